"""Revocation through two real replicas (ExtAuthServer over gRPC) sharing one real store:
memory (one store object for both, as one process would share it), a standalone Redis and a
3-node Cluster. The next upgrade is refused at once by the acquire script; the next plain-HTTP
request within about a second, by every replica, however warm its token cache and memo."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from extauth.config import parse_config
from extauth.server import ExtAuthServer
from extauth.store import MemoryStore, open_store
from extauth.store.base import Revocation
from extauth.store.guard import GuardedStore
from tests.envoy_msgs import headers_of, metadata_of, ws_headers
from tests.keys import JwksServer, jwks_for, jwks_server, shared_rsa_key
from tests.test_server import Client, config, reason_of, token
from tests.waiting import async_wait_until

pytestmark = [pytest.mark.redis, pytest.mark.both_loops]


@pytest.fixture(scope="module")
def jwks() -> Any:
    with jwks_server(jwks_for(shared_rsa_key(), "k1", "RS256")) as srv:
        yield srv


@dataclass
class Replica:
    server: ExtAuthServer
    client: Client

    async def upgrade(self, tok: str) -> tuple[str, dict[str, str]]:
        resp = await self.client.check(f"/ws?token={tok}", ws_headers())
        return ("allow" if resp.status.code == 0 else reason_of(resp)), metadata_of(resp)

    async def http(self, tok: str) -> str:
        resp = await self.client.check("/api/items", {"authorization": f"Bearer {tok}"},
                                       host="api.example.com")
        return "allow" if resp.status.code == 0 else reason_of(resp)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def replicas(request: pytest.FixtureRequest, jwks: JwksServer, key_prefix: str
                   ) -> AsyncIterator[tuple[Replica, Replica]]:
    shared = MemoryStore() if request.param == "memory" else None
    url = {"memory": "memory://", "redis": None, "cluster": None}[request.param]
    if url is None:
        fixture = "redis_server" if request.param == "redis" else "redis_cluster"
        url = request.getfixturevalue(fixture).url
    raw = config(jwks.url, store=url, admin_listen="127.0.0.1:0")
    raw["policies"][0]["quotas"]["connections_per_user"] = 100
    cfg = parse_config(raw)
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(2):
            inner = shared if shared is not None else open_store(url, key_prefix=key_prefix)
            srv = ExtAuthServer(cfg, store=GuardedStore(inner, timeout=1.0))
            await srv.start()
            stack.push_async_callback(srv.stop, 0)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
            stack.push_async_callback(channel.close)
            out.append(Replica(srv, Client(channel)))
        yield out[0], out[1]


async def warm(replicas: tuple[Replica, ...], tok: str) -> None:
    """Every replica has verified the token (cache) and remembered its plain-HTTP allow (memo)."""
    for r in replicas:
        assert (await r.upgrade(tok))[0] == "allow"
        for _ in range(2):
            assert await r.http(tok) == "allow"
    assert all(r.server.metrics.memo_hits.value >= 1 for r in replicas)


async def refused_everywhere(replicas: tuple[Replica, ...], tok: str) -> None:
    for r in replicas:
        # The upgrade: the acquire script reads the store itself, so no wait at all.
        assert (await r.upgrade(tok))[0] == "token_revoked"

        async def http_refused(r: Replica = r) -> bool:
            return await r.http(tok) == "token_revoked"

        await async_wait_until(http_refused, 3.0, "the plain-HTTP request refused")


async def test_revoke_by_jti_on_every_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    tok, other = token("alice", jti="j-1"), token("alice", jti="j-2")
    await warm(replicas, tok)
    await a.server.revocations.revoke(Revocation("jti", "alice", "j-1"), 60)
    assert await a.http(tok) == "token_revoked"  # the replica that revoked knows at once
    await refused_everywhere(replicas, tok)
    for r in replicas:
        assert (await r.upgrade(other))[0] == "allow"
        assert await r.http(other) == "allow"
    # Never a hostile signal: the jail does not count revoked tokens.
    for r in replicas:
        assert r.server.metrics.hostile.labels("token_revoked")._value.get() == 0
        assert r.server.metrics.revocations.labels("jti")._value.get() == 1
    deny = await b.client.check("/api/items", {"authorization": f"Bearer {tok}"}, host="api.example.com")
    assert deny.denied_response.status.code == 401
    assert "retry-after" not in headers_of(deny)


async def test_revoke_by_sid_on_every_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    tok, other = token("bob", jti="x1", sid="sess-1"), token("bob", jti="x2", sid="sess-2")
    await warm(replicas, tok)
    await b.server.revocations.revoke(Revocation("sid", "bob", "sess-1"), 60)
    await refused_everywhere(replicas, tok)
    assert (await a.upgrade(other))[0] == "allow"
    assert await a.http(other) == "allow"


async def test_revoke_issued_before_then_a_new_login_passes(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    now = int(time.time())
    old = token("carol", iat=now - 5)
    await warm(replicas, old)
    await a.server.revocations.revoke(Revocation("before", "carol", before=now), 60)
    await refused_everywhere(replicas, old)
    fresh = token("carol", iat=now + 1)  # issued after T
    for r in replicas:
        assert (await r.upgrade(fresh))[0] == "allow"
        assert await r.http(fresh) == "allow"
    assert (await b.upgrade(token("dave", iat=now - 5)))[0] == "allow"  # another user


async def test_unrevoke_and_expiry_on_every_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    tok, short = token("erin", jti="e-1"), token("erin", jti="e-2")
    await a.server.revocations.revoke(Revocation("jti", "erin", "e-1"), 60)
    await a.server.revocations.revoke(Revocation("jti", "erin", "e-2"), 1.5)
    await refused_everywhere(replicas, tok)
    await refused_everywhere(replicas, short)
    assert await b.server.revocations.unrevoke("jti", "erin", "e-1")
    for r in replicas:
        async def allowed(r: Replica = r, t: str = tok) -> bool:
            return await r.http(t) == "allow" and (await r.upgrade(t))[0] == "allow"

        await async_wait_until(allowed, 3.0, "the unrevoked token allowed")

    # The short one expires on its own, in the store and in every copy.
    for r in replicas:
        async def expired(r: Replica = r) -> bool:
            return await r.http(short) == "allow" and (await r.upgrade(short))[0] == "allow"

        await async_wait_until(expired, 6.0, "the revocation expired")
    assert (await a.server.store.list_revocations()).entries == ()


async def test_an_upgrade_still_takes_exactly_one_store_round_trip(
        jwks: JwksServer, redis_server: Any, key_prefix: str) -> None:
    """The whole pipeline, with revocations in force and this replica's copy in use: each
    upgrade is one EVALSHA (the acquire with its revocation block) and nothing else."""
    import redis.asyncio as aioredis

    from extauth.pipeline import Authorizer
    from extauth.request import CheckInput
    from extauth.revocation import RevocationList
    from extauth.runtime import build_runtime
    from extauth.store.redis import RedisStore
    from tests.test_store_contract import CountingConnection

    raw = config(jwks.url, store=redis_server.url)
    raw["policies"][0]["quotas"]["connections_per_user"] = 100
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=redis_server.port,
                                   connection_class=CountingConnection, decode_responses=True)
    store = GuardedStore(RedisStore(aioredis.Redis(connection_pool=pool), key_prefix=key_prefix), timeout=1.0)
    revocations = RevocationList(store)
    authorizer = Authorizer(build_runtime(parse_config(raw)), store, revocations=revocations)
    admin = redis_server.client()
    try:
        await revocations.revoke(Revocation("jti", "alice", "gone"), 60)
        await revocations.revoke(Revocation("before", "bob", before=time.time()), 60)

        def req(tok: str) -> CheckInput:
            return CheckInput(method="GET", host="ws.example.com", path="/ws", query=f"token={tok}",
                              headers=ws_headers(), source_ip="198.51.100.9")

        tokens = [token("alice", jti=f"ok-{n}") for n in range(10)]
        warm = await authorizer.check(req(token("alice", jti="warm")))  # lease key, scripts, keys
        assert warm.allowed, warm.reason

        evalshas, sends = admin.info("commandstats")["cmdstat_evalsha"]["calls"], CountingConnection.sends
        for tok in tokens:
            assert (await authorizer.check(req(tok))).allowed
        revoked = await authorizer.check(req(token("alice", jti="gone")))
        assert revoked.reason is not None and revoked.reason.value == "token_revoked"
        assert CountingConnection.sends - sends == 10  # the revoked one never reached the store
        assert admin.info("commandstats")["cmdstat_evalsha"]["calls"] - evalshas == 10  # one EVALSHA each
    finally:
        admin.close()
        await store.close()
