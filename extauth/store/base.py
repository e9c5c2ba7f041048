"""The store seam: leases (concurrent connections), attempt rate limits and bans.

Every replica of extauth shares one store, so the limits hold across every
Envoy and every replica. Two implementations: ``MemoryStore`` (``memory://``,
one replica) and ``RedisStore`` (standalone, TLS, Cluster).

A *lease* is one counted WebSocket. It is listed under its user and its client
IP with an expiry; a slot is counted only while its lease is live, so a crashed
Envoy or a lost access-log entry can never hold a slot longer than the TTL.

Callers type against the narrow protocol they need (``LeaseLog`` for the access log,
``Bans`` for the jail, ``RequestStore`` for the pipeline); ``Store`` composes them for
the implementations.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from extauth.reasons import Reason

# The attempt-rate window (``Limits.attempts_per_*_per_minute``), seconds.
RATE_WINDOW = 60.0


class StoreError(Exception):
    """The store could not answer: the one error type out of the guarded store."""


class StoreTimeoutError(StoreError):
    """A store call ran past its bound."""


class BreakerOpenError(StoreError):
    """The circuit breaker refused the call without trying the store."""


def one_subject(user: str | None, ip: str | None) -> None:
    """``count`` and ``list_leases`` take exactly one of user or ip: ValueError otherwise."""
    if (user is None) == (ip is None):
        raise ValueError("give exactly one of user or ip")


def retry_seconds(wait: float) -> float:
    """An honest Retry-After: whole seconds, rounded up, at least 1."""
    return float(max(1, math.ceil(wait - 1e-9)))


@dataclass(frozen=True, slots=True)
class Limits:
    connections_per_user: int | None = None
    connections_per_ip: int | None = None
    attempts_per_user_per_minute: int | None = None
    attempts_per_ip_per_minute: int | None = None
    # False while abuse.enabled is false: bans are then neither made nor enforced anywhere.
    enforce_bans: bool = True


@dataclass(frozen=True, slots=True)
class LeaseRef:
    """Enough to find a lease again; this is what travels in Envoy dynamic metadata."""

    lease_id: str
    policy: str
    user: str | None
    ip: str


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    lease_id: str
    policy: str
    user: str | None
    ip: str
    expires_at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """Either a granted lease or a denial with an honest retry delay."""

    granted: bool
    denied: Reason | None = None  # QUOTA_USER, QUOTA_IP, RATE_IP, RATE_USER or BANNED
    retry_after: float | None = None  # seconds; for rate limits exact, for quotas a hint


@dataclass(frozen=True, slots=True)
class BanInfo:
    ip: str
    expires_at: float
    reason: str


# -- revocation (docs/revocation.md) --------------------------------------------------------

RevocationKind = Literal["jti", "sid", "before"]
# Longest jti, sid or subject a revocation may name (a user id is bounded the same way,
# extauth.tokens.jwt.MAX_USER_CHARS); a token whose jti or sid is longer cannot be revoked by it.
MAX_REVOCATION_VALUE = 256
# Revocations in force across the store: every replica holds a copy (extauth/revocation.py).
MAX_REVOCATIONS = 100_000


class RevocationLimitError(StoreError):
    """The store already holds MAX_REVOCATIONS revocations: one more is refused."""


@dataclass(frozen=True, slots=True)
class TokenIds:
    """What a revocation can match a verified token by, besides its user."""

    jti: str | None = None
    sid: str | None = None
    issued_at: float | None = None  # iat, unix seconds; None: the token carries none


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revocation in force. Always under a subject (the user, as the policy's
    ``user_claim`` names it): it lives in that user's hash slot, so the acquire script
    checks it in the same round trip as the lease. ``value`` is the jti or the sid; for
    ``before``, every token of the subject issued before ``before`` (unix s) is revoked."""

    kind: RevocationKind
    subject: str
    value: str = ""
    before: float | None = None
    expires_at: float = 0.0  # unix seconds: past it no token it could match is still valid


