"""A bounded LRU cache of verified tokens.

Keyed by a BLAKE2b digest of the token, never the token itself, so a
memory dump or a debug print of the cache does not leak bearer credentials.
Entries die at the token's ``exp``: a cached answer is never more permissive
than a fresh verification (which may still allow ``exp + leeway``).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Set

from extauth.tokens import VerifiedToken

__all__ = ["TokenCache", "token_digest"]


def token_digest(token: str) -> bytes:
    """What stands for a token wherever one must be recognised again without being kept."""
    return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=32).digest()


class TokenCache:
    """Bounded LRU of ``hash(token) -> VerifiedToken``; ``maxsize`` 0 disables caching."""

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.time) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        self.maxsize = maxsize
        self._clock = clock
        self._entries: OrderedDict[bytes, VerifiedToken] = OrderedDict()

    def get(self, token: str) -> VerifiedToken | None:
        """The cached verification, or None if absent or past its ``exp``."""
        if self.maxsize == 0:
            return None
        key = token_digest(token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, token: str, verified: VerifiedToken) -> None:
        if self.maxsize == 0:
            return
        if self._clock() >= verified.expires_at:
            return
        key = token_digest(token)
        self._entries[key] = verified
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def forget_keys_not_in(self, thumbprints: Set[str]) -> int:
        """Drop the verifications made with a key not in ``thumbprints``; how many went."""
        gone = [k for k, v in self._entries.items() if v.key not in thumbprints]
        for k in gone:
            del self._entries[k]
        return len(gone)

    def __len__(self) -> int:
        return len(self._entries)
