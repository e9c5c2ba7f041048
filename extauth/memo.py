"""The allow memo: recent plain-HTTP allows kept whole, so a client that repeats a request
with the same credential costs a dict lookup instead of the whole pipeline.

Why: an API client or a dashboard polling with one token repeats the same request all day.
With a warm verified-token cache the pipeline and the protobuf translation still cost about
40 µs a check, which under load is a quarter of the process's time on top of gRPC itself
(docs/benchmarks.md). A hit costs a few microseconds.

Why a hit is exactly the answer the pipeline would give:
- Only allows are kept, and only plain-HTTP ones that took no lease and were not shadow
  denials: the memo never denies, never skips a quota and never hides a hostile request
  from the jail.
- The key is built (``extauth.envoy_api.repeat_key``) from every input the pipeline reads
  for such a request: the policy (by route name, or host and path when matched), the client
  address (and X-Forwarded-For when it is trusted) and a BLAKE2b digest of every header and
  the query string the policy's token sources read. A request with an ``Upgrade`` header is
  never looked up. The digest keeps credentials out of memory, as in the token cache.
- An entry dies at the credential's ``exp`` (as the verified-token cache does) and after at
  most ``MEMO_TTL_SECONDS``. A reload builds a new runtime with a new, empty memo.
- A ban is checked on every hit (``Authorizer.admit_repeat``).
- A key leaving a policy's key set empties the memo (``JwtVerifier.on_keys_dropped``), as
  it empties the token cache of that key's verifications.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["MEMO_TTL_SECONDS", "AllowMemo", "Repeat"]

# An upper bound on an entry's life whatever its token's exp: nothing in a plain-HTTP allow
# is expected to change sooner, and a short bound limits the damage if that ever stops
# being true.
MEMO_TTL_SECONDS = 30.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Repeat(Generic[T]):
    """A remembered allow: its response and what a hit still needs (metrics, ban check)."""

    payload: T  # the response, less the per-check decision id
    expires_at: float  # unix seconds
    policy: str
    client_ip: str


class AllowMemo(Generic[T]):
    """Bounded ``key -> Repeat``; the oldest entry goes first when full; ``maxsize`` 0 disables it."""

    __slots__ = ("__weakref__", "_clock", "_entries", "maxsize")

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.time) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        self.maxsize = maxsize
        self._clock = clock
        self._entries: dict[Hashable, Repeat[T]] = {}

    def get(self, key: Hashable) -> Repeat[T] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires_at:
            del self._entries[key]
            return None
        return entry

    def put(self, key: Hashable, payload: T, valid_until: float, policy: str, client_ip: str) -> None:
        if self.maxsize == 0:
            return
        expires_at = min(valid_until, self._clock() + MEMO_TTL_SECONDS)
        entries = self._entries
        if key not in entries and len(entries) >= self.maxsize:
            del entries[next(iter(entries))]  # insertion order: the oldest
        entries[key] = Repeat(payload, expires_at, policy, client_ip)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
