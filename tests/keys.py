"""Test helpers: real keys, JWKS documents, a token factory and a local JWKS HTTP server.

Reusable by any test::

    from tests.keys import make_rsa_key, jwks_for, private_pem, sign, JwksServer

    key = make_rsa_key()
    doc = jwks_for(key, "k1", "RS256")
    token = sign(key, "RS256", {"iss": ..., "aud": ..., "sub": "alice"}, kid="k1")

Nothing here is mocked: keys are generated with ``cryptography``, tokens are
signed with PyJWT and the JWKS server is a real ``ThreadingHTTPServer``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

# 64 bytes: long enough for HS256, HS384 and HS512.
HMAC_SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}


# -- keys --------------------------------------------------------------------


def make_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_ec_key(curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVES[curve])


def make_ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@functools.cache
def shared_rsa_key() -> rsa.RSAPrivateKey:
    """One RSA key per test session (RSA generation is the slow part of a test run)."""
    return make_rsa_key()


@functools.cache
def shared_ec_key() -> ec.EllipticCurvePrivateKey:
    return make_ec_key()


@functools.cache
def shared_ed25519_key() -> ed25519.Ed25519PrivateKey:
    return make_ed25519_key()


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk_for(key: PrivateKey, kid: str | None, alg: str | None, *, use: str | None = "sig") -> dict[str, Any]:
    """The public JWK of ``key``; ``alg``/``kid``/``use`` omitted when None."""
    pub = key.public_key()
    jwk: dict[str, Any]
    if isinstance(pub, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(pub, as_dict=True)
    jwk.pop("key_ops", None)
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    if use is not None:
        jwk["use"] = use
    return jwk


def jwks_for(key: PrivateKey, kid: str | None, alg: str | None) -> dict[str, Any]:
    """A JWKS document holding the public half of ``key``."""
    return {"keys": [jwk_for(key, kid, alg)]}


def jwks_of(*jwks: dict[str, Any]) -> dict[str, Any]:
    """A JWKS document from several JWKs (``jwk_for`` results)."""
    return {"keys": list(jwks)}


# -- tokens ------------------------------------------------------------------


def sign(
    key: PrivateKey | str | bytes,
    alg: str,
    claims: dict[str, Any],
    *,
    kid: str | None = None,
    headers: dict[str, Any] | None = None,
) -> str:
    """A signed JWT with exactly these claims (no iat/exp filled in, no type checks)."""
    h: dict[str, Any] = {"typ": "JWT", **(headers or {})}
    if kid is not None:
        h["kid"] = kid
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return pyjwt.PyJWS().encode(payload, key, algorithm=alg, headers=h)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    """A hand-assembled token (for alg none, forged headers and the like)."""
    return f"{b64json(header)}.{b64json(claims)}.{signature}"


def resign_header(token: str, header: dict[str, Any]) -> str:
    """Swap a token's header, keeping payload and signature (the signature no longer fits)."""
    _, p, s = token.split(".")
    return f"{b64json(header)}.{p}.{s}"


# -- a local JWKS server -----------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that give up early (size cap, timeout) are expected here.
        return None


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving a switchable JWKS document.

    ``mode`` is one of ``ok``, ``500``, ``garbage``, ``hang`` (blocks until
    :meth:`stop` or :meth:`release`), ``redirect`` (302 elsewhere) and ``huge``.
    ``requests`` counts requests received.
    """

    def __init__(self, doc: dict[str, Any] | None = None) -> None:
        self.doc: dict[str, Any] = doc if doc is not None else {"keys": []}
        self.mode = "ok"
        self.requests = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                    mode = server.mode
                    doc = server.doc
                if mode == "hang":
                    server._release.wait(30)
                    return
                if mode == "500":
                    self._send(500, b"oops")
                elif mode == "garbage":
                    self._send(200, b"<html>not json</html>")
                elif mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://example.invalid/jwks.json")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif mode == "huge":
                    self._send(200, b" " * (1024 * 1024) + json.dumps(doc).encode())
                else:
                    self._send(200, json.dumps(doc).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/.well-known/jwks.json"

    def set(self, doc: dict[str, Any] | None = None, mode: str = "ok") -> None:
        with self._lock:
            if doc is not None:
                self.doc = doc
            self.mode = mode

    def release(self) -> None:
        self._release.set()

    def start(self) -> JwksServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@contextmanager
def jwks_server(doc: dict[str, Any] | None = None) -> Iterator[JwksServer]:
    srv = JwksServer(doc).start()
    try:
        yield srv
    finally:
        srv.stop()


class FakeClock:
    """An injectable clock: ``clock()`` returns ``now``; ``advance`` moves it."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def forgotten(verifier: Any, token: str) -> Callable[[], Awaitable[bool]]:
    """A probe for ``async_wait_until``: the verifier no longer holds ``token``'s cached
    verification. It reads the cache only, so it never makes the key source fetch."""
    async def probe() -> bool:
        return verifier.verify_cached(token) is None
    return probe


def refresh_timers() -> list[asyncio.Task[Any]]:
    """The running JWKS sources' refresh timers (one per started URL key source)."""
    return [t for t in asyncio.all_tasks() if "_refresh_on_timer" in repr(t.get_coro())]
