"""The Envoy Bootstrap message for checked ``EnvoyOptions``, one function per part: clusters,
listener (HTTP connection manager, routes, ext_authz filter), access logs, overload manager.

Imported only when a bootstrap is built: ``envoy-data-plane`` takes seconds to import.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

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
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http2ProtocolOptions,
    Http3ProtocolOptions,
    HttpProtocolOptionsHeadersWithUnderscoresAction,
    SocketAddress,
    SocketAddressProtocol,
    SubstitutionFormatString,
    TransportSocket,
)
from envoy_data_plane.envoy.config.core.v3 import HttpProtocolOptions as CoreHttpProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import (
    Filter,
    FilterChain,
    Listener,
    QuicProtocolOptions,
    UdpListenerConfig,
)
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.config.route.v3 import (
    HeaderMatcher,
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
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.envoy.extensions.transport_sockets.quic.v3 import QuicDownstreamTransport
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CommonTlsContext,
    DownstreamTlsContext,
    TlsCertificate,
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

from extauth.envoy_config import (
    ACCESS_LOG_FORMAT,
    ALS_BUFFER_LIMIT_BYTES,
    ALS_LOG_NAME,
    EXT_AUTHZ_FILTER,
    EXTAUTH_CLUSTER,
    EnvoyOptions,
    HostPort,
    RouteSpec,
)
from extauth.pipeline import SESSION_HEADER


def bootstrap(opts: EnvoyOptions, *, routes: Sequence[RouteSpec], extauth: Sequence[HostPort],
              flush_interval: float) -> Any:
    """The Bootstrap for ``opts``; ``routes`` longest prefix first, ``extauth`` the replicas."""
    return Bootstrap(
        admin=Admin(address=_address(opts.admin)),
        static_resources=BootstrapStaticResources(
            listeners=listeners(opts, routes, flush_interval),
            clusters=[extauth_cluster(opts, extauth)]
                     + [cluster(opts, u.name, [u.endpoint]) for u in opts.upstreams],
        ),
        overload_manager=overload_manager(opts),
    )


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _address(hp: HostPort) -> Address:
    return Address(socket_address=SocketAddress(address=hp.host, port_value=hp.port))


def _grpc_service(**kwargs: Any) -> GrpcService:
    return GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=EXTAUTH_CLUSTER), **kwargs)


# --- clusters ---------------------------------------------------------------------------------

def cluster(opts: EnvoyOptions, name: str, endpoints: Sequence[HostPort], **extra: Any) -> Cluster:
    """An upstream cluster (HTTP/1.1 unless ``extra`` says otherwise) over ``endpoints``."""
    return Cluster(
        name=name,
        connect_timeout=_td(1.0),
        # IP literals need no resolver; names are re-resolved (containers, DNS).
        type=(ClusterDiscoveryType.STATIC if all(e.is_ip for e in endpoints)
              else ClusterDiscoveryType.STRICT_DNS),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[
                LbEndpoint(endpoint=Endpoint(address=_address(e))) for e in endpoints
            ])],
        ),
        # Every open WebSocket holds one upstream connection and one active request for
        # hours: Envoy's default of 1,024 per cluster would strand the surplus in the pending
        # queue forever. The global downstream limit is the real bound.
        circuit_breakers=CircuitBreakers(thresholds=[CircuitBreakersThresholds(
            max_connections=opts.max_connections,
            max_pending_requests=opts.max_connections,
            max_requests=opts.max_connections,
        )]),
        **extra,
    )


def extauth_cluster(opts: EnvoyOptions, replicas: Sequence[HostPort]) -> Cluster:
    """The gRPC cluster of extauth replicas: ext_authz checks and the lease access-log stream."""
    return cluster(
        opts, EXTAUTH_CLUSTER, replicas,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": PbAny.pack(HttpProtocolOptions(
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http2_protocol_options=Http2ProtocolOptions()),
            )),
        },
        # Envoy drops a whole batch of access-log entries when the stream is above this
        # (default 1 MiB): a mass close would lose end entries and hold slots until the TTL.
        per_connection_buffer_limit_bytes=ALS_BUFFER_LIMIT_BYTES,
        # A stopped or draining (NOT_SERVING) replica leaves rotation; with all down,
        # panic mode still tries them, so checks fail with status_on_error until one is back.
        health_checks=[HealthCheck(
            timeout=_td(0.5), interval=_td(1.0), unhealthy_threshold=1, healthy_threshold=1,
            grpc_health_check=HealthCheckGrpcHealthCheck(),
        )],
    )


# --- listener, HTTP connection manager, routes ------------------------------------------------

def listeners(opts: EnvoyOptions, routes: Sequence[RouteSpec], flush_interval: float) -> list[Listener]:
    """The public listeners: cleartext, TLS and QUIC, each as its option asks."""
    out = []
    if opts.listen is not None:
        out.append(listener(opts, routes, flush_interval))
    if opts.tls_listen is not None:
        out.append(tls_listener(opts, routes, flush_interval))
        if opts.http3:
            out.append(quic_listener(opts, routes, flush_interval))
    return out


def _hcm_filter(hcm: HttpConnectionManager) -> Filter:
    return Filter(name="envoy.filters.network.http_connection_manager", typed_config=PbAny.pack(hcm))


def listener(opts: EnvoyOptions, routes: Sequence[RouteSpec], flush_interval: float) -> Listener:
    """The cleartext listener: HTTP/1.1, and h2c (prior knowledge) for clients that speak it."""
    assert opts.listen is not None
    return Listener(
        name="ingress",
        address=_address(opts.listen),
        filter_chains=[FilterChain(filters=[_hcm_filter(
            http_connection_manager(opts, routes, flush_interval))])],
    )


def _tls_context(opts: EnvoyOptions, alpn: Sequence[str]) -> DownstreamTlsContext:
    assert opts.tls_cert is not None and opts.tls_key is not None
    return DownstreamTlsContext(common_tls_context=CommonTlsContext(
        tls_certificates=[TlsCertificate(certificate_chain=DataSource(filename=opts.tls_cert),
                                         private_key=DataSource(filename=opts.tls_key))],
        alpn_protocols=list(alpn),
    ))


def tls_listener(opts: EnvoyOptions, routes: Sequence[RouteSpec], flush_interval: float) -> Listener:
    """The TLS listener: ALPN h2 first, so a browser's WebSockets share its HTTP/2 connection."""
    assert opts.tls_listen is not None
    alt_svc = f'h3=":{opts.tls_listen.port}"; ma=86400' if opts.http3 else None
    return Listener(
        name="ingress_tls",
        address=_address(opts.tls_listen),
        filter_chains=[FilterChain(
            transport_socket=TransportSocket(
                name="envoy.transport_sockets.tls",
                typed_config=PbAny.pack(_tls_context(opts, ["h2", "http/1.1"]))),
            filters=[_hcm_filter(http_connection_manager(
                opts, routes, flush_interval, stat_prefix="ingress_tls", alt_svc=alt_svc))],
        )],
    )


