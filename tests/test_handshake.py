import pytest

from extauth.handshake import is_extended_connect, is_upgrade_attempt, new_key, validate_handshake
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


# RFC 8441 / RFC 9220 as Envoy 1.40 presents an extended CONNECT (logged from a real Envoy).
H2 = {"upgrade": "websocket", "connection": "upgrade", "sec-websocket-version": "13"}


@pytest.mark.parametrize("protocol", ["HTTP/2", "HTTP/3"])
def test_extended_connect_needs_no_key(protocol: str) -> None:
    assert is_extended_connect(protocol)
    validate_handshake("GET", H2, protocol)
    validate_handshake("GET", {**H2, "upgrade": "WebSocket"}, protocol)
    validate_handshake("GET", {k: v for k, v in H2.items() if k != "connection"}, protocol)


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/1.0", ""])
def test_the_key_is_still_required_on_http1(protocol: str) -> None:
    assert not is_extended_connect(protocol)
    with pytest.raises(DenyError) as e:
        validate_handshake("GET", H2, protocol)
    assert e.value.reason is Reason.BAD_HANDSHAKE


@pytest.mark.parametrize(
    ("method", "change", "reason"),
    [
        ("POST", {}, Reason.BAD_HANDSHAKE),
        ("CONNECT", {}, Reason.BAD_HANDSHAKE),  # Envoy presents it as GET: anything else is not it
        ("GET", {"sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}, Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-key": ""}, Reason.BAD_HANDSHAKE),
        ("GET", {"upgrade": "websocket, h2c"}, Reason.BAD_HANDSHAKE),
        ("GET", {"upgrade": "websocket,websocket"}, Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-version": None}, Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-version": "13, 13"}, Reason.BAD_HANDSHAKE),
        ("GET", {"sec-websocket-version": "8"}, Reason.UNSUPPORTED_VERSION),
    ],
)
def test_bad_extended_connects(method: str, change: dict[str, str | None], reason: Reason) -> None:
    headers = dict(H2)
    for k, v in change.items():
        if v is None:
            headers.pop(k)
        else:
            headers[k] = v
    with pytest.raises(DenyError) as e:
        validate_handshake(method, headers, "HTTP/2")
    assert e.value.reason is reason


def test_new_key_is_a_valid_random_rfc6455_key() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:  # what the HTTP/1.1 validator accepts is what an RFC 6455 upstream accepts
        validate_handshake("GET", {**GOOD, "sec-websocket-key": key})
