"""A real browser: headless Chromium loads the demo's two pages (two origins) and opens their
WebSockets through Envoy. Driven over the Chrome DevTools Protocol with ``websockets``.

Needs the Debian package ``chromium`` (``.ci/run`` installs it when it can). Without it the
test is SKIPPED, with the reason, never passed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.e2e.demo_proc import DemoProcess, running_demo
from tests.e2e.harness import REPO, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ARTIFACTS = REPO / "test-artifacts"


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


class Cdp:
    """A minimal DevTools Protocol client: one browser connection, flat sessions."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        while True:  # events in between are not needed
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    async def open_page(self, url: str) -> str:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        session = str(attached["sessionId"])
        await self.call("Page.enable", session)
        await self.call("Page.navigate", session, url=url)
        return session

    async def evaluate(self, session: str, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        return r.get("result", {}).get("value")

    async def screenshot(self, session: str) -> bytes:
        # Headless Chromium may never paint a page behind another one, and a capture then
        # waits for a frame that never comes: bring the page to the front first.
        await self.call("Page.bringToFront", session)
        r = await self.call("Page.captureScreenshot", session, format="png")
        return base64.b64decode(r["data"])


@contextlib.contextmanager
def chromium(binary: str, profile: Path, extra_args: Sequence[str] = ()) -> Iterator[str]:
    """Headless Chromium; yields the browser's DevTools WebSocket URL."""
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=900,700", *extra_args, "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"

        def active() -> list[str] | None:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"chromium exited with {proc.returncode}: {err[-2000:]}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            return lines if len(lines) >= 2 else None

        lines = wait_until(active, 30, "Chromium's DevToolsActivePort", interval=0.05)
        assert lines is not None
        port, path = lines[:2]
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        import os
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.asynccontextmanager
async def cdp(url: str) -> AsyncIterator[Cdp]:
    async with connect(url, max_size=50 * 1024 * 1024, proxy=None) as ws:
        yield Cdp(ws)


async def _wait_result(c: Cdp, session: str, within: float) -> str:
    deadline = time.monotonic() + within
    text = ""
    while time.monotonic() < deadline:
        text = await c.evaluate(session, "document.getElementById('result') && "
                                         "document.getElementById('result').textContent") or ""
        if text and text != "pending":
            return str(text)
        await asyncio.sleep(0.1)
    raise AssertionError(f"page result still {text!r} after {within}s")


@pytest.fixture
def chromium_path() -> str:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); "
                    "the real-browser test was NOT run")
    return binary


