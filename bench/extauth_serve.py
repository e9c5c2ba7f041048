"""``extauth serve`` with bench-only instrumentation, so the benchmarks can see inside the
product process without touching product code. Same arguments as ``extauth serve``.

What it adds (all registered on extauth's own /metrics registry, scraped by bench/run.py):

- ``extauth_bench_redis_round_trips_total{op}``: network writes to Redis (one per command,
  one per pipeline: a round trip each), counted at redis-py's connection and at the store's
  RespLane, and attributed to the store operation that made them (acquire, refresh, release,
  count_all, other), with a new connection's setup commands apart (connection_setup).
- ``extauth_bench_store_refs_total{op}``: leases handed to refresh/release (to turn round
  trips into round trips per lease).
- cProfile on demand: SIGUSR1 starts profiling the event-loop thread, SIGUSR2 stops and
  writes pstats to ``$EXTAUTH_BENCH_PROFILE_OUT``.
- ``$EXTAUTH_BENCH_CONSTANT_ANSWER`` (a file of serialized CheckResponse bytes): Check answers
  those bytes and reads nothing of the request. Everything else in the process is the product's
  (its services, store, jail, metrics, event loop): scenario 4c, the product's process without
  its Check handler, which splits 4/3b into the process's cost and the handler's.

Check latency comes from the product's own ``extauth_check_duration_seconds``. The plain-HTTP
Check path carries no bench code at all; a store call carries a ContextVar.set and each Redis
write a dict increment. Measured in-process (64-way acquire+release pairs against valkey,
instrumented and not, interleaved): no difference beyond this machine's noise, about ±10 µs
on some 110 µs of CPU a pair. The first version of this file (prometheus_client counters and
a coroutine wrapped around every store call and every write) cost about 20 µs a pair (107
against 83 in one such run), which the churn figures carried.
"""

from __future__ import annotations

import asyncio
import contextvars
import cProfile
import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_OP: contextvars.ContextVar[str] = contextvars.ContextVar("bench_store_op", default="other")


def install() -> None:
    import redis.asyncio.connection as rconn

    import extauth.server as server_mod
    from extauth.metrics import LoopCounter, Metrics
    from extauth.store.redis import RedisStore
    from extauth.store.resp import RespConnection, RespLane

    # extauth's own lock-free loop counters: prometheus_client's Counter takes a lock and
    # builds the label key on every labels().inc().
    sends = LoopCounter("extauth_bench_redis_round_trips", "Redis writes by store op (bench)", ("op",))
    refs = LoopCounter("extauth_bench_store_refs", "Leases per store op (bench)", ("op",))

    class BenchMetrics(Metrics):
        def __init__(self, registry: Any = None) -> None:
            super().__init__(registry)
            self.registry.register(sends)
            self.registry.register(refs)

    server_mod.Metrics = BenchMetrics  # type: ignore[attr-defined]

    send = rconn.AbstractConnection.send_packed_command

    async def counted_send(self: Any, command: Any, check_health: bool = True) -> None:
        sends.labels(_OP.get()).inc()
        await send(self, command, check_health)

    rconn.AbstractConnection.send_packed_command = counted_send  # type: ignore[method-assign]

    on_connect = rconn.AbstractConnection.on_connect_check_health

    async def tagged_on_connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        # A new pooled connection's own commands (CLIENT SETNAME/SETINFO) are not the
        # store operation's round trips: count them apart.
        token = _OP.set("connection_setup")
        try:
            return await on_connect(self, *args, **kwargs)
        finally:
            _OP.reset(token)

    rconn.AbstractConnection.on_connect_check_health = tagged_on_connect  # type: ignore[method-assign]

    class CountedConnection(RespConnection):
        def send(self, data: bytes, count: int) -> asyncio.Future[list[Any]]:
            sends.labels(_OP.get()).inc()
            return super().send(data, count)

    RespLane.connection_class = CountedConnection
    lane_handshake = RespLane._handshake

    async def tagged_lane_handshake(self: Any, conn: Any) -> None:
        token = _OP.set("connection_setup")
        try:
            await lane_handshake(self, conn)
        finally:
            _OP.reset(token)

    RespLane._handshake = tagged_lane_handshake  # type: ignore[method-assign]

    def tagged(name: str, fn: Callable[..., Any], counts_refs: bool) -> Callable[..., Any]:
        # Synchronous: it tags the calling task and returns the store's own coroutine, so a
        # store call costs a ContextVar.set more, not a coroutine more. The tag stays set
        # after the call: every store call sets its own first, and each check, access-log
        # stream and background job runs in a task of its own.
        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            _OP.set(name)
            if counts_refs:
                refs.labels(name).inc(len(args[0]))
            return fn(self, *args, **kwargs)
        return wrapper

    for name, counts in (("acquire", False), ("refresh", True), ("release", True), ("count_all", False)):
        setattr(RedisStore, name, tagged(name, getattr(RedisStore, name), counts))


def install_constant_answer() -> None:
    path = os.environ.get("EXTAUTH_BENCH_CONSTANT_ANSWER")
    if not path:
        return
    from extauth.server import AuthorizationService

    answer = Path(path).read_bytes()

    async def constant_check(self: Any, request: Any, context: Any) -> bytes:
        return answer

    AuthorizationService.Check = constant_check  # type: ignore[method-assign]


def install_profiler() -> None:
    out = os.environ.get("EXTAUTH_BENCH_PROFILE_OUT")
    if not out:
        return
    state: dict[str, cProfile.Profile] = {}

    def start(_sig: int, _frame: Any) -> None:
        if "p" not in state:
            state["p"] = cProfile.Profile()
            state["p"].enable()

    def stop(_sig: int, _frame: Any) -> None:
        prof = state.pop("p", None)
        if prof is not None:
            prof.disable()
            prof.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


if __name__ == "__main__":
    install()
    install_constant_answer()
    install_profiler()
    from extauth.cli import main

    raise SystemExit(main(["serve", *sys.argv[1:]]))
