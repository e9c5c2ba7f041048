"""Session bounds through a real Envoy with real clients: the allow's grpc-timeout ends the
WebSocket at its token's exp or after max_seconds, the lease is released, a client's own
grpc-timeout changes nothing and never reaches the upstream."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.e2e.harness import ALLOWED_ORIGIN, Refused, Stack, StackConfig, token, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A long lease TTL: a slot that frees within seconds was released, never expired.
    cfg = StackConfig(lease_ttl=30, connections_per_user=1,
                      sessions={"/short": {"max_seconds": 2}, "/exp": {"close_at_token_expiry": True}})
    s = Stack(tmp_path_factory.mktemp("sessions"), cfg)
    try:
        yield s.start()
    finally:
        s.close()


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def _lifetime(ws: ClientConnection, within: float = 15.0) -> float:
    """Seconds from now until the connection is closed under the client, echoing meanwhile."""
    started = time.monotonic()
    with pytest.raises(ConnectionClosed):
        while time.monotonic() - started < within:
            await ws.send("ping")
            assert await asyncio.wait_for(ws.recv(), within) == "ping"
            await asyncio.sleep(0.1)
    return time.monotonic() - started


def _ended_at_bound(stack: Stack, user: str) -> bool:
    return any(e.get("msg") == "session ended at its bound" and e.get("user") == user
               for x in stack.extauth for e in x.json_lines())


async def test_a_token_with_seconds_left_is_closed_by_envoy_at_its_exp(stack: Stack) -> None:
    user = _user()
    ws = await stack.open(user, path="/exp", tok=token(user, lifetime=4))  # 3 to 4 s left
    assert ws.response is not None and ws.response.status_code == 101
    lived = await _lifetime(ws)
    assert 2 <= lived <= 8, lived
    assert ws.close_code == 1006  # abrupt: the client reconnects with a fresh token
    # The access log's end entry released the lease: the user's one slot frees long before its TTL.
    again = await stack.wait_admitted(user, within=5, path="/exp")
    await again.close()
    await asyncio.to_thread(wait_until, lambda: _ended_at_bound(stack, user), 5, "the bound's log line")
    entry = next(e for e in stack.envoy.access_log()  # type: ignore[union-attr]
                 if e["path"] == "/exp" and e.get("user") == user and e["log_type"] == "DownstreamEnd")
    assert entry["details"] == "max_duration_timeout", entry


async def test_max_seconds_closes_a_long_lived_token_at_the_bound(stack: Stack) -> None:
    user = _user()
    ws = await stack.open(user, path="/short", tok=token(user, lifetime=3600))
    lived = await _lifetime(ws)
    assert 1.5 <= lived <= 8, lived
    again = await stack.wait_admitted(user, within=5, path="/short")
    await again.close()


async def test_a_client_grpc_timeout_neither_lengthens_the_session_nor_reaches_the_upstream(
        stack: Stack) -> None:
    user = _user()
    path = f"/short/{uuid.uuid4().hex[:8]}"
    ws = await stack.open(user, path=path, headers={"grpc-timeout": "1000S"})
    lived = await _lifetime(ws)
    assert 1.5 <= lived <= 8, lived
    [seen] = stack.upstream.requests_to(path)
    assert "grpc-timeout" not in seen.headers


async def test_a_policy_without_a_session_bound_is_unchanged(stack: Stack) -> None:
    user = _user()
    path = f"/ws/{uuid.uuid4().hex[:8]}"
    # A client's own grpc-timeout would shorten its own session: it is removed, and never seen.
    async with stack.connect(user, path=path, headers={"grpc-timeout": "1S"}) as ws:
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            await ws.send("ping")
            assert await asyncio.wait_for(ws.recv(), 5) == "ping"
            await asyncio.sleep(0.25)
    [seen] = stack.upstream.requests_to(path)
    assert "grpc-timeout" not in seen.headers


async def test_plain_http_keeps_a_grpc_clients_timeout(stack: Stack) -> None:
    from tests.e2e.harness import http_request

    user = _user()
    status, _, body = await asyncio.to_thread(
        http_request, stack.port, "GET", "/api/x",
        {"authorization": f"Bearer {token(user, aud='api')}", "grpc-timeout": "5S"})
    assert status == 200, body
    [seen] = stack.upstream.requests_to("/api/x")
    assert seen.headers.get("grpc-timeout") == "5S"


async def test_a_refused_upgrade_still_refused(stack: Stack) -> None:
    r = await stack.try_connect(None, path="/short")
    assert isinstance(r, Refused) and r.reason == "token_missing"


async def test_the_bound_holds_over_http2_extended_connect(stack: Stack) -> None:
    """An RFC 8441 WebSocket (h2c here) takes the same WebSocket route and the same bound."""
    from tests.e2e.extended_connect import H2Client

    user = _user()
    path = f"/short/h2-{uuid.uuid4().hex[:8]}"
    async with await H2Client.connect("127.0.0.1", stack.port) as conn:
        ws = await conn.websocket(f"{path}?token={token(user, lifetime=3600)}", origin=ALLOWED_ORIGIN,
                                  headers=[("grpc-timeout", "1000S")])
        assert not isinstance(ws, Refused), ws
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            while time.monotonic() - started < 15:
                await ws.send("ping")
                assert await ws.recv(within=15) == "ping"
                await asyncio.sleep(0.1)
        lived = time.monotonic() - started
    assert 1.5 <= lived <= 8, lived
    [seen] = stack.upstream.requests_to(path)
    assert "grpc-timeout" not in seen.headers
