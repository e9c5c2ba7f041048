"""`extauth serve` as a real process: readiness, SIGHUP and file-change reload,
SIGTERM drain (NOT_SERVING first, checks still answered, exit 0)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.envoy_msgs import check_request, headers_of, ws_headers
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(cond: Callable[[], bool], what: str) -> None:
    wait_until(cond, 15.0, what, interval=0.05)


def write_config(path: Path, port: int, origins: list[str], **top: Any) -> None:
    # The file names another port: the test process passes --listen, which must
    # keep applying across reloads.
    path.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:1", "admin_listen": "127.0.0.1:2", "drain_seconds": 1.0, **top,
        "policies": [{"name": "chat", "match": {"path_prefix": "/ws"}, "origins": origins}],
    }))


class Proc:
    def __init__(self, config: Path, port: int) -> None:
        self.port = port
        self.p = subprocess.Popen([sys.executable, "-m", "extauth", "serve", "-c", str(config),
                                   "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.authz = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def status(self) -> int:
        try:
            return int(self.health.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status)
        except grpc.RpcError:
            return -1

    def reason(self, origin: str) -> str:
        resp = self.authz.Check(check_request("/ws", ws_headers(origin=origin)), timeout=2)
        return "allow" if resp.status.code == 0 else headers_of(resp)["x-extauth-reason"]

    def stop(self) -> str:
        self.channel.close()
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=10)
        self._reader.join(5)
        return "".join(self.lines)


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[tuple[Proc, Path]]:
    cfg = tmp_path / "extauth.yaml"
    port = free_port()
    write_config(cfg, port, ["https://a.example.com"])
    p = Proc(cfg, port)
    try:
        wait_for(lambda: p.status() == health_pb2.HealthCheckResponse.SERVING, what="SERVING")
        yield p, cfg
    finally:
        p.stop()


def test_sighup_reload_and_bad_config_kept(proc: tuple[Proc, Path]) -> None:
    p, cfg = proc
    assert p.reason("https://b.example.com") == "origin_not_allowed"
    write_config(cfg, p.port, ["https://b.example.com"])
    p.p.send_signal(signal.SIGHUP)
    wait_for(lambda: p.reason("https://b.example.com") == "allow", what="reload")
    # A broken file is refused and the running config stays.
    cfg.write_text("policies: [{name: chat, origins: ['not an origin']}]")
    p.p.send_signal(signal.SIGHUP)
    wait_for(lambda: p.logged("reload refused"), what="the refused reload")
    assert p.reason("https://b.example.com") == "allow"
    assert p.p.poll() is None


def test_file_change_reload(proc: tuple[Proc, Path]) -> None:
    p, cfg = proc
    write_config(cfg, p.port, ["https://c.example.com"])
    os.utime(cfg, (time.time() + 5, time.time() + 5))  # make the mtime change visible
    wait_for(lambda: p.reason("https://c.example.com") == "allow", what="file-change reload")


def test_sigterm_drains_then_exits_zero(proc: tuple[Proc, Path]) -> None:
    p, _ = proc
    p.p.send_signal(signal.SIGTERM)
    wait_for(lambda: p.status() == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
    # During the drain window checks are still answered.
    assert p.reason("https://a.example.com") == "allow"
    assert p.p.wait(timeout=15) == 0
    out = p.stop()
    assert '"msg":"stopped"' in out
    assert "Traceback" not in out


def test_bad_config_refused_at_start(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("listen: nowhere\npolicies: [{name: chat}]\n")
    res = subprocess.run([sys.executable, "-m", "extauth", "serve", "-c", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "listen" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(("setting", "runs_on"),
                         [(None, "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_serves_on_the_configured_event_loop(tmp_path: Path, setting: str | None, runs_on: str) -> None:
    cfg = tmp_path / "extauth.yaml"
    port = free_port()
    write_config(cfg, port, ["https://a.example.com"], **({"event_loop": setting} if setting else {}))
    p = Proc(cfg, port)
    try:
        wait_for(lambda: p.logged('"msg":"serving"'), what="the serving line")
        serving = next(json.loads(line) for line in p.lines if '"msg":"serving"' in line)
        assert serving["event_loop"] == runs_on
        assert p.reason("https://a.example.com") == "allow"
        assert p.reason("https://evil.example.com") == "origin_not_allowed"
        p.p.send_signal(signal.SIGTERM)
        assert p.p.wait(timeout=15) == 0
    finally:
        out = p.stop()
    assert "Traceback" not in out
