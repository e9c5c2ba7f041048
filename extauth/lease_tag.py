"""Lease tags: only leases extauth issued can be refreshed or released.

The access-log service takes its lease references from entries that anything able to
reach ``listen`` could send. A lease id is 128 random bits, so a forged end entry cannot
release a real lease; but a refresh puts back a lease the store lost (``lua/refresh.lua``),
so without a check a forged periodic entry could create leases in a victim's name and
fill their quota. Every lease's metadata therefore carries ``lease_tag``: an HMAC-SHA256,
cut to 128 bits, over the lease's fields, under a key that every replica on the store
shares (the store creates it once: ``Store.lease_key``), so there is nothing to configure;
when the store loses it, the replicas converge on one key again within ``REFRESH_SECONDS``.
An entry whose tag does not verify is ignored, and its lease (if any) expires by TTL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time

from extauth.aio import retrieve
from extauth.logs import log_event
from extauth.store.base import LeaseKeys, LeaseRef, Store, StoreError
from extauth.store.guard import GuardedStore

log = logging.getLogger("extauth.lease_tag")

# How often each replica checks the store still holds its key (one small script call).
REFRESH_SECONDS = 5.0
# After a failed first load, how long loads fail at once before the store is tried again, for
# a store without a circuit breaker (a GuardedStore's reset_seconds otherwise).
RETRY_SECONDS = 2.0

METADATA_FIELD = "lease_tag"


class LeaseTagger:
    """Tags and checks leases. The key is read from the store once (``load``: the server
    does it in the background from the start, and a check that finds it missing waits on
    that same attempt, never longer than a store call), then checked
    again every ``REFRESH_SECONDS`` (``refresh``), so that the replicas converge on one key
    when the store loses it (a restart without persistence, FLUSHALL): the replicas still
    running put theirs back; if a replica started in the meantime got its own in first, the
    others adopt that one and every replica keeps accepting the old (``Store.lease_key``)."""

    def __init__(self) -> None:
        self._key: bytes | None = None
        self._accepted: tuple[_Hmac, ...] = ()  # the current key first
        self._loading: asyncio.Future[None] | None = None  # the one load attempt in flight
        self._failed_until = 0.0  # after a failed load, no other attempt before this (monotonic)
        self._failure = ""  # that failure's type, for the errors raised meanwhile

    @property
    def ready(self) -> bool:
        return self._key is not None

    @property
    def retry_in(self) -> float:
        """Seconds until a load may try the store again after a failed one (0: now)."""
        return max(0.0, self._failed_until - time.monotonic())

    async def load(self, store: Store, *, bounded: bool = True) -> None:
        """Read the shared key, once per process (raises StoreError or TimeoutError while the
        store is unreachable or slow).

        Every check that issues a lease waits on this until it has succeeded once, so it must
        cost a check no more than a store call does, even when the store hangs:
        - concurrent callers share one attempt (never one after the other);
        - ``bounded``: a caller waits at most the store's per-call timeout (a GuardedStore's
          ``timeout``), then raises TimeoutError; the attempt goes on without it, within the
          store's own bound, so a slow first connect still loads the key for later checks;
        - a failed attempt is remembered for about the breaker's reset time (a GuardedStore's
          ``reset_seconds``): meanwhile loads raise StoreError at once instead of each trying.
        ``bounded=False`` waits for the attempt's own end, for callers off the request path."""
        if self._key is not None:
            return
        attempt = self._loading
        if attempt is None:
            if time.monotonic() < self._failed_until:
                raise StoreError(f"lease key unavailable ({self._failure}); "
                                 f"next attempt in {self.retry_in:.1f} s")
            attempt = self._loading = asyncio.ensure_future(self._attempt(store))
            attempt.add_done_callback(retrieve)  # when every caller gave up before its end
        wait = store.timeout if bounded and isinstance(store, GuardedStore) else None
        async with asyncio.timeout(wait):
            # Shielded: a caller giving up (its timeout, its cancellation) leaves the attempt
            # to the others and to the next checks.
            await asyncio.shield(attempt)

    async def _attempt(self, store: Store) -> None:
        try:
            self._use(await store.lease_key(secrets.token_hex(32)))
        except Exception as e:
            retry = store.reset_seconds if isinstance(store, GuardedStore) else RETRY_SECONDS
            self._failed_until = time.monotonic() + retry
            self._failure = type(e).__name__
            raise
        finally:
            self._loading = None

    async def refresh(self, store: Store) -> None:
        """Check the store still holds the key this replica tags with: put it back if the
        store lost it, adopt the store's if another replica's won, and accept the keys it
        replaced (raises StoreError while the store is unreachable)."""
        if self._key is None:
            return
        mine = self._key
        keys = await store.lease_key(mine.hex(), replaces=True)
        if keys.current != mine.hex():
            log_event(log, logging.WARNING, "lease key replaced in the store; tagging with the new one",
                      accepted_keys=1 + len(keys.previous))
        self._use(keys, also=mine)

    def _use(self, keys: LeaseKeys, also: bytes | None = None) -> None:
        current = bytes.fromhex(keys.current)
        accepted = [current, *(bytes.fromhex(k) for k in keys.previous)]
        if also is not None:
            accepted.append(also)  # the store may have pruned it; its own tags stay valid here
        self._key = current
        self._accepted = tuple(_Hmac(key) for key in dict.fromkeys(accepted))

    def tag(self, ref: LeaseRef) -> str:
        assert self._accepted, "load() first"
        return self._accepted[0].tag(_message(ref))

    def valid(self, ref: LeaseRef, tag: object) -> bool:
        # The tag comes from an access-log entry anyone reaching `listen` can send: anything
        # but an ASCII string (every tag we issue is base64url) is simply not ours. Compared
        # as bytes: compare_digest raises TypeError on non-ASCII str, and one such entry
        # must not take the rest of its batch (and the stream) down with it.
        if not isinstance(tag, str) or not tag.isascii():
            return False
        given = tag.encode("ascii")
        message = _message(ref)
        return any(hmac.compare_digest(mac.tag(message).encode("ascii"), given) for mac in self._accepted)


def _message(ref: LeaseRef) -> bytes:
    # The user field is "" for an anonymous lease and never empty for a named one
    # (user ids are non-empty), so the two cannot be confused.
    return "\n".join((ref.lease_id, ref.policy, ref.user or "", ref.ip)).encode()


class _Hmac:
    """HMAC-SHA256 (RFC 2104) under one key, cut to 128 bits, base64url without padding.

    The key's two padded blocks are hashed once here and each tag copies those states:
    half the cost of ``hmac.new`` per tag, and every check and access-log entry makes one
    or two. The result is the same bytes as ``hmac.new(key, message, sha256)``, so replicas
    of any version agree on tags."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def tag(self, message: bytes) -> str:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return base64.urlsafe_b64encode(outer.digest()[:16]).rstrip(b"=").decode()