async def test_browser_allowed_origin_echoes_other_origin_is_refused(
        chromium_path: str, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    with running_demo(demo_dir) as demo, chromium(chromium_path, tmp_path / "profile") as devtools:
        info = demo.info
        async with cdp(devtools) as c:
            allowed = await c.open_page(info["allowed_page"])
            other = await c.open_page(info["other_page"])
            allowed_result = await _wait_result(c, allowed, 20)
            other_result = await _wait_result(c, other, 20)
            allowed_log = await c.evaluate(allowed, "document.getElementById('log').textContent")
            other_log = await c.evaluate(other, "document.getElementById('log').textContent")
            shots = {"browser-allowed-origin.png": await c.screenshot(allowed),
                     "browser-other-origin.png": await c.screenshot(other)}
        for name, png in shots.items():
            (ARTIFACTS / name).write_bytes(png)

        # Browser side: the allowed page's socket opened with chat.v1 and echoed ...
        assert allowed_result == "opened and echoed", (allowed_log, demo.logs())
        assert "open (subprotocol chat.v1)" in allowed_log
        assert f"echo: hello from {info['allowed_origin']}" in allowed_log
        # ... the other page's handshake was refused: no open, an abnormal close (1006).
        assert other_result == "closed with code 1006", (other_log, demo.logs())
        assert not any(line.startswith("open") for line in other_log.splitlines()), other_log
        # Server side: extauth refused that origin, and Envoy logged the reason.
        _check_server_side(demo, info)


def _check_server_side(demo: DemoProcess, info: dict[str, Any]) -> None:
    denied = wait_until(lambda: [d for d in demo.decisions() if d.get("reason") == "origin_not_allowed"],
                        5, "extauth's origin_not_allowed decision log line")
    assert denied[0]["policy"] == "chat"
    entries = wait_until(
        lambda: [e for e in demo.envoy_access_log() if e.get("origin") == info["other_origin"]],
        5, "Envoy's access-log line for the other origin")
    assert entries[0]["status"] == 403
    assert entries[0]["reason"] == "origin_not_allowed"
    allowed = [e for e in demo.envoy_access_log() if e.get("origin") == info["allowed_origin"]]
    # the allowed socket is still open (or just closed): if logged, it was a 101
    assert all(e["status"] == 101 for e in allowed)
    # never the token in Envoy's log
    assert info["token"] not in Path(info["envoy_log"]).read_text()


async def test_browser_websockets_over_http2_with_tls(chromium_path: str, tmp_path: Path) -> None:
    """``extauth demo --tls``: the browser trusts the self-signed certificate by its SPKI pin
    only; both pages' WebSockets go over HTTP/2 (RFC 8441 extended CONNECT), the allowed
    one opens and echoes, the other is refused, as over HTTP/1.1."""
    shots_dir = tmp_path / "screenshots"
    shots_dir.mkdir()
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    with running_demo(demo_dir, tls=True) as demo:
        info = demo.info
        assert info["ws_url"].startswith("wss://")
        pin = [f"--ignore-certificate-errors-spki-list={info['spki_sha256']}"]
        with chromium(chromium_path, tmp_path / "profile", pin) as devtools:
            async with cdp(devtools) as c:
                allowed = await c.open_page(info["allowed_page"])
                allowed_result = await _wait_result(c, allowed, 20)
                other = await c.open_page(info["other_page"])
                other_result = await _wait_result(c, other, 20)
                allowed_log = await c.evaluate(allowed, "document.getElementById('log').textContent")
                other_log = await c.evaluate(other, "document.getElementById('log').textContent")
                for name, session in (("allowed", allowed), ("other", other)):
                    png = await c.screenshot(session)
                    for where in (shots_dir, ARTIFACTS):
                        where.mkdir(exist_ok=True)
                        (where / f"browser-http2-{name}-origin.png").write_bytes(png)
        print(f"\nscreenshots: {shots_dir} (and {ARTIFACTS})")

        assert allowed_result == "opened and echoed", (allowed_log, demo.logs())
        assert "open (subprotocol chat.v1)" in allowed_log
        assert other_result == "closed with code 1006", (other_log, demo.logs())
        assert not any(line.startswith("open") for line in other_log.splitlines()), other_log
        _check_http2_server_side(demo, info)


def _check_http2_server_side(demo: DemoProcess, info: dict[str, Any]) -> None:
    # Envoy saw both WebSockets as HTTP/2 streams carrying :protocol websocket ...
    def ws_entries() -> list[dict[str, Any]]:
        return [e for e in demo.envoy_access_log() if e.get("path") == "/ws"]

    refused = wait_until(lambda: next((e for e in ws_entries() if e["origin"] == info["other_origin"]), None),
                         10, "Envoy's access-log line of the refused WebSocket")
    assert refused is not None
    assert refused["protocol"] == "HTTP/2" and refused["upgrade"] == "websocket"
    assert refused["status"] == 403 and refused["reason"] == "origin_not_allowed"
    # the allowed one is logged once it closed (the page may still hold it)
    for opened in (e for e in ws_entries() if e["origin"] == info["allowed_origin"]):
        assert opened["protocol"] == "HTTP/2" and opened["status"] == 101 and opened["reason"] is None
    # ... and its stats: on the TLS listener, HTTP/2 connections only, none of HTTP/1.1 (so
    # no HTTP/1.1 upgrade: without the page's warm-up Chromium makes one), and both
    # WebSocket upgrades counted on them.
    stats = demo.envoy_stats("http.ingress_tls.")
    assert stats["http.ingress_tls.downstream_cx_http2_total"] >= 1, stats
    assert stats["http.ingress_tls.downstream_cx_http1_total"] == 0, stats
    assert stats["http.ingress_tls.downstream_cx_upgrades_total"] >= 2, stats
    # extauth refused the other origin over HTTP/2 as over HTTP/1.1.
    assert any(d.get("reason") == "origin_not_allowed" and d.get("policy") == "chat"
               and d.get("protocol") == "HTTP/2" for d in demo.decisions())
    assert info["token"] not in Path(info["envoy_log"]).read_text()
