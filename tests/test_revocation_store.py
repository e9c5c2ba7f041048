"""Revocation in every Store (memory, a standalone Redis, a real 3-node Cluster): by jti, by
session id, by subject "issued before T"; checked by the acquire itself; entries that expire
on their own; the epoch replicas poll; and still one round trip per acquire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from extauth.reasons import Reason
from extauth.store import LeaseRef, Limits, MemoryStore, Store, new_lease_id
from extauth.store.base import Revocation, TokenIds
from extauth.store.redis import RedisStore
from tests.redis_servers import RedisClusterServers, RedisServer
from tests.test_store_contract import CountingConnection

pytestmark = [pytest.mark.redis, pytest.mark.both_loops]

LIM = Limits(connections_per_user=100, connections_per_ip=100)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisStore.from_url(server.url, key_prefix=key_prefix)
    else:
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        s = RedisStore.from_url(cluster.url, key_prefix=key_prefix)
    try:
        yield s
    finally:
        await s.close()


def ref(user: str | None = "alice", ip: str = "10.0.0.1") -> LeaseRef:
    return LeaseRef(new_lease_id(), "chat", user, ip)


async def admitted(store: Store, user: str, token: TokenIds, ip: str = "10.0.0.1") -> bool:
    res = await store.acquire(ref(user, ip), LIM, 30, token)
    assert res.granted or res.denied is Reason.TOKEN_REVOKED, res
    return res.granted


async def test_revoke_by_jti_refuses_that_token_only(store: Store) -> None:
    epoch = await store.revocation_epoch()
    expires = await store.revoke(Revocation("jti", "alice", "j-1"), 60)
    assert expires > time.time() + 50
    assert await store.revocation_epoch() != epoch
    assert not await admitted(store, "alice", TokenIds(jti="j-1", issued_at=time.time()))
    assert await admitted(store, "alice", TokenIds(jti="j-2", issued_at=time.time()))
    # The jti is the subject's: another user's token with the same jti is not revoked.
    assert await admitted(store, "bob", TokenIds(jti="j-1"))
    # A denied acquire records nothing.
    assert await store.count("chat", user="alice") == 1


async def test_revoke_by_sid(store: Store) -> None:
    await store.revoke(Revocation("sid", "alice", "session/1 {x}"), 60)
    assert not await admitted(store, "alice", TokenIds(jti="a", sid="session/1 {x}"))
    assert await admitted(store, "alice", TokenIds(jti="b", sid="session-2"))
    assert await admitted(store, "alice", TokenIds(jti="c"))


async def test_revoke_issued_before_passes_later_tokens(store: Store) -> None:
    t = time.time()
    await store.revoke(Revocation("before", "alice", before=t), 60)
    assert not await admitted(store, "alice", TokenIds(issued_at=t - 10))
    assert not await admitted(store, "alice", TokenIds(jti="x", issued_at=t - 0.5))
    assert not await admitted(store, "alice", TokenIds(jti="no-iat"))  # cannot prove it is newer
    assert await admitted(store, "alice", TokenIds(issued_at=t))
    assert await admitted(store, "alice", TokenIds(issued_at=t + 5))
    # Revoking an earlier instant later never moves it back.
    await store.revoke(Revocation("before", "alice", before=t - 100), 60)
    assert not await admitted(store, "alice", TokenIds(issued_at=t - 10))
    listed = (await store.list_revocations()).entries
    assert [(r.kind, r.subject) for r in listed] == [("before", "alice")]
    assert listed[0].before == pytest.approx(t, abs=0.002)


async def test_list_unrevoke_and_epoch(store: Store) -> None:
    await store.revoke(Revocation("jti", "alice", "j-1"), 60)
    await store.revoke(Revocation("sid", "bob|x", "s:1"), 60)
    now = time.time()
    await store.revoke(Revocation("before", "carol", before=now), 60)
    listing = await store.list_revocations()
    assert listing.epoch == await store.revocation_epoch()
    assert [(r.kind, r.subject, r.value) for r in listing.entries] == [
        ("jti", "alice", "j-1"), ("sid", "bob|x", "s:1"), ("before", "carol", "")]
    assert all(r.expires_at > now + 50 for r in listing.entries)
    assert await store.unrevoke("jti", "alice", "j-1")
    assert not await store.unrevoke("jti", "alice", "j-1")
    assert await store.unrevoke("before", "carol")
    assert await store.revocation_epoch() != listing.epoch
    assert await admitted(store, "alice", TokenIds(jti="j-1"))
    assert await admitted(store, "carol", TokenIds(issued_at=now - 10))
    assert [(r.kind, r.subject) for r in (await store.list_revocations()).entries] == [("sid", "bob|x")]


async def test_entries_expire_on_their_own(store: Store) -> None:
    now = time.time()
    await store.revoke(Revocation("jti", "alice", "short"), 1.0)
    await store.revoke(Revocation("before", "dave", before=now), 1.0)
    # An instant whose tokens have all expired already records nothing.
    assert await store.revoke(Revocation("before", "erin", before=now - 10), 1.0) <= time.time()
    assert not await admitted(store, "alice", TokenIds(jti="short"))
    assert len((await store.list_revocations()).entries) == 2
    deadline = time.monotonic() + 10
    while (await store.list_revocations()).entries:
        assert time.monotonic() < deadline, "revocations did not expire"
        await asyncio.sleep(0.1)
    assert await admitted(store, "alice", TokenIds(jti="short"))
    assert await admitted(store, "dave", TokenIds(issued_at=now - 5))


async def test_no_token_ids_means_no_revocation_check(store: Store) -> None:
    await store.revoke(Revocation("before", "alice", before=time.time() + 1), 60)
    assert (await store.acquire(ref("alice"), LIM, 30)).granted  # callers without a token
    assert (await store.acquire(ref(None), LIM, 30, TokenIds(jti="x"))).granted  # anonymous


async def test_revoked_is_checked_after_a_ban_and_before_quotas(store: Store) -> None:
    await store.revoke(Revocation("jti", "alice", "j"), 60)
    full = Limits(connections_per_user=1)
    assert (await store.acquire(ref("alice", "10.0.0.9"), full, 30)).granted
    res = await store.acquire(ref("alice", "10.0.0.9"), full, 30, TokenIds(jti="j"))
    assert res.denied is Reason.TOKEN_REVOKED
    await store.ban("10.0.0.9", 60, "manual")
    res = await store.acquire(ref("alice", "10.0.0.9"), full, 30, TokenIds(jti="j"))
    assert res.denied is Reason.BANNED


async def test_still_one_round_trip_per_acquire_with_the_revocation_check(
        redis_server: RedisServer, key_prefix: str) -> None:
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=redis_server.port,
                                   connection_class=CountingConnection, decode_responses=True)
    store = RedisStore(aioredis.Redis(connection_pool=pool), key_prefix=key_prefix)
    admin = redis_server.client()
    try:
        await store.revoke(Revocation("jti", "alice", "gone"), 60)
        await store.revoke(Revocation("before", "alice", before=time.time() - 1), 60)
        await store.acquire(ref(), LIM, 30, TokenIds(jti="warm", issued_at=time.time()))

        def evalshas() -> int:
            return int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

        before, sends = evalshas(), CountingConnection.sends
        for n in range(10):
            assert (await store.acquire(ref(), LIM, 30, TokenIds(jti=f"ok{n}", sid="s",
                                                                   issued_at=time.time()))).granted
        res = await store.acquire(ref(), LIM, 30, TokenIds(jti="gone", issued_at=time.time()))
        assert res.denied is Reason.TOKEN_REVOKED
        assert CountingConnection.sends - sends == 11  # one round trip each, revoked or not
        assert evalshas() - before == 11  # ... and it is one EVALSHA
    finally:
        admin.close()
        await store.close()