def quic_listener(opts: EnvoyOptions, routes: Sequence[RouteSpec], flush_interval: float) -> Listener:
    """HTTP/3 over QUIC on the TLS listener's address and port (UDP), same certificate."""
    assert opts.tls_listen is not None
    return Listener(
        name="ingress_quic",
        address=Address(socket_address=SocketAddress(
            protocol=SocketAddressProtocol.UDP, address=opts.tls_listen.host,
            port_value=opts.tls_listen.port)),
        udp_listener_config=UdpListenerConfig(quic_options=QuicProtocolOptions()),
        filter_chains=[FilterChain(
            transport_socket=TransportSocket(
                name="envoy.transport_sockets.quic",
                typed_config=PbAny.pack(QuicDownstreamTransport(
                    downstream_tls_context=_tls_context(opts, [])))),
            filters=[_hcm_filter(http_connection_manager(
                opts, routes, flush_interval, stat_prefix="ingress_quic", http3=True))],
        )],
    )


def http_connection_manager(opts: EnvoyOptions, routes: Sequence[RouteSpec], flush_interval: float,
                            *, stat_prefix: str = "ingress", http3: bool = False,
                            alt_svc: str | None = None) -> HttpConnectionManager:
    """WebSocket upgrades through ext_authz then the router, with both access logs; over
    HTTP/2 and HTTP/3 as extended CONNECT too (extauth applies RFC 8441 to those)."""
    return HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=HttpConnectionManagerCodecType.HTTP3 if http3 else HttpConnectionManagerCodecType.AUTO,
        upgrade_configs=[HttpConnectionManagerUpgradeConfig(upgrade_type="websocket")],
        # Envoy hands an extended CONNECT to ext_authz and the upstream as an HTTP/1.1
        # upgrade (GET, upgrade: websocket); extauth adds the key an HTTP/1.1 upstream needs.
        http2_protocol_options=None if http3 else Http2ProtocolOptions(allow_connect=True),
        http3_protocol_options=Http3ProtocolOptions(allow_extended_connect=True) if http3 else None,
        # Edge proxy: the client address is the TCP peer, X-Forwarded-For is ours.
        use_remote_address=True,
        # Policies are chosen by path: normalize it so /ws/../api and //ws cannot reach a
        # route with another policy's rules.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.UNESCAPE_AND_REDIRECT,
        common_http_protocol_options=CoreHttpProtocolOptions(
            # Some upstreams treat x_user_id as x-user-id: a client could smuggle an
            # identity header past the ext_authz rewrite.
            headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST,
            idle_timeout=_td(opts.stream_idle_timeout),
        ),
        stream_idle_timeout=_td(opts.stream_idle_timeout),
        request_headers_timeout=_td(10),
        # Envoy's default 1 s held every client-initiated close (and so the lease release);
        # 100 ms still lets a client read a local reply (a 403) first.
        delayed_close_timeout=_td(0.1),
        route_config=RouteConfiguration(
            name="ingress",
            virtual_hosts=[VirtualHost(name="ingress", domains=["*"],
                                       routes=[x for r in routes for x in route_pair(opts, r)])],
            # Tells browsers HTTP/3 is on the same port (they never start with it).
            response_headers_to_add=[] if alt_svc is None else [HeaderValueOption(
                header=HeaderValue(key="alt-svc", value=alt_svc))],
        ),
        http_filters=[
            HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=PbAny.pack(ext_authz_filter(opts))),
            HttpFilter(name="envoy.filters.http.router", typed_config=PbAny.pack(Router())),
        ],
        access_log=access_logs(opts),
        access_log_options=HttpConnectionManagerHcmAccessLogOptions(
            access_log_flush_interval=_td(flush_interval),
            flush_log_on_tunnel_successfully_established=True,
        ),
    )


