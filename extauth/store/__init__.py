"""The shared store: open one from its URL, wrap it in a GuardedStore, hand out lease ids.

``open_store(url)`` understands ``memory://`` (MemoryStore, one replica),
``redis://[user:pass@]host:port[/db]``, ``rediss://...?ssl_ca_certs=...&ssl_cert_reqs=required``,
``redis+cluster://h:p,h:p`` and ``rediss+cluster://...``. Credentials not in the URL come from
EXTAUTH_REDIS_USERNAME / EXTAUTH_REDIS_PASSWORD. The store it returns is bare: the server
wraps it in ``GuardedStore`` (per-call timeout and circuit breaker).
"""

from __future__ import annotations

import secrets

from extauth.store.base import (
    AcquireResult,
    BanInfo,
    Bans,
    BreakerOpenError,
    KeyStore,
    LeaseInfo,
    LeaseKeys,
    LeaseLog,
    LeaseRef,
    Leases,
    Limits,
    RequestStore,
    Store,
    StoreError,
    StoreTimeoutError,
)
from extauth.store.guard import GuardedStore
from extauth.store.memory import MemoryStore
from extauth.store.url import REDIS_SCHEMES


def new_lease_id() -> str:
    """128 random bits as 22 characters of base64url."""
    return secrets.token_urlsafe(16)


def open_store(url: str, *, key_prefix: str = "extauth") -> Store:
    """A bare store for a config ``store:`` URL. Raises ValueError for an unusable URL."""
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryStore()
    if scheme in REDIS_SCHEMES:
        from extauth.store.redis import RedisStore

        return RedisStore.from_url(url, key_prefix=key_prefix)
    raise ValueError("use memory://, redis://, rediss://, redis+cluster:// or rediss+cluster://")


__all__ = [
    "AcquireResult",
    "BanInfo",
    "Bans",
    "BreakerOpenError",
    "GuardedStore",
    "KeyStore",
    "LeaseInfo",
    "LeaseKeys",
    "LeaseLog",
    "LeaseRef",
    "Leases",
    "Limits",
    "MemoryStore",
    "RequestStore",
    "Store",
    "StoreError",
    "StoreTimeoutError",
    "new_lease_id",
    "open_store",
]
