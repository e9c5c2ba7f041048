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

from extauth.logs import log_event
from extauth.store.base import LeaseKeys, LeaseRef, Store

log = logging.getLogger("extauth.lease_tag")

# How often each replica checks the store still holds its key (one small script call).
REFRESH_SECONDS = 5.0

METADATA_FIELD = "lease_tag"


class LeaseTagger:
    """Tags and checks leases. The key is read from the store on first use, then checked
    again every ``REFRESH_SECONDS`` (``refresh``), so that the replicas converge on one key
    when the store loses it (a restart without persistence, FLUSHALL): the replicas still
    running put theirs back; if a replica started in the meantime got its own in first, the
    others adopt that one and every replica keeps accepting the old (``Store.lease_key``)."""

    def __init__(self) -> None:
        self._key: bytes | None = None
        self._accepted: tuple[_Hmac, ...] = ()  # the current key first
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._key is not None

    async def load(self, store: Store) -> None:
        """Read the shared key once (raises StoreError while the store is unreachable)."""
        if self._key is not None:
            return
        async with self._lock:
            if self._key is None:
                self._use(await store.lease_key(secrets.token_hex(32)))

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

    def valid(self, ref: LeaseRef, tag: str | None) -> bool:
        if tag is None:
            return False
        message = _message(ref)
        return any(hmac.compare_digest(mac.tag(message), tag) for mac in self._accepted)


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
