"""One contract suite for every Store: MemoryStore, a standalone Redis and a real 3-node Cluster.

Real servers only (tests/redis_servers.py). Short TTLs and polling loops with
deadlines instead of long sleeps.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from extauth.reasons import Reason
from extauth.store import LeaseRef, Limits, MemoryStore, Store, StoreError, new_lease_id, open_store
from extauth.store.base import PREVIOUS_LEASE_KEYS, LeaseKeys
from extauth.store.redis import RedisStore, escape
from tests.redis_servers import RedisClusterServers, RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.both_loops]

BACKENDS = ["memory", "redis", "cluster"]


@pytest.fixture(params=BACKENDS)
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


def ref(user: str | None = "alice", ip: str = "10.0.0.1", policy: str = "chat") -> LeaseRef:
    return LeaseRef(new_lease_id(), policy, user, ip)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


# -- quotas -------------------------------------------------------------------


async def test_exactly_n_user_quota_under_concurrency(store: Store) -> None:
    n = 5
    refs = [ref("alice", f"10.0.{i // 250}.{i % 250}") for i in range(50)]
    results = await asyncio.gather(*(store.acquire(r, Limits(connections_per_user=n), 30) for r in refs))
    granted = [r for r, res in zip(refs, results, strict=True) if res.granted]
    assert len(granted) == n
    assert {res.denied for res in results if not res.granted} == {Reason.QUOTA_USER}
    assert all(res.retry_after is not None and res.retry_after >= 1 for res in results if not res.granted)
    assert await store.count("chat", user="alice") == n
    # One more attempt after the storm: still exactly N.
    assert not (await store.acquire(ref("alice", "10.9.9.9"), Limits(connections_per_user=n), 30)).granted


async def test_exactly_n_ip_quota_under_concurrency(store: Store) -> None:
    n = 3
    refs = [ref(f"user{i}" if i % 2 else None, "192.0.2.7") for i in range(50)]
    results = await asyncio.gather(*(store.acquire(r, Limits(connections_per_ip=n), 30) for r in refs))
    assert sum(res.granted for res in results) == n
    assert {res.denied for res in results if not res.granted} == {Reason.QUOTA_IP}
    assert await store.count("chat", ip="192.0.2.7") == n


async def test_both_quotas_under_concurrency_never_over_admit(store: Store) -> None:
    # Same user, same IP, both limited. Memory and standalone Redis are exact. On a Cluster the
    # IP slot is claimed before the user slot is checked, so racing attempts may be denied at the
    # edge (never fewer than one granted), but never more than N, and rollbacks leave no residue.
    n = 3
    lim = Limits(connections_per_user=n, connections_per_ip=n)
    results = await asyncio.gather(*(store.acquire(ref("quinn", "10.13.0.1"), lim, 30) for _ in range(50)))
    granted = sum(r.granted for r in results)
    if isinstance(store, RedisStore) and store.is_cluster:
        assert granted in range(1, n + 1)
    else:
        assert granted == n
    assert await store.count("chat", user="quinn") == granted
    assert await store.count("chat", ip="10.13.0.1") == granted
    assert {r.denied for r in results if not r.granted} <= {Reason.QUOTA_USER, Reason.QUOTA_IP}


async def test_quota_is_per_policy_and_per_subject(store: Store) -> None:
    lim = Limits(connections_per_user=1, connections_per_ip=1)
    assert (await store.acquire(ref("alice", "10.0.0.1", "chat"), lim, 30)).granted
    assert (await store.acquire(ref("alice", "10.0.0.1", "feed"), lim, 30)).granted
    assert (await store.acquire(ref("bob", "10.0.0.2", "chat"), lim, 30)).granted
    res = await store.acquire(ref("alice", "10.0.0.3", "chat"), lim, 30)
    assert (res.granted, res.denied) == (False, Reason.QUOTA_USER)


async def test_no_limit_still_records(store: Store) -> None:
    for _ in range(4):
        assert (await store.acquire(ref("carol", "10.1.1.1"), Limits(), 30)).granted
    assert await store.count("chat", user="carol") == 4
    assert await store.count("chat", ip="10.1.1.1") == 4


# -- TTL, refresh, release ------------------------------------------------------


async def test_ttl_expiry_frees_a_slot(store: Store) -> None:
    # A one-second TTL: long enough that a stalled host cannot expire the lease between
    # two calls in a row, short enough to wait for.
    lim = Limits(connections_per_user=1)
    assert (await store.acquire(ref(), lim, 1.0)).granted
    assert not (await store.acquire(ref(), lim, 1.0)).granted

    async def slot_free() -> bool:
        return (await store.acquire(ref(), lim, 30)).granted

    await eventually(slot_free)
    assert await store.count("chat", user="alice") == 1


async def test_refresh_keeps_a_lease_alive_past_its_ttl(store: Store) -> None:
    # Each refresh moves the expiry to now + the new TTL, which is checked directly. The
    # lease is then checked past the TTL it was acquired with, with more than a second of
    # slack after the last refresh: a CI host that stalls for a few hundred ms (seen: the
    # former 0.4 s TTL refreshed every 0.1 s expired once) cannot fail it.
    r = ref()
    lim = Limits(connections_per_user=1)
    assert (await store.acquire(r, lim, 1.0)).granted
    outlived = time.time() + 1.0
    for _ in range(8):
        before = time.time()
        assert await store.refresh([r], 1.5) == 1
        [lease] = await store.list_leases("chat", user="alice")
        assert lease.expires_at >= before + 1.5 - 0.002  # the store's clock counts whole ms
        await asyncio.sleep(0.15)
    assert time.time() > outlived
    assert await store.count("chat", user="alice") == 1
    assert not (await store.acquire(ref(), lim, 30)).granted

    # Stop refreshing and it expires; a short last TTL keeps the wait short.
    assert await store.refresh([r], 0.2) == 1

    async def gone() -> bool:
        return await store.count("chat", user="alice") == 0

    await eventually(gone)


async def test_lease_key_is_stable_and_shared_by_every_replica(store: Store, key_prefix: str,
                                                               request: pytest.FixtureRequest) -> None:
    first, second = secrets.token_hex(32), secrets.token_hex(32)
    keys = await store.lease_key(first)
    assert keys == LeaseKeys(first)  # the first candidate becomes the key
    assert await store.lease_key(second) == keys  # a later replica's candidate does not
    if isinstance(store, RedisStore):
        backend = request.node.callspec.params["store"]
        url = (request.getfixturevalue("redis_server") if backend == "redis"
               else request.getfixturevalue("redis_cluster")).url
        other = RedisStore.from_url(url, key_prefix=key_prefix)  # another replica
        try:
            assert await other.lease_key(secrets.token_hex(32)) == keys
        finally:
            await other.close()


async def test_a_replaced_lease_key_stays_accepted_and_bounded(store: Store) -> None:
    current = secrets.token_hex(32)
    await store.lease_key(current)
    # A replica that tagged leases under another key (the store had lost the key, and another
    # replica's got in first): its key is kept among the previous ones, once, and bounded.
    mine = secrets.token_hex(32)
    assert await store.lease_key(mine, replaces=True) == LeaseKeys(current, (mine,))
    assert await store.lease_key(mine, replaces=True) == LeaseKeys(current, (mine,))
    assert await store.lease_key(current, replaces=True) == LeaseKeys(current, (mine,))
    for _ in range(PREVIOUS_LEASE_KEYS + 3):
        keys = await store.lease_key(secrets.token_hex(32), replaces=True)
    assert keys.current == current and len(keys.previous) == PREVIOUS_LEASE_KEYS


async def test_acquire_is_idempotent_per_lease_id(store: Store) -> None:
    # A retry whose first reply was lost (the script ran) must not deny itself at the quota.
    r = ref()
    lim = Limits(connections_per_user=1, attempts_per_user_per_minute=1)
    assert (await store.acquire(r, lim, 30)).granted
    assert (await store.acquire(r, lim, 30)).granted
    assert await store.count("chat", user="alice") == 1
    assert not (await store.acquire(ref(), lim, 30)).granted
    assert await store.release([r]) == 1


async def test_refresh_restores_a_lease_the_store_lost(store: Store) -> None:
    # Refreshes come only for connections Envoy reports open: a lease that expired while its
    # refreshes were cut off (or that the store lost) is put back, and counts again.
    lost, live = ref(), ref()
    lim = Limits(connections_per_user=2)
    assert (await store.acquire(lost, lim, 0.2)).granted
    assert (await store.acquire(live, lim, 30)).granted

    async def lost_gone() -> bool:
        return await store.count("chat", user="alice") == 1

    await eventually(lost_gone)
    assert (await store.acquire(ref(), Limits(connections_per_user=2), 0.2)).granted  # its slot was free
    assert await store.refresh([lost, live], 30) == 1  # one was live, one is restored
    both = {lost.lease_id, live.lease_id}
    assert {i.lease_id for i in await store.list_leases("chat", user="alice")} >= both
    assert {i.lease_id for i in await store.list_leases("chat", ip="10.0.0.1")} >= both
    assert not (await store.acquire(ref(), lim, 30)).granted  # the restored lease counts
    assert await store.release([lost, live]) == 2


async def test_refresh_and_release_batches(store: Store) -> None:
    refs = [ref(f"u{i % 7}", f"10.2.0.{i % 11}") for i in range(120)]
    for r in refs:
        assert (await store.acquire(r, Limits(), 30)).granted
    ghost = ref("ghost", "10.3.3.3")  # open, but unknown to the store: restored
    assert await store.refresh([*refs, ghost], 60) == 120
    assert await store.count_all() == 121
    assert await store.release([*refs[:100], ghost]) == 101
    assert await store.count_all() == 20
    assert await store.release(refs) == 20
    assert await store.count_all() == 0


async def test_release_is_idempotent_and_frees_the_slot(store: Store) -> None:
    lim = Limits(connections_per_user=1, connections_per_ip=1)
    r = ref()
    assert (await store.acquire(r, lim, 30)).granted
    assert await store.release([r]) == 1
    assert await store.release([r]) == 0
    assert await store.release([]) == 0
    assert await store.count("chat", user="alice") == 0
    assert await store.count("chat", ip="10.0.0.1") == 0
    assert (await store.acquire(ref(), lim, 30)).granted


async def test_anonymous_lease_lives_under_its_ip_only(store: Store) -> None:
    r = ref(None, "10.4.4.4")
    assert (await store.acquire(r, Limits(connections_per_user=1, connections_per_ip=2), 30)).granted
    assert await store.count("chat", ip="10.4.4.4") == 1
    [info] = await store.list_leases("chat", ip="10.4.4.4")
    assert (info.lease_id, info.user, info.ip) == (r.lease_id, None, "10.4.4.4")
    assert await store.refresh([r], 30) == 1
    assert await store.release([r]) == 1


# -- attempt rates and denial order -----------------------------------------------


async def test_attempt_rate_per_ip_and_retry_after(store: Store) -> None:
    lim = Limits(attempts_per_ip_per_minute=3)
    for i in range(3):
        r = ref(f"u{i}", "10.5.5.5")
        assert (await store.acquire(r, lim, 30)).granted
        await store.release([r])  # releasing does not give an attempt back
    res = await store.acquire(ref("u9", "10.5.5.5"), lim, 30)
    assert (res.granted, res.denied) == (False, Reason.RATE_IP)
    # oldest + 60 - now, rounded up: the attempts were made within the last second.
    assert res.retry_after == 60
    assert (await store.acquire(ref("u9", "10.5.5.6"), lim, 30)).granted


async def test_attempt_rate_per_user(store: Store) -> None:
    lim = Limits(attempts_per_user_per_minute=2)
    assert (await store.acquire(ref("dave", "10.6.0.1"), lim, 30)).granted
    assert (await store.acquire(ref("dave", "10.6.0.2"), lim, 30)).granted
    res = await store.acquire(ref("dave", "10.6.0.3"), lim, 30)
    assert (res.denied, res.retry_after) == (Reason.RATE_USER, 60)
    assert (await store.acquire(ref("erin", "10.6.0.3"), lim, 30)).granted


async def test_denials_record_nothing(store: Store) -> None:
    # Denied attempts never enter the attempt log: the IP still has room for one more attempt.
    lim = Limits(attempts_per_ip_per_minute=2, connections_per_user=1)
    assert (await store.acquire(ref("frank", "10.7.0.1"), lim, 30)).granted
    for _ in range(5):
        assert (await store.acquire(ref("frank", "10.7.0.1"), lim, 30)).denied == Reason.QUOTA_USER
    assert (await store.acquire(ref("gina", "10.7.0.1"), lim, 30)).granted
    assert (await store.acquire(ref("hank", "10.7.0.1"), lim, 30)).denied == Reason.RATE_IP
    assert await store.count("chat", ip="10.7.0.1") == 2
    assert await store.count("chat", user="hank") == 0

    # A user-quota denial leaves nothing under the IP (on Cluster: the IP part is rolled back).
    lim2 = Limits(connections_per_user=1)
    assert (await store.acquire(ref("ivan", "10.8.0.1"), lim2, 30)).granted
    assert (await store.acquire(ref("ivan", "10.8.0.2"), lim2, 30)).denied == Reason.QUOTA_USER
    assert await store.count("chat", ip="10.8.0.2") == 0
    # An IP-quota denial leaves nothing under the user.
    lim3 = Limits(connections_per_ip=1, attempts_per_user_per_minute=1)
    assert (await store.acquire(ref("jane", "10.9.0.1"), lim3, 30)).granted
    assert (await store.acquire(ref("kate", "10.9.0.1"), lim3, 30)).denied == Reason.QUOTA_IP
    assert await store.count("chat", user="kate") == 0
    assert (await store.acquire(ref("kate", "10.9.0.2"), lim3, 30)).granted  # her attempt was not logged
    assert await store.count_all() == 5


async def test_denial_order(store: Store) -> None:
    # ban -> rate_ip -> rate_user -> quota_user -> quota_ip
    tight = Limits(connections_per_user=1, connections_per_ip=1,
                   attempts_per_ip_per_minute=1, attempts_per_user_per_minute=1)
    assert (await store.acquire(ref("lena", "10.10.0.1"), tight, 30)).granted
    assert (await store.acquire(ref("lena", "10.10.0.1"), tight, 30)).denied == Reason.RATE_IP
    loose_ip_rate = Limits(connections_per_user=1, connections_per_ip=1, attempts_per_user_per_minute=1)
    assert (await store.acquire(ref("lena", "10.10.0.1"), loose_ip_rate, 30)).denied == Reason.RATE_USER
    quotas = Limits(connections_per_user=1, connections_per_ip=1)
    assert (await store.acquire(ref("lena", "10.10.0.1"), quotas, 30)).denied == Reason.QUOTA_USER
    assert (await store.acquire(ref("mia", "10.10.0.1"), quotas, 30)).denied == Reason.QUOTA_IP
    await store.ban("10.10.0.1", 30, "manual")
    assert (await store.acquire(ref("mia", "10.10.0.1"), tight, 30)).denied == Reason.BANNED


# -- bans and the abuse jail -------------------------------------------------------------


async def test_ban_unban_list_and_expiry(store: Store) -> None:
    ip = "203.0.113.9"
    before = time.time()
    await store.ban(ip, 60, "manual: noisy")
    [ban] = await store.list_bans()
    assert (ban.ip, ban.reason) == (ip, "manual: noisy")
    assert before + 58 < ban.expires_at < time.time() + 61
    res = await store.acquire(ref("nina", ip), Limits(), 30)
    assert (res.granted, res.denied) == (False, Reason.BANNED)
    assert res.retry_after is not None and 58 <= res.retry_after <= 60
    assert await store.count("chat", ip=ip) == 0
    # With abuse.enabled false the policies' limits say so, and the ban is not enforced.
    assert (await store.acquire(ref("nina", ip), Limits(enforce_bans=False), 30)).granted
    assert await store.unban(ip) is True
    assert await store.unban(ip) is False
    assert await store.list_bans() == []
    assert (await store.acquire(ref("nina", ip), Limits(), 30)).granted

    await store.ban("203.0.113.10", 1.0, "short")
    assert [b.ip for b in await store.list_bans()] == ["203.0.113.10"]

    async def expired() -> bool:
        return await store.list_bans() == []

    await eventually(expired)
    assert (await store.acquire(ref("nina", "203.0.113.10"), Limits(), 30)).granted


async def test_record_hostile_bans_at_threshold(store: Store) -> None:
    ip = "198.51.100.1"
    assert await store.record_hostile(ip, dry_run=False, threshold=3, window=60, ban_seconds=30) is False
    assert await store.record_hostile(ip, dry_run=False, threshold=3, window=60, ban_seconds=30) is False
    other = "198.51.100.2"
    assert await store.record_hostile(other, dry_run=False, threshold=3, window=60, ban_seconds=30) is False
    assert await store.record_hostile(ip, dry_run=False, threshold=3, window=60, ban_seconds=30) is True
    [ban] = await store.list_bans()
    assert ban.ip == ip and ban.expires_at > time.time() + 25
    assert (await store.acquire(ref("omar", ip), Limits(), 30)).denied == Reason.BANNED
    assert (await store.acquire(ref("omar", "198.51.100.2"), Limits(), 30)).granted


async def test_an_ipv6_network_subject_is_a_subject_like_any_other(store: Store) -> None:
    # Per-IP quotas and bans count an IPv6 client by its /64 (extauth.addresses.client_subject):
    # the subject "2001:db8:1:2::/64" must round-trip through every key and listing.
    subject = "2001:db8:1:2::/64"
    lease = ref("quinn", subject)
    one = Limits(connections_per_ip=1)
    assert (await store.acquire(lease, one, 30)).granted
    assert (await store.acquire(ref("rui", subject), one, 30)).denied == Reason.QUOTA_IP
    assert [li.ip for li in await store.list_leases("chat", ip=subject)] == [subject]
    await store.release([lease])
    assert await store.count("chat", ip=subject) == 0
    for _ in range(2):
        banned = await store.record_hostile(subject, dry_run=False, threshold=2, window=60, ban_seconds=30)
    assert banned and [b.ip for b in await store.list_bans()] == [subject]
    assert (await store.acquire(ref("quinn", subject), Limits(), 30)).denied == Reason.BANNED
    assert await store.unban(subject)


async def test_record_hostile_dry_run_never_bans(store: Store) -> None:
    ip = "198.51.100.3"
    assert await store.record_hostile(ip, dry_run=True, threshold=2, window=60, ban_seconds=30) is False
    assert await store.record_hostile(ip, dry_run=True, threshold=2, window=60, ban_seconds=30) is True
    assert await store.list_bans() == []
    assert (await store.acquire(ref("pia", ip), Limits(), 30)).granted


async def test_record_hostile_window_slides(store: Store) -> None:
    ip = "198.51.100.4"
    assert await store.record_hostile(ip, dry_run=False, threshold=2, window=0.3, ban_seconds=30) is False
    await asyncio.sleep(0.4)  # the first signal leaves the 0.3 s window
    assert await store.record_hostile(ip, dry_run=False, threshold=2, window=0.3, ban_seconds=30) is False
    assert await store.list_bans() == []


async def test_record_hostile_counts_each_piece_of_evidence_once(store: Store) -> None:
    # One bad token retried in a reconnect loop is one signal; a new token is a new one.
    ip = "198.51.100.5"

    async def signal(evidence: str) -> bool:
        return await store.record_hostile(ip, dry_run=False, threshold=3, window=60, ban_seconds=30,
                                          signal=evidence)

    for _ in range(20):
        assert await signal("d41d8cd98f00b204e9800998ecf8427e") is False
    assert await signal("9e107d9d372bb6826bd81d3542a419d6") is False
    assert await store.list_bans() == []
    assert await signal("e4d909c290d0fb1ca068ffaddf22cbd0") is True
    assert [b.ip for b in await store.list_bans()] == [ip]


async def test_record_hostile_evidence_seen_again_stays_in_the_window(store: Store) -> None:
    # Seen again, a signal's time moves on: it leaves the window after its latest sighting.
    ip = "198.51.100.6"

    async def signal(evidence: str) -> bool:
        return await store.record_hostile(ip, dry_run=False, threshold=2, window=0.8, ban_seconds=30,
                                          signal=evidence)

    assert await signal("a") is False
    await asyncio.sleep(0.65)
    assert await signal("a") is False  # still one signal, now 0 s old
    # 0.85 s after the first sighting, 0.2 s after the latest: the 0.6 s to spare are for a
    # stalled host, which only ever makes the second sleep longer.
    await asyncio.sleep(0.2)
    assert await signal("b") is True


# -- reads -------------------------------------------------------------------------------


async def test_count_list_and_count_all(store: Store) -> None:
    a1, a2 = ref("alice", "10.11.0.1"), ref("alice", "10.11.0.2")
    b1, anon = ref("bob", "10.11.0.1"), ref(None, "10.11.0.1")
    other_policy = ref("alice", "10.11.0.1", "feed")
    for r in (a1, a2, b1, anon, other_policy):
        assert (await store.acquire(r, Limits(), 30)).granted
    assert await store.count("chat", user="alice") == 2
    assert await store.count("chat", ip="10.11.0.1") == 3
    assert await store.count("feed", user="alice") == 1
    assert await store.count("chat", user="nobody") == 0
    by_user = {(i.lease_id, i.user, i.ip, i.policy) for i in await store.list_leases("chat", user="alice")}
    assert by_user == {(a1.lease_id, "alice", "10.11.0.1", "chat"),
                       (a2.lease_id, "alice", "10.11.0.2", "chat")}
    by_ip = {(i.lease_id, i.user) for i in await store.list_leases("chat", ip="10.11.0.1")}
    assert by_ip == {(a1.lease_id, "alice"), (b1.lease_id, "bob"), (anon.lease_id, None)}
    infos = await store.list_leases("chat", ip="10.11.0.1")
    assert all(time.time() + 25 < i.expires_at < time.time() + 31 for i in infos)
    assert await store.count_all() == 5
    with pytest.raises(ValueError):
        await store.count("chat")
    with pytest.raises(ValueError):
        await store.count("chat", user="alice", ip="10.11.0.1")


WEIRD_USERS = ["{alice}", "}", "{", "ü ser", "a b", "x|y", "%41", "A", "a:leases:b", "*", "[x]?", "\\",
               "日本", "emoji-😀", ""]


async def test_weird_user_ids(store: Store) -> None:
    lim = Limits(connections_per_user=1)
    refs = {u: ref(u, "10.12.0.1") for u in WEIRD_USERS}
    for r in refs.values():
        assert (await store.acquire(r, lim, 30)).granted, r.user
    for u, r in refs.items():
        assert await store.count("chat", user=u) == 1, u
        [info] = await store.list_leases("chat", user=u)
        assert (info.lease_id, info.user, info.ip) == (r.lease_id, u, "10.12.0.1")
        assert not (await store.acquire(ref(u, "10.12.0.2"), lim, 30)).granted
    users = {i.user for i in await store.list_leases("chat", ip="10.12.0.1")}
    assert users == set(WEIRD_USERS)
    assert await store.count_all() == len(WEIRD_USERS)
    assert await store.refresh(list(refs.values()), 30) == len(WEIRD_USERS)
    assert await store.release(list(refs.values())) == len(WEIRD_USERS)


async def test_ipv6_and_ping(store: Store) -> None:
    await store.ping()
    r = ref("zed", "2001:db8::1")
    assert (await store.acquire(r, Limits(connections_per_ip=1), 30)).granted
    assert not (await store.acquire(ref("zed2", "2001:db8::1"), Limits(connections_per_ip=1), 30)).granted
    [info] = await store.list_leases("chat", user="zed")
    assert info.ip == "2001:db8::1"


async def test_closed_memory_store_raises_store_error() -> None:
    store = MemoryStore()
    await store.close()
    with pytest.raises(StoreError):
        await store.ping()


# -- Redis only ------------------------------------------------------------------------------


def test_keys_are_hash_tagged_and_escaped() -> None:
    s = RedisStore.__new__(RedisStore)
    from extauth.store.redis import Keys

    k = Keys("extauth")
    assert k.leases(k.user_tag("alice"), "chat") == "extauth:{u:alice}:leases:chat"
    assert k.leases(k.ip_tag("10.0.0.1"), "chat") == "extauth:{ip:10.0.0.1}:leases:chat"
    assert k.rate(k.ip_tag("10.0.0.1"), "chat") == "extauth:{ip:10.0.0.1}:rate:chat"
    assert k.ban("10.0.0.1") == "extauth:{ip:10.0.0.1}:ban"
    assert k.hostile("10.0.0.1") == "extauth:{ip:10.0.0.1}:hostile"
    assert escape("{a} b%") == "%7Ba%7D%20b%25"
    assert escape("ü") == "%C3%BC"
    assert escape("a.b_c@d:e-f") == "a.b_c@d:e-f"
    del s


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_scripts_survive_script_flush(backend: str, request: pytest.FixtureRequest,
                                            key_prefix: str) -> None:
    if backend == "redis":
        url = request.getfixturevalue("redis_server").url
    else:
        url = request.getfixturevalue("redis_cluster").url
    store = RedisStore.from_url(url, key_prefix=key_prefix)
    try:
        r1 = ref()
        assert (await store.acquire(r1, Limits(connections_per_user=2), 30)).granted
        await store.client.script_flush()
        r2 = ref()
        assert (await store.acquire(r2, Limits(connections_per_user=2), 30)).granted
        await store.client.script_flush()
        assert await store.refresh([r1, r2], 30) == 2  # pipelined EVALSHA path reloads too
        await store.client.script_flush()
        assert await store.record_hostile("10.0.0.9", threshold=1, window=10, ban_seconds=5, dry_run=False)
    finally:
        await store.close()


async def test_store_recovers_after_a_redis_restart(redis_server: RedisServer,
                                                    restart_redis: Callable[[], RedisServer],
                                                    key_prefix: str) -> None:
    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix)
    try:
        lim = Limits(connections_per_user=1)
        assert (await store.acquire(ref(), lim, 30)).granted
        restart_redis()  # persistence is off: the lease is gone with the old process

        async def works() -> bool:
            try:
                return (await store.acquire(ref(), lim, 30)).granted
            except StoreError:
                return False

        await eventually(works)
        assert await store.count("chat", user="alice") == 1
        assert not (await store.acquire(ref(), lim, 30)).granted
        await store.ping()

        # A connection that was open before the restart is counted again at its next refresh.
        first = ref("bob")
        assert (await store.acquire(first, lim, 30)).granted
        restart_redis()

        async def pings() -> bool:
            try:
                await store.ping()
            except StoreError:
                return False
            return True

        await eventually(pings)
        assert await store.refresh([first], 30) == 0  # lost with the old process, restored
        assert await store.count("chat", user="bob") == 1
        assert not (await store.acquire(ref("bob"), lim, 30)).granted
    finally:
        await store.close()


class CountingConnection(aioredis.Connection):
    """Counts network writes: one per command, one per pipeline (a round trip each)."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


