"""RespLane, the multiplexed connection RedisStore uses on its request path, against a real
server: replies reach their own callers under concurrency and cancellation, a late reply or a
lost connection fails the calls waiting on it and the next call connects again, AUTH and
SELECT are honoured. Only the protocol-garbage case uses a fake server (a real Redis cannot
be made to send garbage)."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extauth.store import LeaseRef, Limits, new_lease_id
from extauth.store.redis import RedisStore, client_from_url
from extauth.store.resp import RespConnection, RespLane, encode
from tests.redis_servers import RedisServer, free_port

pytestmark = [pytest.mark.redis, pytest.mark.both_loops]


@pytest.fixture
async def lane(redis_server: RedisServer) -> AsyncIterator[RespLane]:
    lane = RespLane("127.0.0.1", redis_server.port)
    try:
        yield lane
    finally:
        await lane.close()


def test_encode_is_resp_arrays_of_bulk_strings() -> None:
    assert encode([("SET", "k", 12), ("GET", b"\x00k")]) == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n*2\r\n$3\r\nGET\r\n$2\r\n\x00k\r\n")
    assert encode([("X", "é")]) == b"*2\r\n$1\r\nX\r\n$2\r\n\xc3\xa9\r\n"  # length in bytes


async def test_concurrent_calls_each_get_their_own_reply(lane: RespLane, key_prefix: str) -> None:
    replies = await asyncio.gather(*(lane.call("ECHO", f"{key_prefix}-{i}") for i in range(500)))
    assert replies == [f"{key_prefix}-{i}" for i in range(500)]
    res = await lane.pipeline([("SET", f"{key_prefix}:a", "1"), ("INCRBY", f"{key_prefix}:a", 41),
                               ("HGET", f"{key_prefix}:a", "f"), ("GET", f"{key_prefix}:missing")])
    assert res[:2] == ["OK", 42]
    assert isinstance(res[2], ResponseError) and "WRONGTYPE" in str(res[2])  # in the list, not raised
    assert res[3] is None


async def test_error_replies_raise_from_call(lane: RespLane) -> None:
    with pytest.raises(NoScriptError):
        await lane.call("EVALSHA", "0" * 40, 0)
    with pytest.raises(ResponseError, match="unknown command"):
        await lane.call("NOSUCHCOMMAND")
    assert await lane.call("PING") == "PONG"  # the connection is still in step


async def test_a_cancelled_call_leaves_the_replies_in_step(lane: RespLane, key_prefix: str) -> None:
    # BLPOP holds the connection's reply queue for 0.3 s: a caller giving up meanwhile (as the
    # store's per-call timeout does) must not receive or shift anyone else's reply.
    blocked = asyncio.ensure_future(lane.call("BLPOP", f"{key_prefix}:q", "0.3"))
    behind = asyncio.ensure_future(lane.call("ECHO", "behind"))
    await asyncio.sleep(0.05)
    blocked.cancel()
    assert await behind == "behind"
    assert await lane.call("ECHO", "after") == "after"


async def test_a_late_reply_aborts_the_connection_then_the_next_call_reconnects(
        redis_server: RedisServer, key_prefix: str) -> None:
    lane = RespLane("127.0.0.1", redis_server.port, reply_timeout=1.0)
    try:
        first = await lane.call("CLIENT", "ID")
        waiting = [asyncio.ensure_future(lane.call("BLPOP", f"{key_prefix}:q", "5")),
                   asyncio.ensure_future(lane.call("ECHO", "queued"))]
        for call in waiting:
            with pytest.raises(RedisTimeoutError):
                await call
        assert await lane.call("CLIENT", "ID") != first  # a new connection
    finally:
        await lane.close()


async def test_a_killed_connection_fails_its_calls_and_the_next_call_reconnects(
        lane: RespLane, redis_server: RedisServer, key_prefix: str) -> None:
    client_id = await lane.call("CLIENT", "ID")
    waiting = asyncio.ensure_future(lane.call("BLPOP", f"{key_prefix}:q", "5"))
    await asyncio.sleep(0.05)
    admin = redis_server.client()
    try:
        assert admin.client_kill_filter(_id=client_id) == 1
    finally:
        admin.close()
    with pytest.raises(RedisConnectionError):
        await waiting
    assert await lane.call("ECHO", "again") == "again"


async def test_a_server_restart_is_survived(redis_server: RedisServer, restart_redis: Any) -> None:
    lane = RespLane("127.0.0.1", redis_server.port)
    try:
        assert await lane.call("PING") == "PONG"
        restart_redis()
        for _ in range(50):  # a call may fail while the old socket's close is still in flight
            try:
                assert await lane.call("PING") == "PONG"
                break
            except RedisConnectionError:
                await asyncio.sleep(0.02)
        else:
            pytest.fail("the lane never reconnected")
    finally:
        await lane.close()


async def test_connect_refused_is_a_connection_error() -> None:
    lane = RespLane("127.0.0.1", free_port(), connect_timeout=0.5)
    with pytest.raises(RedisConnectionError):
        await lane.call("PING")


async def test_a_missing_ca_file_is_a_connection_error_at_connect() -> None:
    lane = RespLane.from_client(client_from_url(f"rediss://127.0.0.1:{free_port()}?ssl_ca_certs=/nonexistent.pem"))
    assert lane is not None
    with pytest.raises(RedisConnectionError, match="No such file"):
        await lane.call("PING")


async def test_auth_and_database_are_honoured(private_redis: RedisServer) -> None:
    admin = private_redis.client()
    try:
        admin.execute_command("ACL", "SETUSER", "svc", "on", ">s3cret", "~*", "+@all")
        admin.config_set("requirepass", "topsecret")
    finally:
        admin.close()
    good = RespLane("127.0.0.1", private_redis.port, username="svc", password="s3cret", db=3,
                    client_name="extauth-test")
    wrong = RespLane("127.0.0.1", private_redis.port, username="svc", password="nope")
    nobody = RespLane("127.0.0.1", private_redis.port)
    default = RespLane("127.0.0.1", private_redis.port, password="topsecret")
    try:
        await good.call("SET", "in-db-3", "yes")
        assert await good.call("CLIENT", "GETNAME") == "extauth-test"
        assert await default.call("GET", "in-db-3") is None  # db 0
        assert await default.pipeline([("SELECT", 3), ("GET", "in-db-3")]) == ["OK", "yes"]
        with pytest.raises(RedisConnectionError, match="setup refused"):
            await wrong.call("PING")
        with pytest.raises(ResponseError, match="NOAUTH"):
            await nobody.call("PING")
    finally:
        for lane in (good, wrong, nobody, default):
            await lane.close()


async def test_garbage_from_the_server_fails_the_calls_and_reconnects() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        garbage = connections == 1
        while await reader.read(4096):
            writer.write(b"?garbage\r\n" if garbage else b"+PONG\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lane = RespLane("127.0.0.1", port)
    try:
        with pytest.raises(RedisConnectionError):
            await lane.call("PING")
        assert await lane.call("PING") == "PONG"
        assert connections == 2
    finally:
        await lane.close()
        server.close()
        await server.wait_closed()


def test_from_client_speaks_for_one_server_plain_or_tls(redis_server: RedisServer) -> None:
    lane = RespLane.from_client(client_from_url("redis://u:p%40ss@127.0.0.1:6390/2"))
    assert lane is not None
    assert (lane.host, lane.port, lane._db) == ("127.0.0.1", 6390, 2)
    assert (lane._username, lane._password) == ("u", "p@ss")
    assert not lane.tls and lane.ssl_context() is None
    tls = RespLane.from_client(client_from_url("rediss://127.0.0.1:6390?ssl_cert_reqs=none"))
    assert tls is not None and tls.tls
    ctx = tls.ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE  # redis-py's context for the URL
    # Certificate files are read at the first connect: a missing one is a store error then.
    missing = RespLane.from_client(client_from_url("rediss://127.0.0.1:6390?ssl_ca_certs=/nonexistent.pem"))
    assert missing is not None and missing.tls
    assert RespLane.from_client(RedisCluster(host="127.0.0.1", port=redis_server.port)) is None
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=6390, connection_class=_Custom)
    assert RespLane.from_client(aioredis.Redis(connection_pool=pool)) is None


class _Custom(aioredis.Connection):
    pass


class _Writes:
    """Counts every RespConnection write (one per command or pipeline: a round trip each)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        send = RespConnection.send

        def counted(conn: RespConnection, data: bytes, count: int) -> asyncio.Future[list[Any]]:
            self.count += 1
            return send(conn, data, count)

        monkeypatch.setattr(RespConnection, "send", counted)


