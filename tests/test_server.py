"""The real grpc.aio server on an ephemeral port, called over a real gRPC channel with
xds-protos messages; keys come from a JWKS URL served by a local HTTP server."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from extauth.config import load_config, parse_config
from extauth.server import ExtAuthServer, guard_settings
from extauth.store.guard import GuardedStore
from extauth.store.memory import MemoryStore
from tests.envoy_msgs import (
    als_message,
    check_request,
    h2_ws_headers,
    headers_of,
    log_entry,
    metadata_of,
    ws_headers,
)
from tests.keys import (
    JwksServer,
    jwks_for,
    jwks_server,
    make_rsa_key,
    refresh_timers,
    shared_rsa_key,
    sign,
)
from tests.waiting import async_wait_until

pytestmark = pytest.mark.both_loops

ISS = "https://issuer.example.com"


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with jwks_server(jwks_for(shared_rsa_key(), "k1", "RS256")) as srv:
        yield srv


def token(sub: str = "alice", key: Any = None, **over: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": "ws", "sub": sub, "iat": now, "exp": now + 600, **over}
    return sign(key or shared_rsa_key(), "RS256", claims, kid="k1")


def config(jwks_url: str, **top: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "store": "memory://",
        "drain_seconds": 0,
        **top,
        "policies": [
            {
                "name": "chat",
                "match": {"hosts": ["ws.example.com"], "path_prefix": "/ws"},
                "origins": ["https://app.example.com", "https://*.example.com"],
                "jwt": {
                    "issuer": ISS, "audiences": ["ws"], "algorithms": ["RS256"], "jwks_uri": jwks_url,
                    "token_sources": ["query:token", "header:authorization", "subprotocol"],
                },
                "quotas": {"connections_per_user": 2, "connections_per_ip": 50},
                "upstream_headers": {"x-user-id": "{sub}", "x-tenant": "{org}"},
            },
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "websocket_only": False,
                "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_uri": jwks_url},
                "upstream_headers": {"x-user-id": "{sub}"},
            },
        ],
    }


class Client:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.authz = external_auth_pb2_grpc.AuthorizationStub(channel)
        self.als = als_pb2_grpc.AccessLogServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    async def check(self, *args: Any, **kw: Any) -> external_auth_pb2.CheckResponse:
        return await self.authz.Check(check_request(*args, **kw), timeout=5)


@pytest.fixture
async def server(jwks: JwksServer) -> AsyncIterator[ExtAuthServer]:
    srv = ExtAuthServer(parse_config(config(jwks.url)))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(drain=0)


@pytest.fixture
async def client(server: ExtAuthServer) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Client(channel)


def reason_of(resp: external_auth_pb2.CheckResponse) -> str:
    return headers_of(resp).get("x-extauth-reason", "")


async def test_health_serving_and_reflection(client: Client) -> None:
    resp = await client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    authz = await client.health.Check(
        health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=5)
    assert authz.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    calls = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for r in calls:
        names = {s.name for s in r.list_services_response.service}
    assert {"envoy.service.auth.v3.Authorization", "envoy.service.accesslog.v3.AccessLogService"} <= names


async def test_allow_strips_query_token_and_adds_identity(client: Client) -> None:
    resp = await client.check(f"/ws/room?x=1&token={token(org='acme')}",
                              ws_headers(x_user_id="spoofed", x_tenant="spoofed"))
    assert resp.status.code == 0 and resp.HasField("ok_response")
    assert list(resp.ok_response.query_parameters_to_remove) == ["token"]
    headers = headers_of(resp)
    assert headers["x-user-id"] == "alice" and headers["x-tenant"] == "acme"
    md = metadata_of(resp)
    assert md["policy"] == "chat" and md["user"] == "alice" and len(md["lease_id"]) >= 16
    assert md["client_ip"] == "203.0.113.7"
    assert "token" not in json.dumps(md)


async def test_the_request_protocol_reaches_the_pipeline(client: Client) -> None:
    # An HTTP/2 WebSocket as Envoy sends it: allowed, with a key for an HTTP/1.1 upstream ...
    resp = await client.check(f"/ws?token={token()}", h2_ws_headers(), protocol="HTTP/2")
    assert resp.status.code == 0, reason_of(resp)
    assert len(headers_of(resp)["sec-websocket-key"]) == 24
    assert metadata_of(resp)["lease_id"]
    # ... and the same headers claiming HTTP/1.1 lack the key RFC 6455 requires.
    resp = await client.check(f"/ws?token={token()}", h2_ws_headers(), protocol="HTTP/1.1")
    assert reason_of(resp) == "bad_handshake"


async def test_missing_claim_header_is_removed_not_left_spoofable(client: Client) -> None:
    resp = await client.check("/ws", ws_headers(authorization=f"Bearer {token()}", x_tenant="spoofed"))
    assert resp.status.code == 0
    assert "x-tenant" in resp.ok_response.headers_to_remove
    assert "authorization" in resp.ok_response.headers_to_remove


async def test_subprotocol_token_forwards_only_real_protocols(client: Client) -> None:
    tok = token()
    resp = await client.check("/ws", ws_headers(sec_websocket_protocol=f"chat.v1, bearer.{tok}"))
    assert resp.status.code == 0
    assert headers_of(resp)["sec-websocket-protocol"] == "chat.v1"
    assert tok not in str(resp)


async def test_disallowed_origin_403_with_json_body(client: Client) -> None:
    resp = await client.check(f"/ws?token={token()}", ws_headers(origin="https://evil.com"))
    assert resp.denied_response.status.code == 403
    assert reason_of(resp) == "origin_not_allowed"
    body = json.loads(resp.denied_response.body)
    assert body["error"] == "origin_not_allowed" and body["message"]
    assert headers_of(resp)["content-type"] == "application/json"
    assert metadata_of(resp)["reason"] == "origin_not_allowed"


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        (ws_headers(origin=None), 403, "origin_missing"),
        (ws_headers(sec_websocket_version="8"), 426, "unsupported_version"),
        (ws_headers(sec_websocket_key="nope"), 400, "bad_handshake"),
        ({"origin": "https://app.example.com"}, 400, "bad_handshake"),  # plain HTTP on a ws-only policy
        (ws_headers(), 401, "token_missing"),
        (ws_headers(authorization="Bearer not-a-jwt"), 401, "token_malformed"),
        (ws_headers(authorization="Bearer " + "a" * 9000), 401, "token_malformed"),
        (ws_headers(origin="https://app!example.com"), 403, "origin_not_allowed"),  # Envoy's non-UTF-8 '!'
    ],
)
async def test_denials(client: Client, headers: dict[str, str], status: int, reason: str) -> None:
    resp = await client.check("/ws", headers)
    assert resp.denied_response.status.code == status
    assert reason_of(resp) == reason


async def test_426_tells_the_supported_version(client: Client) -> None:
    resp = await client.check("/ws", ws_headers(sec_websocket_version="8"))
    assert headers_of(resp)["sec-websocket-version"] == "13"


async def test_401_carries_www_authenticate(client: Client) -> None:
    resp = await client.check("/ws", ws_headers(authorization="Bearer a.b.c"))
    assert 'error="invalid_token"' in headers_of(resp)["www-authenticate"]
    missing = await client.check("/ws", ws_headers())
    assert "error=" not in headers_of(missing)["www-authenticate"]


async def test_forged_signature_and_expired(client: Client) -> None:
    forged = token(key=make_rsa_key())
    resp = await client.check("/ws", ws_headers(authorization=f"Bearer {forged}"))
    assert reason_of(resp) == "token_bad_signature"
    expired = token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    resp = await client.check("/ws", ws_headers(authorization=f"Bearer {expired}"))
    assert reason_of(resp) == "token_expired"


async def test_unknown_policy_and_empty_request(client: Client) -> None:
    resp = await client.check("/ws", ws_headers(), context={"policy": "nope"})
    assert resp.denied_response.status.code == 403 and reason_of(resp) == "no_policy"
    empty = await client.authz.Check(external_auth_pb2.CheckRequest(), timeout=5)
    # It names no source address either: that is what it is refused for first.
    assert empty.denied_response.status.code == 403 and reason_of(empty) == "source_not_ip"


async def test_plain_http_policy_by_jwt_alone(client: Client) -> None:
    resp = await client.check("/api/items", {"authorization": f"Bearer {token()}"}, host="api.example.com")
    assert resp.status.code == 0
    assert headers_of(resp)["x-user-id"] == "alice"
    assert "lease_id" not in metadata_of(resp)  # nothing to count for plain HTTP


async def test_user_quota_then_release_through_access_log(client: Client) -> None:
    tok = token("bob")
    leases = []
    for _ in range(2):
        resp = await client.check(f"/ws?token={tok}", ws_headers())
        assert resp.status.code == 0
        leases.append(metadata_of(resp))
    third = await client.check(f"/ws?token={tok}", ws_headers())
    assert third.denied_response.status.code == 429 and reason_of(third) == "quota_user"
    assert int(headers_of(third)["retry-after"]) >= 1
    assert metadata_of(third)["user"] == "bob"

    # Envoy streams the tunnel-established, periodic and end entries with our metadata.
    call = client.als.StreamAccessLogs()
    await call.write(als_message([log_entry(leases[0], "DownstreamTunnelSuccessfullyEstablished"),
                                  log_entry(None, "DownstreamEnd")]))
    await call.write(als_message([log_entry(leases[0], "DownstreamPeriodic")], first=False))
    await call.write(als_message([log_entry(leases[0], "DownstreamEnd")], first=False))
    await call.done_writing()
    await call

    again = await client.check(f"/ws?token={tok}", ws_headers())
    assert again.status.code == 0, reason_of(again)


async def test_internal_error_is_a_500_denial_and_server_survives(jwks: JwksServer) -> None:
    from extauth.store.memory import MemoryStore

    class Broken(MemoryStore):
        # A bug inside the store is a fault we cannot cause for real.
        async def acquire(self, *a: Any, **kw: Any) -> Any:
            raise RuntimeError("boom")

    srv = ExtAuthServer(parse_config(config(jwks.url)), store=Broken())
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            c = Client(ch)
            resp = await c.check(f"/ws?token={token()}", ws_headers())
            assert resp.denied_response.status.code == 500
            assert reason_of(resp) == "internal_error"
            assert "boom" not in resp.denied_response.body
            ok = await c.check("/api/x", {"authorization": f"Bearer {token()}"})
            assert ok.status.code == 0
    finally:
        await srv.stop(drain=0)


async def test_leases_in_real_redis_refreshed_and_released_over_the_stream(
    jwks: JwksServer, redis_server: Any, key_prefix: str
) -> None:
    from extauth.store import open_store
    from extauth.store.guard import GuardedStore

    cfg = parse_config(config(jwks.url, store=redis_server.url, lease_ttl_seconds=1.0))
    store = GuardedStore(open_store(redis_server.url, key_prefix=key_prefix), timeout=1.0)
    srv = ExtAuthServer(cfg, store=store)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            c = Client(ch)
            tok = token("erin")
            first = metadata_of(await c.check(f"/ws?token={tok}", ws_headers()))
            second = metadata_of(await c.check(f"/ws?token={tok}", ws_headers()))
            assert "lease_id" in first and "lease_id" in second
            assert await store.count("chat", user="erin") == 2

            call = c.als.StreamAccessLogs()
            await call.write(als_message([log_entry(first, "DownstreamTunnelSuccessfullyEstablished"),
                                          log_entry(second, "DownstreamTunnelSuccessfullyEstablished")]))
            # Keep `first` alive with periodic entries past the TTL; let `second` lapse.
            deadline = time.monotonic() + 1.6
            while time.monotonic() < deadline:
                await call.write(als_message([log_entry(first, "DownstreamPeriodic")], first=False))
                await asyncio.sleep(0.2)
            leases = await store.list_leases("chat", user="erin")
            assert [lease.lease_id for lease in leases] == [first["lease_id"]]
            await call.write(als_message([log_entry(first, "DownstreamEnd")], first=False))
            await call.done_writing()
            await call
            assert await store.count("chat", user="erin") == 0
    finally:
        await srv.stop(drain=0)


async def test_stop_ends_open_access_log_streams_instead_of_waiting_for_them(jwks: JwksServer) -> None:
    srv = ExtAuthServer(parse_config(config(jwks.url)))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            call = Client(ch).als.StreamAccessLogs()
            await call.write(als_message([log_entry(None, "DownstreamPeriodic")]))
            # Stop once the server is handling the stream: an RPC whose handler has not started
            # when the server stops is cancelled by gRPC, not ended by us.
            seen = srv.metrics.accesslog_entries.labels("periodic", "ignored")

            async def handled() -> bool:
                return bool(seen._value.get() == 1)

            await async_wait_until(handled, 5.0, "the server to handle the stream's first message")
            # Envoy never half-closes this stream; stop() must not sit out the grace period on it.
            await asyncio.wait_for(srv.stop(drain=0), timeout=1.5)
            # The server ended the stream (Envoy reconnects to another replica).
            await asyncio.wait_for(call, timeout=1.0)
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await srv.stop(drain=0)  # a no-op once stopped; stops it when an assertion failed first


async def test_file_reloads_under_concurrent_checks_fail_none(jwks: JwksServer, tmp_path: Any) -> None:
    path = tmp_path / "extauth.yaml"

    def write(extra_origin: int) -> None:
        data = config(jwks.url)
        data["policies"][0]["origins"] = ["https://app.example.com", f"https://r{extra_origin}.example.com"]
        path.write_text(yaml.safe_dump(data))

    write(0)
    srv = ExtAuthServer(load_config(path), config_path=path)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            c = Client(ch)
            tok = token("frank")
            stop = asyncio.Event()

            async def reloader() -> int:
                n = 0
                while not stop.is_set():
                    n += 1
                    write(n)
                    assert await srv.reload()
                return n

            task = asyncio.create_task(reloader())
            results = []
            for _ in range(10):
                results += await asyncio.gather(*(
                    c.check("/api/x", {"authorization": f"Bearer {tok}"}, host="api.example.com")
                    for _ in range(40)))
            stop.set()
            reloads = await task
        assert reloads >= 3
        assert all(r.status.code == 0 for r in results), {reason_of(r) for r in results}
        assert srv.metrics.reloads.labels("ok")._value.get() == reloads
    finally:
        await srv.stop(drain=0)


class FileServer:
    """A started server whose config comes from a file the test rewrites, then reloads."""

    def __init__(self, jwks: JwksServer, tmp_path: Any) -> None:
        self.path = tmp_path / "extauth.yaml"
        self.data = config(jwks.url)
        self.write()
        self.srv = ExtAuthServer(load_config(self.path), config_path=self.path)

    def write(self, **top: Any) -> None:
        self.data.update(top)
        self.path.write_text(yaml.safe_dump(self.data))


@pytest.fixture
async def file_server(jwks: JwksServer, tmp_path: Any) -> AsyncIterator[FileServer]:
    fs = FileServer(jwks, tmp_path)
    await fs.srv.start()
    try:
        yield fs
    finally:
        await fs.srv.stop(drain=0)


async def test_reload_applies_store_timeout_and_breaker_settings(file_server: FileServer) -> None:
    srv = file_server.srv
    assert srv.store.timeout == 0.05
    file_server.write(store_timeout_ms=120, store_breaker={"failure_threshold": 7, "reset_seconds": 9})
    assert await srv.reload()
    assert srv.store.timeout == 0.12
    assert (srv.store.failure_threshold, srv.store.reset_seconds) == (7, 9)


async def test_a_file_that_breaks_the_parser_is_refused_and_reloads_go_on(
        file_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import extauth.server

    srv = file_server.srv

    def parser_bug(_path: Any) -> Any:
        # What PyYAML raises on a file nested thousands deep (not provoked for real here:
        # a RecursionError leaves CPython's own recursion bookkeeping unreliable).
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(extauth.server, "load_config", parser_bug)
    assert not await srv.reload()
    monkeypatch.undo()
    assert srv.metrics.reloads.labels("error")._value.get() == 1
    file_server.write(store_timeout_ms=120)
    assert await srv.reload()  # the next good file is taken
    assert srv.config.store_timeout_ms == 120


@pytest.mark.parametrize(("key", "value"), [("admin_token_env", "EXTAUTH_ADMIN_TOKEN_NEXT"),
                                            ("watch_config", False), ("event_loop", "asyncio")])
async def test_a_reload_that_changes_what_is_read_at_start_is_refused(
        file_server: FileServer, key: str, value: Any) -> None:
    # The admin token is read when the admin API starts and the file watcher is started by
    # serve: a reload reporting success while the old token kept working would mislead.
    srv = file_server.srv
    before = getattr(srv.config, key)
    assert before != value
    file_server.write(**{key: value})
    assert not await srv.reload()
    assert getattr(srv.config, key) == before
    assert srv.metrics.reloads.labels("error")._value.get() == 1


async def _one_key_timer() -> bool:
    return len(refresh_timers()) == 1


async def test_a_reload_that_changes_only_claim_settings_keeps_the_warm_keys(tmp_path: Any) -> None:
    with jwks_server(jwks_for(shared_rsa_key(), "k1", "RS256")) as keys:
        fs = FileServer(keys, tmp_path)
        await fs.srv.start()
        try:
            # Both policies read the same JWKS with the same settings: one source, one fetch.
            assert keys.requests == 1 and len(refresh_timers()) == 1
            before = list(fs.srv.authorizer.runtime.key_sources.values())
            # The endpoint is down when a new audience is added: a new key source could load
            # nothing, and the policy would deny jwks_unavailable until the endpoint is back.
            keys.set(mode="500")
            fs.data["policies"][0]["jwt"]["audiences"] = ["ws", "ws2"]
            fs.write()
            assert await fs.srv.reload()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{fs.srv.port}") as ch:
                resp = await Client(ch).check(f"/ws?token={token(aud='ws2')}", ws_headers())
            assert resp.status.code == 0, reason_of(resp)
            assert keys.requests == 1 and len(refresh_timers()) == 1
            assert list(fs.srv.authorizer.runtime.key_sources.values()) == before
            # A change to the key source's own settings replaces it, and the old one stops.
            keys.set(mode="ok")
            fs.data["policies"][0]["jwt"]["jwks_timeout_seconds"] = 1.5
            fs.write()
            assert await fs.srv.reload()
            assert len(fs.srv.authorizer.runtime.key_sources) == 2
            assert len(refresh_timers()) == 2  # the api policy's source, and chat's new one
            fs.data["policies"][1]["jwt"]["jwks_timeout_seconds"] = 1.5
            fs.write()
            assert await fs.srv.reload()
            assert len(fs.srv.authorizer.runtime.key_sources) == 1
            await async_wait_until(_one_key_timer, 5, "the unused key source to stop")
        finally:
            await fs.srv.stop(drain=0)
    assert len(refresh_timers()) == 0


async def test_a_reload_applies_the_log_level(file_server: FileServer) -> None:
    root = logging.getLogger()
    saved = root.level
    try:
        file_server.write(log_level="warning")
        assert await file_server.srv.reload()
        assert root.level == logging.WARNING
        file_server.write(log_level="debug")
        assert await file_server.srv.reload()
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(saved)


class _LateStore(MemoryStore):
    """Commits the lease, then answers ``delay`` seconds late: awaiting (the check can be
    cancelled meanwhile) or, with ``stall``, blocking the whole event loop (it cannot)."""

    delay = 0.0
    stall = False
    committed = 0

    async def acquire(self, *a: Any, **kw: Any) -> Any:
        result = await super().acquire(*a, **kw)
        self.committed += 1
        if self.stall:
            time.sleep(self.delay)  # noqa: ASYNC251  (blocking on purpose: a stalled loop)
        elif self.delay:
            await asyncio.sleep(self.delay)
        return result


@pytest.mark.parametrize("stall", [
    # The reply comes past the caller's deadline, where grpc.aio cancels the check (Envoy has
    # answered the client itself by then): the guard gives the lease back.
    False,
    # The check is not cancelled, it finishes: the loop stalled (a GC pause, a host that takes
    # the CPU away) right after the acquire, past the deadline. Its allow goes to a call that
    # has ended: Envoy never applies it and never logs the lease.
    True,
], ids=["cancelled", "loop_stalled"])
async def test_a_lease_whose_allow_never_reaches_envoy_is_given_back(jwks: JwksServer, stall: bool) -> None:
    cfg = parse_config(config(jwks.url, store_timeout_ms=5000))
    inner = _LateStore()
    srv = ExtAuthServer(cfg, store=GuardedStore(inner, **guard_settings(cfg)))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            # Warm first (the signing keys, the lease key), so that the short deadline below
            # falls after the acquire has committed, not before it, on a busy machine too.
            warm = await stub.Check(check_request(f"/ws?token={token('warm')}", ws_headers()), timeout=5)
            assert warm.status.code == 0 and inner.committed == 1
            # A deadline with a second of slack to reach the acquire, a reply half a second past it.
            inner.delay, inner.stall = 1.5, stall
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Check(check_request(f"/ws?token={token('late')}", ws_headers()), timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert inner.committed == 2
            inner.delay = 0.0

            async def none_left() -> bool:
                return await inner.count("chat", user="late") == 0

            await async_wait_until(none_left, 5.0, "the late lease to be released")
            assert srv.metrics.leases_past_deadline._value.get() == (1 if stall else 0)
            # The allows that reached their caller keep their leases.
            assert await inner.count("chat", user="warm") == 1
            ok = await stub.Check(check_request(f"/ws?token={token('prompt')}", ws_headers()), timeout=5)
            assert ok.status.code == 0 and await inner.count("chat", user="prompt") == 1
    finally:
        await srv.stop(drain=0)
