"""Lease tags: only leases extauth issued can be refreshed or released.

The access-log service takes its lease references from entries that anything able to
reach ``listen`` could send. A lease id is 128 random bits, so a forged end entry cannot
release a real lease; but a refresh puts back a lease the store lost (``lua/refresh.lua``),
so without a check a forged periodic entry could create leases in a victim's name and
fill their quota. Every lease's metadata therefore carries ``lease_tag``: an HMAC-SHA256,
cut to 128 bits, over the lease's fields, under a key that every replica on the store
shares (the store creates it once: ``Store.lease_key``), so there is nothing to configure.
An entry whose tag does not verify is ignored, and its lease (if any) expires by TTL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac

from extauth.store.base import LeaseRef, Store

METADATA_FIELD = "lease_tag"


class LeaseTagger:
    """Tags and checks leases; the key is read from the store on first use, then kept."""

    def __init__(self) -> None:
        self._key: bytes | None = None
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
                self._key = bytes.fromhex(await store.lease_key())

    def tag(self, ref: LeaseRef) -> str:
        assert self._key is not None, "load() first"
        message = "\n".join((ref.lease_id, ref.policy, ref.user or "", ref.ip)).encode()
        # The user field is "" for an anonymous lease and never empty for a named one
        # (user ids are non-empty), so the two cannot be confused.
        digest = hmac.new(self._key, message, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def valid(self, ref: LeaseRef, tag: str | None) -> bool:
        return tag is not None and hmac.compare_digest(self.tag(ref), tag)
