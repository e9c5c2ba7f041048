"""WebSocket upgrade classification and RFC 6455 handshake validation."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from extauth.reasons import DenyError, Reason


def _has_token(value: str, token: str) -> bool:
    """Whether a comma-separated header value lists ``token`` (case-insensitive)."""
    low = value.lower()
    if low == token:  # the overwhelmingly common case, without building a list
        return True
    return token in (t.strip() for t in low.split(","))


def is_upgrade_attempt(headers: Mapping[str, str]) -> bool:
    """True when the client asks to upgrade to WebSocket (``Upgrade: websocket``, any case)."""
    return _has_token(headers.get("upgrade", ""), "websocket")


def validate_handshake(method: str, headers: Mapping[str, str]) -> None:
    """Raise DenyError unless this is a well-formed RFC 6455 opening handshake.

    Envoy joins repeated headers with ",", so a comma in a single-valued field
    means the client sent it twice: a smuggling attempt or a broken client.
    """
    if method != "GET":
        raise DenyError(Reason.BAD_HANDSHAKE, "method must be GET")
    # Envoy keeps Connection and Upgrade on upgrade requests (it forwards them).
    if not _has_token(headers.get("connection", ""), "upgrade"):
        raise DenyError(Reason.BAD_HANDSHAKE, "connection header lacks the upgrade token")
    version = headers.get("sec-websocket-version")
    if version is None:
        raise DenyError(Reason.BAD_HANDSHAKE, "sec-websocket-version missing")
    if version.strip() != "13":
        if "," in version:
            raise DenyError(Reason.BAD_HANDSHAKE, "sec-websocket-version repeated")
        raise DenyError(Reason.UNSUPPORTED_VERSION, "sec-websocket-version is not 13")
    key = headers.get("sec-websocket-key")
    if key is None:
        raise DenyError(Reason.BAD_HANDSHAKE, "sec-websocket-key missing")
    if not _valid_key(key.strip()):
        raise DenyError(Reason.BAD_HANDSHAKE, "sec-websocket-key is not 16 base64 bytes")


def _valid_key(key: str) -> bool:
    if len(key) != 24 or "," in key:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
