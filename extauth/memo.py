"""The allow memo: a repeated plain-HTTP allow answered from memory (``FastPath``), exactly
as the pipeline would answer it.

Why a hit is exact:
- Only allows are kept, only plain-HTTP ones that took no lease and were not shadow
  denials (``Decision.valid_until``): the memo never denies, never skips a quota and never
  hides a hostile request from the jail.
- The key holds every input such a decision reads: every ``CheckInput`` field but those
  ``NOT_KEYED`` names with its reason (a new field is keyed until declared otherwise), and
  what the policy declares it reads beyond them (``Reads``, built with the policy). The
  policy is chosen again, and the ban checked, on every hit.
- An entry dies at the credential's ``exp`` and after at most ``MEMO_TTL_SECONDS``. A
  reload starts an empty memo; a key leaving a policy's key set, or a revocation, empties
  it; ``invalidate`` drops one user's entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from extauth.decision import Decision
from extauth.handshake import is_upgrade_attempt
from extauth.policy import select_policy
from extauth.request import CheckInput

if TYPE_CHECKING:
    from extauth.pipeline import Authorizer

__all__ = ["KEYED_FIELDS", "MEMO_TTL_SECONDS", "NOT_KEYED", "AllowMemo", "FastPath", "Reads", "Repeat"]

# An upper bound on an entry's life whatever its token's exp: a short bound limits the damage
# if something in a plain-HTTP allow ever changes sooner.
MEMO_TTL_SECONDS = 30.0

# The CheckInput fields a key leaves out, and why each may be.
NOT_KEYED: Mapping[str, str] = {
    "headers": "keyed by name: those the policy reads (Reads.headers, Reads.secrets)",
    "query": "keyed as a digest when the policy's token sources read it (Reads.query)",
    "context": "chooses the policy: chosen again on a hit, and keyed by its name",
    "host": "chooses the policy, as context does",
    "path": "chooses the policy, as context does; keyed when claim rules read it (Reads.fields); "
            "a path with parameters takes the pipeline when token sources read them (Reads.parameters)",
    "request_id": "logged with denials only",
}
KEYED_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(CheckInput) if f.name not in NOT_KEYED)

# A key keeps some inputs as they are (host, path, X-Forwarded-For): a request whose key would
# keep more than this takes the full pipeline, so the memo is bounded in bytes, not only entries.
_MAX_KEPT_CHARS = 2048
# A missing header: shorter than any digest, so no value's digest equals it.
_ABSENT = b"-"
_SCALARS = (str, int, float, bool, type(None))

T = TypeVar("T")


class Reads:
    """What a plain-HTTP decision under one policy reads of a request beyond ``KEYED_FIELDS``,
    and the memo key of a request under it (``key``)."""

    __slots__ = ("_kept", "fields", "headers", "parameters", "query", "secrets")

    def __init__(self, *, fields: tuple[str, ...] = (), headers: tuple[str, ...] = (),
                 secrets: tuple[str, ...] = (), query: bool = False, parameters: bool = False) -> None:
        self.fields = fields  # more CheckInput fields, kept as they are (path, for claim rules)
        self.headers = headers  # kept as they are (X-Forwarded-For, when trusted)
        self.secrets = secrets  # kept as one digest: they carry the credential
        self.query = query  # the query string, in that digest
        self.parameters = parameters  # path parameters may alias a token name: never keyed
        names = tuple(dict.fromkeys(KEYED_FIELDS + fields))
        self._kept = operator.attrgetter(*names) if len(names) > 1 else (
            lambda req: (getattr(req, names[0]),) if names else ())

    def key(self, req: CheckInput) -> Hashable | None:
        """The inputs as one hashable value; None when they are too large (or not plain values)."""
        if self.parameters and ";" in req.path:
            return None
        kept: tuple[Any, ...] = self._kept(req)
        headers = req.headers
        if self.headers:
            kept += tuple(headers.get(name) for name in self.headers)
        size = 0
        for value in kept:
            if type(value) is str:
                size += len(value)
            elif not isinstance(value, _SCALARS):
                return None  # a field the memo cannot keep as it is: no memo
        if size > _MAX_KEPT_CHARS:
            return None
        if not self.secrets and not self.query:
            return kept
        return kept, self._digest(headers, req.query)

    def _digest(self, headers: Mapping[str, str], query: str) -> bytes:
        secrets = self.secrets
        if len(secrets) == 1 and not self.query:
            # The usual policy, one header: hashed in one call, without framing.
            value = headers.get(secrets[0])
            return _ABSENT if value is None else hashlib.blake2b(
                value.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        digest = hashlib.blake2b(digest_size=16)
        for name in secrets:
            value = headers.get(name)
            digest.update(_ABSENT if value is None else _framed(value))
        if self.query:
            digest.update(_framed(query))
        return digest.digest()


def _framed(value: str) -> bytes:
    # Length-prefixed, so no two different sets of values digest the same input.
    return b"%d:%s" % (len(value), value.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class Repeat(Generic[T]):
    """A remembered allow: its response and what a hit still needs (metrics, ban check)."""

    payload: T  # the response, less the per-check decision id
    expires_at: float  # unix seconds
    policy: str
    client_ip: str
    user: str | None = None  # for ``AllowMemo.invalidate``


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

    def put(self, key: Hashable, payload: T, valid_until: float, policy: str, client_ip: str,
            user: str | None = None) -> None:
        if self.maxsize == 0:
            return
        expires_at = min(valid_until, self._clock() + MEMO_TTL_SECONDS)
        entries = self._entries
        if key not in entries and len(entries) >= self.maxsize:
            del entries[next(iter(entries))]  # insertion order: the oldest
        entries[key] = Repeat(payload, expires_at, policy, client_ip, user)

    def invalidate(self, user: str) -> int:
        """Drop one user's entries (their tokens revoked); how many were dropped."""
        gone = [key for key, entry in self._entries.items() if entry.user == user]
        for key in gone:
            del self._entries[key]
        return len(gone)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# The memo of the runtime the key was made under (a reload mid-check must not put an old
