"""Prometheus metrics. One ``Metrics`` object per process, built with its own registry
so tests and embedded use never collide on the global one.

Names are a contract (dashboards and alerts use them); see docs/operations.md.
Values that live elsewhere (JWKS fetch counters and key age, kept by each
verifier) are read at scrape time by a collector instead of being copied.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Store call latency buckets tuned for a sub-millisecond service.
_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# Check latency: a cached decision takes tens of microseconds, so the low end is finer (a
# p99 read off this histogram is within 25-50 µs of the truth below 300 µs).
_CHECK_BUCKETS = (0.000025, 0.00005, 0.000075, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.00075,
                  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The two metrics every Check touches are single-writer (event loop) and lock-free.
        self.decisions = LoopCounter(
            "extauth_decisions", "Check decisions by policy, result and reason",
            ("policy", "result", "reason"), registry=r,
        )
        self.check_seconds = LoopHistogram(
            "extauth_check_duration_seconds",
            "Server-side Check latency: from the gRPC handler's start to its decision",
            _CHECK_BUCKETS, registry=r,
        )
        self.memo_hits = LoopCounter(
            "extauth_allow_memo_hits", "Checks answered from the allow memo (extauth/memo.py)", (),
            registry=r,
        ).labels()
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
        self.leases_restored = Counter(
            "extauth_leases_restored_total",
            "Leases of open connections the store had lost (restart, flush, refreshes cut off for a "
            "TTL), put back by their refresh", registry=r,
        )
        self.leases_past_deadline = Counter(
            "extauth_leases_past_deadline_total",
            "Leases given back at once because their check ended after Envoy's deadline (Envoy had "
            "answered the client itself): the event loop stalled past ext_authz's timeout", registry=r,
        )
        self.revocations = Gauge(
            "extauth_revocations", "Revocations in force, by kind (jti, sid, before), as this replica's "
            "copy holds them", ["kind"], registry=r,
        )
        self.sessions_ended = Counter(
            "extauth_sessions_ended_total",
            "WebSockets ended, by policy and cause: bound (Envoy closed it at its session bound, "
            "max_stream_duration) or other (the client, the upstream or an error closed it)",
            ["policy", "cause"], registry=r,
        )
        self.bans = Counter("extauth_bans_total", "Bans by kind (enforced, dry_run, manual)", ["kind"],
                            registry=r)
        self.hostile = Counter("extauth_hostile_signals_total", "Hostile signals counted by the jail",
                               ["reason"], registry=r)
        self.reloads = Counter("extauth_config_reloads_total", "Config reloads by result", ["result"],
                               registry=r)
        self.shadow = Counter("extauth_shadow_denials_total", "Would-be denials in shadow mode",
                              ["policy", "reason"], registry=r)


class _LoopCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter for the event-loop thread only.

    prometheus_client's Counter takes a lock on every ``inc``; on the Check path that lock
    costs more than a cached decision's logic. Here the one writer is the event loop and the
    scrape thread only reads ints, which the GIL keeps whole.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 registry: CollectorRegistry | None = None) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _LoopCount] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> _LoopCount:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}")
        child = self._children.get(values)
        if child is None:
            child = self._children.setdefault(values, _LoopCount())
        return child

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class LoopHistogram(Collector):
    """A histogram for the event-loop thread only: ``observe`` is a bisect and two adds.

    Counts are kept per bucket and made cumulative at scrape time, so a scrape that races
    an observation can lag by one sample but never shows a count below a bucket.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], *,
                 registry: CollectorRegistry | None = None) -> None:
        self._name = name
        self._doc = documentation
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterable[Metric]:
        counts = list(self._counts)
        cumulative, running = [], 0
        for bound, count in zip((*map(floatToGoString, self._bounds), "+Inf"), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family = HistogramMetricFamily(self._name, self._doc)
        family.add_metric([], cumulative, self._sum)
        yield family


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
