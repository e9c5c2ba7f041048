"""Development token minting (``extauth token`` and tests). Not used on the request path."""

from __future__ import annotations

import time
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from extauth.config import ALGORITHMS, EC_ALGS, HMAC_ALGS, OKP_ALGS, RSA_ALGS

__all__ = ["load_public_key", "mint_token", "public_jwk", "public_jwks"]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


def mint_token(
    *,
    key: str | bytes,
    alg: str,
    claims: dict[str, Any],
    kid: str | None = None,
    lifetime: int = 3600,
) -> str:
    """Sign ``claims`` with a PEM private key (or an HMAC secret); fills iat/exp when absent."""
    if alg not in ALGORITHMS:
        raise ValueError(f"unsupported algorithm {alg!r}")
    body = dict(claims)
    now = int(time.time())
    body.setdefault("iat", now)
    body.setdefault("exp", int(body["iat"]) + lifetime)
    headers: dict[str, Any] = {"typ": "JWT"}
    if kid is not None:
        headers["kid"] = kid
    signing_key: Any = key
    if alg not in HMAC_ALGS:
        pem = key.encode("utf-8") if isinstance(key, str) else key
        signing_key = serialization.load_pem_private_key(pem, password=None)
    return pyjwt.encode(body, signing_key, algorithm=alg, headers=headers)


def load_public_key(pem: bytes | str) -> PublicKey:
    """A public key from a public (or private: its public half is used) PEM."""
    data = pem.encode("utf-8") if isinstance(pem, str) else pem
    if b"PRIVATE KEY" in data:
        priv = serialization.load_pem_private_key(data, password=None)
        pub: Any = priv.public_key()
    else:
        pub = serialization.load_pem_public_key(data)
    if not isinstance(pub, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                      | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise ValueError(f"unsupported key type {type(pub).__name__}")
    return pub


def public_jwk(pem: bytes | str, alg: str, kid: str) -> dict[str, Any]:
    """One public JWK (``use: sig``, with ``alg`` and ``kid``) from a PEM key."""
    pub = load_public_key(pem)
    jwk: dict[str, Any]
    if isinstance(pub, rsa.RSAPublicKey):
        if alg not in RSA_ALGS:
            raise ValueError(f"{alg} does not fit an RSA key")
        jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        if alg not in EC_ALGS:
            raise ValueError(f"{alg} does not fit an EC key")
        jwk = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        if alg not in OKP_ALGS:
            raise ValueError(f"{alg} does not fit an OKP key")
        jwk = OKPAlgorithm.to_jwk(pub, as_dict=True)
    jwk = {k: v for k, v in jwk.items() if k not in {"key_ops"}}
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


def public_jwks(pem: bytes, alg: str, kid: str) -> dict[str, Any]:
    """A JWKS document ``{"keys": [jwk]}`` holding the public half of ``pem``."""
    return {"keys": [public_jwk(pem, alg, kid)]}