@dataclass(frozen=True, slots=True)
class RevocationListing:
    """Every revocation in force, and the store's revocation epoch (changes with each of them)."""

    epoch: str
    entries: tuple[Revocation, ...] = ()


# -- per-user quota overrides (docs/authorization.md#quota-tiers-and-overrides) ---------------

@dataclass(frozen=True, slots=True)
class QuotaOverride:
    """Per-user limits set at run time (``extauth admin quota set``): each one given replaces the
    policy's (its tier's) for that user under that policy, on every replica; None keeps it."""

    connections_per_user: int | None = None
    attempts_per_user_per_minute: int | None = None
    expires_at: float | None = None  # unix seconds; None: until cleared


# Replaced lease-tag keys kept for verification: a bounded few, for a day (longer than the
# generated Envoy config lets a WebSocket live, max_stream_duration).
PREVIOUS_LEASE_KEYS = 8
PREVIOUS_LEASE_KEY_SECONDS = 86_400


@dataclass(frozen=True, slots=True)
class LeaseKeys:
    """The lease-tag key (hex) every replica on a store shares, and keys it replaced that
    tags of open connections may still carry (``Store.lease_key``)."""

    current: str
    previous: tuple[str, ...] = ()



# Every method below is a coroutine that may raise StoreError and never hangs (the guard
# bounds each call). The protocols are what callers need; ``Store`` is what a backend implements.


class KeyStore(Protocol):
    """The lease-tag key (``extauth/lease_tag.py``)."""

    @abc.abstractmethod
    async def lease_key(self, candidate: str, replaces: bool = False) -> LeaseKeys:
        """The key of the lease tags: a secret (hex) every replica on this store shares.
        ``candidate`` becomes it when the store has none: the first replica to ask, or a store
        that lost its data, where the replicas still running put back the key they tag with
        (``LeaseTagger.refresh``). ``replaces``: the candidate has tagged leases, so when
        another key is current it is kept among ``previous`` (bounded, and for a day) and tags
        made under it still verify on every replica."""


class LeaseLog(KeyStore, Protocol):
    """What Envoy's access-log stream does to leases: keep open ones alive, end closed ones."""

    @abc.abstractmethod
    async def refresh(self, refs: Sequence[LeaseRef], ttl: float) -> int:
        """Extend leases to now+ttl, putting back any the store lost (expired or missing): only
        called for connections Envoy reports open. Returns how many were live before."""

    @abc.abstractmethod
    async def release(self, refs: Sequence[LeaseRef]) -> int:
        """Remove leases; idempotent. Returns how many were present."""


class Leases(LeaseLog, Protocol):
    """Counted connections: take a slot, and read what is held."""

    @abc.abstractmethod
    async def acquire(self, ref: LeaseRef, limits: Limits, ttl: float,
                      token: TokenIds | None = None) -> AcquireResult:
        """Atomically: refuse a banned IP; refuse a revoked token (``token``, of ``ref.user``:
        Reason.TOKEN_REVOKED); check and count the attempt-rate windows
        (sliding, ``RATE_WINDOW``; only admitted attempts are recorded, so Retry-After is
        exact); drop expired leases; check the user's and the IP's live leases against the
        limits; then add the lease under both with expiry now+ttl.
        One round trip on a standalone Redis. The user part is skipped when ref.user is None.
        Idempotent per lease id: a retried call that finds its own live lease is admitted
        again without counting against itself.
        """

    @abc.abstractmethod
    async def count(self, policy: str, *, user: str | None = None, ip: str | None = None) -> int:
        """Live leases of one user or one IP under one policy (exactly one of user/ip)."""

    @abc.abstractmethod
    async def list_leases(
        self, policy: str, *, user: str | None = None, ip: str | None = None
    ) -> list[LeaseInfo]:
        """Live leases of one user or one IP under one policy (exactly one of user/ip)."""

    @abc.abstractmethod
    async def count_all(self) -> int:
        """Every live lease in the store (for metrics and stats; may scan)."""


