"""Store benchmark: acquire+release throughput, latency and client CPU, round trips per acquire,
Redis memory per lease. The store runs as shipped (its request path on RespLane) and, side by
side, on redis-py alone.

Starts its own valkey-server on an ephemeral port with persistence off and prints markdown
tables. Runtime well under a minute.

    .venv/bin/python bench/store_bench.py [--ops 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from bench_stack import Valkey

from extauth.store import LeaseRef, Limits, MemoryStore, Store, new_lease_id
from extauth.store.redis import RedisStore

LIMITS = Limits(connections_per_user=1_000_000, connections_per_ip=1_000_000,
                attempts_per_ip_per_minute=1_000_000, attempts_per_user_per_minute=1_000_000)


class PlainConnection(aioredis.Connection):
    """A connection class of its own: RespLane.from_client then declines the client, so the
    store runs on redis-py alone (the comparison row)."""


def redis_py_only(server: Valkey, key_prefix: str) -> RedisStore:
    pool = aioredis.ConnectionPool(host="127.0.0.1", port=server.port, connection_class=PlainConnection,
                                   decode_responses=True)
    store = RedisStore(aioredis.Redis(connection_pool=pool), key_prefix=key_prefix)
    assert store._lane is None
    return store


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def latency_run(store: Store, ops: int) -> dict[str, float]:
    acq: list[float] = []
    rel: list[float] = []
    started = time.perf_counter()
    for i in range(ops):
        ref = LeaseRef(new_lease_id(), "chat", f"user{i % 200}", f"10.0.{i % 50}.1")
        t0 = time.perf_counter()
        res = await store.acquire(ref, LIMITS, 60)
        t1 = time.perf_counter()
        await store.release([ref])
        t2 = time.perf_counter()
        assert res.granted
        acq.append(t1 - t0)
        rel.append(t2 - t1)
    elapsed = time.perf_counter() - started
    return {
        "seq_pairs_per_s": ops / elapsed,
        "acq_p50_us": pct(acq, 50) * 1e6, "acq_p99_us": pct(acq, 99) * 1e6,
        "rel_p50_us": pct(rel, 50) * 1e6, "rel_p99_us": pct(rel, 99) * 1e6,
    }


async def concurrent_run(store: Store, ops: int, workers: int = 64) -> tuple[float, float]:
    """64-way acquire+release: pairs per second and this process's CPU µs per pair."""
    async def worker(w: int) -> None:
        for i in range(ops // workers):
            ref = LeaseRef(new_lease_id(), "chat", f"user{(w * 7 + i) % 200}", f"10.1.{w}.1")
            assert (await store.acquire(ref, LIMITS, 60)).granted
            await store.release([ref])

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    pairs = (ops // workers) * workers
    return pairs / (time.perf_counter() - started), (time.process_time() - cpu) / pairs * 1e6


def info_calls(admin: Any, cmd: str) -> int:
    return int(admin.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0))


class Writes:
    """Counts the writes of the store's one RespLane connection: a round trip each."""

    def __init__(self, store: RedisStore) -> None:
        assert store._lane is not None and store._lane._conn is not None, "connect the store first"
        conn = store._lane._conn
        self.sends, send = 0, conn.send

        def counted(data: bytes, count: int) -> Any:
            self.sends += 1
            return send(data, count)

        conn.send = counted  # type: ignore[method-assign]


async def round_trips(server: Valkey, ops: int) -> dict[str, float]:
    store = RedisStore.from_url(server.url, key_prefix="rt")
    admin = server.client()
    try:
        warm = LeaseRef(new_lease_id(), "chat", "warm", "10.9.9.9")
        await store.acquire(warm, LIMITS, 60)
        await store.refresh([warm], 60)
        await store.release([warm])
        counter = Writes(store)
        refs = [LeaseRef(new_lease_id(), "chat", f"user{i % 100}", f"10.2.{i % 20}.1") for i in range(ops)]
        sends, evalsha = counter.sends, info_calls(admin, "evalsha")
        total = int(admin.info("stats")["total_commands_processed"])
        for ref in refs:
            await store.acquire(ref, LIMITS, 60)
        acquire_rt = (counter.sends - sends) / ops
        acquire_evalsha = (info_calls(admin, "evalsha") - evalsha) / ops
        # Includes the commands run inside the script (and 2 INFO calls of ours, negligible).
        server_cmds = (int(admin.info("stats")["total_commands_processed"]) - total) / ops
        sends = counter.sends
        batch = refs[:500]
        await store.refresh(batch, 60)
        refresh_rt = counter.sends - sends
        sends = counter.sends
        await store.release(batch)
        release_rt = counter.sends - sends
        await store.release(refs)
        return {"acquire_rt": acquire_rt, "acquire_evalsha": acquire_evalsha, "server_cmds": server_cmds,
                "refresh500_rt": refresh_rt, "release500_rt": release_rt}
    finally:
        admin.close()
        await store.close()


async def memory_per_lease(server: Valkey, leases: int = 10_000, users: int = 1_000,
                           ips: int = 100) -> dict[str, Any]:
    store = RedisStore.from_url(server.url, key_prefix="mem")
    admin = server.client()
    try:
        admin.flushall()
        base = int(admin.info("memory")["used_memory"])
        refs = [LeaseRef(new_lease_id(), "chat", f"user-{i % users:04d}", f"10.{i % ips // 10}.{i % ips}.7")
                for i in range(leases)]
        sem = asyncio.Semaphore(64)

        async def one(ref: LeaseRef) -> None:
            async with sem:
                assert (await store.acquire(ref, Limits(), 600)).granted

        await asyncio.gather(*(one(r) for r in refs))
        keys = [k for k in admin.scan_iter(match="mem:*:leases:*", count=1000)]
        pipe = admin.pipeline(transaction=False)
        for k in keys:
            pipe.memory_usage(k, samples=0)
        usage = sum(int(u or 0) for u in pipe.execute())
        used = int(admin.info("memory")["used_memory"]) - base
        encodings = {str(admin.object("encoding", k)) for k in keys[:50]}
        assert await store.count_all() == leases
        return {"keys": len(keys), "memory_usage_per_lease": usage / leases,
                "used_memory_per_lease": used / leases, "encoding": ",".join(sorted(encodings))}
    finally:
        admin.flushall()
        admin.close()
        await store.close()


def row(name: str, r: dict[str, float], conc: tuple[float, float]) -> str:
    return (f"| {name} | {r['seq_pairs_per_s']:,.0f} | {conc[0]:,.0f} | {conc[1]:.0f} "
            f"| {r['acq_p50_us']:.0f} | {r['acq_p99_us']:.0f} "
            f"| {r['rel_p50_us']:.0f} | {r['rel_p99_us']:.0f} |")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=3000)
    args = ap.parse_args()
    started = time.perf_counter()
    lines = ["| store | seq acquire+release /s | 64-way acquire+release /s | client CPU µs per pair (64-way) "
             "| acquire p50 µs | acquire p99 µs | release p50 µs | release p99 µs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    mem = MemoryStore()
    lines.append(row("memory", await latency_run(mem, args.ops), await concurrent_run(mem, args.ops * 4)))

    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        server = Valkey(Path(tmp)).start()
        try:
            # As shipped, then on redis-py alone, one after the other in the same run.
            for name, make in (("redis (as shipped: RespLane)",
                                lambda: RedisStore.from_url(server.url, key_prefix="bench")),
                               ("redis (redis-py alone)", lambda: redis_py_only(server, "bench"))):
                rs = make()
                await rs.ping()
                lines.append(row(name, await latency_run(rs, args.ops), await concurrent_run(rs, args.ops)))
                await rs.close()
            rt = await round_trips(server, 1000)
            mem_stats = await memory_per_lease(server)
        finally:
            server.stop()

    print("\n## Throughput and latency (one client process, loopback)\n")
    print("\n".join(lines))
    print("\n## Round trips (writes counted at the store's RespLane connection)\n")
    print("| operation | round trips | server-side |")
    print("|---|---:|---|")
    print(f"| acquire (user + IP, all four limits) | {rt['acquire_rt']:.2f} per acquire "
          f"| {rt['acquire_evalsha']:.2f} EVALSHA per acquire; {rt['server_cmds']:.1f} commands incl. inside "
          "the script |")
    print(f"| refresh of 500 leases | {rt['refresh500_rt']:.0f} | pipelined EVALSHA, one per lease key |")
    print(f"| release of 500 leases | {rt['release500_rt']:.0f} | pipelined ZREM, one per lease key |")
    print("| acquire on Cluster | 2 | IP-slot script then user-slot script (+1 rollback on a user denial) |")
    print("\n## Redis memory per lease (10,000 leases, 1,000 users, 100 IPs)\n")
    print("| measure | bytes per lease |")
    print("|---|---:|")
    print(f"| sum of MEMORY USAGE over {mem_stats['keys']} lease keys ÷ leases "
          f"| {mem_stats['memory_usage_per_lease']:.0f} |")
    print(f"| INFO used_memory delta ÷ leases (incl. attempt logs and allocator overhead) "
          f"| {mem_stats['used_memory_per_lease']:.0f} |")
    print(f"\nZSET encoding: {mem_stats['encoding']}. Target: ≤ 200 bytes per lease. "
          f"Total runtime {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    asyncio.run(main())