async def test_one_round_trip_per_acquire_on_standalone(redis_server: RedisServer, key_prefix: str) -> None:
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=redis_server.port,
                                   connection_class=CountingConnection, decode_responses=True)
    client = aioredis.Redis(connection_pool=pool)
    store = RedisStore(client, key_prefix=key_prefix)
    admin = redis_server.client()
    try:
        lim = Limits(connections_per_user=100, connections_per_ip=100, attempts_per_ip_per_minute=1000,
                     attempts_per_user_per_minute=1000)
        warm = ref()
        await store.acquire(warm, lim, 30)  # warm: connection handshake and script cache
        await store.refresh([warm], 30)

        def calls(cmd: str) -> int:
            return int(admin.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0))

        evalsha, sends = calls("evalsha"), CountingConnection.sends
        refs = [ref() for _ in range(20)]
        for r in refs:
            assert (await store.acquire(r, lim, 30)).granted
        assert CountingConnection.sends - sends == 20  # one round trip each
        assert calls("evalsha") - evalsha == 20  # ... and it is one EVALSHA
        sends = CountingConnection.sends
        assert await store.refresh(refs, 30) == 20
        assert await store.release(refs) == 20
        assert CountingConnection.sends - sends == 2  # one pipelined round trip per batch
        assert calls("evalsha") - evalsha == 20 + 40  # refresh: one EVALSHA per (lease, key)
    finally:
        admin.close()
        await store.close()


