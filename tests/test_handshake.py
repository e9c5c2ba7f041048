import pytest

from extauth.handshake import is_upgrade_attempt, validate_handshake
from extauth.reasons import DenyError, Reason

GOOD = {
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-version": "13",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def test_classify_case_insensitive() -> None:
    assert is_upgrade_attempt({"upgrade": "WebSocket"})
    assert is_upgrade_attempt({"upgrade": "h2c, websocket"})
    assert not is_upgrade_attempt({"upgrade": "h2c"})
    assert not is_upgrade_attempt({})


def test_valid_handshake() -> None:
    validate_handshake("GET", GOOD)
    validate_handshake("GET", {**GOOD, "connection": "keep-alive, Upgrade"})


def _reason(method: str, headers: dict[str, str]) -> Reason:
    with pytest.raises(DenyError) as e:
        validate_handshake(method, headers)
    return e.value.reason


@pytest.mark.parametrize(
    ("method", "change", "reason"),
    [
        ("POST", {}, Reason.BAD_HANDSHAKE),
        ("GET", {"connection": "keep-alive"}, Reason.BAD_HANDSHAKE),
        ("GET", {"connection": None}, Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-version": "8"}, Reason.UNSUPPORTED_VERSION),
        ("GET", {"sec-websocket-version": "14"}, Reason.UNSUPPORTED_VERSION),
        ("GET", {"sec-websocket-version": "13, 13"}, Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-version": None}, Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-key": None}, Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-key": "short"}, Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==,dGhlIHNhbXBsZSBub25jZQ=="},
         Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-key": "dGhlIHNhbXBsZSBub25jZSEh"}, Reason.BAD_HANDSHAKE),  # 18 bytes
        ("GET", {"sec-websocket-key": "!!!!!!!!!!!!!!!!!!!!!!=="}, Reason.BAD_HANDSHAKE),
    ],
)
def test_bad_handshakes(method: str, change: dict[str, str | None], reason: Reason) -> None:
    headers = dict(GOOD)
    for k, v in change.items():
        if v is None:
            headers.pop(k)
        else:
            headers[k] = v
    assert _reason(method, headers) is reason
