"""Translation between Envoy's ext_authz messages (xds-protos, upb-backed) and the pipeline.

Kept apart from the pipeline so the decision logic never touches protobuf.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from extauth.pipeline import Decision
from extauth.request import CheckInput

# The namespace Envoy files our dynamic metadata under, and the one the
# access-log entries carry it back in.
METADATA_NAMESPACE = "envoy.filters.http.ext_authz"

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OK = status_pb2.Status(code=code_pb2.OK)


def check_input(request: external_auth_pb2.CheckRequest) -> CheckInput:
    attrs = request.attributes
    http = attrs.request.http
    if http.headers:
        headers: Mapping[str, str] = http.headers
    else:
        headers = _header_map(http)
    path, _, query = http.path.partition("?")
    query = query.partition("#")[0]
    return CheckInput(
        method=http.method,
        host=http.host or headers.get(":authority", ""),
        path=path,
        query=query,
        headers=headers,
        source_ip=attrs.source.address.socket_address.address,
        context=attrs.context_extensions,
        request_id=http.id,
        scheme=http.scheme,
    )


def _header_map(http: attribute_context_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    """Envoy's ``encode_raw_headers`` form: repeated entries, joined like the map form."""
    out: dict[str, str] = {}
    for h in http.header_map.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _metadata(d: Decision) -> struct_pb2.Struct:
    md: dict[str, str] = {"decision_id": d.decision_id}
    if d.policy:
        md["policy"] = d.policy
    if d.user is not None:
        md["user"] = d.user
    if d.client_ip:
        md["client_ip"] = d.client_ip
    if d.reason is not None:
        md["reason"] = d.reason.value
    if d.shadow_reason is not None:
        md["shadow_reason"] = d.shadow_reason.value
    if d.lease is not None:
        md["lease_id"] = d.lease.lease_id
    s = struct_pb2.Struct()
    s.update(md)
    return s


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
    )


def check_response(d: Decision) -> external_auth_pb2.CheckResponse:
    if d.allowed:
        ok = external_auth_pb2.OkHttpResponse(
            headers=[_header(k, v) for k, v in d.headers_to_set.items()],
            headers_to_remove=list(d.headers_to_remove),
            query_parameters_to_remove=list(d.query_params_to_remove),
        )
        return external_auth_pb2.CheckResponse(status=_OK, ok_response=ok, dynamic_metadata=_metadata(d))
    assert d.reason is not None
    body = json.dumps({"error": d.reason.value, "message": d.reason.info.message}, separators=(",", ":"))
    headers = [_header(k, v) for k, v in d.deny_headers.items()]
    headers.append(_header("content-type", "application/json"))
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=d.status),
        headers=headers,
        body=body,
    )
    code = code_pb2.UNAUTHENTICATED if d.status == 401 else code_pb2.PERMISSION_DENIED
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code), denied_response=denied, dynamic_metadata=_metadata(d)
    )