def test_open_store_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    s = open_store("redis://u:p%40ss@127.0.0.1:6390/2")
    assert isinstance(s, RedisStore) and isinstance(s.client, aioredis.Redis)
    kw = s.client.connection_pool.connection_kwargs
    assert (kw["username"], kw["password"], kw["db"], kw["port"]) == ("u", "p@ss", 2, 6390)
    assert kw["socket_timeout"] == 1.0 and kw["socket_connect_timeout"] == 1.0
    monkeypatch.setenv("EXTAUTH_REDIS_USERNAME", "envuser")
    monkeypatch.setenv("EXTAUTH_REDIS_PASSWORD", "envpass")
    s = open_store("rediss://127.0.0.1:6390?ssl_ca_certs=/tmp/ca.pem&ssl_cert_reqs=required")
    assert isinstance(s, RedisStore) and isinstance(s.client, aioredis.Redis)
    kw = s.client.connection_pool.connection_kwargs
    assert (kw["username"], kw["password"], kw["ssl_ca_certs"], kw["ssl_cert_reqs"]) == (
        "envuser", "envpass", "/tmp/ca.pem", "required")
    c = open_store("rediss+cluster://127.0.0.1:7000,127.0.0.1:7001?ssl_cert_reqs=none")
    assert isinstance(c, RedisStore) and c.is_cluster
    for bad in ("redis://h:1?bogus=1", "redis://h:1?ssl_ca_certs=x", "redis://a:1,b:2", "mongodb://x",
                "redis+cluster://h:1/3"):
        with pytest.raises(ValueError):
            open_store(bad)


