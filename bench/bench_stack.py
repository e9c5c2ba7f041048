"""The benchmark stack: valkey-server, the echo upstream (C, or its lean Python twin),
instrumented extauth, the no-op servicer and ONE Envoy (``--concurrency 1``) with one listener
per scenario, so every scenario runs through the same Envoy process, side by side, in one run.

The Envoy bootstrap starts from ``extauth envoy-config`` (the generator the product ships) and
is then adjusted here, in the bench only:

- ``product``: the generated listener; ``/api`` answers with a direct_response after ext_authz,
  ``/ws`` goes to the echo upstream.
- ``noop``: a copy of ``product`` whose ext_authz filter calls the no-op servicer instead.
- ``floor_resp``: the same, to a second no-op servicer that answers the product's own allow for
  the bench request (identity header, credential removal, dynamic metadata), rendered once by
  extauth's code at start-up: Envoy does the same work on the answer as for ``product``.
- ``product_asyncio``: a copy of ``product`` whose ext_authz filter and access log call a second
  extauth, the same config on asyncio's own event loop (``event_loop: asyncio``): what the
  default uvloop is worth, measured side by side.
- ``product_const``: a copy of ``product`` to a third extauth, the same config, whose Check
  answers the product's allow for the bench request (the bytes ``floor_resp`` answers) without
  reading the request (``bench/extauth_serve.py``, ``$EXTAUTH_BENCH_CONSTANT_ANSWER``): the
  product's process without its Check handler.
- ``ceiling``: the same HCM with the ext_authz filter removed (/api a direct_response, /ws to the
  echo upstream: churn with no auth at all).
- ``jwt`` / ``jwt_cached``: the same HCM with Envoy's native ``jwt_authn`` (same RS256 key,
  inline local JWKS) in place of ext_authz, without and with its verified-JWT cache.

The stdout access log is removed from every listener (it is Envoy's own cost, the same in
every scenario, and would write ~100 MB during the run); the gRPC access log that releases
leases is kept. The upstream cluster gets circuit-breaker thresholds above the held-connection
target (see ``UPSTREAM_BREAKERS``).
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))

from tests.e2e.harness import (  # noqa: E402
    ALLOWED_ORIGIN,
    DEV_JWKS,
    ISSUER,
    Envoy,
    Extauth,
    Proc,
    generate_bootstrap,
    token,
    wait_until,
)
from tests.redis_servers import RedisServer, free_port  # noqa: E402

AUDIENCE = "ws"
# Envoy's default per-cluster circuit breakers allow 1,024 connections / 1,024 active
# requests: a WebSocket holds one of each for its whole life, so without these the upstream
# cluster refuses (503 UO) every WebSocket beyond 1,024 per Envoy worker set.
UPSTREAM_BREAKERS = {"thresholds": [{"max_connections": 100_000, "max_pending_requests": 100_000,
                                     "max_requests": 100_000, "max_retries": 3}]}
# Envoy's default delayed_close_timeout (1 s) makes every WebSocket closed by an RFC 6455
# client linger 1 s: after the close handshake the client waits for the server to close TCP
# while Envoy waits for the client to (measured: close() 1,000 ms through Envoy vs 0.5 ms
# direct). 0 disables the delayed close, for every listener alike.
DELAYED_CLOSE = "0s"
LISTENERS = ("ceiling", "jwt", "jwt_cached", "noop", "floor_resp", "product", "product_const",
             "product_asyncio")
# The listeners whose ext_authz filter calls a no-op servicer (a cluster of the same name).
FLOORS = ("noop", "floor_resp")
# The listener (and cluster, and process) of the product on asyncio's own event loop.
ASYNCIO_PRODUCT = "product_asyncio"
# The listener (and cluster, and process) of the product's process with a constant Check.
CONST_PRODUCT = "product_const"
# The product's copies on listeners of their own: each takes its own access log too.
PRODUCT_COPIES = (ASYNCIO_PRODUCT, CONST_PRODUCT)
# The subject of the plain-HTTP scenarios' token.
HTTP_USER = "bench-http"


def extauth_config(store_url: str, metrics_port: int) -> dict[str, Any]:
    jwt = {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["RS256"], "jwks_file": str(DEV_JWKS)}
    return {
        "listen": "127.0.0.1:0",  # --listen on the command line
        "admin_listen": "127.0.0.1:0",
        "store": store_url,
        "lease_ttl_seconds": 60,
        # Not the default 50 ms: that timeout includes event-loop queueing, and a saturated
        # 2-core box stalls past 50 ms, answering some upgrades 503 by design; the churn figure
        # should measure upgrades, not refusals (docs/benchmarks.md, Findings). 250 ms is the
        # e2e harness's value.
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


def _direct(route: dict[str, Any]) -> None:
    route.pop("route", None)
    route["direct_response"] = {"status": 200, "body": {"inline_string": "ok"}}


def _jwt_authn(cached: bool) -> dict[str, Any]:
    provider: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "local_jwks": {"inline_string": DEV_JWKS.read_text()},
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        "forward": False,
        "claim_to_headers": [{"header_name": "x-user-id", "claim_name": "sub"}],
    }
    if cached:
        provider["jwt_cache_config"] = {"jwt_cache_size": 1000}
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"dev": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "dev"}}],
        },
    }


def _grpc_clusters(listener: dict[str, Any]) -> list[dict[str, Any]]:
    """The envoy_grpc blocks of a listener's ext_authz filter and gRPC access logs."""
    hcm = _hcm(listener)
    return ([f["typed_config"]["grpc_service"]["envoy_grpc"] for f in hcm["http_filters"]
             if f["name"] == "envoy.filters.http.ext_authz"]
            + [a["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]
               for a in hcm.get("access_log", []) if "common_config" in a.get("typed_config", {})])


def derive_bootstrap(generated: dict[str, Any], ports: dict[str, int],
                     authz_ports: dict[str, int]) -> dict[str, Any]:
    """``authz_ports``: the no-op floors' and the product copies' gRPC ports, by name."""
    doc = copy.deepcopy(generated)
    resources = doc["static_resources"]
    product = resources["listeners"][0]
    hcm = _hcm(product)
    hcm["access_log"] = [a for a in hcm.get("access_log", []) if a["name"] != "envoy.access_loggers.stdout"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    for r in routes:
        if r["match"]["prefix"] == "/api":
            _direct(r)
    listeners: dict[str, dict[str, Any]] = {"product": product}

    for floor in FLOORS:
        lst = copy.deepcopy(product)
        for f in _hcm(lst)["http_filters"]:
            if f["name"] == "envoy.filters.http.ext_authz":
                f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = floor
        listeners[floor] = lst
    # Each copy of the product takes its own access log too: its leases are released by itself.
    for name in PRODUCT_COPIES:
        copied = listeners[name] = copy.deepcopy(product)
        for grpc in _grpc_clusters(copied):
            grpc["cluster_name"] = name

    def without_authz(extra: list[dict[str, Any]], prefixes: tuple[str, ...]) -> dict[str, Any]:
        lst = copy.deepcopy(product)
        h = _hcm(lst)
        h["http_filters"] = [*extra, *[f for f in h["http_filters"]
                                       if f["name"] != "envoy.filters.http.ext_authz"]]
        h["access_log"] = []
        h.pop("access_log_options", None)
        kept = [copy.deepcopy(r) for r in h["route_config"]["virtual_hosts"][0]["routes"]
                if r["match"]["prefix"] in prefixes]
        for r in kept:
            r.pop("typed_per_filter_config", None)
        h["route_config"]["virtual_hosts"][0]["routes"] = kept
        return dict(lst)

    # The ceiling keeps /ws too: churn without any auth is the machine's own churn limit.
    listeners["ceiling"] = without_authz([], ("/api", "/ws"))
    listeners["jwt"] = without_authz([_jwt_authn(cached=False)], ("/api",))
    listeners["jwt_cached"] = without_authz([_jwt_authn(cached=True)], ("/api",))
    out = []
    for name in LISTENERS:
        lst = listeners[name]
        lst["name"] = name
        lst["address"]["socket_address"]["port_value"] = ports[name]
        _hcm(lst)["stat_prefix"] = name
        _hcm(lst)["delayed_close_timeout"] = DELAYED_CLOSE
        out.append(lst)
    resources["listeners"] = out

    clusters = resources["clusters"]
    extauth = next(c for c in clusters if c["name"] == "extauth")
    for name, port in authz_ports.items():
        cluster = copy.deepcopy(extauth)
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = name
        ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ep["address"]["socket_address"]["port_value"] = port
        clusters.append(cluster)
    for c in clusters:
        if c["name"] == "app":
            c["circuit_breakers"] = UPSTREAM_BREAKERS
    return doc


class Instrumented(Extauth):
    """extauth through bench/extauth_serve.py (same CLI as ``extauth serve``)."""

    def __init__(self, name: str, config: Path, port: int, logdir: Path, profile_out: Path) -> None:
        super().__init__(name, config, port, logdir)
        self.args = [sys.executable, str(BENCH / "extauth_serve.py"), "-c", str(config),
                     "--listen", f"127.0.0.1:{port}"]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "EXTAUTH_BENCH_PROFILE_OUT": str(profile_out)}


class Noop(Extauth):
    """bench/noop_authz.py; readiness by gRPC health like extauth."""

    def __init__(self, name: str, port: int, logdir: Path, response: Path | None = None) -> None:
        super().__init__(name, logdir / "unused.yaml", port, logdir)
        self.args = [sys.executable, str(BENCH / "noop_authz.py"), "--listen", f"127.0.0.1:{port}",
                     *(["--response", str(response)] if response else [])]


def product_allow(config: dict[str, Any]) -> bytes:
    """extauth's serialized allow for the plain-HTTP bench request, rendered by its own code
    (in-process, memory store: a plain-HTTP allow takes no lease)."""
    from envoy.service.auth.v3 import external_auth_pb2

    from extauth.config import parse_config
    from extauth.server import AuthorizationService, ExtAuthServer

    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    attrs.source.address.socket_address.address = "127.0.0.1"
    attrs.context_extensions["policy"] = "api"
    http = attrs.request.http
    http.method, http.path, http.host, http.scheme = "GET", "/api/bench", "127.0.0.1", "http"
    http.headers.update({":method": "GET", ":path": "/api/bench", ":authority": "127.0.0.1",
                         "authorization": f"Bearer {token(HTTP_USER, lifetime=3600)}",
                         "origin": ALLOWED_ORIGIN})
    server = ExtAuthServer(parse_config({**config, "store": "memory://", "metrics_listen": None}))

    async def render() -> bytes:
        answer: bytes = await AuthorizationService(server.authorizer).Check(request, None)
        return answer

    answer = asyncio.run(render())
    if not external_auth_pb2.CheckResponse.FromString(answer).HasField("ok_response"):
        raise RuntimeError("extauth did not allow the bench request: the floor_resp scenario is broken")
    return answer


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class BenchStack:
    def __init__(self, workdir: Path, upstream_binary: Path | None = None) -> None:
        self.dir = workdir
        # bench/wsecho.c when it was built, else its Python twin bench/ws_upstream.py
        self.upstream_cmd = ([str(upstream_binary)] if upstream_binary
                             else [sys.executable, str(BENCH / "ws_upstream.py")])
        self.redis: RedisServer | None = None
        self.upstream: Proc | None = None
        self.extauth: Instrumented | None = None
        # The product's copies (PRODUCT_COPIES), by listener name.
        self.copies: dict[str, Instrumented] = {}
        self.floors: dict[str, Noop] = {}
        self.envoy: Envoy | None = None
        self.ports = {name: free_port() for name in LISTENERS}
        self.metrics_port = free_port()
        self.profile_out = workdir / "extauth.prof"

    @property
    def store_url(self) -> str:
        assert self.redis is not None
        return self.redis.url + "/0"

    def start(self) -> BenchStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.redis = RedisServer(self.dir / "redis").start()
        up_port = free_port()
        self.upstream = Proc("upstream", [*self.upstream_cmd, "--port", str(up_port)], self.dir).start()
        wait_until(lambda: (self.upstream.check_alive(), port_open(up_port))[1],  # type: ignore[union-attr]
                   15, "echo upstream")
        cfg_path = self.dir / "extauth.yaml"
        config = extauth_config(self.store_url, self.metrics_port)
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        ext = self.extauth = Instrumented("extauth", cfg_path, free_port(), self.dir, self.profile_out)
        ext.start()
        self._start_copy(ASYNCIO_PRODUCT, {**config, "event_loop": "asyncio"})
        allow = self.dir / "product-allow.bin"
        allow.write_bytes(product_allow(config))
        self._start_copy(CONST_PRODUCT, config, EXTAUTH_BENCH_CONSTANT_ANSWER=str(allow))
        for floor in FLOORS:
            self.floors[floor] = Noop(floor, free_port(), self.dir, allow if floor == "floor_resp" else None)
            self.floors[floor].start()
        generated = yaml.safe_load(generate_bootstrap([
            "-c", str(cfg_path), "--listen", f"127.0.0.1:{self.ports['product']}",
            "--upstream", f"app=127.0.0.1:{up_port}", "--extauth", ext.address,
            "--admin-port", "0", "--flush-interval", "20"]))
        bootstrap = derive_bootstrap(generated, self.ports, {
            **{k: v.port for k, v in (*self.floors.items(), *self.copies.items())}})
        path = self.dir / "envoy.yaml"
        path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self.envoy = Envoy("envoy", path, self.ports["product"], self.dir).start()
        # Envoy's gRPC health checks must have found every authz cluster healthy.
        wait_until(self._authz_healthy, 15, "Envoy health checks to pass for extauth and the floors")

    def _start_copy(self, name: str, config: dict[str, Any], **env: str) -> None:
        """One of the product's copies: its own config file, gRPC and metrics ports."""
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**config, "metrics_listen": f"127.0.0.1:{free_port()}"},
                                       sort_keys=False))
        proc = self.copies[name] = Instrumented(name, path, free_port(), self.dir, self.dir / f"{name}.prof")
        proc.env.update(env)
        proc.start()

    def _authz_healthy(self) -> bool:
        assert self.envoy is not None
        _, body = self.envoy.admin_get("/clusters")
        authz = ("extauth", *PRODUCT_COPIES, *FLOORS)
        flags = [line for line in body.splitlines() if "::health_flags::" in line
                 and line.split("::")[0] in authz]
        return len(flags) == len(authz) and all(line.endswith("::healthy") for line in flags)

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        procs: list[tuple[str, Proc | None]] = [("envoy", self.envoy), ("extauth", self.extauth),
                                                *self.copies.items(), ("upstream", self.upstream),
                                                *self.floors.items()]
        for name, proc in procs:
            if proc is not None and proc.popen is not None:
                out[name] = proc.popen.pid
        if self.redis is not None and self.redis.proc is not None:
            out["valkey"] = self.redis.proc.pid
        return out

    def close(self) -> None:
        for proc in (self.envoy, *self.floors.values(), self.extauth, *self.copies.values(), self.upstream):
            if proc is not None:
                proc.stop(timeout=5)
        if self.redis is not None:
            self.redis.cleanup()


def wait_for(predicate: Any, within: float, what: str, interval: float = 0.1) -> Any:
    return wait_until(predicate, within, what, interval)
