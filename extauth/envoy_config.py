"""``extauth envoy-config``: the options, their checks and the CLI of the Envoy bootstrap
generator (the messages are built in :mod:`extauth.envoy_bootstrap`).

A new option: an ``EnvoyOptions`` field, its flag of the same name in ``add_arguments``, and
its use in the one ``envoy_bootstrap`` function that builds the message it belongs to.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from extauth.addresses import split_host_port
from extauth.config import Config, load_config

# The name of the ext_authz filter in the HCM chain. Envoy files the CheckResponse's
# dynamic_metadata under this namespace, and per-route config is keyed by it.
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
EXTAUTH_CLUSTER = "extauth"
ALS_BUFFER_LIMIT_BYTES = 32 * 1024 * 1024
ALS_LOG_NAME = "extauth_leases"

# The access log's path: without the query, and withheld when it has path parameters (either
# can carry a token). CEL, since no other formatter can test for a ';'.
ACCESS_LOG_PATH = "%CEL(request.url_path.contains(';') ? '(path-parameters-withheld)' : request.url_path)%"

# The stdout access log: one JSON object per request. Never the query string nor a path
# parameter (ACCESS_LOG_PATH). The deny reason, decision id, policy and user come from the
# dynamic metadata extauth returned.
ACCESS_LOG_FORMAT: dict[str, str] = {
    "time": "%START_TIME%",
    "log_type": "%ACCESS_LOG_TYPE%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "method": "%REQ(:METHOD)%",
    # HTTP/1.1, HTTP/2 or HTTP/3: with ``upgrade`` it tells an RFC 8441 WebSocket from an RFC 6455 one.
    "protocol": "%PROTOCOL%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": ACCESS_LOG_PATH,
    "upgrade": "%REQ(UPGRADE)%",
    "origin": "%REQ(ORIGIN)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "upstream": "%UPSTREAM_HOST%",
    "duration_ms": "%DURATION%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "reason": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:reason)%",
    "decision_id": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:decision_id)%",
    "policy": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:policy)%",
    "user": f"%DYNAMIC_METADATA({EXT_AUTHZ_FILTER}:user)%",
}


class EnvoyConfigError(ValueError):
    """Bad command-line input for the generator (the message says which)."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, value: str, what: str) -> HostPort:
        """``HOST:PORT`` given as ``what`` (a flag or key, named in the EnvoyConfigError)."""
        try:
            return cls(*split_host_port(value))
        except ValueError as e:
            raise EnvoyConfigError(f"{what}: {e}") from None

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class Upstream:
    name: str
    endpoint: HostPort

    @classmethod
    def parse(cls, value: str) -> Upstream:
        name, sep, addr = value.partition("=")
        if not sep or not name or not addr:
            raise EnvoyConfigError(f"--upstream: expected NAME=HOST:PORT, got {value!r}")
        if name == EXTAUTH_CLUSTER:
            raise EnvoyConfigError(f"--upstream: {EXTAUTH_CLUSTER!r} is the ext_authz cluster's name")
        return cls(name, HostPort.parse(addr, "--upstream"))


@dataclass(frozen=True)
class RouteSpec:
    prefix: str
    upstream: str
    # The policy the route names (``context_extensions``); None: extauth picks it by host and
    # path, as its config says (first match, ``hosts`` included).
    policy: str | None

    @classmethod
    def parse(cls, value: str) -> RouteSpec:
        prefix, sep, rest = value.partition("=")
        upstream, sep2, policy = rest.partition(":")
        if not sep or not sep2 or not prefix.startswith("/") or not upstream or not policy:
            raise EnvoyConfigError(f"--route: expected /PREFIX=UPSTREAM:POLICY, got {value!r}")
        return cls(prefix, upstream, policy)


