"""Run ``python -m extauth demo`` as a child process for tests (shared by the demo and browser tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tests.e2e.harness import REPO, wait_until


class DemoProcess:
    def __init__(self, workdir: Path, duration: float = 120.0, tls: bool = False) -> None:
        self.workdir = workdir
        self.out = workdir / "demo.out"
        self.err = workdir / "demo.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "extauth", "demo", "--port", "0", "--duration", str(duration),
                 "--workdir", str(workdir), *(["--tls"] if tls else [])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.info: dict[str, Any] = {}

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        info_path = self.workdir / "demo.json"

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"demo exited with {self.proc.returncode}:\n{self.logs()}")
            return info_path.exists() and "stopping" not in self.out.read_text()

        wait_until(ready, timeout, "the demo to be ready", interval=0.1)
        self.info = json.loads(info_path.read_text())
        return self.info

    def logs(self) -> str:
        return (f"--- stdout\n{self.out.read_text(errors='replace')[-3000:]}\n"
                f"--- stderr\n{self.err.read_text(errors='replace')[-5000:]}")

    def decisions(self) -> list[dict[str, Any]]:
        out = []
        for line in self.err.read_text(errors="replace").splitlines():
            with suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("logger") == "extauth.decision":
                    out.append(rec)
        return out

    def envoy_access_log(self) -> list[dict[str, Any]]:
        out = []
        path = Path(self.info["envoy_log"])
        for line in path.read_text(errors="replace").splitlines():
            with suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "log_type" in rec:
                    out.append(rec)
        return out

    def envoy_stats(self, prefix: str) -> dict[str, int]:
        """Envoy's counters and gauges whose names start with ``prefix``, from its admin."""
        import urllib.request

        url = f"http://{self.info['envoy_admin']}/stats?filter=^{prefix}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def interrupt(self, timeout: float = 20.0) -> int:
        """Ctrl-C (SIGINT to the demo only, as a terminal would to the foreground job)."""
        with suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextmanager
def running_demo(workdir: Path, duration: float = 120.0, tls: bool = False) -> Iterator[DemoProcess]:
    demo = DemoProcess(workdir, duration, tls)
    try:
        demo.wait_ready()
        yield demo
    finally:
        demo.kill()