async def test_memory_sliding_window_is_exact_with_a_driven_clock() -> None:
    now = [1_000_000.0]
    store = MemoryStore(clock=lambda: now[0])
    lim = Limits(attempts_per_ip_per_minute=2)
    assert (await store.acquire(ref("a", "10.0.0.1"), lim, 3600)).granted
    now[0] += 10.25
    assert (await store.acquire(ref("b", "10.0.0.1"), lim, 3600)).granted
    now[0] += 5
    res = await store.acquire(ref("c", "10.0.0.1"), lim, 3600)
    assert (res.denied, res.retry_after) == (Reason.RATE_IP, 45)  # 60 - 15.25 = 44.75, rounded up
    now[0] += 44.5
    assert (await store.acquire(ref("c", "10.0.0.1"), lim, 3600)).denied == Reason.RATE_IP
    res = await store.acquire(ref("c", "10.0.0.1"), lim, 3600)
    assert res.retry_after == 1  # 0.25 s left: at least one second
    now[0] += 0.25
    assert (await store.acquire(ref("c", "10.0.0.1"), lim, 3600)).granted  # the first left the window
    assert (await store.acquire(ref("d", "10.0.0.1"), lim, 3600)).denied == Reason.RATE_IP
    # Leases expire by the same clock.
    assert await store.count("chat", ip="10.0.0.1") == 3
    now[0] += 3600
    assert await store.count_all() == 0