@dataclass(frozen=True)
class EnvoyOptions:
    """Everything the bootstrap takes besides the extauth config (seconds for durations)."""

    listen: HostPort | None  # the cleartext listener (HTTP/1.1 and h2c); None: TLS only
    upstreams: Sequence[Upstream]
    routes: Sequence[RouteSpec] = ()
    extauth: Sequence[HostPort] = ()
    admin: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 9901))
    # access_log_flush_interval; None: a third of the lease TTL, clamped to [1 s, 20 s].
    flush_interval: float | None = None
    # How long the ALS logger batches entries before sending: a short wait means a
    # closed WebSocket frees its slot quickly.
    als_buffer_flush: float = 0.2
    ext_authz_timeout: float = 0.5
    max_stream_duration: float = 3600.0
    stream_idle_timeout: float = 300.0
    max_connections: int = 50_000
    # A TLS listener (ALPN h2, http/1.1, extended CONNECT on): browsers open WebSockets
    # over HTTP/2 there (RFC 8441). The certificate chain and key are PEM files Envoy reads.
    tls_listen: HostPort | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # HTTP/3 (QUIC, RFC 9220 WebSockets) on the TLS listener's address and port, over UDP.
    http3: bool = False


def default_routes(cfg: Config, upstream: str) -> list[RouteSpec]:
    """One route per policy path_prefix, all to ``upstream``, naming no policy.

    extauth's own matching then decides: Envoy's longest-prefix routes cannot express
    ``hosts`` and config order, so a named policy could be another policy's rules."""
    prefixes = dict.fromkeys(p.match.path_prefix for p in cfg.policies if p.match is not None)
    return [RouteSpec(prefix, upstream, None) for prefix in prefixes]


def flush_interval_for(cfg: Config, requested: float | None) -> float:
    """The access-log flush interval; a requested one was checked by ``_check_limits``."""
    if requested is not None:
        return requested
    return min(20.0, max(1.0, cfg.lease_ttl_seconds / 3))


# Durations and limits are checked here rather than left to Envoy: a bootstrap that Envoy
# rejects at start, or one where 0 quietly means "no limit" (max_stream_duration 0 would end
# the re-authentication cap), is worse than a refusal naming the flag.
_MAX_SECONDS = 365 * 86400.0
_MAX_CONNECTIONS = 10_000_000


def _check_limits(opts: EnvoyOptions) -> None:
    for flag, seconds in (("--flush-interval", opts.flush_interval),
                          ("--ext-authz-timeout", opts.ext_authz_timeout),
                          ("--max-stream-duration", opts.max_stream_duration),
                          ("--stream-idle-timeout", opts.stream_idle_timeout)):
        if seconds is not None and not (math.isfinite(seconds) and 0 < seconds <= _MAX_SECONDS):
            raise EnvoyConfigError(f"{flag}: expected seconds > 0 and at most a year, got {seconds:g}")
    if not 1 <= opts.max_connections <= _MAX_CONNECTIONS:
        raise EnvoyConfigError(f"--max-connections: expected 1 to {_MAX_CONNECTIONS:,}, "
                               f"got {opts.max_connections}")
    # Envoy binds listeners and its admin to IP literals only (no name resolution there).
    for flag, hp in (("--listen", opts.listen), ("--tls-listen", opts.tls_listen),
                     ("--admin-address", opts.admin)):
        if hp is not None and not hp.is_ip:
            raise EnvoyConfigError(f"{flag}: expected an IP address, got {hp.host!r}")
    if not 0 <= opts.admin.port <= 65535:
        raise EnvoyConfigError(f"--admin-port: expected 0 to 65535, got {opts.admin.port}")


def _check_tls(opts: EnvoyOptions) -> list[str]:
    """The listeners' consistency: at least one, TLS with both its files, HTTP/3 with TLS."""
    if opts.listen is None and opts.tls_listen is None:
        raise EnvoyConfigError("give --listen HOST:PORT, --tls-listen HOST:PORT or both")
    files = {"--tls-cert": opts.tls_cert, "--tls-key": opts.tls_key}
    if opts.tls_listen is None:
        given = [flag for flag, f in files.items() if f] + (["--http3"] if opts.http3 else [])
        if given:
            raise EnvoyConfigError(f"{', '.join(given)}: only with --tls-listen HOST:PORT")
        return []
    missing = [flag for flag, f in files.items() if not f]
    if missing:
        raise EnvoyConfigError(f"--tls-listen: give {' and '.join(missing)} (PEM files)")
    if opts.listen is not None and opts.listen.port == opts.tls_listen.port and (
            opts.listen.host == opts.tls_listen.host
            or {opts.listen.host, opts.tls_listen.host} & {"0.0.0.0", "::"}):
        raise EnvoyConfigError("--listen and --tls-listen: the same TCP port")
    # The generator may run where Envoy does not: a file missing here is only a warning.
    return [f"{flag} {f}: not a readable file here (Envoy reads it at start)"
            for flag, f in files.items() if f and not os.access(f, os.R_OK)]