async def test_store_request_path_is_one_write_per_acquire_and_per_batch(
        redis_server: RedisServer, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix)
    assert store._lane is not None
    writes = _Writes(monkeypatch)
    try:
        refs = [LeaseRef(new_lease_id(), "chat", f"u{i}", "10.0.0.1") for i in range(20)]
        # Connected and the scripts loaded (a first EVALSHA may meet NOSCRIPT): warm-up writes.
        warm = LeaseRef(new_lease_id(), "chat", "warm", "10.0.0.2")
        await store.acquire(warm, Limits(), 30)
        await store.refresh([warm], 30)
        before = writes.count
        results = await asyncio.gather(*(store.acquire(r, Limits(connections_per_user=1), 30) for r in refs))
        assert all(r.granted for r in results)
        assert writes.count - before == 20
        assert await store.refresh(refs, 30) == 20
        assert await store.release(refs) == 20
        assert writes.count - before == 22
        assert await store.count("chat", ip="10.0.0.1") == 0
    finally:
        await store.close()



async def test_a_connect_every_caller_gave_up_on_fails_without_an_unretrieved_exception() -> None:
    # A server that accepts and never answers: the connect's setup (CLIENT SETNAME) gets no
    # reply, so the shared connect fails at connect_timeout, after its only caller gave up.
    # Nobody awaits it then, and its failure must not be logged as "Task exception was never
    # retrieved" (a traceback per failed connect during an outage).
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    lane = RespLane("127.0.0.1", server.sockets[0].getsockname()[1], connect_timeout=0.1,
                    client_name="extauth-test")
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):  # the caller's own timeout, as the guard's
                await lane.call("PING")
        connecting = lane._connecting
        assert connecting is not None
        await asyncio.wait([connecting])  # waits for it without retrieving its outcome
        assert not connecting.cancelled() and lane._conn is None  # it failed, unwatched
        # asyncio reports an exception never retrieved when the task is collected.
        del connecting
        gc.collect()
        assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported
    finally:
        loop.set_exception_handler(None)
        await lane.close()
        server.close()
        await server.wait_closed()
