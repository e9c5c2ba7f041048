"""``extauth envoy-config``: a complete Envoy bootstrap for an extauth config, built from typed
messages (``envoy-data-plane``), never from string templates.

Every message is a pydantic-validated dataclass that forbids unknown fields, so a misspelt
field name or a wrong enum fails here, in Python, instead of producing YAML that Envoy
rejects (or, worse, silently ignores). The annotated reference in ``envoy/envoy.yaml``
explains each setting; this module produces the same shape for any set of policies,
upstreams and extauth replicas::

    extauth envoy-config -c extauth.yaml --listen 0.0.0.0:8080 \\
        --upstream chat=127.0.0.1:8081 --route /ws=chat:chat > envoy.yaml
    envoy -c envoy.yaml

``envoy-data-plane`` takes a couple of seconds to import: it is imported inside
:func:`build_bootstrap`, never at module import time.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extauth.config import Config, load_config

# The name of the ext_authz filter in the HCM chain. Envoy files the CheckResponse's
# dynamic_metadata under this namespace, and per-route config is keyed by it.
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
EXTAUTH_CLUSTER = "extauth"
ALS_BUFFER_LIMIT_BYTES = 32 * 1024 * 1024
ALS_LOG_NAME = "extauth_leases"

# The stdout access log: one JSON object per request. Never the query string (it can
# carry a token): the path is %REQ_WITHOUT_QUERY(:PATH)%. The deny reason, decision id,
# policy and user come from the dynamic metadata extauth returned.
ACCESS_LOG_FORMAT: dict[str, str] = {
    "time": "%START_TIME%",
    "log_type": "%ACCESS_LOG_TYPE%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ_WITHOUT_QUERY(:PATH)%",
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
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise EnvoyConfigError(f"{what}: expected HOST:PORT, got {value!r}")
        return cls(host, int(port))

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
    listen: HostPort
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


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def default_routes(cfg: Config, upstream: str) -> list[RouteSpec]:
    """One route per path_prefix a policy matches, all to ``upstream``, naming no policy:
    extauth's own matching decides (the first policy in config order whose ``hosts`` and
    prefix fit, else ``no_policy``). Naming each prefix's policy on its route would lose
    ``hosts`` and config order, which Envoy's one virtual host and longest-prefix routes
    cannot express: a request could get another policy's rules, or a policy for no host."""
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
    for flag, hp in (("--listen", opts.listen), ("--admin-address", opts.admin)):
        if not hp.is_ip:
            raise EnvoyConfigError(f"{flag}: expected an IP address, got {hp.host!r}")
    if not 0 <= opts.admin.port <= 65535:
        raise EnvoyConfigError(f"--admin-port: expected 0 to 65535, got {opts.admin.port}")


def check_options(cfg: Config, opts: EnvoyOptions) -> list[str]:
    """Raise EnvoyConfigError for inconsistent input; return warnings worth printing."""
    warnings: list[str] = []
    _check_limits(opts)
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
        return _build_bootstrap(cfg, opts)


