"""JWT verification: cheap structural checks, our key selection, signature, then claims.

Order matters and is part of the security contract:

1. length (before any parsing), ASCII, three base64url segments;
2. header: a JSON object without ``jku``/``x5u``/``jwk``/``x5c``/``crit``
   (never followed; their presence is an injection attempt), an ``alg`` that is
   not ``none`` in any spelling and is configured;
3. with several issuers, the issuer named by the token's ``iss`` (read unverified from the
   bounded payload, before any key is touched; unknown is ``token_claims``): its algorithms,
   audiences and keys are the only ones the token is checked against;
   key selection by ``kid`` from OUR key set of that issuer (an unknown kid refetches a JWKS
   URL at most once per cooldown), and the token's ``alg`` must equal the one
   algorithm bound to that key;
4. the signature (PyJWT, with exactly that key and that one algorithm);
5. only then the claims, so nobody can probe claim checks without a valid
   signature, and an expired-but-authentic token is ``token_expired`` (not hostile).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt as pyjwt
from jwt.exceptions import (
    PyJWTError,
)

from extauth.config import JwtConfig
from extauth.reasons import DenyError, Reason
from extauth.tokens import VerifiedToken
from extauth.tokens.cache import TokenCache
from extauth.tokens.jwks import KeySource, UrlKeySource, WeakCallbacks, make_key_source
from extauth.tokens.keyset import KeyEntry, KeySet

__all__ = ["FORBIDDEN_HEADERS", "JwtVerifier"]

log = logging.getLogger("extauth.jwt")

# Header parameters that point at, or embed, keys (or demand extensions). We
# never follow them; a token that carries one is an injection attempt.
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]*")
_MAX_KID_CHARS = 256
MAX_USER_CHARS = 256
_JWS = pyjwt.PyJWS()
_SIG_ONLY: Any = {"verify_signature": True}


def _deny(reason: Reason, detail: str) -> DenyError:
    return DenyError(reason, detail)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate member {k!r}")
        out[k] = v
    return out


def _strict_json(raw: bytes) -> Any:
    """JSON without duplicate members or NaN/Infinity (parsers disagree on both)."""
    return json.loads(
        raw.decode("utf-8"), object_pairs_hook=_unique_object, parse_constant=_reject_constant
    )


def _b64url(segment: str) -> bytes:
    # Unpadded base64url only; the regex already excluded other characters.
    if len(segment) % 4 == 1:
        raise ValueError("bad base64url length")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    # Reject non-canonical encodings (trailing bits set): PyJWT does too.
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != segment:
        raise ValueError("non-canonical base64url")
    return data


def _is_number(v: Any) -> bool:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range (JSON ints are unbounded): no timestamp
        return False


@dataclass(frozen=True, slots=True)
class _Issuer:
    """What one issuer's tokens are checked against, and nothing of any other issuer's."""

    index: int
    issuer: str
    audiences: frozenset[str]
    algorithms: frozenset[str]
    source: KeySource


def _claims_of(payload: bytes) -> dict[str, Any]:
    try:
        claims = _strict_json(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _deny(Reason.TOKEN_MALFORMED, "payload is not valid JSON") from None
    if not isinstance(claims, dict):
        raise _deny(Reason.TOKEN_MALFORMED, "payload is not a JSON object")
    return claims


class _IssuerWatcher:
    """One issuer's key-drop callback, as a bound method a key source can hold weakly."""

    __slots__ = ("__weakref__", "_index", "_verifier")

    def __init__(self, verifier: JwtVerifier, index: int) -> None:
        self._verifier = weakref.ref(verifier)
        self._index = index

    def dropped(self, keys: KeySet) -> None:
        verifier = self._verifier()
        if verifier is not None:
            verifier._issuer_keys_dropped(self._index, keys)


