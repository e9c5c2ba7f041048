"""GuardedStore: a per-call timeout and a circuit breaker around any Store.

Every call runs under ``asyncio.timeout`` (``timeout``), so a store that hangs can never
hang a request. After ``failure_threshold`` consecutive failures the breaker *opens*:
every call raises StoreError at once, with no network wait, so an outage costs nothing
per request. After ``reset_seconds`` one call is let through as a probe (*half open*;
concurrent calls are still refused); its success closes the breaker, its failure opens it
for another ``reset_seconds``. Recovery is automatic when the store returns.

Every failure of the wrapped store (its StoreError, a timeout, a socket error, anything a
client library raises) leaves as StoreError and counts; only the caller's cancellation
passes through, uncounted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from extauth.aio import BackgroundTasks
from extauth.store.base import (
    AcquireResult,
    BanInfo,
    BreakerOpenError,
    LeaseInfo,
    LeaseKeys,
    LeaseRef,
    Limits,
    QuotaOverride,
    Revocation,
    RevocationKind,
    RevocationListing,
    Store,
    StoreError,
    StoreTimeoutError,
    TokenIds,
    one_subject,
)

if TYPE_CHECKING:
    from extauth.metrics import Metrics

T = TypeVar("T")
# Background releases of acquires that timed out; past this the lease TTL is the backstop.
_MAX_COMPENSATIONS = 1024
BreakerState = Literal["closed", "open", "half_open"]


class GuardedStore(Store):
    """The store the server holds (a ``RequestStore``): every call bounded, failures as StoreError."""

    timeout: float
    failure_threshold: int
    reset_seconds: float

    def __init__(
        self,
        inner: Store,
        *,
        timeout: float = 0.05,
        scan_timeout: float = 1.0,
        failure_threshold: int = 3,
        reset_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[BreakerState], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.inner = inner
        self.scan_timeout = scan_timeout  # off the request path (count_all may SCAN)
        self.configure(timeout=timeout, failure_threshold=failure_threshold, reset_seconds=reset_seconds)
        self._clock = clock
        self._on_state_change = on_state_change
        self.metrics = metrics
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False
        # Monotonic, never reset; calls, errors and latency are in the Prometheus metrics.
        self.timeouts = 0  # calls cut off by the per-call timeout
        self.rejected = 0  # calls refused at once because the breaker was open
        self.opened = 0  # times the breaker opened
        self._compensations = BackgroundTasks(limit=_MAX_COMPENSATIONS)
        # The latency histogram's child per op, looked up once: labels() is a locked dict
        # lookup that every store call would otherwise pay.
        self._latency: dict[str, Any] = {}

    def configure(self, *, timeout: float, failure_threshold: int, reset_seconds: float) -> None:
        """Set the bounds (at start and on a config reload); the breaker's current state is kept."""
        if timeout <= 0 or failure_threshold < 1 or reset_seconds <= 0:
            raise ValueError("timeout and reset_seconds must be > 0, failure_threshold >= 1")
        self.timeout = timeout
        self.scan_timeout = max(self.scan_timeout, timeout)
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds

    # -- breaker -------------------------------------------------------------

    @property
    def breaker_state(self) -> BreakerState:
        """"closed", "open" or "half_open" (open turns half_open once reset_seconds have passed)."""
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_seconds:
            return "half_open"
        return self._state

    def _set_state(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            if self.metrics is not None:
                self.metrics.breaker_open.set(0 if state == "closed" else 1)
            if self._on_state_change is not None:
                self._on_state_change(state)

    def _admit(self) -> bool:
        """Raise StoreError when the breaker refuses the call; True when this call is the probe."""
        if self._state == "closed":
            return False
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_seconds:
            self._set_state("half_open")
        if self._state == "half_open" and not self._probing:
            self._probing = True
            return True
        self.rejected += 1
        raise BreakerOpenError(f"store circuit breaker is {self._state}")

    def _failure(self, probe: bool, op: str, started: float) -> None:
        self._observe(op, started)
        self._count_error(op)
        self._consecutive += 1
        if probe:
            self._probing = False
        if probe or (self._state == "closed" and self._consecutive >= self.failure_threshold):
            self._opened_at = self._clock()
            self.opened += 1
            self._set_state("open")

    def _success(self, probe: bool) -> None:
        self._consecutive = 0
        if probe:
            self._probing = False
        self._set_state("closed")

    async def _guard(self, op: str, call: Callable[[], Awaitable[T]], limit: float | None = None) -> T:
        try:
            probe = self._admit()
        except StoreError:
            self._count_error(op)
            raise
        limit = self.timeout if limit is None else limit
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # caller's cancellation when the inner call completes at the same moment,
            # leaving a cancelled task running (it hung the jail's shutdown).
            async with asyncio.timeout(limit):
                result = await call()
        except TimeoutError:
            self.timeouts += 1
            self._failure(probe, op, started)
            raise StoreTimeoutError(f"store call {op} timed out after {limit * 1000:.0f} ms") from None
        except StoreError:
            self._failure(probe, op, started)
            raise
        except Exception as e:
            self._failure(probe, op, started)
            raise _store_error(e) from e
        except BaseException:
            # The caller cancelled us: count nothing, but never leave the probe slot taken.
            if probe:
                self._probing = False
            raise
        self._observe(op, started)
        self._success(probe)
        return result

    def _observe(self, op: str, started: float) -> None:
        if self.metrics is not None:
            child = self._latency.get(op)
            if child is None:
                child = self._latency[op] = self.metrics.store_seconds.labels(op)
            child.observe(time.perf_counter() - started)

    def _count_error(self, op: str) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(op).inc()

    # -- Store -----------------------------------------------------------------

    async def acquire(self, ref: LeaseRef, limits: Limits, ttl: float,
                      token: TokenIds | None = None) -> AcquireResult:
        admitted = False

        async def call() -> AcquireResult:
            nonlocal admitted
            admitted = True
            return await self.inner.acquire(ref, limits, ttl, token)

        try:
            return await self._guard("acquire", call)
        except (StoreError, asyncio.CancelledError):
            if admitted:
                # The script may have committed before the timeout fired (a stalled event
                # loop counts against the timeout too), or before grpc.aio cancelled the
                # check at Envoy's deadline: either way no lease id reaches Envoy, so take
                # the lease back rather than hold the slot for a whole TTL.
                self.release_later(ref)
            raise

    def release_later(self, ref: LeaseRef) -> None:
        """Release a lease in the background (bounded; the lease TTL is the backstop): for an
        acquire whose answer never reaches Envoy."""
        self._compensations.spawn(lambda: self.release([ref]))  # failures count in release

    # Refresh and release come from Envoy's access-log stream, off the request
    # path: they are never refused by the breaker (which request-path stalls can
    # open) and get the long timeout, but they do not move the breaker either.

    async def refresh(self, refs: Sequence[LeaseRef], ttl: float) -> int:
        return await self._background("refresh", lambda: self.inner.refresh(refs, ttl))

    async def release(self, refs: Sequence[LeaseRef]) -> int:
        return await self._background("release", lambda: self.inner.release(refs))

    async def _background(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.scan_timeout):
                result = await call()
        except TimeoutError:
            self.timeouts += 1
            self._count_error(op)
            raise StoreTimeoutError(
                f"store call {op} timed out after {self.scan_timeout * 1000:.0f} ms") from None
        except StoreError:
            self._count_error(op)
            raise
        except Exception as e:
            self._count_error(op)
            raise _store_error(e) from e
        self._observe(op, started)
        return result

    async def count(self, policy: str, *, user: str | None = None, ip: str | None = None) -> int:
        one_subject(user, ip)  # the caller's mistake, not the store's failure
        return await self._guard("count", lambda: self.inner.count(policy, user=user, ip=ip))

    async def list_leases(
        self, policy: str, *, user: str | None = None, ip: str | None = None
    ) -> list[LeaseInfo]:
        one_subject(user, ip)
        # Admin reads, like count_all (the metrics sampler, admin Stats) and list_bans: off the
        # request path, so slow ones must not open the breaker that refuses acquires.
        return await self._background("list_leases", lambda: self.inner.list_leases(policy, user=user, ip=ip))

    async def count_all(self) -> int:
        return await self._background("count_all", self.inner.count_all)

    async def record_hostile(self, ip: str, *, threshold: int, window: float, ban_seconds: float,
                             dry_run: bool, signal: str | None = None) -> bool:
        return await self._guard("record_hostile", lambda: self.inner.record_hostile(
            ip, threshold=threshold, window=window, ban_seconds=ban_seconds, dry_run=dry_run,
            signal=signal))

    async def ban(self, ip: str, seconds: float, reason: str) -> None:
        await self._guard("ban", lambda: self.inner.ban(ip, seconds, reason))

    async def unban(self, ip: str) -> bool:
        return await self._guard("unban", lambda: self.inner.unban(ip))

    async def list_bans(self) -> list[BanInfo]:
        # The jail's sync, off the request path: a long list read under the request timeout
        # would fail and open the breaker that refuses every acquire.
        return await self._background("list_bans", self.inner.list_bans)

    async def ping(self) -> None:
        await self._guard("ping", self.inner.ping)

    async def lease_key(self, candidate: str, replaces: bool = False) -> LeaseKeys:
        def call() -> Awaitable[LeaseKeys]:
            return self.inner.lease_key(candidate, replaces)

        if replaces:  # the periodic check of a loaded key: off the request path
            return await self._background("lease_key", call)
        # The first load is a request-path call (refused while open, its failures count) with
        # the long bound: LeaseTagger.load shares it and no check waits on it past ``timeout``.
        return await self._guard("lease_key", call, limit=self.scan_timeout)

    # Revocations are written by the admin API and read by every replica's poller
    # (extauth/revocation.py), off the request path like list_bans.

    async def revoke(self, revocation: Revocation, ttl: float) -> float:
        return await self._background("revoke", lambda: self.inner.revoke(revocation, ttl))

    async def unrevoke(self, kind: RevocationKind, subject: str, value: str = "") -> bool:
        return await self._background("unrevoke", lambda: self.inner.unrevoke(kind, subject, value))

    async def list_revocations(self) -> RevocationListing:
        return await self._background("list_revocations", self.inner.list_revocations)

    async def revocation_epoch(self) -> str:
        return await self._background("revocation_epoch", self.inner.revocation_epoch)

    # Quota overrides are written and read by the admin API, off the request path.

    async def set_quota_override(self, policy: str, user: str, override: QuotaOverride,
                                 ttl: float | None) -> QuotaOverride:
        return await self._background(
            "set_quota_override", lambda: self.inner.set_quota_override(policy, user, override, ttl))

    async def get_quota_override(self, policy: str, user: str) -> QuotaOverride | None:
        return await self._background("get_quota_override",
                                      lambda: self.inner.get_quota_override(policy, user))

    async def clear_quota_override(self, policy: str, user: str) -> bool:
        return await self._background("clear_quota_override",
                                      lambda: self.inner.clear_quota_override(policy, user))

    async def close(self) -> None:
        """Closes the wrapped store; never refused by the breaker."""
        await self.settle()
        await self.inner.close()

    async def settle(self) -> None:
        """Wait (bounded) for background releases of timed-out acquires."""
        await self._compensations.wait(self.scan_timeout)


def _store_error(e: Exception) -> StoreError:
    """A failure of the wrapped store as the one error type callers catch."""
    if isinstance(e, OSError):
        return StoreError(f"store unreachable: {e}")
    # Anything else a client library raises mid-call (redis-py has raised AttributeError on
    # a connection torn down under it) is the store failing too, not the caller's bug.
    return StoreError(f"store call failed: {type(e).__name__}")
