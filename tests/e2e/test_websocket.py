"""Through a real Envoy with real clients: origin, token transports, identity, quotas, plain HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from tests.e2e.harness import (
    OTHER_ORIGIN,
    Refused,
    Stack,
    close_all,
    http_request,
    token,
    wait_until,
)

pytestmark = pytest.mark.e2e


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def test_disallowed_origin_is_403_and_never_reaches_upstream(shared_stack: Stack) -> None:
    path = f"/ws/origin-{uuid.uuid4().hex[:8]}"
    r = await shared_stack.try_connect(_user(), path=path, origin=OTHER_ORIGIN)
    assert isinstance(r, Refused)
    assert r.status == 403
    assert r.reason == "origin_not_allowed"
    assert json.loads(r.body)["error"] == "origin_not_allowed"
    assert shared_stack.upstream.requests_to(path) == []
    # Envoy's access log records the reason (from the ext_authz dynamic metadata), and the
    # path without its query string (which carried the token).
    entry = await asyncio.to_thread(
        wait_until,
        lambda: next((e for e in shared_stack.envoy.access_log() if e["path"] == path), None),  # type: ignore[union-attr]
        5, "the access-log entry")
    assert entry is not None
    assert entry["status"] == 403
    assert entry["reason"] == "origin_not_allowed"
    assert "token" not in json.dumps(entry)
    # And extauth's decision log says the same.
    assert any(d.get("reason") == "origin_not_allowed" and d.get("route") == path
               for d in shared_stack.extauth[0].decisions())


async def test_allowed_origin_and_valid_token_is_101_and_echoes(shared_stack: Stack) -> None:
    async with shared_stack.connect(_user()) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"
        await ws.send(b"\x00\x01binary")
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01binary"


@pytest.mark.parametrize("transport", ["query", "header", "subprotocol"])
async def test_upstream_never_sees_the_token_and_sees_the_user(shared_stack: Stack, transport: str) -> None:
    user = _user()
    tok = token(user)
    path = f"/ws/{transport}-{uuid.uuid4().hex[:8]}"
    async with shared_stack.connect(user, tok=tok, path=path, transport=transport) as ws:
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 5) == "ping"
        if transport == "subprotocol":
            # The client offered "chat.v1, bearer.<jwt>"; the upstream saw and chose chat.v1.
            assert ws.subprotocol == "chat.v1"
    [seen] = shared_stack.upstream.requests_to(path)
    assert seen.path == path  # the token query parameter is gone
    assert seen.headers["x-user-id"] == user
    assert "authorization" not in seen.headers
    everything = seen.path + json.dumps(seen.headers)
    assert tok not in everything
    assert tok.split(".")[2] not in everything  # not even the signature
    if transport == "subprotocol":
        assert seen.headers["sec-websocket-protocol"] == "chat.v1"
        assert seen.subprotocol == "chat.v1"


async def test_client_cannot_forge_the_identity_header(shared_stack: Stack) -> None:
    user = _user()
    path = f"/ws/forge-{uuid.uuid4().hex[:8]}"
    ws = await shared_stack.open(user, path=path, transport="header")
    await ws.close()
    # a forged x-user-id next to a valid token is overwritten with the token's subject
    from websockets.asyncio.client import connect

    async with connect(shared_stack.ws_url(path + "-2"), origin=shared_stack.cfg.origins[0],  # type: ignore[arg-type]
                       additional_headers={"Authorization": f"Bearer {token(user)}",
                                           "X-User-Id": "admin"}, proxy=None, compression=None):
        pass
    [seen] = shared_stack.upstream.requests_to(path + "-2")
    assert seen.headers["x-user-id"] == user


async def test_per_user_quota_429_then_release_through_als(shared_stack: Stack) -> None:
    user = _user()
    conns = await shared_stack.hold(user, 10)
    try:
        r = await shared_stack.try_connect(user)
        assert isinstance(r, Refused), "the 11th connection was admitted"
        assert r.status == 429
        assert r.reason == "quota_user"
        assert int(r.headers["retry-after"]) >= 1
        # another user is not affected
        async with shared_stack.connect(_user()) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
        # close one: Envoy's access-log stream releases its lease; a new one is admitted fast
        await conns.pop().close()
        started = time.monotonic()
        conns.append(await shared_stack.wait_admitted(user, within=2.0))
        assert time.monotonic() - started < 2.0
        # and the quota still holds at ten
        r = await shared_stack.try_connect(user)
        assert isinstance(r, Refused) and r.reason == "quota_user"
    finally:
        await close_all(conns)


async def test_held_connections_outlive_the_lease_ttl(shared_stack: Stack) -> None:
    """Periodic access-log entries refresh leases: after several TTLs the ten are still
    counted (no eleventh admitted) and still echo."""
    user = _user()
    conns = await shared_stack.hold(user, 10)
    try:
        await asyncio.sleep(shared_stack.cfg.lease_ttl * 2 + 0.5)
        r = await shared_stack.try_connect(user)
        assert isinstance(r, Refused) and r.reason == "quota_user"
        for ws in conns[:2]:
            await ws.send("still here")
            assert await ws.recv() == "still here"
    finally:
        await close_all(conns)
    await shared_stack.wait_admitted(user, within=2.0)


def test_plain_http_policy_is_jwt_only(shared_stack: Stack) -> None:
    user = _user()
    status, headers, _ = http_request(shared_stack.port, "GET", "/api/items")
    assert status == 401
    assert headers["x-extauth-reason"] == "token_missing"
    assert headers["www-authenticate"].startswith("Bearer")
    status, headers, _ = http_request(shared_stack.port, "GET", "/api/items",
                                      {"Authorization": "Bearer not-a-jwt"})
    assert status == 401
    # the ws audience is not valid for the api policy
    status, _, _ = http_request(shared_stack.port, "GET", "/api/items",
                                {"Authorization": f"Bearer {token(user, aud='ws')}"})
    assert status == 401
    status, _, body = http_request(shared_stack.port, "GET", "/api/items?page=2",
                                   {"Authorization": f"Bearer {token(user, aud='api')}"})
    assert status == 200
    assert json.loads(body) == {"path": "/api/items?page=2", "user": user}


def test_plain_http_on_websocket_only_policy_is_refused(shared_stack: Stack) -> None:
    status, headers, _ = http_request(shared_stack.port, "GET", f"/ws?token={token(_user())}")
    assert status == 400
    assert headers["x-extauth-reason"] == "bad_handshake"


async def test_missing_or_bad_token_on_websocket(shared_stack: Stack) -> None:
    r = await shared_stack.try_connect(None)
    assert isinstance(r, Refused) and r.status == 401 and r.reason == "token_missing"
    r = await shared_stack.try_connect(None, tok=token("x", aud="api"))
    assert isinstance(r, Refused) and r.status == 401