async def test_memory_lease_expiry_with_refreshes_and_releases_on_a_driven_clock() -> None:
    # The memory store keeps each subject's expiries in a heap that refreshes and releases
    # leave stale entries in: counts and Retry-After must follow the live leases only.
    now = [1_000_000.0]
    store = MemoryStore(clock=lambda: now[0])
    refs = [ref(f"u{i}", "10.0.0.1") for i in range(300)]
    for i, r in enumerate(refs):
        assert (await store.acquire(r, Limits(), 10 + i)).granted  # r expires at +10+i
    now[0] += 5
    assert await store.refresh(refs[:100], 1000) == 100  # the first 100 now outlive the rest
    assert await store.release(refs[100:150]) == 50
    for _ in range(3):  # refresh again: more stale heap entries, rebuilt along the way
        assert await store.refresh(refs[:100], 1000) == 100
    assert await store.count("chat", ip="10.0.0.1") == 250
    lim = Limits(connections_per_ip=250)
    res = await store.acquire(ref("x", "10.0.0.1"), lim, 60)
    # The earliest live lease is refs[150], acquired with TTL 160 at t=0: 155 s from now.
    assert (res.denied, res.retry_after) == (Reason.QUOTA_IP, 155)
    now[0] += 155
    assert await store.count("chat", ip="10.0.0.1") == 249
    assert (await store.acquire(ref("x", "10.0.0.1"), lim, 60)).granted
    now[0] += 150  # every lease but the refreshed 100 has expired ("x" too, at +60)
    assert await store.count("chat", ip="10.0.0.1") == 100
    now[0] += 1000
    assert await store.count_all() == 0
