"""Revoked tokens: this replica's copy of the store's revocations, and writing them.

Revocations live in the store under their subject (the user), so the acquire script refuses
a revoked token's upgrade in the same round trip as its lease, authoritatively on every
replica. Plain-HTTP checks and the allow memo take no round trip: they read this copy,
which a poller keeps in step with the store (one GET of the revocation epoch every
``POLL_SECONDS``; the whole list only when the epoch changed). A change empties the allow
memo, and the verified-token cache is never trusted alone (``revoked`` runs after it), so
every replica honours a revocation within about ``POLL_SECONDS`` (docs/revocation.md).

Failure mode: while the store cannot be read the copy keeps its last state (and the acquire
script, when the store answers, stays authoritative for upgrades).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from extauth.aio import cancel_and_wait
from extauth.config import DAY, Config
from extauth.logs import log_event
from extauth.metrics import Metrics
from extauth.store.base import (
    MAX_REVOCATION_VALUE,
    Revocation,
    RevocationKind,
    RevocationListing,
    Revocations,
    TokenIds,
)
from extauth.tokens import VerifiedToken

log = logging.getLogger("extauth.revocation")

POLL_SECONDS = 0.5
_KINDS: tuple[RevocationKind, ...] = ("jti", "sid", "before")


def token_ids(verified: VerifiedToken) -> TokenIds:
    """What a revocation can match in a verified token: its ``jti``, ``sid`` and ``iat``
    (a jti or sid that is not a short string cannot be revoked by, and is ignored)."""
    claims = verified.claims
    jti, sid, iat = claims.get("jti"), claims.get("sid"), claims.get("iat")
    return TokenIds(
        jti=jti if isinstance(jti, str) and 0 < len(jti) <= MAX_REVOCATION_VALUE else None,
        sid=sid if isinstance(sid, str) and 0 < len(sid) <= MAX_REVOCATION_VALUE else None,
        # The verifier already refused an iat that is not a finite number.
        issued_at=float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else None,
    )


def revocation_seconds(cfg: Config) -> float:
    """How long a revocation must last: the longest any policy lets a token live past its
    ``iat`` (``max_lifetime_seconds``) plus its leeway. Past that no token it could match is
    still accepted anywhere, so the entry expires on its own."""
    bounds = [p.jwt.max_lifetime_seconds + p.jwt.leeway_seconds for p in cfg.policies if p.jwt is not None]
    return float(max(bounds, default=DAY))


class _Snapshot:
    """Revocations indexed for the request path."""

    __slots__ = ("before", "entries", "ids")

    def __init__(self, entries: tuple[Revocation, ...]) -> None:
        self.entries = entries
        self.ids: dict[tuple[str, str, str], float] = {}  # (kind, subject, value) -> expiry
        self.before: dict[str, tuple[float, float]] = {}  # subject -> (instant, expiry)
        for r in entries:
            if r.kind == "before" and r.before is not None:
                self.before[r.subject] = (r.before, r.expires_at)
            elif r.kind != "before":
                self.ids[r.kind, r.subject, r.value] = r.expires_at


class RevocationList:
    """This replica's copy of the revocations in force (``revoked``), kept in step by
    ``start``'s poller, and the admin's way to change them (``revoke``, ``unrevoke``)."""

    def __init__(self, store: Revocations, metrics: Metrics | None = None, *,
                 poll_seconds: float = POLL_SECONDS, clock: Callable[[], float] = time.time) -> None:
        if poll_seconds <= 0:
            raise ValueError("poll_seconds must be > 0")
        self.store = store
        self.metrics = metrics or Metrics()
        self.poll_seconds = poll_seconds
        self._clock = clock
        self._snapshot = _Snapshot(())
        self._epoch: str | None = None
        # Bumped with every change applied: a check that began under another generation must
        # not leave its allow in the memo.
        self.generation = 0
        self._callbacks: list[Callable[[], None]] = []
        self._poller: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._store_ok = True
        self.syncs = 0  # successful reads of the whole list (tests, debugging)

    # -- the request path ------------------------------------------------------------

    def revoked(self, user: str, token: TokenIds) -> bool:
        """Whether a verified token of ``user`` is revoked, from this replica's copy."""
        snap = self._snapshot
        if not snap.entries:
            return False
        now = self._clock()
        ids = snap.ids
        if token.jti is not None and ids.get(("jti", user, token.jti), 0.0) > now:
            return True
        if token.sid is not None and ids.get(("sid", user, token.sid), 0.0) > now:
            return True
        before = snap.before.get(user)
        return (before is not None and before[1] > now
                and (token.issued_at is None or token.issued_at < before[0]))

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the copy changes (the server empties the allow memo)."""
        self._callbacks.append(callback)

    @property
    def entries(self) -> tuple[Revocation, ...]:
        return self._snapshot.entries

    # -- keeping the copy ------------------------------------------------------------

    async def start(self) -> None:
        """Read the list once (failures are logged, the poller retries) and start polling."""
        with contextlib.suppress(Exception):
            await self.sync()
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        await cancel_and_wait(self._poller)
        self._poller = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.sync()
            except Exception as e:
                if self._store_ok:
                    log_event(log, logging.WARNING, "revocations cannot be read; keeping the last copy",
                              error=type(e).__name__)
                self._store_ok = False
            else:
                if not self._store_ok:
                    log_event(log, logging.INFO, "revocations readable again")
                self._store_ok = True

    async def sync(self, *, force: bool = False) -> bool:
        """Read the store's epoch, and the whole list when it moved; True when the copy changed."""
        async with self._sync_lock:
            if not force and self._epoch is not None and await self.store.revocation_epoch() == self._epoch:
                self._expire()
                return False
            listing: RevocationListing = await self.store.list_revocations()
            self.syncs += 1
            changed = listing.entries != self._snapshot.entries
            self._epoch = listing.epoch
            if changed:
                self._apply(listing.entries)
            return changed

    def _expire(self) -> None:
        """Entries past their expiry leave the copy (and the gauge) without a store read."""
        now = self._clock()
        snap = self._snapshot
        if any(r.expires_at <= now for r in snap.entries):
            self._apply(tuple(r for r in snap.entries if r.expires_at > now))

    def _apply(self, entries: tuple[Revocation, ...]) -> None:
        self._snapshot = _Snapshot(entries)
        self.generation += 1
        counts: Mapping[str, int] = {k: sum(r.kind == k for r in entries) for k in _KINDS}
        for kind, n in counts.items():
            self.metrics.revocations.labels(kind).set(n)
        for callback in self._callbacks:
            callback()

    # -- changing it (the admin API) -----------------------------------------------------

    async def revoke(self, revocation: Revocation, ttl: float) -> float:
        """Record a revocation in the store and in this copy at once; its expiry (unix s)."""
        expires = await self.store.revoke(revocation, ttl)
        await self._resync()
        return expires

    async def unrevoke(self, kind: RevocationKind, subject: str, value: str = "") -> bool:
        found = await self.store.unrevoke(kind, subject, value)
        await self._resync()
        return found

    async def _resync(self) -> None:
        # The store has the change; the poller catches up if this read fails.
        with contextlib.suppress(Exception):
            await self.sync(force=True)
