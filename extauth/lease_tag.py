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
from extauth.store.base import KeyStore, LeaseKeys, LeaseRef, StoreError, StoreTimeoutError

log = logging.getLogger("extauth.lease_tag")

# How often each replica checks the store still holds its key (one small script call).
REFRESH_SECONDS = 5.0
# After a failed first load, how long loads fail at once before the store is tried again,
# unless the caller says (the guarded store's reset_seconds).
RETRY_SECONDS = 2.0

METADATA_FIELD = "lease_tag"


class LeaseTagger:
    """Tags and checks leases under the store's shared key: read once (``load``), then checked
    every ``REFRESH_SECONDS`` (``refresh``) so that replicas converge on one key when the store
    loses it, every replica still accepting the keys it replaced (``KeyStore.lease_key``)."""

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

    async def load(self, store: KeyStore, *, wait: float | None = None,
                   retry: float = RETRY_SECONDS) -> None:
        """Read the shared key, once per process (raises StoreError while the store is
        unreachable or slow).

        Every check that issues a lease waits on this until it has succeeded once, so it must
        cost a check no more than a store call does, even when the store hangs:
        - concurrent callers share one attempt (never one after the other);
        - ``wait``: a caller waits at most this long (the request path's per-call timeout);
          the attempt goes on without it, within the store's own bound, so a slow first
          connect still loads the key for later checks; None waits for the attempt's end;
        - a failed attempt is remembered for ``retry`` seconds: meanwhile loads raise
          StoreError at once instead of each trying."""
        if self._key is not None:
            return
        attempt = self._loading
        if attempt is None:
            if time.monotonic() < self._failed_until:
                raise StoreError(f"lease key unavailable ({self._failure}); "
                                 f"next attempt in {self.retry_in:.1f} s")
            attempt = self._loading = asyncio.ensure_future(self._attempt(store, retry))
            attempt.add_done_callback(retrieve)  # when every caller gave up before its end
        try:
            async with asyncio.timeout(wait):
                # Shielded: a caller giving up (its timeout, its cancellation) leaves the attempt
                # to the others and to the next checks.
                await asyncio.shield(attempt)
        except TimeoutError:
            raise StoreTimeoutError(f"lease key not loaded within {wait} s") from None

    async def _attempt(self, store: KeyStore, retry: float) -> None:
        try:
            self._use(await store.lease_key(secrets.token_hex(32)))
        except Exception as e:
            self._failed_until = time.monotonic() + retry
            self._failure = type(e).__name__
            raise
        finally:
            self._loading = None

    async def refresh(self, store: KeyStore) -> None:
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
    """HMAC-SHA256 under one key, cut to 128 bits, base64url without padding."""

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes) -> None:
        # Keyed once; each tag copies it rather than hashing the key's pads again.
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def tag(self, message: bytes) -> str:
        mac = self._keyed.copy()
        mac.update(message)
        return base64.urlsafe_b64encode(mac.digest()[:16]).rstrip(b"=").decode()