def check_options(cfg: Config, opts: EnvoyOptions) -> list[str]:
    """Raise EnvoyConfigError for inconsistent input; return warnings worth printing."""
    warnings: list[str] = []
    _check_limits(opts)
    warnings.extend(_check_tls(opts))
    if not opts.upstreams:
        raise EnvoyConfigError("give at least one --upstream NAME=HOST:PORT")
    names = [u.name for u in opts.upstreams]
    if len(set(names)) != len(names):
        raise EnvoyConfigError("--upstream: duplicate upstream name")
    routes = opts.routes or default_routes(cfg, names[0])
    if not routes:
        raise EnvoyConfigError("no policy has a match.path_prefix: give --route PREFIX=UPSTREAM:POLICY")
    for r in routes:
        if r.upstream not in names:
            raise EnvoyConfigError(f"--route {r.prefix}: unknown upstream {r.upstream!r}")
        if r.policy is not None and cfg.policy(r.policy) is None:
            raise EnvoyConfigError(f"--route {r.prefix}: no policy named {r.policy!r} in the config")
    prefixes = [r.prefix for r in routes]
    if len(set(prefixes)) != len(prefixes):
        raise EnvoyConfigError("--route: duplicate prefix")
    if cfg.store_timeout_ms / 1000 >= opts.ext_authz_timeout:
        # Envoy's deadline then always fires first on a slow store: it answers 503 itself
        # (status_on_error), store_on_error never applies, and the deny carries no reason.
        warnings.append(
            f"store_timeout_ms ({cfg.store_timeout_ms:g} ms) is not shorter than the ext_authz "
            f"timeout ({opts.ext_authz_timeout:g}s): on a slow store Envoy answers 503 before "
            f"extauth decides, and store_on_error never applies; raise --ext-authz-timeout"
        )
    flush = flush_interval_for(cfg, opts.flush_interval)
    if flush * 2 > cfg.lease_ttl_seconds:
        warnings.append(
            f"flush interval {flush:g}s is more than half of lease_ttl_seconds "
            f"({cfg.lease_ttl_seconds:g}s): one lost access-log entry would expire a live lease"
        )
    return warnings


def build_bootstrap(cfg: Config, opts: EnvoyOptions) -> Any:
    """The Bootstrap message (an ``envoy_data_plane`` dataclass) for ``cfg`` and ``opts``."""
    with warnings.catch_warnings():
        # envoy-data-plane's generated validators trip pydantic deprecation warnings.
        warnings.simplefilter("ignore", DeprecationWarning)
        from extauth import envoy_bootstrap

        check_options(cfg, opts)
        routes = list(opts.routes or default_routes(cfg, opts.upstreams[0].name))
        # Longest prefix first: /ws/admin must win over /ws.
        routes.sort(key=lambda r: len(r.prefix), reverse=True)
        return envoy_bootstrap.bootstrap(
            opts, routes=routes, extauth=list(opts.extauth) or [_extauth_from_config(cfg)],
            flush_interval=flush_interval_for(cfg, opts.flush_interval))


def _extauth_from_config(cfg: Config) -> HostPort:
    hp = HostPort.parse(cfg.listen, "listen")
    if hp.host in ("0.0.0.0", "::"):
        return HostPort("127.0.0.1" if hp.host == "0.0.0.0" else "::1", hp.port)
    return hp


def render_yaml(bootstrap: Any, *, header: str = "") -> str:
    """Bootstrap as YAML with proto field names (snake_case), Envoy's own spelling."""
    import betterproto2

    data = bootstrap.to_dict(casing=betterproto2.Casing.SNAKE)
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=110)
    return header + body


