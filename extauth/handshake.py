"""WebSocket upgrade classification and RFC 6455 handshake validation."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from extauth.reasons import DenyError, Reason


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def is_upgrade_attempt(headers: Mapping[str, str]) -> bool:
    """True when the client asks to upgrade to WebSocket (``Upgrade: websocket``, any case)."""
    return "websocket" in _tokens(headers.get("upgrade", ""))


def validate_handshake(method: str, headers: Mapping[str, str]) -> None:
    """Raise DenyError unless this is a well-formed RFC 6455 opening handshake.

    Envoy joins repeated headers with ",", so a comma in a single-valued field
    means the client sent it twice: a smuggling attempt or a broken client.
    """
    if method != "GET":
        raise DenyError(Reason.BAD_HANDSHAKE, "method must be GET")
    # Envoy keeps Connection and Upgrade on upgrade requests (it forwards them).
    if "upgrade" not in _tokens(headers.get("connection", "")):
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
