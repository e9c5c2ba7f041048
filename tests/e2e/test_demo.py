"""``extauth demo`` (``make demo``): the whole stack in one command, stopped by Ctrl-C or --duration."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.e2e.demo_proc import DemoProcess, running_demo
from tests.e2e.harness import http_request, port_closed, wait_until

pytestmark = pytest.mark.e2e


async def _open(info: dict[str, object], origin: str) -> ClientConnection | int:
    try:
        return await connect(str(info["ws_url"]), origin=origin,  # type: ignore[arg-type]
                             subprotocols=["chat.v1", f"bearer.{info['token']}"],  # type: ignore[list-item]
                             proxy=None, open_timeout=5)
    except InvalidStatus as e:
        return e.response.status_code


async def test_demo_serves_pages_and_answers_403_101_429_then_ctrl_c_stops_everything(tmp_path: Path) -> None:
    demo = DemoProcess(tmp_path)
    try:
        info = await asyncio.to_thread(demo.wait_ready)
        out = demo.out.read_text()
        for needle in (info["allowed_page"], info["other_page"], "curl ", "429", "403", "101"):
            assert needle in out
        # both pages are served (two ports: two origins)
        for page in (info["allowed_page"], info["other_page"]):
            port = int(str(page).rstrip("/").rsplit(":", 1)[1])
            status, _, body = await asyncio.to_thread(http_request, port, "GET", "/")
            assert status == 200
            assert b"new WebSocket" in body and str(info["token"]).encode() in body
        assert await _open(info, str(info["other_origin"])) == 403
        held = []
        for _ in range(int(str(info["per_user"]))):
            ws = await _open(info, str(info["allowed_origin"]))
            assert not isinstance(ws, int), ws
            assert ws.subprotocol == "chat.v1"
            await ws.send("hi")
            assert await ws.recv() == "hi"
            held.append(ws)
        assert await _open(info, str(info["allowed_origin"])) == 429
        for ws in held:
            await ws.close()
        envoy_port = int(str(info["envoy_port"]))
        # Ctrl-C: a clean exit, and Envoy (a child in its own process group) is gone too.
        started = time.monotonic()
        code = await asyncio.to_thread(demo.interrupt)
        assert code == 0, demo.logs()
        assert time.monotonic() - started < 15
        assert "demo stopped" in demo.out.read_text()
        await asyncio.to_thread(wait_until, lambda: port_closed(envoy_port), 5, "Envoy's port to close")
    finally:
        demo.kill()


def test_demo_duration_stops_by_itself(tmp_path: Path) -> None:
    with running_demo(tmp_path, duration=2) as demo:
        code = demo.proc.wait(30)
        assert code == 0, demo.logs()
        assert "demo stopped" in demo.out.read_text()
        assert port_closed(int(demo.info["envoy_port"]))


async def test_demo_tls_serves_websockets_over_http2_http3_and_http1(tmp_path: Path) -> None:
    """``make demo DEMO_ARGS=--tls`` without a browser: the certificate it made verifies,
    and its wss:// endpoint takes RFC 8441, RFC 9220 and RFC 6455 WebSockets alike."""
    import ssl

    from tests.e2e.extended_connect import H2Client, H3Client, WebSocket
    from tests.e2e.harness import Refused

    with running_demo(tmp_path, duration=60, tls=True) as demo:
        info = demo.info
        port, cafile = int(info["envoy_port"]), str(info["cert_file"])
        tls = ssl.create_default_context(cafile=cafile)
        tls.set_alpn_protocols(["h2", "http/1.1"])
        bearer = ["chat.v1", f"bearer.{info['token']}"]
        for conn in (await H2Client.connect("127.0.0.1", port, tls=tls, server_name="localhost"),
                     await H3Client.connect("127.0.0.1", port, verify=True, cafile=cafile)):
            try:
                refused = await conn.websocket("/ws", origin=info["other_origin"], subprotocols=bearer)
                assert isinstance(refused, Refused) and refused.reason == "origin_not_allowed"
                ws = await conn.websocket("/ws", origin=info["allowed_origin"], subprotocols=bearer)
                assert isinstance(ws, WebSocket), ws
                await ws.send(conn.protocol_name)
                assert await ws.recv() == conn.protocol_name
                await ws.close()
            finally:
                await conn.aclose()
        http1 = ssl.create_default_context(cafile=cafile)
        http1.set_alpn_protocols(["http/1.1"])  # offered h2, Envoy would pick it
        async with connect(info["ws_url"], origin=info["allowed_origin"], subprotocols=bearer,  # type: ignore[arg-type]
                           ssl=http1, server_hostname="localhost", proxy=None, open_timeout=5) as ws1:
            await ws1.send("http/1.1")
            assert await ws1.recv() == "http/1.1"