def generate(cfg: Config, opts: EnvoyOptions) -> str:
    header = (
        "# Generated by `extauth envoy-config` from typed envoy-data-plane messages.\n"
        "# Annotated reference: envoy/envoy.yaml. Fields at their default value are omitted\n"
        "# (e.g. ext_authz failure_mode_allow: false).\n"
    )
    return render_yaml(build_bootstrap(cfg, opts), header=header)


# The options parsed from their flags' text; every other field is taken as is from the flag
# of the same name (a field without a flag keeps its default).
_PARSED_OPTIONS = ("listen", "upstreams", "routes", "extauth", "admin", "tls_listen")


def options_from_args(args: argparse.Namespace) -> EnvoyOptions:
    """``EnvoyOptions`` from ``add_arguments``' flags; raises EnvoyConfigError on bad text."""
    plain = {f.name: getattr(args, f.name) for f in fields(EnvoyOptions)
             if f.name not in _PARSED_OPTIONS and hasattr(args, f.name)}
    return EnvoyOptions(
        listen=HostPort.parse(args.listen, "--listen") if args.listen else None,
        tls_listen=HostPort.parse(args.tls_listen, "--tls-listen") if args.tls_listen else None,
        upstreams=[Upstream.parse(u) for u in args.upstream],
        routes=[RouteSpec.parse(r) for r in args.route],
        extauth=[HostPort.parse(e, "--extauth") for e in args.extauth],
        admin=HostPort(args.admin_address, args.admin_port),
        **plain,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="the extauth config (policies, lease TTL)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="Envoy's cleartext listener (HTTP/1.1, and h2c with RFC 8441 WebSockets)")
    p.add_argument("--tls-listen", metavar="HOST:PORT",
                   help="a TLS listener, ALPN h2 and http/1.1: browsers' WebSockets over HTTP/2 (RFC 8441)")
    p.add_argument("--tls-cert", metavar="PEM", help="the TLS listener's certificate chain")
    p.add_argument("--tls-key", metavar="PEM", help="the TLS listener's private key")
    p.add_argument("--http3", action="store_true",
                   help="HTTP/3 (QUIC over UDP) on the TLS listener's address and port, "
                        "with RFC 9220 WebSockets, announced by Alt-Svc")
    p.add_argument("--upstream", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="an upstream cluster (repeatable); the first one is the default route target")
    p.add_argument("--route", action="append", default=[], metavar="PREFIX=UPSTREAM:POLICY",
                   help="a route (repeatable); default: one per policy at its match.path_prefix")
    p.add_argument("--extauth", action="append", default=[], metavar="HOST:PORT",
                   help="an extauth replica (repeatable); default: the config's listen address")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (0: any free port)")
    p.add_argument("--admin-address", default="127.0.0.1", help="Envoy admin bind address")
    p.add_argument("--flush-interval", type=float, default=None, metavar="S",
                   help="access-log flush interval (lease refresh); default: lease_ttl_seconds/3")
    # Defaults come from EnvoyOptions, the one place they are set.
    p.add_argument("--ext-authz-timeout", type=float, default=EnvoyOptions.ext_authz_timeout, metavar="S",
                   help="Envoy's deadline for one check (default %(default)s); keep it above the config's "
                        "store_timeout_ms, so that extauth, not Envoy, answers a slow store")
    p.add_argument("--max-stream-duration", type=float, default=EnvoyOptions.max_stream_duration, metavar="S",
                   help="hard cap on a WebSocket's life; it must reconnect (and re-authenticate)")
    p.add_argument("--stream-idle-timeout", type=float, default=EnvoyOptions.stream_idle_timeout, metavar="S")
    p.add_argument("--max-connections", type=int, default=EnvoyOptions.max_connections,
                   help="global downstream connection limit (overload manager)")
    p.add_argument("-o", "--output", help="write here instead of stdout")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    try:
        opts = options_from_args(args)
        for w in check_options(cfg, opts):
            print(f"warning: {w}", file=sys.stderr)
        text = generate(cfg, opts)
    except EnvoyConfigError as e:
        print(f"envoy-config: {e}", file=sys.stderr)
        return 2
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as e:
            print(f"envoy-config: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0
