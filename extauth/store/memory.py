"""MemoryStore: the embedded store for a single replica (``memory://``).

Complete semantics, identical to RedisStore (the same contract suite runs
against both): leases with expiry, sliding attempt windows, hostile counting
and bans. Nothing here awaits while it mutates state, so every method is
atomic on the event loop without a lock. The clock is wall-clock unix seconds
(``time.time`` by default) and injectable, so tests can drive time.

State lives in this process only: with more than one replica use Redis.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence

from extauth.reasons import Reason
from extauth.store.base import (
    MAX_REVOCATIONS,
    PREVIOUS_LEASE_KEYS,
    RATE_WINDOW,
    AcquireResult,
    BanInfo,
    LeaseInfo,
    LeaseKeys,
    LeaseRef,
    Limits,
    QuotaOverride,
    Revocation,
    RevocationKind,
    RevocationLimitError,
    RevocationListing,
    Store,
    StoreError,
    TokenIds,
    check_override,
    one_subject,
    retry_seconds,
)

_SubjectKey = tuple[str, str, str]  # (kind "u"|"ip", subject, policy)


class _Log:
    """A sliding log of admitted timestamps."""

    __slots__ = ("times", "window")

    def __init__(self, window: float) -> None:
        self.times: deque[float] = deque()
        self.window = window

    def prune(self, now: float, window: float | None = None) -> None:
        if window is not None:
            self.window = window
        while self.times and self.times[0] <= now - self.window:
            self.times.popleft()


class _Signals:
    """Hostile signals in a sliding window, ``{signal: latest time}`` in time order; a signal
    seen again moves to the end, so it is counted once."""

    __slots__ = ("seen", "window")

    def __init__(self, window: float) -> None:
        self.seen: dict[str, float] = {}
        self.window = window

    def add(self, signal: str, now: float, window: float) -> int:
        self.window = window
        self.prune(now)
        self.seen.pop(signal, None)
        self.seen[signal] = now
        return len(self.seen)

    def prune(self, now: float) -> None:
        seen = self.seen
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] > now - self.window:
                return
            del seen[oldest]


class _Leases(dict[str, tuple[float, LeaseRef]]):
    """One subject's leases, ``{lease_id: (expires_at, ref)}``, with a min-heap of expiries,
    so that dropping the expired ones and finding the earliest cost O(log n) per lease
    rather than a scan of all of them on every acquire (an office behind one NAT address
    holds thousands under one IP). Heap entries are checked against the dict when popped:
    a refreshed or released lease leaves a stale one, dropped when it surfaces, and the
    heap is rebuilt when stale entries outnumber live ones."""

    __slots__ = ("heap",)

    def __init__(self) -> None:
        super().__init__()
        self.heap: list[tuple[float, str]] = []

    def put(self, lease_id: str, expires: float, ref: LeaseRef) -> None:
        self[lease_id] = (expires, ref)
        heapq.heappush(self.heap, (expires, lease_id))
        if len(self.heap) > 2 * len(self) + 64:
            self.heap = [(exp, lid) for lid, (exp, _) in self.items()]
            heapq.heapify(self.heap)

    def _stale(self, top: tuple[float, str]) -> bool:
        entry = self.get(top[1])
        return entry is None or entry[0] != top[0]

    def prune(self, now: float) -> None:
        heap = self.heap
        while heap and (heap[0][0] <= now or self._stale(heap[0])):
            exp, lid = heapq.heappop(heap)
            entry = self.get(lid)
            if entry is not None and entry[0] == exp:
                del self[lid]

    def earliest(self) -> float:
        """The earliest expiry among the leases (call after prune, on a non-empty set)."""
        return self.heap[0][0]


class MemoryStore(Store):
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # (kind, subject, policy) -> {lease_id: (expires_at, ref)}
        self._leases: dict[_SubjectKey, _Leases] = {}
        self._rates: dict[_SubjectKey, _Log] = {}
        self._hostile: dict[str, _Signals] = {}
        self._signal_ids = itertools.count()  # for signals that name no evidence
        self._bans: dict[str, tuple[float, str]] = {}
        self._closed = False
        self._ops = 0
        self._lease_key: str | None = None  # one replica: its tagger's own (lease_key)
        self._previous_keys: tuple[str, ...] = ()
        # (kind, subject, value) -> revocation; value "" for "before" (one per subject).
        self._revoked: dict[tuple[str, str, str], Revocation] = {}
        self._overrides: dict[tuple[str, str], QuotaOverride] = {}  # (policy, user)
        self._revocation_epoch = secrets.token_hex(8)

    # -- helpers ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    def _live(self, key: _SubjectKey, now: float) -> _Leases:
        leases = self._leases.get(key)
        if leases is None:
            return _Leases()
        leases.prune(now)
        if not leases:
            del self._leases[key]
        return leases

    def _put(self, key: _SubjectKey, ref: LeaseRef, expires: float) -> None:
        leases = self._leases.get(key)
        if leases is None:
            leases = self._leases[key] = _Leases()
        leases.put(ref.lease_id, expires, ref)

    def _ban_of(self, ip: str, now: float) -> tuple[float, str] | None:
        ban = self._bans.get(ip)
        if ban is not None and ban[0] <= now:
            del self._bans[ip]
            return None
        return ban

    def _rate_log(self, key: _SubjectKey, now: float) -> _Log | None:
        log = self._rates.get(key)
        if log is not None:
            log.prune(now, RATE_WINDOW)
            if not log.times:
                del self._rates[key]
                return None
        return log

    @staticmethod
    def _subject(policy: str, user: str | None, ip: str | None) -> _SubjectKey:
        one_subject(user, ip)
        return ("u", user, policy) if user is not None else ("ip", ip or "", policy)

    def _sweep(self, now: float) -> None:
        """Drop idle state now and then, so memory tracks live state only (like Redis key expiry)."""
        self._ops += 1
        if self._ops % 1024:
            return
        for key in list(self._leases):
            self._live(key, now)
        for rk in list(self._rates):
            self._rate_log(rk, now)
        for ip in list(self._hostile):
            self._hostile[ip].prune(now)
            if not self._hostile[ip].seen:
                del self._hostile[ip]
        for ip in list(self._bans):
            self._ban_of(ip, now)
        self._live_revocations(now)

    def _live_revocations(self, now: float) -> dict[tuple[str, str, str], Revocation]:
        for key in [k for k, r in self._revoked.items() if r.expires_at <= now]:
            del self._revoked[key]
        return self._revoked

    def _revoked_token(self, user: str, token: TokenIds, now: float) -> bool:
        revoked = self._revoked
        if not revoked:
            return False
        for key in (("jti", user, token.jti), ("sid", user, token.sid)):
            if key[2] is not None:
                rev = revoked.get(key)  # type: ignore[arg-type]
                if rev is not None and rev.expires_at > now:
                    return True
        before = revoked.get(("before", user, ""))
        return (before is not None and before.expires_at > now and before.before is not None
                and (token.issued_at is None or token.issued_at < before.before))

    # -- leases ----------------------------------------------------------

    async def acquire(self, ref: LeaseRef, limits: Limits, ttl: float,
                      token: TokenIds | None = None) -> AcquireResult:
        self._check_open()
        now = self._clock()
        self._sweep(now)
        ban = self._ban_of(ref.ip, now) if limits.enforce_bans else None
        if ban is not None:
            return AcquireResult(False, Reason.BANNED, retry_seconds(ban[0] - now))
        if token is not None and ref.user is not None and self._revoked_token(ref.user, token, now):
            return AcquireResult(False, Reason.TOKEN_REVOKED)

        if ref.user is not None and self._overrides:
            limits = self._with_override(limits, ref.policy, ref.user, now)
        ip_key: _SubjectKey = ("ip", ref.ip, ref.policy)
        if ref.lease_id in self._live(ip_key, now):
            return AcquireResult(True)  # idempotent, as acquire.lua: a retried call is admitted again
        user_key: _SubjectKey | None = ("u", ref.user, ref.policy) if ref.user is not None else None
        rate_checks: list[tuple[_SubjectKey, int | None, Reason]] = [
            (ip_key, limits.attempts_per_ip_per_minute, Reason.RATE_IP)
        ]
        quota_checks: list[tuple[_SubjectKey, int | None, Reason]] = []
        if user_key is not None:
            rate_checks.append((user_key, limits.attempts_per_user_per_minute, Reason.RATE_USER))
            quota_checks.append((user_key, limits.connections_per_user, Reason.QUOTA_USER))
        quota_checks.append((ip_key, limits.connections_per_ip, Reason.QUOTA_IP))

        for key, limit, reason in rate_checks:
            if limit is None:
                continue
            log = self._rate_log(key, now)
            if log is not None and len(log.times) >= limit:
                return AcquireResult(False, reason, retry_seconds(log.times[0] + RATE_WINDOW - now))
        for key, limit, reason in quota_checks:
            live = self._live(key, now)
            if limit is not None and len(live) >= limit:
                return AcquireResult(False, reason, retry_seconds(live.earliest() - now))

        for key, limit, _ in rate_checks:
            if limit is not None:
                self._rates.setdefault(key, _Log(RATE_WINDOW)).times.append(now)
        expires = now + ttl
        for lease_key in (user_key, ip_key):
            if lease_key is not None:
                self._put(lease_key, ref, expires)
        return AcquireResult(True)

    def _keys_of(self, ref: LeaseRef) -> list[_SubjectKey]:
        keys: list[_SubjectKey] = [("ip", ref.ip, ref.policy)]
        if ref.user is not None:
            keys.append(("u", ref.user, ref.policy))
        return keys

    async def refresh(self, refs: Sequence[LeaseRef], ttl: float) -> int:
        self._check_open()
        now = self._clock()
        live = 0
        for ref in refs:
            was_live = False
            for key in self._keys_of(ref):
                was_live |= ref.lease_id in self._live(key, now)
                # Put back a lost lease too: see lua/refresh.lua for why.
                self._put(key, ref, now + ttl)
            live += was_live
        return live

    async def release(self, refs: Sequence[LeaseRef]) -> int:
        self._check_open()
        present = 0
        for ref in refs:
            was = False
            for key in self._keys_of(ref):
                leases = self._leases.get(key)
                if leases is not None and leases.pop(ref.lease_id, None) is not None:
                    was = True
                    if not leases:
                        del self._leases[key]
            present += was
        return present

    async def count(self, policy: str, *, user: str | None = None, ip: str | None = None) -> int:
        self._check_open()
        return len(self._live(self._subject(policy, user, ip), self._clock()))

    async def list_leases(
        self, policy: str, *, user: str | None = None, ip: str | None = None
    ) -> list[LeaseInfo]:
        self._check_open()
        live = self._live(self._subject(policy, user, ip), self._clock())
        return sorted(
            (LeaseInfo(lid, r.policy, r.user, r.ip, exp) for lid, (exp, r) in live.items()),
            key=lambda li: (li.expires_at, li.lease_id),
        )

    async def count_all(self) -> int:
        """Every live lease (each counted once, under its IP). O(leases)."""
        self._check_open()
        now = self._clock()
        return sum(len(self._live(key, now)) for key in list(self._leases) if key[0] == "ip")

    # -- rates, abuse, bans ------------------------------------------------

    async def record_hostile(self, ip: str, *, threshold: int, window: float, ban_seconds: float,
                             dry_run: bool, signal: str | None = None) -> bool:
        self._check_open()
        now = self._clock()
        self._sweep(now)
        signals = self._hostile.setdefault(ip, _Signals(window))
        evidence = signal if signal is not None else f"#{next(self._signal_ids)}"
        if signals.add(evidence, now, window) < threshold:
            return False
        del self._hostile[ip]
        if not dry_run:
            self._bans[ip] = (now + ban_seconds, "hostile")
        return True

    async def ban(self, ip: str, seconds: float, reason: str) -> None:
        self._check_open()
        self._bans[ip] = (self._clock() + seconds, reason)

    async def unban(self, ip: str) -> bool:
        self._check_open()
        return self._ban_of(ip, self._clock()) is not None and self._bans.pop(ip, None) is not None

    async def list_bans(self) -> list[BanInfo]:
        self._check_open()
        now = self._clock()
        out = []
        for ip in list(self._bans):
            ban = self._ban_of(ip, now)
            if ban is not None:
                out.append(BanInfo(ip, ban[0], ban[1]))
        return sorted(out, key=lambda b: (b.expires_at, b.ip))

    async def ping(self) -> None:
        self._check_open()

    async def lease_key(self, candidate: str, replaces: bool = False) -> LeaseKeys:
        self._check_open()
        if self._lease_key is None:
            self._lease_key = candidate
        elif replaces and candidate != self._lease_key and candidate not in self._previous_keys:
            self._previous_keys = (*self._previous_keys, candidate)[-PREVIOUS_LEASE_KEYS:]
        return LeaseKeys(self._lease_key, self._previous_keys)

    # -- revocation --------------------------------------------------------

    # -- per-user quota overrides ------------------------------------------------------------

    def _override_of(self, policy: str, user: str, now: float) -> QuotaOverride | None:
        found = self._overrides.get((policy, user))
        if found is not None and found.expires_at is not None and found.expires_at <= now:
            del self._overrides[(policy, user)]
            return None
        return found

    def _with_override(self, limits: Limits, policy: str, user: str, now: float) -> Limits:
        found = self._override_of(policy, user, now)
        if found is None:
            return limits
        return dataclasses.replace(
            limits,
            connections_per_user=found.connections_per_user or limits.connections_per_user,
            attempts_per_user_per_minute=found.attempts_per_user_per_minute
            or limits.attempts_per_user_per_minute)

    async def set_quota_override(self, policy: str, user: str, override: QuotaOverride,
                                 ttl: float | None) -> QuotaOverride:
        self._check_open()
        check_override(override)
        stored = dataclasses.replace(override, expires_at=None if ttl is None else self._clock() + ttl)
        self._overrides[(policy, user)] = stored
        return stored

    async def get_quota_override(self, policy: str, user: str) -> QuotaOverride | None:
        self._check_open()
        return self._override_of(policy, user, self._clock())

    async def clear_quota_override(self, policy: str, user: str) -> bool:
        self._check_open()
        return self._overrides.pop((policy, user), None) is not None

    async def revoke(self, revocation: Revocation, ttl: float) -> float:
        self._check_open()
        now = self._clock()
        if (revocation.kind == "before") != (revocation.before is not None):
            raise ValueError("a 'before' revocation, and only one, names its instant")
        live = self._live_revocations(now)
        before = revocation.before
        value = "" if before is not None else revocation.value
        key = (revocation.kind, revocation.subject, value)
        expires = (now if before is None else before) + ttl
        old = live.get(key)
        if old is not None:
            # Revoking again never shortens an entry, nor moves "before" back.
            expires = max(expires, old.expires_at)
            if before is not None and old.before is not None:
                before = max(before, old.before)
        if expires <= now:
            return expires
        if old is None and len(live) >= MAX_REVOCATIONS:
            raise RevocationLimitError(f"{MAX_REVOCATIONS} revocations are in force")
        live[key] = Revocation(revocation.kind, revocation.subject, value, before, expires)
        self._revocation_epoch = secrets.token_hex(8)
        return expires

    async def unrevoke(self, kind: RevocationKind, subject: str, value: str = "") -> bool:
        self._check_open()
        live = self._live_revocations(self._clock())
        found = live.pop((kind, subject, value if kind != "before" else ""), None) is not None
        if found:
            self._revocation_epoch = secrets.token_hex(8)
        return found

    async def list_revocations(self) -> RevocationListing:
        self._check_open()
        live = self._live_revocations(self._clock())
        entries = sorted(live.values(), key=lambda r: (r.subject, r.kind, r.value))
        return RevocationListing(self._revocation_epoch, tuple(entries))

    async def revocation_epoch(self) -> str:
        self._check_open()
        return self._revocation_epoch

    async def close(self) -> None:
        self._closed = True
