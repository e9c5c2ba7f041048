"""WebSocket upgrade classification and handshake validation: RFC 6455 over HTTP/1.1, and
RFC 8441 / RFC 9220 (extended CONNECT) over HTTP/2 and HTTP/3 as Envoy presents them."""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping

from extauth.reasons import DenyError, Reason

# Envoy's ``HttpRequest.protocol`` for the streams that carry a WebSocket as an extended
# CONNECT. Envoy hands ext_authz such a request as an HTTP/1.1 upgrade would look: method GET,
# ``upgrade: websocket`` (the ``:protocol``), ``connection: upgrade``, and no key.
EXTENDED_CONNECT_PROTOCOLS = frozenset({"HTTP/2", "HTTP/3"})


def _has_token(value: str, token: str) -> bool:
    """Whether a comma-separated header value lists ``token`` (case-insensitive)."""
    low = value.lower()
    if low == token:  # the overwhelmingly common case, without building a list
        return True
    return token in (t.strip() for t in low.split(","))


def is_upgrade_attempt(headers: Mapping[str, str]) -> bool:
    """True when the client asks to upgrade to WebSocket (``Upgrade: websocket``, any case)."""
    return _has_token(headers.get("upgrade", ""), "websocket")


def is_extended_connect(protocol: str) -> bool:
    """Whether an upgrade on a stream of this protocol came as an extended CONNECT."""
    return protocol in EXTENDED_CONNECT_PROTOCOLS


def validate_handshake(method: str, headers: Mapping[str, str], protocol: str = "HTTP/1.1") -> None:
    """Raise DenyError unless this is a well-formed opening handshake for its protocol.

    Envoy joins repeated headers with ",", so a comma in a single-valued field
    means the client sent it twice: a smuggling attempt or a broken client.
    """
    if method != "GET":  # Envoy presents an extended CONNECT as GET too
        raise DenyError(Reason.BAD_HANDSHAKE, "method must be GET")
    if is_extended_connect(protocol):
        _validate_extended_connect(headers)
        return
    # Envoy keeps Connection and Upgrade on upgrade requests (it forwards them).
    if not _has_token(headers.get("connection", ""), "upgrade"):
        raise DenyError(Reason.BAD_HANDSHAKE, "connection header lacks the upgrade token")
    _validate_version(headers)
    key = headers.get("sec-websocket-key")
    if key is None:
        raise DenyError(Reason.BAD_HANDSHAKE, "sec-websocket-key missing")
    if not _valid_key(key.strip()):
        raise DenyError(Reason.BAD_HANDSHAKE, "sec-websocket-key is not 16 base64 bytes")


def _validate_extended_connect(headers: Mapping[str, str]) -> None:
    """RFC 8441 §5 (and RFC 9220): ``:protocol`` is exactly ``websocket``, the version is 13,
    and there is no key, which the pseudo-header supersedes: a client that sends one is not
    speaking RFC 8441, and an HTTP/1.1 upstream would accept a key it chose."""
    if headers.get("upgrade", "").strip().lower() != "websocket":
        raise DenyError(Reason.BAD_HANDSHAKE, ":protocol is not exactly websocket")
    _validate_version(headers)
    if "sec-websocket-key" in headers:
        raise DenyError(Reason.BAD_HANDSHAKE, "sec-websocket-key is not used over HTTP/2 or HTTP/3")


def _validate_version(headers: Mapping[str, str]) -> None:
    version = headers.get("sec-websocket-version")
    if version is None:
        raise DenyError(Reason.BAD_HANDSHAKE, "sec-websocket-version missing")
    if version.strip() != "13":
        if "," in version:
            raise DenyError(Reason.BAD_HANDSHAKE, "sec-websocket-version repeated")
        raise DenyError(Reason.UNSUPPORTED_VERSION, "sec-websocket-version is not 13")


def new_key() -> str:
    """A fresh RFC 6455 ``Sec-WebSocket-Key`` (16 random bytes, base64), for an HTTP/1.1
    upstream of an extended CONNECT, which has none of its own."""
    return base64.b64encode(secrets.token_bytes(16)).decode("ascii")


def _valid_key(key: str) -> bool:
    if len(key) != 24 or "," in key:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
