"""WebSockets over HTTP/2 (RFC 8441) and HTTP/3 (RFC 9220) through a real Envoy: extended
CONNECT streams on one multiplexed connection get exactly what an HTTP/1.1 upgrade gets
(origin, token transports and stripping, quotas, leases released on close).

The stack has a TLS listener (ALPN h2, self-signed certificate) and HTTP/3 on its port; the
cleartext listener takes h2c too. Clients: tests/e2e/extended_connect.py (h2, aioquic).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.e2e.extended_connect import H2Client, H3Client, WebSocket, _Multiplexed
from tests.e2e.harness import (
    ALLOWED_ORIGIN,
    OTHER_ORIGIN,
    Refused,
    Stack,
    StackConfig,
    token,
    wait_until,
)

pytestmark = pytest.mark.e2e

QUOTA = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A lease TTL far beyond the test's waits: a slot freed within them was released by the
    # access-log stream's end entry, not expired.
    s = Stack(tmp_path_factory.mktemp("h2stack"),
              StackConfig(tls=True, http3=True, lease_ttl=30, connections_per_user=QUOTA,
                          sessions={"/short": {"max_seconds": 2}}))
    try:
        yield s.start()
    finally:
        s.close()


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def _tls(stack: Stack) -> ssl.SSLContext:
    """Trusts the stack's own certificate only, and offers h2 (as a browser does, first)."""
    assert stack.cert is not None
    ctx = ssl.create_default_context(cafile=str(stack.cert.cert_file))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


@pytest.fixture(params=["h2-tls", "h2c", "h3"])
async def conn(request: pytest.FixtureRequest, stack: Stack) -> AsyncIterator[_Multiplexed]:
    """One multiplexed connection to Envoy: HTTP/2 over TLS, HTTP/2 cleartext, or HTTP/3."""
    c: H2Client | H3Client
    if request.param == "h2-tls":
        assert stack.tls_port is not None
        c = await H2Client.connect("127.0.0.1", stack.tls_port, tls=_tls(stack), server_name="localhost")
    elif request.param == "h2c":
        c = await H2Client.connect("127.0.0.1", stack.port)
    else:
        assert stack.tls_port is not None and stack.cert is not None
        c = await H3Client.connect("127.0.0.1", stack.tls_port, server_name="localhost", verify=True,
                                   cafile=str(stack.cert.cert_file))
    try:
        yield c
    finally:
        await c.aclose()


def _protocol(conn: _Multiplexed) -> str:
    return conn.protocol_name


async def _open(conn: _Multiplexed, user: str, *, transport: str = "query", path: str = "/ws",
                origin: str | None = ALLOWED_ORIGIN, tok: str | None = None) -> WebSocket | Refused:
    tok = tok or token(user)
    headers: list[tuple[str, str]] = []
    protos = ["chat.v1"]
    if transport == "query":
        path = f"{path}?token={tok}"
    elif transport == "header":
        headers.append(("authorization", f"Bearer {tok}"))
    elif transport == "subprotocol":
        protos.append(f"bearer.{tok}")
    else:
        raise ValueError(transport)
    return await conn.websocket(path, origin=origin, subprotocols=protos, headers=headers)


def _entry(stack: Stack, path: str, user: str | None = None) -> dict[str, Any]:
    assert stack.envoy is not None
    envoy = stack.envoy
    found = wait_until(lambda: next((e for e in envoy.access_log() if e["path"] == path
                                     and user in (None, e.get("user"))), None), 10,
                       f"Envoy's access-log entry for {path}")
    assert found is not None
    return found


@pytest.mark.parametrize("transport", ["query", "header", "subprotocol"])
async def test_allowed_origin_opens_echoes_and_the_upstream_never_sees_the_token(
        stack: Stack, conn: _Multiplexed, transport: str) -> None:
    user = _user()
    tok = token(user)
    path = f"/ws/{transport}-{uuid.uuid4().hex[:8]}"
    ws = await _open(conn, user, transport=transport, path=path, tok=tok)
    assert isinstance(ws, WebSocket), ws
    assert ws.response[":status"] == "200"  # RFC 8441's 101: the stream is the tunnel
    assert ws.subprotocol == "chat.v1"
    await ws.send("hello over " + _protocol(conn))
    assert await ws.recv() == "hello over " + _protocol(conn)
    await ws.close()
    [seen] = stack.upstream.requests_to(path)
    assert seen.websocket and seen.path == path  # the query token is gone
    assert seen.headers["x-user-id"] == user
    assert "authorization" not in seen.headers
    assert seen.headers["sec-websocket-protocol"] == "chat.v1"
    everything = seen.path + json.dumps(seen.headers)
    assert tok not in everything and tok.split(".")[2] not in everything
    # The HTTP/1.1 upstream got the key extauth added (the stream had none), and accepted it.
    assert len(base64.b64decode(seen.headers["sec-websocket-key"], validate=True)) == 16
    entry = await asyncio.to_thread(_entry, stack, path)
    assert entry["protocol"] == _protocol(conn) and entry["upgrade"] == "websocket"
    assert entry["policy"] == "chat" and entry["user"] == user
    assert "token" not in json.dumps(entry)


