"""Build real Envoy messages (xds-protos) the way Envoy sends them."""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping

from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import struct_pb2

AC = attribute_context_pb2.AttributeContext


def ws_headers(origin: str | None = "https://app.example.com", **extra: str) -> dict[str, str]:
    h = {
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-version": "13",
        "sec-websocket-key": base64.b64encode(os.urandom(16)).decode(),
    }
    if origin is not None:
        h["origin"] = origin
    h.update({k.replace("_", "-"): v for k, v in extra.items()})
    return h


def h2_ws_headers(origin: str | None = "https://app.example.com", **extra: str) -> dict[str, str]:
    """An HTTP/2 or HTTP/3 WebSocket (extended CONNECT) as Envoy 1.40 presents it to ext_authz:
    ``:protocol`` as ``upgrade``, its own ``connection: upgrade``, and no key."""
    h = {"upgrade": "websocket", "connection": "upgrade", "sec-websocket-version": "13"}
    if origin is not None:
        h["origin"] = origin
    h.update({k.replace("_", "-"): v for k, v in extra.items()})
    return h


def check_request(
    path: str = "/ws",
    headers: Mapping[str, str] | None = None,
    *,
    method: str = "GET",
    host: str = "ws.example.com",
    source_ip: str = "203.0.113.7",
    context: Mapping[str, str] | None = None,
    protocol: str = "HTTP/1.1",
) -> external_auth_pb2.CheckRequest:
    http = AC.HttpRequest(method=method, path=path, host=host, scheme="http", protocol=protocol,
                          id="req-1", headers=dict(headers or {}))
    source = AC.Peer(address=address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=source_ip, port_value=40000)))
    attrs = AC(source=source, request=AC.Request(http=http), context_extensions=dict(context or {}))
    return external_auth_pb2.CheckRequest(attributes=attrs)


def log_entry(metadata: Mapping[str, str] | None, kind: str) -> accesslog_pb2.HTTPAccessLogEntry:
    """An HTTP access-log entry of the given AccessLogType name carrying our ext_authz metadata."""
    common = accesslog_pb2.AccessLogCommon(access_log_type=accesslog_pb2.AccessLogType.Value(kind))
    if metadata is not None:
        s = struct_pb2.Struct()
        s.update(dict(metadata))
        common.metadata.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(s)
    return accesslog_pb2.HTTPAccessLogEntry(common_properties=common)


def als_message(
    entries: list[accesslog_pb2.HTTPAccessLogEntry], first: bool = True
) -> als_pb2.StreamAccessLogsMessage:
    msg = als_pb2.StreamAccessLogsMessage(
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=entries))
    if first:
        msg.identifier.log_name = "extauth_leases"
        msg.identifier.node.id = "test-envoy"
    return msg


def headers_of(resp: external_auth_pb2.CheckResponse) -> dict[str, str]:
    opts = resp.ok_response.headers if resp.HasField("ok_response") else resp.denied_response.headers
    return {o.header.key: o.header.value for o in opts}


def metadata_of(resp: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {k: v.string_value for k, v in resp.dynamic_metadata.fields.items()}
