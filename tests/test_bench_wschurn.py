"""The bench's C churn client (bench/wschurn.c) against a real `websockets` server: what
`make bench` reports as upgrades must be real RFC 6455 upgrades, and anything else must not
count as one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_measure  # noqa: E402

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(scope="module")
def wschurn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary, why = bench_measure.build_c_tool("wschurn", tmp_path_factory.mktemp("wschurn"))
    assert binary is not None, why
    return binary


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(["tok-a", "tok-b", "tok-c"]))
    return path


class _LoopThread:
    """An asyncio loop in a thread, serving until closed."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[_LoopThread]:
    lt = _LoopThread()
    try:
        yield lt
    finally:
        lt.close()


def _run(binary: Path, port: int, tokens: Path, seconds: float = 0.5) -> dict[str, Any]:
    out = subprocess.run([str(binary), "--host", "127.0.0.1", "--port", str(port), "--path", "/ws",
                          "--origin", "https://app.example.com", "--tokens", str(tokens),
                          "--concurrency", "4", "--duration", str(seconds)],
                         capture_output=True, text=True, timeout=30, check=True)
    return dict(json.loads(out.stdout))


def test_cycles_against_a_real_websockets_server(wschurn: Path, tokens: Path,
                                                 loop_thread: _LoopThread) -> None:
    seen: list[tuple[str, str | None]] = []

    async def echo(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen.append((ws.request.path, ws.request.headers.get("Origin")))
        async for message in ws:  # the library checks masking and framing; a bad frame ends this
            await ws.send(message)

    async def start() -> Any:
        return await serve(echo, "127.0.0.1", 0, compression=None)

    server = loop_thread.run(start())
    try:
        port = server.sockets[0].getsockname()[1]
        result = _run(wschurn, port, tokens)
    finally:
        server.close()
        loop_thread.run(server.wait_closed())
    assert result["errors"] == {}
    assert result["upgrades"] > 0
    assert result["cycles"] == result["upgrades"] == result["statuses"]["101"]
    assert len(result["latencies_us"]) == result["upgrades"]
    assert len(seen) == result["upgrades"]
    assert {path for path, _ in seen} == {"/ws?token=tok-a", "/ws?token=tok-b", "/ws?token=tok-c"}
    assert {origin for _, origin in seen} == {"https://app.example.com"}


def _raw_server(loop_thread: _LoopThread, answer: bytes) -> tuple[int, Callable[[], None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0)

    server = loop_thread.run(start())

    def stop() -> None:
        server.close()

    return server.sockets[0].getsockname()[1], stop


@pytest.mark.parametrize(("answer", "status"), [
    # A 101 whose Sec-WebSocket-Accept is not the RFC 6455 value for the key sent is no upgrade.
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n", "0"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "0"),
    (b"HTTP/1.1 403 Forbidden\r\nx-extauth-reason: origin_not_allowed\r\ncontent-length: 0\r\n\r\n", "403"),
    (b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n", "429"),
])
def test_refusals_are_not_counted_as_upgrades(wschurn: Path, tokens: Path, loop_thread: _LoopThread,
                                              answer: bytes, status: str) -> None:
    port, stop = _raw_server(loop_thread, answer)
    try:
        result = _run(wschurn, port, tokens, seconds=0.3)
    finally:
        loop_thread.loop.call_soon_threadsafe(stop)
    assert result["upgrades"] == 0 and result["cycles"] == 0
    assert result["latencies_us"] == []
    assert set(result["statuses"]) == {status}
    assert result["errors"]["refused"] == result["statuses"][status] > 0


def test_a_closed_port_is_a_connect_error(wschurn: Path, tokens: Path, loop_thread: _LoopThread) -> None:
    port, stop = _raw_server(loop_thread, b"")
    loop_thread.loop.call_soon_threadsafe(stop)
    loop_thread.run(asyncio.sleep(0.05))  # the listener is gone once the loop has run its close
    result = _run(wschurn, port, tokens, seconds=0.2)
    assert result["upgrades"] == 0
    assert result["errors"].get("connect_error", 0) > 0
