"""WebSocket load client (one process; bench/run.py starts several) through Envoy, one JSON
line of results on stdout.

churn: ``--concurrency`` loops for ``--duration`` seconds, each: connect (the upgrade,
timed), send one message, read the echo, close. Each cycle is a bare asyncio Protocol
speaking just enough RFC 6455 (a fresh Sec-WebSocket-Key and its Sec-WebSocket-Accept
checked, a masked text frame, the close handshake), like bench/ws_upstream.py on the other
side. Measured on this 2-core machine, a ``websockets`` client costs about 0.6 ms of CPU per
cycle, asyncio client or sans-I/O alike, which is more than extauth's whole share: the
load generator's CPU is taken from the system under test.

hold: real ``websockets`` asyncio clients (the library's handshake and keepalive-free
connections); the rate does not matter there.

hold: open ``--count`` connections (at most ``--concurrency`` handshakes in flight), echo
once on each, print ``{"event": "opened", ...}``, keep them open until a line arrives on stdin
(or ``--max-hold`` seconds), then close them all and print ``{"event": "closed", ...}``.

Tokens come from a JSON file (a list); connection i uses token i mod len.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.protocol import State


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ECHO = b"x"


def _masked(first_byte: int, payload: bytes) -> bytes:
    """One client frame (payload under 126 bytes), masked as RFC 6455 requires of clients."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((first_byte, 0x80 | len(payload))) + mask + body


class _Cycle(asyncio.Protocol):
    """One churn cycle on one connection: upgrade, one echo, close handshake."""

    def __init__(self, request_head: bytes) -> None:
        key = base64.b64encode(os.urandom(16))
        self.request = request_head + b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"
        self.accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())  # noqa: S324 - RFC 6455
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        loop = asyncio.get_running_loop()
        self.upgraded: asyncio.Future[int] = loop.create_future()  # the response status
        self.done: asyncio.Future[str] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            self._response()
        if self.open:
            self._frames()

    def _response(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head, self.buf = self.buf[:end].split(b"\r\n"), self.buf[end + 4:]
        status = int(head[0].split(b" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head[1:])}
        if status == 101 and headers.get(b"sec-websocket-accept") != self.accept:
            status = 0  # a 101 without the right accept value is not an upgrade
        self.upgraded.set_result(status)
        if status != 101:
            self._finish("refused")
            return
        self.open = True
        assert self.transport is not None
        self.transport.write(_masked(0x81, _ECHO))

    def _frames(self) -> None:
        assert self.transport is not None
        while len(self.buf) >= 2:
            n = self.buf[1] & 0x7F
            if n >= 126 or len(self.buf) < 2 + n:  # the echo and the close are short
                return
            opcode, payload, self.buf = self.buf[0] & 0x0F, self.buf[2:2 + n], self.buf[2 + n:]
            if opcode == 0x1:
                self.transport.write(_masked(0x88, (1000).to_bytes(2, "big")))
                if payload != _ECHO:
                    self._finish("bad_echo")
            elif opcode == 0x8:
                self._finish("ok")

    def _finish(self, outcome: str) -> None:
        if not self.done.done():
            self.done.set_result(outcome)
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed before the upgrade answer"))
        self._finish("connection_lost")


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        with open(args.tokens, encoding="utf-8") as f:
            self.tokens: list[str] = json.load(f)
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.upgrades = 0
        self.cycles = 0

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

    async def cycle(self, i: int, host: str, port: int, path: str) -> bool:
        """One lean churn cycle; False when refused or broken."""
        head = (f"GET {path}?token={self.tokens[i % len(self.tokens)]} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: {self.args.origin}\r\n").encode()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(10):
                _, proto = await loop.create_connection(lambda: _Cycle(head), host, port)
                status = await proto.upgraded
                self.statuses[status] += 1
                if status != 101:
                    return False
                self.latencies.append(time.perf_counter() - t0)
                self.upgrades += 1
                outcome = await proto.done
        except Exception as e:
            self.errors[type(e).__name__] += 1
            return False
        if outcome != "ok":
            self.errors[outcome] += 1
            return False
        self.cycles += 1
        return True

    async def churn(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.args.duration
        started = time.perf_counter()
        url = urlsplit(self.args.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80

        async def lane_loop(lane: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                i = self.args.offset + lane + n * self.args.concurrency
                ok = await self.cycle(i, host, port, url.path)
                n += 1
                if not ok:
                    await asyncio.sleep(0.005)

        await asyncio.gather(*(lane_loop(i) for i in range(self.args.concurrency)))
        return self.result(time.perf_counter() - started)

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
        return {"elapsed": elapsed, "upgrades": self.upgrades, "cycles": self.cycles,
                "statuses": {str(k): v for k, v in self.statuses.items()}, "errors": dict(self.errors),
                "latencies_us": [round(x * 1e6) for x in self.latencies]}


async def main(args: argparse.Namespace) -> None:
    client = Client(args)
    if args.mode == "churn":
        out = await client.churn()
    else:
        out = await client.hold()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["churn", "hold"])
    ap.add_argument("--url", required=True, help="ws://host:port/path (the token goes in ?token=)")
    ap.add_argument("--origin", required=True)
    ap.add_argument("--tokens", required=True, help="JSON file: a list of tokens")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--offset", type=int, default=0, help="first token index (spreads users over processes)")
    ap.add_argument("--max-hold", type=float, default=300.0)
    a = ap.parse_args()
    raise_nofile()
    asyncio.run(main(a))