def _build_bootstrap(cfg: Config, opts: EnvoyOptions) -> Any:
    from envoy_data_plane.envoy.config.accesslog.v3 import (
        AccessLog,
        AccessLogFilter,
        LogTypeFilter,
        MetadataFilter,
    )
    from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
    from envoy_data_plane.envoy.config.cluster.v3 import (
        CircuitBreakers,
        CircuitBreakersThresholds,
        Cluster,
        ClusterDiscoveryType,
        ClusterLbPolicy,
    )
    from envoy_data_plane.envoy.config.core.v3 import (
        Address,
        ApiVersion,
        GrpcService,
        GrpcServiceEnvoyGrpc,
        HealthCheck,
        HealthCheckGrpcHealthCheck,
        Http2ProtocolOptions,
        HttpProtocolOptionsHeadersWithUnderscoresAction,
        SocketAddress,
        SubstitutionFormatString,
        TypedExtensionConfig,
    )
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
    from envoy_data_plane.envoy.config.route.v3 import (
        Route,
        RouteAction,
        RouteActionMaxStreamDuration,
        RouteConfiguration,
        RouteMatch,
        VirtualHost,
    )
    from envoy_data_plane.envoy.data.accesslog.v3 import AccessLogType
    from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
        CommonGrpcAccessLogConfig,
        HttpGrpcAccessLogConfig,
    )
    from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
    from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
        CheckSettings,
        ExtAuthz,
        ExtAuthzPerRoute,
    )
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerCodecType,
        HttpConnectionManagerHcmAccessLogOptions,
        HttpConnectionManagerPathWithEscapedSlashesAction,
        HttpConnectionManagerUpgradeConfig,
        HttpFilter,
    )
    from envoy_data_plane.envoy.extensions.formatter.req_without_query.v3 import ReqWithoutQuery
    from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
        DownstreamConnectionsConfig,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions,
        HttpProtocolOptionsExplicitHttpConfig,
    )
    from envoy_data_plane.envoy.type.matcher.v3 import (
        MetadataMatcher,
        MetadataMatcherPathSegment,
        ValueMatcher,
    )
    from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
    from envoy_data_plane.google.protobuf import Any as PbAny
    from envoy_data_plane.google.protobuf import Struct

    check_options(cfg, opts)
    upstream_names = [u.name for u in opts.upstreams]
    routes = list(opts.routes or default_routes(cfg, upstream_names[0]))
    # Longest prefix first: /ws/admin must win over /ws.
    routes.sort(key=lambda r: len(r.prefix), reverse=True)
    extauth = list(opts.extauth) or [_extauth_from_config(cfg)]
    flush = flush_interval_for(cfg, opts.flush_interval)

    def address(hp: HostPort) -> Address:
        return Address(socket_address=SocketAddress(address=hp.host, port_value=hp.port))

    def cluster(name: str, endpoints: Sequence[HostPort], *, http2: bool = False) -> Cluster:
        c = Cluster(
            name=name,
            connect_timeout=_td(1.0),
            # IP literals need no resolver; names are re-resolved (containers, DNS).
            type=(ClusterDiscoveryType.STATIC if all(e.is_ip for e in endpoints)
                  else ClusterDiscoveryType.STRICT_DNS),
            lb_policy=ClusterLbPolicy.ROUND_ROBIN,
            load_assignment=ClusterLoadAssignment(
                cluster_name=name,
                endpoints=[LocalityLbEndpoints(lb_endpoints=[
                    LbEndpoint(endpoint=Endpoint(address=address(e))) for e in endpoints
                ])],
            ),
            # Every open WebSocket holds one upstream connection and one active request
            # for hours: Envoy's default of 1,024 per cluster would cap concurrent sockets
            # per upstream far below the listener's limit, and the surplus would wait in
            # the pending queue forever (WebSocket routes have no request timeout).
            # The global downstream limit is the real bound.
            circuit_breakers=CircuitBreakers(thresholds=[CircuitBreakersThresholds(
                max_connections=opts.max_connections,
                max_pending_requests=opts.max_connections,
                max_requests=opts.max_connections,
            )]),
        )
        if http2:
            c.typed_extension_protocol_options = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": PbAny.pack(HttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                        http2_protocol_options=Http2ProtocolOptions()),
                )),
            }
        return c

    ext_cluster = cluster(EXTAUTH_CLUSTER, extauth, http2=True)
    # The access-log stream's buffer. Envoy discards a whole batch of entries when the stream
    # is above this (the default 1 MiB) instead of waiting: when thousands of WebSockets close
    # at once (an Envoy drain, a client network blip) their end entries outrun extauth, and
    # every lost one holds its slot until the lease TTL. Measured in the bench: 6,000 sockets
    # closed at once lost 5,018 entries at 1 MiB and none at 32 MiB (about 1 KiB an entry;
    # memory is only taken while extauth is behind).
    ext_cluster.per_connection_buffer_limit_bytes = ALS_BUFFER_LIMIT_BYTES
    # gRPC health checks take a replica that stops (or drains: it reports NOT_SERVING
    # first) out of rotation; with every replica down Envoy's panic mode still tries them,
    # so checks fail with status_on_error, and recover as soon as one is back.
    ext_cluster.health_checks = [HealthCheck(
        timeout=_td(0.5), interval=_td(1.0), unhealthy_threshold=1, healthy_threshold=1,
        grpc_health_check=HealthCheckGrpcHealthCheck(),
    )]
    clusters = [ext_cluster] + [cluster(u.name, [u.endpoint]) for u in opts.upstreams]

    def per_route(policy: str | None) -> dict[str, PbAny]:
        if policy is None:
            return {}
        return {EXT_AUTHZ_FILTER: PbAny.pack(ExtAuthzPerRoute(
            check_settings=CheckSettings(context_extensions={"policy": policy})))}

    def route(r: RouteSpec) -> Route:
        return Route(
            name=f"{r.policy}:{r.prefix}" if r.policy else r.prefix,
            match=RouteMatch(prefix=r.prefix),
            route=RouteAction(
                cluster=r.upstream,
                # A WebSocket's response never "completes": no whole-request timeout, but a
                # hard cap so a long-lived connection is closed and must re-authenticate
                # (a revoked or expired token lives at most this long), and an idle cap.
                timeout=_td(0),
                idle_timeout=_td(opts.stream_idle_timeout),
                max_stream_duration=RouteActionMaxStreamDuration(
                    max_stream_duration=_td(opts.max_stream_duration)),
            ),
            typed_per_filter_config=per_route(r.policy),
        )

    ext_authz = ExtAuthz(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=EXTAUTH_CLUSTER),
            timeout=_td(opts.ext_authz_timeout),
        ),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # Refuse header mutations that are not valid HTTP instead of forwarding them.
        validate_mutations=True,
    )

    lease_filter = AccessLogFilter(metadata_filter=MetadataFilter(
        matcher=MetadataMatcher(
            filter=EXT_AUTHZ_FILTER,
            path=[MetadataMatcherPathSegment(key="lease_id")],
            value=ValueMatcher(present_match=True),
        ),
        match_if_key_not_found=False,
    ))
    als = AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=lease_filter,
        typed_config=PbAny.pack(HttpGrpcAccessLogConfig(common_config=CommonGrpcAccessLogConfig(
            log_name=ALS_LOG_NAME,
            grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=EXTAUTH_CLUSTER)),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=_td(opts.als_buffer_flush),
        ))),
    )
    stdout_log = AccessLog(
        name="envoy.access_loggers.stdout",
        # Final entries only: the periodic/tunnel entries exist for the lease stream.
        filter=AccessLogFilter(log_type_filter=LogTypeFilter(types=[AccessLogType.DownstreamEnd])),
        typed_config=PbAny.pack(StdoutAccessLog(log_format=SubstitutionFormatString(
            json_format=Struct.from_dict(ACCESS_LOG_FORMAT),
            # %REQ_WITHOUT_QUERY(...)% is an extension formatter: it must be named here.
            formatters=[TypedExtensionConfig(
                name="envoy.formatter.req_without_query",
                typed_config=PbAny.pack(ReqWithoutQuery()))],
        ))),
    )

    hcm = HttpConnectionManager(
        stat_prefix="ingress",
        codec_type=HttpConnectionManagerCodecType.AUTO,
        upgrade_configs=[HttpConnectionManagerUpgradeConfig(upgrade_type="websocket")],
        # Edge proxy: the client address is the TCP peer, X-Forwarded-For is ours.
        use_remote_address=True,
        # Policies are chosen by path: normalize it so /ws/../api and //ws cannot
        # reach a route with another policy's rules.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.UNESCAPE_AND_REDIRECT,
        common_http_protocol_options=_http_protocol_options(
            HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST, opts),
        stream_idle_timeout=_td(opts.stream_idle_timeout),
        request_headers_timeout=_td(10),
        # The default 1 s delayed close held every client-initiated WebSocket close
        # (and so the lease release) for a second; 100 ms still lets a client read a
        # local reply (a 403) before the connection goes away.
        delayed_close_timeout=_td(0.1),
        route_config=RouteConfiguration(
            name="ingress",
            virtual_hosts=[VirtualHost(name="ingress", domains=["*"], routes=[route(r) for r in routes])],
        ),
        http_filters=[
            HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=PbAny.pack(ext_authz)),
            HttpFilter(name="envoy.filters.http.router", typed_config=PbAny.pack(Router())),
        ],
        access_log=[stdout_log, als],
        access_log_options=HttpConnectionManagerHcmAccessLogOptions(
            access_log_flush_interval=_td(flush),
            flush_log_on_tunnel_successfully_established=True,
        ),
    )
    listener = Listener(
        name="ingress",
        address=address(opts.listen),
        filter_chains=[FilterChain(filters=[Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=PbAny.pack(hcm))])],
    )
    overload = OverloadManager(
        refresh_interval=_td(0.25),
        resource_monitors=[ResourceMonitor(
            name="envoy.resource_monitors.global_downstream_max_connections",
            typed_config=PbAny.pack(DownstreamConnectionsConfig(
                max_active_downstream_connections=opts.max_connections)),
        )],
    )
    return Bootstrap(
        admin=Admin(address=address(opts.admin)),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
        overload_manager=overload,
    )


def _http_protocol_options(action: Any, opts: EnvoyOptions) -> Any:
    from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CoreHttpProtocolOptions

    # Underscored header names are refused: some upstreams treat x_user_id as x-user-id,
    # which would let a client smuggle an identity header past the ext_authz rewrite.
    return CoreHttpProtocolOptions(headers_with_underscores_action=action,
                                   idle_timeout=_td(opts.stream_idle_timeout))


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


def options_from_args(args: argparse.Namespace) -> EnvoyOptions:
    return EnvoyOptions(
        listen=HostPort.parse(args.listen, "--listen"),
        upstreams=[Upstream.parse(u) for u in args.upstream],
        routes=[RouteSpec.parse(r) for r in args.route],
        extauth=[HostPort.parse(e, "--extauth") for e in args.extauth],
        admin=HostPort(args.admin_address, args.admin_port),
        flush_interval=args.flush_interval,
        ext_authz_timeout=args.ext_authz_timeout,
        max_stream_duration=args.max_stream_duration,
        stream_idle_timeout=args.stream_idle_timeout,
        max_connections=args.max_connections,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="the extauth config (policies, lease TTL)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="Envoy's public listener")
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