async def test_another_origin_is_refused(stack: Stack, conn: _Multiplexed) -> None:
    path = f"/ws/origin-{uuid.uuid4().hex[:8]}"
    r = await _open(conn, _user(), path=path, origin=OTHER_ORIGIN)
    assert isinstance(r, Refused) and r.status == 403, r
    assert r.reason == "origin_not_allowed"
    assert json.loads(r.body)["error"] == "origin_not_allowed"
    assert stack.upstream.requests_to(path) == []
    entry = await asyncio.to_thread(_entry, stack, path)
    assert entry["status"] == 403 and entry["reason"] == "origin_not_allowed"
    assert entry["protocol"] == _protocol(conn)
    # extauth's decision log names the protocol too
    assert any(d.get("reason") == "origin_not_allowed" and d.get("route") == path
               and d.get("protocol") == _protocol(conn) for d in stack.extauth[0].decisions())


async def test_quota_counts_streams_and_a_closed_one_is_released(stack: Stack, conn: _Multiplexed) -> None:
    user = _user()
    held: list[WebSocket] = []
    try:
        for i in range(QUOTA):  # all on one connection, as a browser multiplexes them
            ws = await _open(conn, user)
            assert isinstance(ws, WebSocket), f"stream {i + 1}/{QUOTA}: {ws}"
            held.append(ws)
        over = await _open(conn, user)
        assert isinstance(over, Refused) and over.status == 429, over
        assert over.reason == "quota_user" and int(over.headers["retry-after"]) >= 1
        # The others still echo; a closed stream's end entry releases its lease (the TTL is
        # 30 s: freed within seconds means released, not expired).
        await held[0].send("still open")
        assert await held[0].recv() == "still open"
        await held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            again = await _open(conn, user)
            if isinstance(again, WebSocket):
                held.append(again)
                break
            assert again.reason == "quota_user", again
            assert time.monotonic() < deadline, "the closed stream's lease was not released"
            await asyncio.sleep(0.1)
        refused = await _open(conn, user)
        assert isinstance(refused, Refused) and refused.reason == "quota_user"
    finally:
        for ws in held:
            await ws.close()


@pytest.mark.parametrize(("headers", "version", "status", "reason"), [
    # RFC 8441: the :protocol supersedes the key; a client sending one is not speaking it.
    ([("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")], "13", 400, "bad_handshake"),
    ([], "8", 426, "unsupported_version"),
])
async def test_rfc8441_rules(stack: Stack, conn: _Multiplexed, headers: list[tuple[str, str]],
                             version: str, status: int, reason: str) -> None:
    path = f"/ws/bad-{uuid.uuid4().hex[:8]}?token={token(_user())}"
    r = await conn.websocket(path, origin=ALLOWED_ORIGIN, headers=headers, version=version)
    assert isinstance(r, Refused) and r.status == status and r.reason == reason, r


async def test_streams_outlive_the_lease_ttl_by_their_periodic_entries(shared_stack: Stack) -> None:
    """Envoy's periodic access-log entries refresh an HTTP/2 stream's lease as an HTTP/1.1
    socket's: after two TTLs (3 s each) the quota's streams are still counted and echo."""
    user = _user()
    quota = shared_stack.cfg.connections_per_user
    async with await H2Client.connect("127.0.0.1", shared_stack.port) as c:
        held: list[WebSocket] = []
        try:
            for _ in range(quota):
                ws = await _open(c, user)
                assert isinstance(ws, WebSocket), ws
                held.append(ws)
            await asyncio.sleep(shared_stack.cfg.lease_ttl * 2 + 0.5)
            over = await _open(c, user)
            assert isinstance(over, Refused) and over.reason == "quota_user", over
            for ws in held[:2]:
                await ws.send("still here")
                assert await ws.recv() == "still here"
        finally:
            for ws in held:
                await ws.close()


async def test_the_session_bound_ends_a_stream(stack: Stack, conn: _Multiplexed) -> None:
    """A policy's session.max_seconds (extauth's grpc-timeout on the allow) closes an HTTP/2 or
    HTTP/3 WebSocket at its bound too, and the end entry releases its lease."""
    user = _user()
    ws = await _open(conn, user, path="/short")
    assert isinstance(ws, WebSocket), ws
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        while time.monotonic() - started < 15:
            await ws.send("ping")
            assert await ws.recv() == "ping"
            await asyncio.sleep(0.1)
    lived = time.monotonic() - started
    assert 1.5 <= lived <= 8, lived

    def ended_at_bound() -> bool:
        return any(e.get("msg") == "session ended at its bound" and e.get("user") == user
                   for x in stack.extauth for e in x.json_lines())

    await asyncio.to_thread(wait_until, ended_at_bound, 5, "the bound's log line")
    entry = await asyncio.to_thread(_entry, stack, "/short", user)
    assert entry["details"] == "max_duration_timeout" and entry["protocol"] == _protocol(conn), entry