# config's answer in the new memo), the entry's key, and the revocation generation then.
MemoKey = tuple[AllowMemo[bytes], Hashable, int]


class FastPath:
    """The Check handler's one shortcut: ``lookup`` answers a repeated plain-HTTP allow with
    its remembered response (less the decision id), ``remember`` keeps an allow's."""

    __slots__ = ("_authorizer",)

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    def key(self, req: CheckInput) -> MemoKey | None:
        """The request's memo key; None when its answer is never remembered."""
        authorizer = self._authorizer
        rt = authorizer.runtime  # the one check() reads too: nothing awaits in between
        memo = rt.memo
        headers = req.headers
        if not memo.maxsize or ("upgrade" in headers and is_upgrade_attempt(headers)):
            return None
        policy = select_policy(rt.policies, rt.by_name, req.context, req.host, req.path)
        if policy is None or policy.reads is None:
            return None
        inputs = policy.reads.key(req)
        if inputs is None:
            return None
        return memo, (policy.name, inputs), authorizer.revocation_generation

    def lookup(self, key: MemoKey, started: float) -> bytes | None:
        hit = key[0].get(key[1])
        if hit is None or not self._authorizer.admit_repeat(hit.policy, hit.client_ip, started):
            return None
        return hit.payload

    def remember(self, key: MemoKey | None, decision: Decision, payload: bytes) -> None:
        """Keep a remembered allow's response; anything else, or an allow decided while a
        revocation arrived, is not kept."""
        if (key is None or decision.valid_until is None or decision.policy is None
                or self._authorizer.revocation_generation != key[2]):
            return
        key[0].put(key[1], payload, decision.valid_until, decision.policy, decision.client_ip,
                   decision.user)
