"""The bench's echo upstreams, the C one (bench/wsecho.c) and its Python twin
(bench/ws_upstream.py), against a real `websockets` client: churn through Envoy counts an
upgrade only when the upstream really spoke RFC 6455, so both must, and the same way."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_measure  # noqa: E402
from redis_servers import free_port  # noqa: E402


@pytest.fixture(scope="module")
def wsecho(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary, why = bench_measure.build_c_tool("wsecho", tmp_path_factory.mktemp("wsecho"))
    assert binary is not None, why
    return binary


@pytest.fixture(scope="module")
def wschurn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary, why = bench_measure.build_c_tool("wschurn", tmp_path_factory.mktemp("wschurn"))
    assert binary is not None, why
    return binary


def _start(cmd: list[str]) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":  # printed once listening
        proc.kill()
        proc.wait(10)
        raise AssertionError("the upstream did not start")
    return proc, port


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(params=["c", "python"])
def upstream(request: pytest.FixtureRequest) -> Iterator[int]:
    cmd = ([str(request.getfixturevalue("wsecho"))] if request.param == "c"
           else [sys.executable, str(REPO / "bench" / "ws_upstream.py")])
    proc, port = _start(cmd)
    try:
        yield port
    finally:
        assert _stop(proc) == 0, "SIGTERM must stop the upstream cleanly"


def test_echoes_every_frame_size_and_fragments(upstream: int) -> None:
    async def go() -> None:
        # websockets itself checks Sec-WebSocket-Accept and refuses any framing error
        async with connect(f"ws://127.0.0.1:{upstream}/ws", max_size=None, compression=None) as ws:
            for message in ["x", b"\x00" * 200, "y" * 70_000, bytes(range(256)) * 4096]:
                await ws.send(message)
                assert await ws.recv() == message
            await ws.send(["frag", "mented"])  # continuation frames, echoed as they came
            assert await ws.recv() == "fragmented"
            await asyncio.wait_for(await ws.ping(b"hi"), 5)

    asyncio.run(go())


def test_a_close_is_answered_with_the_same_code_then_tcp_closes(upstream: int) -> None:
    async def go() -> None:
        ws = await connect(f"ws://127.0.0.1:{upstream}/ws")
        await ws.close(code=4001, reason="bye")
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 4001
        with pytest.raises(ConnectionClosed):
            await ws.recv()

    asyncio.run(go())
    # The same on a bare socket, where nothing else could close TCP: after its close frame the
    # upstream closes (Envoy then sees the upstream end, as with a real server).
    with socket.create_connection(("127.0.0.1", upstream), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = _read_until(s, b"\r\n\r\n")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's own example
        s.sendall(bytes([0x88, 0x82, 1, 2, 3, 4, 0x0F ^ 1, 0xA1 ^ 2]))  # close 4001, masked
        assert _read_until(s, b"") == bytes([0x88, 2, 0x0F, 0xA1])  # then EOF


def _read_until(s: socket.socket, end: bytes) -> bytes:
    """Bytes until ``end`` is in them, or (``end`` empty) until the peer closes."""
    data = b""
    while not end or end not in data:
        chunk = s.recv(4096)
        if not chunk:
            assert not end, f"closed before {end!r}: {data!r}"
            return data
        data += chunk
    return data


def test_plain_http_is_a_keep_alive_200(upstream: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=5)
    try:
        for _ in range(2):  # the same connection twice
            conn.request("GET", "/health")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"ok")
    finally:
        conn.close()


def test_an_upgrade_without_a_key_is_refused(wsecho: Path) -> None:
    proc, port = _start([str(wsecho)])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 400 "), head
            assert s.recv(4096) == b"", "the connection is closed after the 400"
    finally:
        assert _stop(proc) == 0


def test_the_churn_client_cycles_against_it(wsecho: Path, wschurn: Path, tmp_path: Path) -> None:
    """The two C tools together, as the bench's no-auth churn runs them (Envoy aside)."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(["tok"]))
    proc, port = _start([str(wsecho)])
    try:
        out = subprocess.run([str(wschurn), "--host", "127.0.0.1", "--port", str(port), "--path", "/ws",
                              "--origin", "https://app.example.com", "--tokens", str(tokens),
                              "--concurrency", "4", "--duration", "1.0"],
                             capture_output=True, text=True, timeout=30, check=True)
    finally:
        assert _stop(proc) == 0
    result = json.loads(out.stdout)
    assert result["errors"] == {}
    assert result["upgrades"] > 10
    assert result["statuses"] == {"101": result["upgrades"]}
    assert result["cycles"] >= result["upgrades"] - 4  # lanes cut off at the deadline