class Bans(Protocol):
    """Banned IPs and the hostile signals that lead to them (the jail, the admin API)."""

    @abc.abstractmethod
    async def record_hostile(self, ip: str, *, threshold: int, window: float, ban_seconds: float,
                             dry_run: bool, signal: str | None = None) -> bool:
        """Count one hostile signal for ip in a sliding window; ban (unless dry_run) when the
        count reaches threshold. Returns True when this call reached the threshold.

        ``signal`` names the evidence (a digest of the forged credential): the same one again
        within the window counts once, so a client retrying one bad token in a reconnect loop
        is one signal, not one per attempt. None counts every call."""

    @abc.abstractmethod
    async def ban(self, ip: str, seconds: float, reason: str) -> None: ...

    @abc.abstractmethod
    async def unban(self, ip: str) -> bool: ...

    @abc.abstractmethod
    async def list_bans(self) -> list[BanInfo]: ...


class Revocations(Protocol):
    """Revoked tokens (the admin API writes them, every replica's copy reads them); the
    acquire checks them itself (``Leases.acquire``'s ``token``)."""

    @abc.abstractmethod
    async def revoke(self, revocation: Revocation, ttl: float) -> float:
        """Record a revocation for ``ttl`` seconds (``before``: counted from ``before`` itself),
        and change the revocation epoch. Revoking again never shortens an entry nor moves its
        instant back. Returns the entry's expiry (unix s); one already past records nothing.
        Raises RevocationLimitError when MAX_REVOCATIONS are in force."""

    @abc.abstractmethod
    async def unrevoke(self, kind: RevocationKind, subject: str, value: str = "") -> bool:
        """Remove a revocation (``value`` is empty for ``before``); whether it was in force."""

    @abc.abstractmethod
    async def list_revocations(self) -> RevocationListing:
        """Every revocation in force, with the epoch they were read at."""

    @abc.abstractmethod
    async def revocation_epoch(self) -> str:
        """The revocation epoch: one cheap read, for replicas polling for a change."""


def check_override(override: QuotaOverride) -> None:
    """ValueError unless the override sets a limit, each at least 1."""
    limits = (override.connections_per_user, override.attempts_per_user_per_minute)
    given = [v for v in limits if v is not None]
    if not given:
        raise ValueError("an override sets connections_per_user and/or attempts_per_user_per_minute")
    if any(v < 1 or v > 1_000_000_000 for v in given):
        raise ValueError("override limits are whole numbers from 1 to 1000000000")


class QuotaOverrides(Protocol):
    """Per-user quota overrides (the admin API writes them); the acquire applies the user's
    own in its one round trip (it lives in the user's hash slot)."""

    @abc.abstractmethod
    async def set_quota_override(self, policy: str, user: str, override: QuotaOverride,
                                 ttl: float | None) -> QuotaOverride:
        """Replace the user's override under ``policy`` (for ``ttl`` seconds, or until cleared);
        returns it as stored. At least one limit must be given (ValueError otherwise)."""

    @abc.abstractmethod
    async def get_quota_override(self, policy: str, user: str) -> QuotaOverride | None: ...

    @abc.abstractmethod
    async def clear_quota_override(self, policy: str, user: str) -> bool:
        """Remove the override; whether there was one."""


class Store(Leases, Bans, Revocations, QuotaOverrides):
    """A complete backend (memory, Redis) and the guard around one."""

    @abc.abstractmethod
    async def ping(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class RequestStore(Leases, Protocol):
    """The store as the request path holds it (``GuardedStore``): bounded calls, and a way to
    give back a lease whose allow never reached Envoy."""

    # The per-call bound a caller on the request path waits at most, seconds.
    timeout: float
    # How long a failure stands before the store is tried again, seconds.
    reset_seconds: float

    @abc.abstractmethod
    def release_later(self, ref: LeaseRef) -> None:
        """Release a lease in the background (bounded; the lease TTL is the backstop)."""
