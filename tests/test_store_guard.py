"""GuardedStore: per-call timeout and circuit breaker, against real failures.

A real server that is killed and restarted, and a TCP server that accepts and
never answers. The breaker state machine is also driven with a scripted
in-process Store (not a Redis double: it stands for "any store").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from extauth.config import parse_config
from extauth.metrics import Metrics
from extauth.reasons import Reason
from extauth.server import build_store
from extauth.store import GuardedStore, LeaseRef, Limits, MemoryStore, StoreError, new_lease_id
from extauth.store.base import (
    AcquireResult,
    BanInfo,
    LeaseInfo,
    LeaseKeys,
    QuotaOverride,
    Revocation,
    RevocationKind,
    RevocationListing,
    Store,
    TokenIds,
)
from extauth.store.redis import RedisStore
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.redis


def ref(user: str = "alice", ip: str = "10.0.0.1") -> LeaseRef:
    return LeaseRef(new_lease_id(), "chat", user, ip)


def state(g: GuardedStore) -> str:
    return g.breaker_state


def tried(metrics: Metrics, op: str) -> float:
    """Calls of ``op`` that reached the store (the latency histogram's count)."""
    return metrics.registry.get_sample_value("extauth_store_call_duration_seconds_count", {"op": op}) or 0.0


def failed(metrics: Metrics, op: str) -> float:
    return metrics.registry.get_sample_value("extauth_store_errors_total", {"op": op}) or 0.0


async def _fails_fast(store: GuardedStore, bound: float) -> None:
    started = time.monotonic()
    with pytest.raises(StoreError):
        await store.acquire(ref(), Limits(), 30)
    assert time.monotonic() - started < bound


async def test_killed_redis_opens_the_breaker_and_recovery_closes_it(
        private_redis: RedisServer, key_prefix: str) -> None:
    states: list[str] = []
    metrics = Metrics()
    guarded = GuardedStore(RedisStore.from_url(private_redis.url, key_prefix=key_prefix),
                           timeout=0.2, failure_threshold=3, reset_seconds=2.0,
                           on_state_change=states.append, metrics=metrics)
    try:
        assert (await guarded.acquire(ref(), Limits(connections_per_user=5), 30)).granted
        assert state(guarded) == "closed"

        private_redis.kill()
        for _ in range(3):  # each failure comes back within the per-call timeout
            await _fails_fast(guarded, 0.2 + 0.8)
        assert state(guarded) == "open"
        assert metrics.breaker_open._value.get() == 1

        errors, rejected = failed(metrics, "acquire"), guarded.rejected
        started = time.monotonic()
        for _ in range(100):
            with pytest.raises(StoreError):
                await guarded.acquire(ref(), Limits(), 30)
        assert time.monotonic() - started < 2  # no network wait while open (20 s if each timed out)
        assert guarded.rejected - rejected == 100
        assert failed(metrics, "acquire") - errors == 100

        private_redis.start()  # same port

        deadline = time.monotonic() + 10
        while True:
            if state(guarded) != "open":
                try:
                    await guarded.ping()
                    break
                except StoreError:
                    pass
            assert time.monotonic() < deadline, "breaker never recovered"
            await asyncio.sleep(0.05)
        assert state(guarded) == "closed"
        assert "half_open" in states and states[-1] == "closed"
        assert metrics.breaker_open._value.get() == 0
        assert (await guarded.acquire(ref(), Limits(connections_per_user=5), 30)).granted
        assert tried(metrics, "acquire") >= 5 and guarded.opened >= 1
    finally:
        await guarded.close()


async def test_a_silent_server_can_never_hang_a_call(silent_port: int) -> None:
    inner = RedisStore.from_url(f"redis://127.0.0.1:{silent_port}")
    guarded = GuardedStore(inner, timeout=0.05, failure_threshold=2, reset_seconds=30)
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(StoreError, match="timed out"):
                await guarded.acquire(ref(), Limits(), 30)
            assert time.monotonic() - started < 1
        assert guarded.timeouts == 2
        assert state(guarded) == "open"
        started = time.monotonic()
        for _ in range(100):
            with pytest.raises(StoreError):
                await guarded.acquire(ref(), Limits(), 30)
        assert time.monotonic() - started < 2  # 5 s if each waited for its timeout
        assert guarded.timeouts == 2
    finally:
        await guarded.close()


async def test_background_calls_are_bounded_and_do_not_move_the_breaker(silent_port: int) -> None:
    inner = RedisStore.from_url(f"redis://127.0.0.1:{silent_port}")
    guarded = GuardedStore(inner, timeout=0.05, scan_timeout=0.2, failure_threshold=1, reset_seconds=30)
    try:
        # Access-log refreshes and releases are off the request path: they get the long
        # timeout, still end, and a failure does not open the breaker for checks.
        with pytest.raises(StoreError, match="timed out"):
            await guarded.refresh([ref()], 30)
        with pytest.raises(StoreError, match="timed out"):
            await guarded.release([ref()])
        # So are the jail's once-a-second ban-list sync and the admin and metrics reads:
        # failing them must not refuse acquires.
        for read in (guarded.list_bans, guarded.count_all,
                     lambda: guarded.list_leases("chat", user="alice")):
            with pytest.raises(StoreError, match="timed out after 200 ms"):
                await read()
        assert state(guarded) == "closed"
        with pytest.raises(StoreError):
            await guarded.acquire(ref(), Limits(), 30)
        assert state(guarded) == "open"
        # ...and an open breaker does not refuse them: they still reach the store.
        timeouts = guarded.timeouts
        with pytest.raises(StoreError, match="timed out"):
            await guarded.release([ref()])
        assert guarded.timeouts == timeouts + 1
    finally:
        await guarded.close()


async def test_an_acquire_that_times_out_after_committing_is_taken_back() -> None:
    class SlowAfterCommit(MemoryStore):
        # The script commits, then the reply is late (a stalled loop or network):
        # a fault that cannot be produced on demand with a real server.
        async def acquire(self, ref: LeaseRef, limits: Limits, ttl: float,
                          token: TokenIds | None = None) -> AcquireResult:
            result = await super().acquire(ref, limits, ttl, token)
            await asyncio.sleep(0.2)
            return result

    inner = SlowAfterCommit()
    guarded = GuardedStore(inner, timeout=0.05, failure_threshold=5)
    lease = ref()
    with pytest.raises(StoreError, match="timed out"):
        await guarded.acquire(lease, Limits(connections_per_user=1), 30)
    await guarded.settle()  # the background release
    assert await inner.count(lease.policy, user=lease.user) == 0
    await guarded.close()


async def test_bare_redis_store_has_socket_timeouts(silent_port: int) -> None:
    # Even without the guard, the store's own socket timeout ends the call.
    store = RedisStore.from_url(f"redis://127.0.0.1:{silent_port}", socket_timeout=0.2, connect_timeout=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.ping()
        assert time.monotonic() - started < 2.0
    finally:
        await store.close()


# -- the state machine, with a scripted store and a fake clock ----------------------------


class Scripted(Store):
    """Any store: fails, hangs or answers as told."""

    def __init__(self) -> None:
        self.mode = "ok"  # "ok" | "fail" | "hang" | "bug"
        self.entered = 0
        self.called = asyncio.Event()

    async def _go(self) -> None:
        self.entered += 1
        self.called.set()
        if self.mode == "fail":
            raise StoreError("down")
        if self.mode == "hang":
            await asyncio.Event().wait()  # never answers; only cancellation ends it
        if self.mode == "bug":
            raise AttributeError("'NoneType' object has no attribute 'send_packed_command'")

    async def acquire(self, ref: LeaseRef, limits: Limits, ttl: float,
                      token: TokenIds | None = None) -> AcquireResult:
        await self._go()
        return AcquireResult(True)

    async def refresh(self, refs: Sequence[LeaseRef], ttl: float) -> int:
        await self._go()
        return len(refs)

    async def release(self, refs: Sequence[LeaseRef]) -> int:
        await self._go()
        return len(refs)

    async def count(self, policy: str, *, user: str | None = None, ip: str | None = None) -> int:
        await self._go()
        return 0

    async def list_leases(self, policy: str, *, user: str | None = None,
                          ip: str | None = None) -> list[LeaseInfo]:
        await self._go()
        return []

    async def count_all(self) -> int:
        await self._go()
        return 0

    async def record_hostile(self, ip: str, *, threshold: int, window: float, ban_seconds: float,
                             dry_run: bool) -> bool:
        await self._go()
        return False

    async def ban(self, ip: str, seconds: float, reason: str) -> None:
        await self._go()

    async def unban(self, ip: str) -> bool:
        await self._go()
        return False

    async def list_bans(self) -> list[BanInfo]:
        await self._go()
        return []

    async def ping(self) -> None:
        await self._go()

    async def lease_key(self, candidate: str, replaces: bool = False) -> LeaseKeys:
        await self._go()
        return LeaseKeys("00" * 32)

    async def revoke(self, revocation: Revocation, ttl: float) -> float:
        await self._go()
        return 0.0

    async def unrevoke(self, kind: RevocationKind, subject: str, value: str = "") -> bool:
        await self._go()
        return False

    async def list_revocations(self) -> RevocationListing:
        await self._go()
        return RevocationListing("")

    async def revocation_epoch(self) -> str:
        await self._go()
        return ""

    async def set_quota_override(self, policy: str, user: str, override: QuotaOverride,
                                 ttl: float | None) -> QuotaOverride:
        await self._go()
        return override

    async def get_quota_override(self, policy: str, user: str) -> QuotaOverride | None:
        await self._go()
        return None

    async def clear_quota_override(self, policy: str, user: str) -> bool:
        await self._go()
        return False

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_breaker_state_machine() -> None:
    inner, clock = Scripted(), Clock()
    g = GuardedStore(inner, timeout=0.05, failure_threshold=3, reset_seconds=2.0, clock=clock)
    inner.mode = "fail"
    for _ in range(2):
        with pytest.raises(StoreError):
            await g.ping()
    assert state(g) == "closed"
    inner.mode = "ok"
    await g.ping()  # a success resets the consecutive count
    inner.mode = "fail"
    for _ in range(3):
        with pytest.raises(StoreError):
            await g.ping()
    assert state(g) == "open"
    entered = inner.entered
    with pytest.raises(StoreError, match="breaker"):
        await g.ping()
    assert inner.entered == entered  # refused without touching the store

    clock.now += 2.0
    assert state(g) == "half_open"
    with pytest.raises(StoreError):  # the probe fails: open again for reset_seconds
        await g.ping()
    assert state(g) == "open"
    clock.now += 1.9
    assert state(g) == "open"
    clock.now += 0.2

    # Half open: exactly one probe goes through; concurrent calls are refused.
    inner.mode = "hang"
    inner.called.clear()
    probe = asyncio.create_task(g.ping())
    await inner.called.wait()
    inner.mode = "ok"
    with pytest.raises(StoreError, match="half_open"):
        await g.count("chat", user="alice")
    with pytest.raises(StoreError, match="timed out"):
        await probe
    assert state(g) == "open"
    clock.now += 2.0
    await g.ping()
    assert state(g) == "closed"
    assert g.timeouts == 1


async def test_any_failure_is_a_store_error_and_cancellation_does_not_trip_the_breaker() -> None:
    inner, clock = Scripted(), Clock()
    metrics = Metrics()
    g = GuardedStore(inner, timeout=5, failure_threshold=2, reset_seconds=1.0, clock=clock, metrics=metrics)
    # A client library failing in an unexpected way (redis-py has raised AttributeError on a
    # connection torn down under it) is a store failure like any other: one type, counted.
    inner.mode = "bug"
    with pytest.raises(StoreError, match="AttributeError") as raised:
        await g.ping()
    assert isinstance(raised.value.__cause__, AttributeError)
    assert state(g) == "closed" and failed(metrics, "ping") == 1
    inner.mode = "fail"
    with pytest.raises(StoreError):
        await g.ping()
    assert state(g) == "open"
    clock.now += 1.0
    inner.mode = "hang"
    inner.called.clear()
    probe = asyncio.create_task(g.ping())
    await inner.called.wait()
    probe.cancel()  # the caller gave up on the probe: the probe slot is free again
    with pytest.raises(asyncio.CancelledError):
        await probe
    inner.mode = "ok"
    await g.ping()
    assert state(g) == "closed"


async def test_every_method_is_guarded_and_the_bounds_come_from_the_config() -> None:
    cfg = parse_config({
        "store_timeout_ms": 20, "store_breaker": {"failure_threshold": 4, "reset_seconds": 7},
        "policies": [{"name": "p"}],
    })
    metrics = Metrics()
    g = build_store(cfg, metrics)
    assert (g.timeout, g.failure_threshold, g.reset_seconds) == (0.02, 4, 7)
    r = ref()
    assert (await g.acquire(r, Limits(connections_per_user=1), 30)).granted
    assert (await g.acquire(ref(), Limits(connections_per_user=1), 30)).denied == Reason.QUOTA_USER
    assert await g.refresh([r], 30) == 1
    assert await g.count("chat", user="alice") == 1
    with pytest.raises(ValueError):  # the caller's mistake stays one, never counted as a failure
        await g.count("chat", user="alice", ip="10.0.0.1")
    assert len(await g.list_leases("chat", ip="10.0.0.1")) == 1
    assert await g.count_all() == 1
    assert await g.record_hostile("10.0.0.2", threshold=1, window=1, ban_seconds=1, dry_run=True)
    await g.ban("10.0.0.3", 5, "x")
    assert [b.ip for b in await g.list_bans()] == ["10.0.0.3"]
    assert await g.unban("10.0.0.3")
    assert await g.release([r]) == 1
    await g.ping()
    ops = ("acquire", "refresh", "count", "list_leases", "count_all", "record_hostile", "ban",
           "list_bans", "unban", "release", "ping")
    assert sum(tried(metrics, op) for op in ops) == 12 and sum(failed(metrics, op) for op in ops) == 0
    await g.close()
    with pytest.raises(StoreError):  # a closed MemoryStore refuses
        await g.ping()


async def test_the_first_lease_key_load_is_a_request_path_call_and_the_periodic_check_is_not() -> None:
    # Every check that issues a lease waits on the first load (LeaseTagger.load shares one call
    # and bounds each check's wait by ``timeout``): an outage met there must open the breaker,
    # and an open breaker must refuse it at once. The periodic check of a loaded key
    # (replaces=True) stays off the request path, like refresh and release.
    inner, clock = Scripted(), Clock()
    g = GuardedStore(inner, timeout=0.01, scan_timeout=0.1, failure_threshold=1, reset_seconds=2.0,
                     clock=clock)
    inner.mode = "hang"
    with pytest.raises(StoreError, match="timed out after 100 ms"):  # the long bound, shared
        await g.lease_key("00" * 32)
    assert state(g) == "open" and g.timeouts == 1
    entered = inner.entered
    with pytest.raises(StoreError, match="breaker"):
        await g.lease_key("00" * 32)
    assert inner.entered == entered  # refused without touching the store
    inner.mode = "ok"
    assert (await g.lease_key("00" * 32, replaces=True)).current == "00" * 32  # not refused
    assert state(g) == "open"  # ...and does not move it
    clock.now += 2.0
    await g.lease_key("00" * 32)  # the probe
    assert state(g) == "closed"
