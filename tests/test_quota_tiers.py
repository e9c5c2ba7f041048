"""Quota tiers chosen by a claim, per-network per-IP limits, and per-user overrides held in the
store (applied by the acquire in its one round trip): exact-N per tier on memory, a standalone
Redis and a real 3-node Cluster."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from extauth.config import ConfigError, parse_config
from extauth.pipeline import Authorizer
from extauth.quotas import QuotaPlan
from extauth.reasons import Reason
from extauth.request import CheckInput
from extauth.runtime import build_runtime
from extauth.store import LeaseRef, Limits, MemoryStore, Store, new_lease_id
from extauth.store.base import QuotaOverride
from extauth.store.guard import GuardedStore
from extauth.store.redis import RedisStore
from tests.envoy_msgs import ws_headers
from tests.keys import jwks_for, shared_rsa_key, sign
from tests.redis_servers import RedisClusterServers, RedisServer

ISS = "https://issuer.example.com"

QUOTAS = {
    "connections_per_user": 2, "connections_per_ip": 20, "attempts_per_user_per_minute": 100,
    "tier_claim": "plan",
    "tiers": {"pro": {"connections_per_user": 5}, "internal": {"connections_per_user": 8,
                                                               "connections_per_ip": 40}},
    "ip_overrides": [{"cidr": "203.0.113.0/24", "connections_per_ip": 500},
                     {"cidr": "203.0.113.128/25", "attempts_per_ip_per_minute": 9000},
                     {"cidr": "2001:db8::/32", "connections_per_ip": 60}],
}


def plan(**over: Any) -> QuotaPlan:
    cfg = parse_config({"policies": [{"name": "p", "jwt": {"issuer": ISS, "audiences": ["ws"],
                                                           "jwks_file": "/nonexistent"},
                                      "quotas": {**QUOTAS, **over}}]})
    return QuotaPlan(cfg.policies[0].quotas, enforce_bans=True)


def test_the_tier_a_claim_names_and_the_default_tier() -> None:
    p = plan()
    default = Limits(connections_per_user=2, connections_per_ip=20, attempts_per_user_per_minute=100)
    assert p.limits({"plan": "free"}, "198.51.100.1") == default  # not a tier: the default
    assert p.limits(None, "198.51.100.1") == default
    for odd in (None, 7, True, ["pro"], {"pro": 1}, "PRO"):
        assert p.limits({"plan": odd}, "198.51.100.1") == default, odd
    # A tier replaces what it gives and keeps the rest.
    assert p.limits({"plan": "pro"}, "198.51.100.1") == Limits(5, 20, 100, None)
    assert p.limits({"plan": "internal"}, "198.51.100.1") == Limits(8, 40, 100, None)


def test_the_longest_matching_network_sets_the_per_ip_limits() -> None:
    p = plan()
    assert p.limits({"plan": "pro"}, "203.0.113.5").connections_per_ip == 500
    deeper = p.limits({}, "203.0.113.200")
    assert (deeper.connections_per_ip, deeper.attempts_per_ip_per_minute) == (20, 9000)  # /25 wins
    assert p.limits({}, "2001:db8:1::7").connections_per_ip == 60
    assert p.limits({}, "192.0.2.1").connections_per_ip == 20
    assert p.limits({}, "unix:/run/envoy.sock").connections_per_ip == 20  # no address: no network
    assert p.limits({"plan": "internal"}, "203.0.113.5").connections_per_user == 8  # per-user: the tier's


@pytest.mark.parametrize(("quotas", "message"), [
    ({"tiers": {"pro": {"connections_per_user": 5}}}, "tiers need tier_claim"),
    ({"tier_claim": "plan"}, "tier_claim needs tiers"),
    ({"tier_claim": "a..b", "tiers": {"x": {}}}, "claim path"),
    ({"ip_overrides": [{"cidr": "nonsense", "connections_per_ip": 1}]}, "not a network"),
    ({"ip_overrides": [{"cidr": "10.0.0.0/8"}]}, "give connections_per_ip"),
    ({"ip_overrides": [{"cidr": "10.0.0.0/8", "connections_per_ip": 1},
                       {"cidr": "10.0.0.0/8", "connections_per_ip": 2}]}, "each cidr once"),
    ({"tier_claim": "plan", "tiers": {"pro": {"connections_per_user": 0}}}, "greater than or equal to 1"),
])
def test_bad_tier_config(quotas: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="quotas") as err:
        parse_config({"policies": [{"name": "p", "jwt": {"issuer": ISS, "audiences": ["ws"],
                                                         "jwks_file": "/x"}, "quotas": quotas}]})
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="need a jwt section"):
        parse_config({"policies": [{"name": "p", "quotas": {"tier_claim": "plan",
                                                             "tiers": {"pro": {"connections_per_ip": 3}}}}]})


# -- the store: overrides, on every backend ------------------------------------------------------



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


def ref(user: str | None, ip: str, policy: str = "chat") -> LeaseRef:
    return LeaseRef(new_lease_id(), policy, user, ip)


@pytest.mark.redis
async def test_override_set_get_clear(store: Store) -> None:
    assert await store.get_quota_override("chat", "alice") is None
    got = await store.set_quota_override("chat", "alice", QuotaOverride(connections_per_user=7), None)
    assert got == QuotaOverride(7, None, None)
    assert await store.get_quota_override("chat", "alice") == QuotaOverride(7, None, None)
    assert await store.get_quota_override("other", "alice") is None  # per policy
    timed = await store.set_quota_override("chat", "alice", QuotaOverride(attempts_per_user_per_minute=9), 60)
    assert timed.expires_at is not None and timed.expires_at > time.time() + 50
    now = await store.get_quota_override("chat", "alice")  # replaced whole: connections is gone
    assert now is not None and (now.connections_per_user, now.attempts_per_user_per_minute) == (None, 9)
    assert now.expires_at is not None and now.expires_at > time.time() + 50
    assert await store.clear_quota_override("chat", "alice")
    assert not await store.clear_quota_override("chat", "alice")
    assert await store.get_quota_override("chat", "alice") is None
    for bad in (QuotaOverride(), QuotaOverride(connections_per_user=0)):
        with pytest.raises(ValueError):
            await store.set_quota_override("chat", "alice", bad, None)


@pytest.mark.redis
async def test_an_override_is_exact_under_concurrency(store: Store) -> None:
    limits = Limits(connections_per_user=2, connections_per_ip=1000)
    await store.set_quota_override("chat", "{weird} user|*", QuotaOverride(connections_per_user=6), None)
    refs = [ref("{weird} user|*", f"10.1.0.{i}") for i in range(40)]
    results = await asyncio.gather(*(store.acquire(r, limits, 30) for r in refs))
    assert sum(r.granted for r in results) == 6
    assert {r.denied for r in results if not r.granted} == {Reason.QUOTA_USER}
    # Other users keep the configured limit; the override is per policy too.
    others = await asyncio.gather(*(store.acquire(ref("bob", f"10.2.0.{i}"), limits, 30) for i in range(10)))
    assert sum(r.granted for r in others) == 2
    elsewhere = await asyncio.gather(*(store.acquire(ref("{weird} user|*", f"10.3.0.{i}", "api"), limits, 30)
                                       for i in range(10)))
    assert sum(r.granted for r in elsewhere) == 2


@pytest.mark.redis
async def test_an_override_below_the_open_count_closes_nothing_and_new_ones_wait(store: Store) -> None:
    limits = Limits(connections_per_user=5)
    held = [ref("carol", f"10.4.0.{i}") for i in range(4)]
    assert all([(await store.acquire(r, limits, 30)).granted for r in held])
    await store.set_quota_override("chat", "carol", QuotaOverride(connections_per_user=2), None)
    assert await store.count("chat", user="carol") == 4  # open sockets: nothing happens
    denied = await store.acquire(ref("carol", "10.4.1.1"), limits, 30)
    assert denied.denied is Reason.QUOTA_USER and denied.retry_after is not None
    assert await store.refresh(held, 30) == 4  # still refreshed like any open connection
    await store.release(held[:3])  # down to 1 < 2: a new one fits again
    assert (await store.acquire(ref("carol", "10.4.1.2"), limits, 30)).granted
    assert not (await store.acquire(ref("carol", "10.4.1.3"), limits, 30)).granted


@pytest.mark.redis
async def test_an_override_of_the_attempt_rate(store: Store) -> None:
    limits = Limits(attempts_per_user_per_minute=100)
    await store.set_quota_override("chat", "dave", QuotaOverride(attempts_per_user_per_minute=3), None)
    results = [await store.acquire(ref("dave", f"10.5.0.{i}"), limits, 30) for i in range(5)]
    assert [r.granted for r in results] == [True, True, True, False, False]
    assert results[3].denied is Reason.RATE_USER


# -- the pipeline: exact N per tier, on every backend ---------------------------------------------

@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("keys") / "jwks.json"
    path.write_text(json.dumps(jwks_for(shared_rsa_key(), "k1", "RS256")))
    return str(path)


def token(sub: str, plan: str | None) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": "ws", "sub": sub, "iat": now, "exp": now + 600}
    if plan is not None:
        claims["plan"] = plan
    return sign(shared_rsa_key(), "RS256", claims, kid="k1")


@pytest.mark.redis
async def test_exactly_n_per_tier_through_the_pipeline(store: Store, jwks_file: str) -> None:
    cfg = parse_config({"policies": [{
        "name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
        "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file, "token_sources": ["query:token"]},
        "quotas": {"connections_per_user": 2, "connections_per_ip": 3, "tier_claim": "plan",
                   "tiers": {"pro": {"connections_per_user": 4}, "internal": {"connections_per_user": 7}},
                   "ip_overrides": [{"cidr": "198.18.0.0/15", "connections_per_ip": 1000}]}}]})
    guarded = GuardedStore(store, timeout=5.0)
    authz = Authorizer(build_runtime(cfg), guarded)

    def ws(tok: str, ip: str) -> CheckInput:
        return CheckInput(method="GET", host="h", path="/ws", query=f"token={tok}", headers=ws_headers(),
                          source_ip=ip)

    for sub, tier, expected in (("f", "free", 2), ("n", None, 2), ("p", "pro", 4), ("i", "internal", 7)):
        tok = token(sub, tier)
        decisions = await asyncio.gather(*(authz.check(ws(tok, f"198.18.{k}.1")) for k in range(20)))
        assert sum(d.allowed for d in decisions) == expected, (sub, tier)
        assert {d.reason for d in decisions if not d.allowed} == {Reason.QUOTA_USER}
    # Outside the listed network the per-IP limit is the tier's (3), exactly.
    tok = token("x", "internal")
    decisions = await asyncio.gather(*(authz.check(ws(tok, "192.0.2.9")) for _ in range(20)))
    assert sum(d.allowed for d in decisions) == 3
    assert {d.reason for d in decisions if not d.allowed} == {Reason.QUOTA_IP}
    # A per-user override from the store beats the tier, on every replica sharing the store.
    await store.set_quota_override("chat", "p", QuotaOverride(connections_per_user=6), None)
    other_replica = Authorizer(build_runtime(cfg), GuardedStore(store, timeout=5.0))
    more = await asyncio.gather(*(other_replica.check(ws(token("p", "pro"), f"198.19.{k}.1"))
                                  for k in range(20)))
    assert sum(d.allowed for d in more) == 2  # 4 held, 6 allowed
