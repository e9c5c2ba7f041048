"""The Python fallback HTTP load generator, used only when ``wrk`` is not on PATH
(``apt-get install wrk`` / ``brew install wrk`` gives far higher and steadier figures: this one
spends a whole core on its own event loop and caps the fastest scenarios well below Envoy's).

Keep-alive HTTP/1.1 over raw asyncio streams, ``--connections`` connections, for ``--duration``
seconds; with ``--rate`` each connection paces its requests so the total is ``--rate`` per
second (an open-loop schedule: a late response makes the next request go at once, not shift
the schedule). Prints one JSON line: requests, non-2xx, errors, elapsed, latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = "".join(f"{h}\r\n" for h in args.header)
    request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n{headers}\r\n").encode()
    deadline = time.monotonic() + args.duration
    stats = {"requests": 0, "non2xx": 0, "errors": 0}
    latencies: list[float] = []
    interval = args.connections / args.rate if args.rate else 0.0

    async def conn(lane: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(args.host, args.port)
        except OSError:
            stats["errors"] += 1
            return
        next_at = time.monotonic() + (lane * interval / args.connections if interval else 0)
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if interval:
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                    next_at += interval
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                stats["requests"] += 1
                if not 200 <= status < 300:
                    stats["non2xx"] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            stats["errors"] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(conn(i) for i in range(args.connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {**stats, "elapsed": elapsed, "rps": stats["requests"] / elapsed,
            "p50_us": pct(latencies, 50) * 1e6, "p99_us": pct(latencies, 99) * 1e6}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=0.0, help="total requests/s (0: as fast as possible)")
    print(json.dumps(asyncio.run(run(ap.parse_args()))), flush=True)
