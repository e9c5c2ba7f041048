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

Check latency comes from the product's own ``extauth_check_duration_seconds``: the Check
path carries no bench code, so the product is measured as it ships. Cost: a counter increment
per Redis write.
"""

from __future__ import annotations

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
    from prometheus_client import Counter

    import extauth.server as server_mod
    from extauth.metrics import Metrics
    from extauth.store.redis import RedisStore
    from extauth.store.resp import RespLane

    holder: dict[str, Any] = {}

    class BenchMetrics(Metrics):
        def __init__(self, registry: Any = None) -> None:
            super().__init__(registry)
            holder["rt"] = Counter("extauth_bench_redis_round_trips", "Redis writes by store op (bench)",
                                   ["op"], registry=self.registry)
            holder["refs"] = Counter("extauth_bench_store_refs", "Leases per store op (bench)", ["op"],
                                     registry=self.registry)

    server_mod.Metrics = BenchMetrics  # type: ignore[attr-defined]

    send = rconn.AbstractConnection.send_packed_command

    async def counted_send(self: Any, command: Any, check_health: bool = True) -> None:
        rt = holder.get("rt")
        if rt is not None:
            rt.labels(_OP.get()).inc()
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

    lane_send = RespLane._send

    async def counted_lane_send(self: Any, conn: Any, data: bytes, count: int) -> Any:
        rt = holder.get("rt")
        if rt is not None:
            rt.labels(_OP.get()).inc()
        return await lane_send(self, conn, data, count)

    RespLane._send = counted_lane_send  # type: ignore[method-assign]
    lane_handshake = RespLane._handshake

    async def tagged_lane_handshake(self: Any, conn: Any) -> None:
        token = _OP.set("connection_setup")
        try:
            await lane_handshake(self, conn)
        finally:
            _OP.reset(token)

    RespLane._handshake = tagged_lane_handshake  # type: ignore[method-assign]

    def tagged(name: str, fn: Callable[..., Any], counts_refs: bool) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            token = _OP.set(name)
            try:
                if counts_refs and "refs" in holder:
                    holder["refs"].labels(name).inc(len(args[0]))
                return await fn(self, *args, **kwargs)
            finally:
                _OP.reset(token)
        return wrapper

    for name, refs in (("acquire", False), ("refresh", True), ("release", True), ("count_all", False)):
        setattr(RedisStore, name, tagged(name, getattr(RedisStore, name), refs))


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
    install_profiler()
    from extauth.cli import main

    raise SystemExit(main(["serve", *sys.argv[1:]]))
