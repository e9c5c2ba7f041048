"""The first lease-key load (extauth/lease_tag.py) when the store is down or hangs at start.

Every check that issues a lease waits on that load until it has succeeded once, so it must
cost a check no more than a store call: concurrent checks share one attempt, none waits
longer than the store's per-call timeout, a failed attempt is remembered for the breaker's
reset time (a burst fails at once instead of each trying), and the key loads as soon as the
store answers, in the background, without waiting for a check. Against real sockets: a TCP
server that accepts and never answers, a closed port, and a real Redis behind a gate that
first hangs, then relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from extauth.config import parse_config
from extauth.lease_tag import LeaseTagger
from extauth.metrics import Metrics
from extauth.pipeline import Authorizer, Decision
from extauth.reasons import Reason
from extauth.request import CheckInput
from extauth.runtime import build_runtime
from extauth.server import ExtAuthServer
from extauth.store import GuardedStore, StoreError
from extauth.store.redis import RedisStore
from tests.envoy_msgs import ws_headers
from tests.redis_servers import RedisServer, free_port
from tests.waiting import eventually

pytestmark = pytest.mark.redis

TIMEOUT = 0.05  # the store's per-call timeout in these tests
# What a check may take at most: one per-call timeout (50 ms) plus a second of slack for a
# stalled CI host, still far under the old queue's 1 s, 2 s, 3 s... (0.6 s, 0.9 s... at the
# 0.3 s scan timeout below).
BOUND = 1.0
CHECKS = 12


def config(store_on_error: str = "deny") -> Any:
    # No JWT: anonymous leases per client IP, so nothing but the store is in the way.
    return parse_config({
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "drain_seconds": 0,
        "store_on_error": store_on_error,
        "policies": [{"name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
                      "quotas": {"connections_per_ip": 100}}],
    })


def upgrade(n: int) -> CheckInput:
    return CheckInput(method="GET", host="h", path="/ws", query="", headers=ws_headers(),
                      source_ip=f"198.51.100.{n % 250 + 1}")


async def timed(check: Awaitable[Decision]) -> tuple[float, Decision]:
    started = time.monotonic()
    decision = await check
    return time.monotonic() - started, decision


async def burst(authz: Authorizer, n: int = CHECKS) -> list[tuple[float, Decision]]:
    return await asyncio.gather(*(timed(authz.check(upgrade(i))) for i in range(n)))


class Gate:
    """A TCP front for a real Redis: shut, it accepts and never answers (a hung store);
    opened, it relays every connection to the server (and drops the ones it held, as a
    recovering network would, so the clients connect again)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.is_open = False
        self._held: list[asyncio.StreamWriter] = []
        self._relays: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Gate:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def open(self) -> None:
        self.is_open = True
        for w in self._held:
            w.transport.abort()
        self._held.clear()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        self.open()  # drops the held connections
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.is_open:
            self._held.append(writer)
            while await reader.read(65536):
                pass
            return
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._relays.discard(task)
            for w in (writer, up_writer):
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def gate(redis_server: RedisServer) -> AsyncIterator[Gate]:
    g = await Gate(redis_server.port).start()
    try:
        yield g
    finally:
        await g.close()


def tried(store: GuardedStore) -> float:
    """Lease-key calls that reached the store (the latency histogram's count)."""
    assert store.metrics is not None
    return store.metrics.registry.get_sample_value(
        "extauth_store_call_duration_seconds_count", {"op": "lease_key"}) or 0.0


def failed(store: GuardedStore) -> float:
    assert store.metrics is not None
    return store.metrics.registry.get_sample_value("extauth_store_errors_total", {"op": "lease_key"}) or 0.0


@contextlib.asynccontextmanager
async def guarded_store(url: str, key_prefix: str = "extauth", **kw: Any) -> AsyncIterator[GuardedStore]:
    kw = {"timeout": TIMEOUT, "failure_threshold": 3, "reset_seconds": 30.0, "metrics": Metrics(), **kw}
    store = GuardedStore(RedisStore.from_url(url, key_prefix=key_prefix), **kw)
    try:
        yield store
    finally:
        await store.close()