class JwtVerifier:
    """Verifies bearer JWTs for one policy (one issuer or several); raises DenyError(Reason.X, detail)."""

    def __init__(
        self,
        cfg: JwtConfig,
        *,
        max_token_bytes: int,
        cache_size: int,
        clock: Callable[[], float] = time.time,
        source: KeySource | None = None,
        sources: Sequence[KeySource] | None = None,
    ) -> None:
        """``source`` (one issuer) or ``sources`` (one per ``cfg.per_issuer()``): key sources owned
        by the caller (shared, or carried over a reload); without them the verifier makes its own
        and closes them with itself."""
        self.cfg = cfg
        self.max_token_bytes = max_token_bytes
        self._clock = clock
        per_issuer = cfg.per_issuer()
        given = list(sources) if sources is not None else [source] if source is not None else None
        if given is not None and len(given) != len(per_issuer):
            raise ValueError("one key source per issuer")
        self._owns_source = given is None
        self._issuers = tuple(
            _Issuer(i, c.issuer, frozenset(c.audiences), frozenset(c.algorithms),
                    given[i] if given is not None else make_key_source(c, clock))  # raises ConfigError
            for i, c in enumerate(per_issuer))
        self._by_iss = {i.issuer: i for i in self._issuers}
        self._multi = len(self._issuers) > 1
        # Single issuer: the old fast path, which reads no claim before the signature.
        self._only = self._issuers[0]
        self._source = self._only.source
        self._algorithms = self._only.algorithms
        self._audiences = self._only.audiences
        self.cache = TokenCache(cache_size, clock)
        # Counters for metrics/tests: signature verifications actually run.
        self.verifications = 0
        # Called when keys leave the key set (weakly: a replaced runtime's allow memo goes).
        self._on_keys_dropped: WeakCallbacks[[]] = WeakCallbacks()
        # Each issuer's key thumbprints as last seen: a cached verification is kept while its
        # own issuer still holds its key.
        self._seen: dict[int, frozenset[str]] = {}
        self._watchers: list[_IssuerWatcher] = []
        for issuer in self._issuers:
            issuer.source.watch(self._keys_dropped if not self._multi else self._dropped_watcher(issuer))

    def on_keys_dropped(self, callback: Callable[[], None]) -> None:
        """Call the bound method ``callback`` whenever a key leaves the key set; held weakly."""
        self._on_keys_dropped.add(callback)

    def _keys_dropped(self, keys: KeySet) -> None:
        """Keys were removed, changed or went stale: what they verified is verified again, or denied."""
        forgotten = self.cache.forget_keys_not_in(keys.thumbprints)
        self._announce_dropped(forgotten)

    def _announce_dropped(self, forgotten: int) -> None:
        log.info("jwt: keys withdrawn (removed, changed, or too stale to use); "
                 "%d cached verification(s) forgotten", forgotten)
        self._on_keys_dropped()

    def _dropped_watcher(self, issuer: _Issuer) -> Callable[[KeySet], None]:
        # Held weakly by the source: a bound method of an object the verifier keeps.
        watcher = _IssuerWatcher(self, issuer.index)
        self._watchers.append(watcher)
        return watcher.dropped

    def _issuer_keys_dropped(self, index: int, keys: KeySet) -> None:
        self._seen[index] = keys.thumbprints
        kept = frozenset(f"{i}:{t}" for i, thumbs in self._seen.items() for t in thumbs)
        self._announce_dropped(self.cache.forget_keys_not_in(kept))

    # -- metrics ---------------------------------------------------------------

    @property
    def key_source(self) -> KeySource:
        """The (first) issuer's key source."""
        return self._source

    @property
    def key_sources(self) -> tuple[KeySource, ...]:
        return tuple(i.source for i in self._issuers)

    @property
    def jwks_fetches(self) -> int:
        return sum(s.fetches for s in self.key_sources if isinstance(s, UrlKeySource))

    @property
    def jwks_fetch_failures(self) -> int:
        return sum(s.fetch_failures for s in self.key_sources if isinstance(s, UrlKeySource))

    @property
    def key_age_seconds(self) -> float | None:
        """Age of the oldest key set in use; None if none was loaded (or HMAC secrets only)."""
        ages = [a for a in (s.key_age_seconds() for s in self.key_sources) if a is not None]
        return max(ages) if ages else None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Warm URL keys; never raises (a failure is logged and retried lazily)."""
        for source in self.key_sources:
            try:
                await source.start()
            except Exception:
                log.warning("jwt: key warm-up failed", exc_info=True)

    async def close(self) -> None:
        if self._owns_source:
            for source in self.key_sources:
                await source.close()

    # -- verification ----------------------------------------------------------

    def verify_cached(self, token: str) -> VerifiedToken | None:
        """The cached result for a token, without any verification work."""
        if len(token) > self.max_token_bytes:
            return None
        return self.cache.get(token)

    async def verify(self, token: str) -> VerifiedToken:
        try:
            if len(token) > self.max_token_bytes:
                raise _deny(Reason.TOKEN_MALFORMED, f"token longer than {self.max_token_bytes} bytes")
            cached = self.cache.get(token)
            if cached is not None:
                return cached
            verified = await self._verify(token)
        except DenyError:
            raise
        except Exception as e:
            # Never propagate: an internal bug is not evidence of forgery, so it
            # is not reported with a hostile reason.
            log.error("jwt: unexpected error during verification: %s", type(e).__name__, exc_info=True)
            raise _deny(Reason.INTERNAL_ERROR, f"unexpected {type(e).__name__}") from None
        self.cache.put(token, verified)
        return verified

    async def _verify(self, token: str) -> VerifiedToken:
        if self._multi:
            return await self._verify_multi(token)
        header = self._parse_header(token)
        entries = await self._select_keys(header.get("kid"))
        alg = header["alg"]
        if alg != entries[0].alg:  # a key set's entries for one token share their algorithm
            raise _deny(Reason.TOKEN_BAD_SIGNATURE, f"alg {alg} is not the algorithm bound to the key")
        entry, payload = self._check_signature(token, entries)
        return self._check_claims(_claims_of(payload), entry.thumbprint)

    async def _verify_multi(self, token: str) -> VerifiedToken:
        """Several issuers: the unverified ``iss`` picks one, and only its keys are consulted."""
        header = self._parse_header(token, check_alg=False)
        try:
            unverified = _claims_of(_b64url(token.split(".")[1]))
        except (binascii.Error, ValueError):
            raise _deny(Reason.TOKEN_MALFORMED, "payload is not base64url") from None
        iss = unverified.get("iss")
        issuer = self._by_iss.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _deny(Reason.TOKEN_CLAIMS, "issuer not accepted")
        self._check_alg(header["alg"], issuer.algorithms)
        entries = await self._select_keys(header.get("kid"), issuer)
        alg = header["alg"]
        if alg != entries[0].alg:
            raise _deny(Reason.TOKEN_BAD_SIGNATURE, f"alg {alg} is not the algorithm bound to the key")
        entry, _ = self._check_signature(token, entries)
        # The payload the signature covers is the one read above: parsed once.
        return self._check_claims(unverified, f"{issuer.index}:{entry.thumbprint}", issuer)

    def _parse_header(self, token: str, *, check_alg: bool = True) -> dict[str, Any]:
        if not token.isascii():
            raise _deny(Reason.TOKEN_MALFORMED, "token is not ASCII")
        parts = token.split(".")
        if len(parts) != 3:
            raise _deny(Reason.TOKEN_MALFORMED, f"expected 3 segments, got {len(parts)}")
        h64, p64, s64 = parts
        for name, seg in (("header", h64), ("payload", p64), ("signature", s64)):
            if not _SEGMENT_RE.fullmatch(seg):
                raise _deny(Reason.TOKEN_MALFORMED, f"{name} is not base64url")
        if not h64 or not p64:
            raise _deny(Reason.TOKEN_MALFORMED, "empty header or payload")
        try:
            header = _strict_json(_b64url(h64))
        except (binascii.Error, UnicodeDecodeError, ValueError, RecursionError):
            raise _deny(Reason.TOKEN_MALFORMED, "header is not base64url JSON") from None
        if not isinstance(header, dict):
            raise _deny(Reason.TOKEN_MALFORMED, "header is not a JSON object")
        injected = FORBIDDEN_HEADERS.intersection(header)
        if injected:
            names = ", ".join(sorted(injected))
            raise _deny(Reason.TOKEN_BAD_SIGNATURE, f"forbidden header parameter(s): {names}")
        if "b64" in header:
            raise _deny(Reason.TOKEN_MALFORMED, "b64 header parameter is not supported")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID_CHARS):
            raise _deny(Reason.TOKEN_MALFORMED, "kid is not a short string")
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            # alg missing: nothing is signed in a way we could check.
            raise _deny(Reason.TOKEN_BAD_SIGNATURE, "alg missing")
        if alg.strip().lower() == "none":
            raise _deny(Reason.TOKEN_BAD_SIGNATURE, "alg none")
        if check_alg:
            self._check_alg(alg, self._algorithms)
        if not s64:
            raise _deny(Reason.TOKEN_BAD_SIGNATURE, "empty signature")
        return header

    @staticmethod
    def _check_alg(alg: str, algorithms: frozenset[str]) -> None:
        if alg not in algorithms:
            if alg.upper().startswith("HS"):
                # HMAC where the issuer has only public keys: the key-confusion attack.
                raise _deny(Reason.TOKEN_BAD_SIGNATURE, "HMAC alg on an issuer without HMAC keys")
            # Another issuer's algorithm (a misconfigured client), not evidence of forgery.
            raise _deny(Reason.TOKEN_UNKNOWN_KEY, "alg not allowed by the policy")

    async def _select_keys(self, kid: str | None, issuer: _Issuer | None = None) -> tuple[KeyEntry, ...]:
        source = issuer.source if issuer is not None else self._source
        keys = await source.keys()  # may raise jwks_unavailable
        entries = keys.select(kid)
        if not entries and kid is not None and await source.refetch_for_unknown_kid():
            keys = await source.keys()
            entries = keys.select(kid)
        if issuer is not None:
            self._seen[issuer.index] = keys.thumbprints
        if not entries:
            if kid is None:
                raise _deny(Reason.TOKEN_UNKNOWN_KEY, "no kid and the key set has several keys")
            raise _deny(Reason.TOKEN_UNKNOWN_KEY, "unknown kid")
        return entries

    def _check_signature(self, token: str, entries: tuple[KeyEntry, ...]) -> tuple[KeyEntry, bytes]:
        """The key that verifies (each selected key in turn, with its one bound algorithm) and
        the payload bytes.

        PyJWT's algorithm is called directly: _parse_header already validated the segments,
        which PyJWS.decode would re-validate character by character in Python."""
        self.verifications += 1
        signing_input, _, s64 = token.rpartition(".")
        p64 = signing_input.partition(".")[2]
        try:
            signature = _b64url(s64)
            payload = _b64url(p64)
        except (binascii.Error, ValueError):
            raise _deny(Reason.TOKEN_MALFORMED, "cannot decode") from None
        signed = signing_input.encode("ascii")
        for entry in entries:
            try:
                if entry.jwk.Algorithm.verify(signed, entry.jwk.key, signature):
                    return entry, payload
            except (ValueError, TypeError, PyJWTError):
                pass  # e.g. a signature of the wrong length for the curve
        raise _deny(Reason.TOKEN_BAD_SIGNATURE, "signature does not verify")

    def _check_claims(self, claims: dict[str, Any], key: str, issuer: _Issuer | None = None) -> VerifiedToken:
        cfg = self.cfg
        issuer = issuer or self._only
        now = self._clock()
        leeway = cfg.leeway_seconds
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _is_number(claims[name]):
                raise _deny(Reason.TOKEN_CLAIMS, f"{name} is not a number")
        if "exp" not in claims:
            raise _deny(Reason.TOKEN_CLAIMS, "exp missing")
        exp = float(claims["exp"])
        iat = float(claims["iat"]) if "iat" in claims else None
        nbf = float(claims["nbf"]) if "nbf" in claims else None

        iss = claims.get("iss")
        if not isinstance(iss, str) or iss != issuer.issuer:
            raise _deny(Reason.TOKEN_CLAIMS, "issuer not accepted")
        aud = claims.get("aud")
        if isinstance(aud, str):
            auds = [aud]
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            auds = aud
        else:
            raise _deny(Reason.TOKEN_CLAIMS, "aud missing or not a string/list of strings")
        if issuer.audiences.isdisjoint(auds):
            raise _deny(Reason.TOKEN_CLAIMS, "audience not accepted")

        if now >= exp + leeway:
            raise _deny(Reason.TOKEN_EXPIRED, "expired")
        if nbf is not None and nbf > now + leeway:
            raise _deny(Reason.TOKEN_NOT_YET_VALID, "nbf in the future")
        if iat is not None and iat > now + leeway:
            raise _deny(Reason.TOKEN_NOT_YET_VALID, "iat in the future")
        lifetime = exp - (iat if iat is not None else now)
        if lifetime > cfg.max_lifetime_seconds:
            raise _deny(Reason.TOKEN_CLAIMS, f"lifetime over {cfg.max_lifetime_seconds}s")

        raw_user = claims.get(cfg.user_claim)
        if isinstance(raw_user, bool) or not isinstance(raw_user, str | int):
            raise _deny(Reason.TOKEN_CLAIMS, f"{cfg.user_claim} missing or not a string/integer")
        user = str(raw_user)
        if not user:
            raise _deny(Reason.TOKEN_CLAIMS, f"{cfg.user_claim} is empty")
        # The user id goes into logs, metadata, store keys and admin listings:
        # bound it and keep control characters out.
        if len(user) > MAX_USER_CHARS or not user.isprintable():
            raise _deny(Reason.TOKEN_CLAIMS, f"{cfg.user_claim} is too long or not printable")
        return VerifiedToken(claims=MappingProxyType(claims), user=user, expires_at=exp, key=key)
