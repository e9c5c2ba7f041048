"""Prometheus metrics. One ``Metrics`` object per process, built with its own registry
so tests and embedded use never collide on the global one.

Names are a contract (dashboards and alerts use them); see docs/operations.md.
Values that live elsewhere (JWKS fetch counters and key age, kept by each
verifier) are read at scrape time by a collector instead of being copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Check latency buckets tuned for a sub-millisecond service.
_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "extauth_decisions_total", "Check decisions by policy, result and reason",
            ["policy", "result", "reason"], registry=r,
        )
        self.check_seconds = Histogram(
            "extauth_check_duration_seconds", "Server-side Check latency", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "extauth_store_call_duration_seconds", "Store call latency by operation", ["op"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.store_errors = Counter(
            "extauth_store_errors_total", "Store calls that failed, by operation", ["op"], registry=r
        )
        self.breaker_open = Gauge(
            "extauth_store_breaker_open", "1 while the store circuit breaker is open", registry=r
        )
        self.active_leases = Gauge(
            "extauth_active_leases", "Live leases in the store (sampled from the store)", registry=r
        )
        self.accesslog_entries = Counter(
            "extauth_accesslog_entries_total", "Envoy access-log entries by type and outcome",
            ["type", "outcome"], registry=r,
        )
        self.bans = Counter("extauth_bans_total", "Bans by kind (enforced, dry_run, manual)", ["kind"],
                            registry=r)
        self.hostile = Counter("extauth_hostile_signals_total", "Hostile signals counted by the jail",
                               ["reason"], registry=r)
        self.reloads = Counter("extauth_config_reloads_total", "Config reloads by result", ["result"],
                               registry=r)
        self.shadow = Counter("extauth_shadow_denials_total", "Would-be denials in shadow mode",
                              ["policy", "reason"], registry=r)


class _VerifierStats(Protocol):
    @property
    def jwks_fetches(self) -> int: ...
    @property
    def jwks_fetch_failures(self) -> int: ...
    @property
    def key_age_seconds(self) -> float | None: ...


class JwksCollector(Collector):
    """extauth_jwks_fetches_total{policy,result} and extauth_jwks_age_seconds{policy},
    read from the verifiers of the config in force at scrape time."""

    def __init__(self, verifiers_by_policy: Callable[[], Mapping[str, _VerifierStats]]) -> None:
        self._verifiers = verifiers_by_policy

    def collect(self) -> Iterable[Metric]:
        fetches = CounterMetricFamily("extauth_jwks_fetches", "JWKS fetches by policy and result",
                                      labels=["policy", "result"])
        age = GaugeMetricFamily("extauth_jwks_age_seconds", "Age of the key set in use, by policy",
                                labels=["policy"])
        for policy, v in self._verifiers().items():
            fetches.add_metric([policy, "ok"], v.jwks_fetches - v.jwks_fetch_failures)
            fetches.add_metric([policy, "error"], v.jwks_fetch_failures)
            key_age = v.key_age_seconds
            if key_age is not None:
                age.add_metric([policy], key_age)
        yield fetches
        yield age