def assert_all_answered_in_time(results: list[tuple[float, Decision]], store_on_error: str) -> None:
    slowest = max(elapsed for elapsed, _ in results)
    assert slowest < BOUND, f"a check took {slowest:.2f} s"
    for _, d in results:
        if store_on_error == "deny":
            assert (d.allowed, d.reason) == (False, Reason.STORE_UNAVAILABLE)
        else:
            assert d.allowed and d.lease is None and d.lease_tag is None


@pytest.mark.parametrize("store_on_error", ["deny", "allow"])
async def test_checks_never_queue_on_a_store_that_hangs_at_start(silent_port: int,
                                                                  store_on_error: str) -> None:
    # The lease-key load used to run one caller at a time, each for the store's 1 s bound:
    # the Nth check waited N seconds, past Envoy's ext_authz timeout, so store_on_error never
    # decided anything. Each check now waits at most the per-call timeout.
    async with guarded_store(f"redis://127.0.0.1:{silent_port}", scan_timeout=0.3,
                             failure_threshold=1) as store:
        authz = Authorizer(build_runtime(config(store_on_error)), store)
        assert_all_answered_in_time(await burst(authz), store_on_error)
        # One attempt for all of them, under the store's own (background) bound; its failure
        # counts in the breaker like any request-path call's.
        with pytest.raises(StoreError):
            await authz.tagger.load(store)  # waits for that attempt's end
        assert tried(store) == 1 and store.rejected == 0
        assert store.timeouts == 1 and store.breaker_state == "open"
        # The next burst fails at once: the failure is remembered, nothing new is tried. The
        # store's call count says so; a time bound of one per-call timeout (50 ms) said it
        # too, but a CI host can stall the loop that long.
        results = await burst(authz)
        assert_all_answered_in_time(results, store_on_error)
        assert tried(store) == 1 and store.rejected == 0


async def test_a_burst_on_a_closed_port_makes_one_attempt() -> None:
    async with guarded_store(f"redis://127.0.0.1:{free_port()}") as store:
        authz = Authorizer(build_runtime(config()), store)
        assert_all_answered_in_time(await burst(authz), "deny")
        for i in range(5):  # one after the other, too: the failure is remembered
            assert_all_answered_in_time([await timed(authz.check(upgrade(i)))], "deny")
        assert tried(store) == 1 and failed(store) == 1 and store.rejected == 0
        assert not authz.tagger.ready and authz.tagger.retry_in > 0


async def test_once_the_store_answers_the_key_loads_and_leases_are_tagged(
        gate: Gate, redis_server: RedisServer, key_prefix: str) -> None:
    async with guarded_store(gate.url, key_prefix, scan_timeout=0.3, reset_seconds=0.2) as store:
        authz = Authorizer(build_runtime(config()), store)
        assert_all_answered_in_time(await burst(authz), "deny")
        gate.open()
        decision = await eventually(lambda: authz.check(upgrade(0)), lambda d: d.allowed)
        assert decision.allowed and decision.lease is not None and decision.lease_tag is not None
        assert authz.tagger.ready
        # Tagged under the key the store holds for every replica.
        other = RedisStore.from_url(redis_server.url, key_prefix=key_prefix)
        try:
            replica = LeaseTagger()
            await replica.load(other)
            assert replica.valid(decision.lease, decision.lease_tag)
        finally:
            await other.close()
        assert store.breaker_state == "closed"


async def test_the_server_loads_the_key_in_the_background_once_the_store_answers(
        gate: Gate, key_prefix: str) -> None:
    # No check arrives: the key must still be loaded as soon as the store answers, so the
    # first checks after an outage at start do not each pay for (or fail on) the load.
    cfg = config()
    store = GuardedStore(RedisStore.from_url(gate.url, key_prefix=key_prefix), timeout=TIMEOUT,
                         scan_timeout=0.3, failure_threshold=3, reset_seconds=0.2)
    server = ExtAuthServer(cfg, store=store)
    await server.start()
    try:
        assert not server.tagger.ready
        gate.open()

        async def ready() -> bool:
            return server.tagger.ready

        assert await eventually(ready, bool, within=4.0), "the key was never loaded"
        assert store.breaker_state == "closed"
    finally:
        await server.stop(drain=0)
