"""Crashes and outages with real processes: Envoy SIGKILLed, extauth restarted, two extauth
replicas on one Redis, extauth down, Redis down."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest

from tests.e2e.harness import Refused, Stack, close_all

pytestmark = pytest.mark.e2e


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def _refusal(stack: Stack, user: str) -> Refused:
    r = await stack.try_connect(user)
    if not isinstance(r, Refused):
        await r.close()
        raise AssertionError(f"{user} was admitted\n{stack.logs()}")
    return r


async def _wait_refusal(stack: Stack, user: str, status: int, within: float) -> Refused:
    """Poll until ``user`` is refused with ``status``."""
    deadline = time.monotonic() + within
    while True:
        r = await stack.try_connect(user)
        if isinstance(r, Refused) and r.status == status:
            return r
        if not isinstance(r, Refused):
            await r.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"no {status} within {within}s (last: {r})\n{stack.logs()}")
        await asyncio.sleep(0.1)


async def test_envoy_sigkill_slots_come_back_within_lease_ttl(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(lease_ttl=3.0, flush_interval=1.0)
    assert stack.envoy is not None
    user = _user()
    conns = await stack.hold(user, 10)
    assert (await _refusal(stack, user)).reason == "quota_user"
    # Envoy dies without a word: no DownstreamEnd entries, the leases are orphaned.
    killed = time.monotonic()
    stack.envoy.kill()
    await close_all(conns)
    stack.envoy.start()
    # Each orphaned lease expires lease_ttl_seconds after its last refresh (at most one TTL
    # after the kill): poll until all ten slots are back.
    conns = []
    try:
        deadline = killed + stack.cfg.lease_ttl + 2.0
        while len(conns) < 10 and time.monotonic() < deadline:
            r = await stack.try_connect(user)
            if isinstance(r, Refused):
                assert r.reason == "quota_user", r
                await asyncio.sleep(0.1)
            else:
                conns.append(r)
        waited = time.monotonic() - killed
        assert len(conns) == 10, f"only {len(conns)} slots back after {waited:.1f}s\n{stack.logs()}"
        assert waited <= stack.cfg.lease_ttl + 2.0
        # and not more than ten: the new connections hold leases of their own
        assert (await _refusal(stack, user)).reason == "quota_user"
    finally:
        await close_all(conns)


async def test_extauth_restart_keeps_accounting(make_stack: Callable[..., Stack]) -> None:
    """Leases live in Redis: a restarted extauth still counts the connections that stayed
    open across the restart, keeps refreshing them (from Envoy's periodic entries) and
    releases them when they close."""
    stack = make_stack(lease_ttl=3.0, flush_interval=1.0, connections_per_user=6)
    user = _user()
    conns = await stack.hold(user, 4)
    try:
        stopping = time.monotonic()
        stack.extauth[0].stop()
        stopped = time.monotonic() - stopping
        stack.extauth[0].start()
        # Longer than two TTLs: only refreshes through the new process keep the four alive.
        await asyncio.sleep(stack.cfg.lease_ttl * 2 + 0.5)
        for ws in conns:
            await ws.send("alive")
            assert await ws.recv() == "alive"
        print(f"graceful stop took {stopped:.2f}s")
        conns += await stack.hold(user, 2)
        assert (await _refusal(stack, user)).reason == "quota_user"
        # Closing connections opened before the restart frees their slots through the new process.
        await close_all(conns[:3])
        del conns[:3]
        conns += [await stack.wait_admitted(user, within=2.0) for _ in range(3)]
        assert (await _refusal(stack, user)).reason == "quota_user"
    finally:
        await close_all(conns)


async def test_two_replicas_share_the_per_user_limit(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(replicas=2)
    assert stack.envoy is not None
    user = _user()
    conns = await stack.hold(user, 10)
    try:
        for _ in range(3):
            assert (await _refusal(stack, user)).reason == "quota_user"
        # Both replicas took part (Envoy round-robins checks over the cluster).
        stats = await asyncio.to_thread(stack.envoy.extauth_host_stats)
        served = {host: s.get("rq_success", 0) for host, s in stats.items()}
        assert len(served) == 2 and all(n > 0 for n in served.values()), served
        # A release handled by either replica frees the slot for both.
        await conns.pop().close()
        conns.append(await stack.wait_admitted(user, within=2.0))
        assert (await _refusal(stack, user)).reason == "quota_user"
    finally:
        await close_all(conns)


async def test_extauth_down_is_503_then_recovers_without_restarting_envoy(
        make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    user = _user()
    async with stack.connect(user) as ws:
        await ws.send("a")
        assert await ws.recv() == "a"
    stack.extauth[0].kill()
    r = await _wait_refusal(stack, user, 503, within=5)
    # Envoy's own answer (status_on_error), not one of extauth's: no reason header.
    assert r.reason is None
    # Fail closed: never a connection while extauth is away.
    for _ in range(3):
        assert (await _refusal(stack, user)).status == 503
    stack.extauth[0].start()
    ws = await stack.wait_admitted(user, within=10)
    await ws.send("b")
    assert await ws.recv() == "b"
    await ws.close()


async def test_redis_down_is_503_store_unavailable_then_recovers(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(store_on_error="deny")
    assert stack.redis is not None
    user = _user()
    async with stack.connect(user):
        pass
    stack.redis.kill()
    r = await _wait_refusal(stack, user, 503, within=5)
    assert r.reason == "store_unavailable"
    assert "retry-after" in r.headers
    stack.redis.start()
    ws = await stack.wait_admitted(user, within=10)
    await ws.close()


async def test_envoy_down_means_connection_refused(make_stack: Callable[..., Stack]) -> None:
    """Trivial, for the record: with Envoy gone, clients get ECONNREFUSED; there is no
    path to the upstream that bypasses it (the upstream is not published)."""
    stack = make_stack(store="memory")
    assert stack.envoy is not None
    async with stack.connect(_user()):
        pass
    stack.envoy.kill()
    with pytest.raises(ConnectionRefusedError):
        await stack.open(_user())
