"""Held WebSockets for bench/run.py: open ``--count`` real ``websockets`` connections through
Envoy (at most ``--concurrency`` handshakes in flight), echo once on each, print
``{"event": "opened", ...}``, keep them open until a line arrives on stdin (or ``--max-hold``
seconds), then close them all and print ``{"event": "closed", ...}``.

Tokens come from a JSON file (a list); connection i uses token i mod len.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.protocol import State


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        with open(args.tokens, encoding="utf-8") as f:
            self.tokens: list[str] = json.load(f)
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.upgrades = 0

    async def open(self, i: int) -> ClientConnection | None:
        """One upgrade (timed), then one echo; None when refused or broken."""
        tok = self.tokens[i % len(self.tokens)]
        t0 = time.perf_counter()
        try:
            ws = await connect(f"{self.args.url}?token={tok}", origin=self.args.origin,
                               compression=None, open_timeout=10, close_timeout=5, proxy=None,
                               ping_interval=None, user_agent_header=None)
        except InvalidStatus as e:
            self.statuses[e.response.status_code] += 1
            return None
        except Exception as e:
            self.errors[type(e).__name__] += 1
            return None
        self.latencies.append(time.perf_counter() - t0)
        self.upgrades += 1
        self.statuses[101] += 1
        try:
            await ws.send("x")
            if await asyncio.wait_for(ws.recv(), 10) != "x":
                self.errors["bad_echo"] += 1
        except Exception as e:
            self.errors[f"echo:{type(e).__name__}"] += 1
            await ws.close()
            return None
        return ws

    async def hold(self) -> dict[str, Any]:
        sem = asyncio.Semaphore(self.args.concurrency)
        conns: list[ClientConnection] = []

        async def one(i: int) -> None:
            async with sem:
                ws = await self.open(i)
                if ws is not None:
                    conns.append(ws)

        started = time.perf_counter()
        await asyncio.gather(*(one(self.args.offset + i) for i in range(self.args.count)))
        opened = self.result(time.perf_counter() - started)
        print(json.dumps({"event": "opened", "held": len(conns), **opened}), flush=True)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), self.args.max_hold)
        except TimeoutError:
            self.errors["max_hold_reached"] += 1
        alive = sum(1 for ws in conns if ws.state is State.OPEN)
        t0 = time.perf_counter()
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
        return {"event": "closed", "alive_before_close": alive, "close_seconds": time.perf_counter() - t0,
                "errors": dict(self.errors)}

    def result(self, elapsed: float) -> dict[str, Any]:
        return {"elapsed": elapsed, "upgrades": self.upgrades,
                "statuses": {str(k): v for k, v in self.statuses.items()}, "errors": dict(self.errors),
                "latencies_us": [round(x * 1e6) for x in self.latencies]}


async def main(args: argparse.Namespace) -> None:
    print(json.dumps(await Client(args).hold()), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True, help="ws://host:port/path (the token goes in ?token=)")
    ap.add_argument("--origin", required=True)
    ap.add_argument("--tokens", required=True, help="JSON file: a list of tokens")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--offset", type=int, default=0, help="first token index (spreads users over processes)")
    ap.add_argument("--max-hold", type=float, default=300.0)
    a = ap.parse_args()
    raise_nofile()
    asyncio.run(main(a))
