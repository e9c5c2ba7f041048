"""Prometheus metrics. One ``Metrics`` object per process, built with its own registry
so tests and embedded use never collide on the global one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.jwks_fetches = Counter(
            "extauth_jwks_fetches_total", "JWKS fetches by policy and result", ["policy", "result"],
            registry=r,
        )
        self.jwks_age = Gauge(
            "extauth_jwks_age_seconds", "Age of the key set in use, by policy", ["policy"], registry=r
        )
        self.bans = Counter("extauth_bans_total", "Bans by kind (enforced, dry_run, manual)", ["kind"],
                            registry=r)
        self.hostile = Counter("extauth_hostile_signals_total", "Hostile signals counted by the jail",
                               ["reason"], registry=r)
        self.reloads = Counter("extauth_config_reloads_total", "Config reloads by result", ["result"],
                               registry=r)
        self.shadow = Counter("extauth_shadow_denials_total", "Would-be denials in shadow mode",
                              ["policy", "reason"], registry=r)
