"""Key sets: a JWKS document (or a shared secret) as keys each bound to exactly ONE algorithm.

The binding is made when the set is built (the key's JWKS ``alg``, else the single configured
algorithm that fits its ``kty``/``crv``): a token's header never chooses a key type or algorithm.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jwt import PyJWK

from extauth.config import EC_ALGS, OKP_ALGS, RSA_ALGS

log = logging.getLogger("extauth.jwks")

_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
# Private (and multi-prime) members; a JWKS must only publish public keys.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class JwksError(Exception):
    """A key set document that cannot be used."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    kid: str | None
    alg: str
    jwk: PyJWK = field(repr=False)  # an HMAC entry holds the shared secret
    # Identifies the key across fetches (thumbprint()); never logged: for a shared secret
    # it is derived from the secret.
    thumbprint: str = field(default="", repr=False)


def thumbprint(members: Mapping[str, Any], alg: str) -> str:
    """The same key (members and bound algorithm) gives the same value in every fetch."""
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{alg}\n{canonical}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[KeyEntry, ...]
    by_kid: Mapping[str, KeyEntry] = field(default_factory=dict)
    # Shared secrets are keys without a kid: the token's kid is not consulted, and each
    # (the current one, then the one it replaced during a rotation) is tried in turn.
    single_secret: bool = False
    thumbprints: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thumbprints", frozenset(k.thumbprint for k in self.keys))

    def select(self, kid: str | None) -> tuple[KeyEntry, ...]:
        """The keys a token with ``kid`` may be signed with, in the order to try them: the
        one for ``kid``; with no kid, the only key if there is exactly one; every shared
        secret. Empty when there is none."""
        if self.single_secret:
            return self.keys
        if kid is None:
            return self.keys[:1] if len(self.keys) == 1 else ()
        entry = self.by_kid.get(kid)
        return () if entry is None else (entry,)

    def __len__(self) -> int:
        return len(self.keys)


def _compatible(alg: str, kty: str, crv: Any) -> bool:
    if kty == "RSA":
        return alg in RSA_ALGS
    if kty == "EC":
        return alg in EC_ALGS and _EC_CURVES[alg] == crv
    if kty == "OKP":
        return alg in OKP_ALGS and crv in _OKP_CURVES
    return False


def _bind_alg(jwk: Mapping[str, Any], algorithms: Sequence[str]) -> tuple[str | None, str]:
    """(alg, "") for a usable key, else (None, why-skipped)."""
    kty = jwk.get("kty")
    crv = jwk.get("crv")
    if not isinstance(kty, str):
        return None, "no kty"
    if crv is not None and not isinstance(crv, str):
        return None, "crv is not a string"
    if kty == "oct":
        return None, "symmetric keys are never accepted from a JWKS"
    declared = jwk.get("alg")
    if declared is not None:
        if not isinstance(declared, str):
            return None, "alg is not a string"
        if declared not in algorithms:
            return None, f"alg {declared} is not in the configured algorithms"
        if not _compatible(declared, kty, crv):
            return None, f"alg {declared} does not fit kty {kty}"
        return declared, ""
    fits = [a for a in algorithms if _compatible(a, kty, crv)]
    if not fits:
        return None, f"no configured algorithm fits kty {kty}"
    if len(fits) > 1:
        return None, f"ambiguous: {', '.join(fits)} all fit kty {kty}; publish an alg"
    return fits[0], ""


def build_key_set(data: Any, algorithms: Sequence[str], *, source: str) -> KeySet:
    """Build a KeySet from a parsed JWKS document; unusable keys are skipped with a warning.

    Raises JwksError when the document is not a JWKS or has no usable key.
    """
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError("not a JWKS document (expected an object with a 'keys' list)")
    entries: list[KeyEntry] = []
    by_kid: dict[str, KeyEntry] = {}
    for i, raw in enumerate(data["keys"]):
        if not isinstance(raw, dict):
            log.warning("jwks %s: key #%d skipped: not an object", source, i)
            continue
        kid = raw.get("kid")
        label = f"key #{i}" + (f" (kid {kid!r})" if isinstance(kid, str) else "")
        if kid is not None and not isinstance(kid, str):
            log.warning("jwks %s: %s skipped: kid is not a string", source, label)
            continue
        use = raw.get("use")
        if use is not None and use != "sig":
            log.warning("jwks %s: %s skipped: use is %r, not 'sig'", source, label, use)
            continue
        ops = raw.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            log.warning("jwks %s: %s skipped: key_ops does not allow 'verify'", source, label)
            continue
        try:
            alg, why = _bind_alg(raw, algorithms)
        except Exception as e:
            # One odd key must not cost the whole set (nor a file poller): skip it. The
            # type only: a message could quote key material.
            log.warning("jwks %s: %s skipped: %s", source, label, type(e).__name__)
            continue
        if alg is None:
            log.warning("jwks %s: %s skipped: %s", source, label, why)
            continue
        public = {k: v for k, v in raw.items() if k not in _PRIVATE_MEMBERS}
        if len(public) != len(raw):
            log.warning("jwks %s: %s publishes private key material; only the public part is used",
                        source, label)
        try:
            jwk = PyJWK(public, algorithm=alg)
        except Exception as e:
            log.warning("jwks %s: %s skipped: %s", source, label, type(e).__name__)
            continue
        if kid is not None and kid in by_kid:
            log.warning("jwks %s: %s skipped: duplicate kid", source, label)
            continue
        entry = KeyEntry(kid=kid, alg=alg, jwk=jwk, thumbprint=thumbprint(public, alg))
        entries.append(entry)
        if kid is not None:
            by_kid[kid] = entry
    if not entries:
        raise JwksError("no usable signing key")
    return KeySet(keys=tuple(entries), by_kid=by_kid)


def parse_jwks_bytes(body: bytes, algorithms: Sequence[str], *, source: str) -> KeySet:
    """``build_key_set`` of a JSON document's bytes; JwksError when they are not JSON."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise JwksError(f"not valid JSON: {type(e).__name__}") from None
    return build_key_set(data, algorithms, source=source)