def route_pair(opts: EnvoyOptions, r: RouteSpec) -> list[Route]:
    """A prefix's WebSocket route (requests with an ``Upgrade`` header), then its plain one."""
    return [route(opts, r, websocket=True), route(opts, r, websocket=False)]


def route(opts: EnvoyOptions, r: RouteSpec, *, websocket: bool) -> Route:
    """A prefix route to an upstream, naming its policy to ext_authz when it has one.

    The WebSocket one ends a stream at the session bound extauth's allow sets as
    ``grpc-timeout`` (at most ``max_stream_duration``), which never reaches the upstream; a
    client's own copy is overwritten or removed by the allow. The plain route leaves a gRPC
    client's ``grpc-timeout`` alone."""
    per_filter = {} if r.policy is None else {EXT_AUTHZ_FILTER: PbAny.pack(ExtAuthzPerRoute(
        check_settings=CheckSettings(context_extensions={"policy": r.policy})))}
    cap = _td(opts.max_stream_duration)
    name = f"{r.policy}:{r.prefix}" if r.policy else r.prefix
    return Route(
        name=f"{name}:websocket" if websocket else name,
        match=RouteMatch(prefix=r.prefix,
                         headers=[HeaderMatcher(name="upgrade", present_match=True)] if websocket else []),
        route=RouteAction(
            cluster=r.upstream,
            # A WebSocket's response never completes: no whole-request timeout, but an idle
            # cap and a hard cap after which it must re-authenticate (a revoked token's reach).
            timeout=_td(0),
            idle_timeout=_td(opts.stream_idle_timeout),
            max_stream_duration=RouteActionMaxStreamDuration(
                max_stream_duration=cap, grpc_timeout_header_max=cap if websocket else None),
        ),
        request_headers_to_remove=[SESSION_HEADER] if websocket else [],
        typed_per_filter_config=per_filter,
    )


def ext_authz_filter(opts: EnvoyOptions) -> ExtAuthz:
    """The ext_authz filter: fail closed (503) when extauth cannot answer in time."""
    return ExtAuthz(
        grpc_service=_grpc_service(timeout=_td(opts.ext_authz_timeout)),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # Refuse header mutations that are not valid HTTP instead of forwarding them.
        validate_mutations=True,
        # Pick the route again after the allow's headers: the WebSocket route reads the session
        # bound (grpc-timeout) as it is then, not as the client sent it.
        clear_route_cache=True,
    )


# --- access logs ------------------------------------------------------------------------------

def access_logs(opts: EnvoyOptions) -> list[AccessLog]:
    """The stdout JSON log, then the gRPC lease stream to extauth."""
    return [stdout_access_log(), lease_access_log(opts)]


def stdout_access_log() -> AccessLog:
    """One JSON line per finished request (``ACCESS_LOG_FORMAT``)."""
    return AccessLog(
        name="envoy.access_loggers.stdout",
        # Final entries only: the periodic/tunnel entries exist for the lease stream.
        filter=AccessLogFilter(log_type_filter=LogTypeFilter(types=[AccessLogType.DownstreamEnd])),
        typed_config=PbAny.pack(StdoutAccessLog(log_format=SubstitutionFormatString(
            json_format=Struct.from_dict(ACCESS_LOG_FORMAT),  # %CEL% is built in
        ))),
    )


def lease_access_log(opts: EnvoyOptions) -> AccessLog:
    """The gRPC access-log stream that confirms, refreshes and releases leases: only requests
    whose ext_authz metadata holds a ``lease_id``."""
    return AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=AccessLogFilter(metadata_filter=MetadataFilter(
            matcher=MetadataMatcher(
                filter=EXT_AUTHZ_FILTER,
                path=[MetadataMatcherPathSegment(key="lease_id")],
                value=ValueMatcher(present_match=True),
            ),
            match_if_key_not_found=False,
        )),
        typed_config=PbAny.pack(HttpGrpcAccessLogConfig(common_config=CommonGrpcAccessLogConfig(
            log_name=ALS_LOG_NAME,
            grpc_service=_grpc_service(),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=_td(opts.als_buffer_flush),
        ))),
    )


# --- process-wide -----------------------------------------------------------------------------

def overload_manager(opts: EnvoyOptions) -> OverloadManager:
    """The global downstream connection limit."""
    return OverloadManager(
        refresh_interval=_td(0.25),
        resource_monitors=[ResourceMonitor(
            name="envoy.resource_monitors.global_downstream_max_connections",
            typed_config=PbAny.pack(DownstreamConnectionsConfig(
                max_active_downstream_connections=opts.max_connections)),
        )],
    )
