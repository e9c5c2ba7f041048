"""Translation between Envoy's ext_authz messages (xds-protos, upb-backed) and the pipeline's
values (``CheckInput`` in, ``Decision`` out), so the decision logic never touches protobuf."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.rpc import code_pb2

from extauth.decision import Decision
from extauth.lease_tag import METADATA_FIELD as LEASE_TAG_FIELD
from extauth.reasons import Reason
from extauth.request import CheckInput

# The namespace Envoy files our dynamic metadata under, and the one the
# access-log entries carry it back in.
METADATA_NAMESPACE = "envoy.filters.http.ext_authz"

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = {"content-type": "application/json"}
# The deny body depends on the reason only.
_BODIES = {
    r: json.dumps({"error": r.value, "message": r.info.message}, separators=(",", ":")) for r in Reason
}


def check_input(request: external_auth_pb2.CheckRequest) -> CheckInput:
    attrs = request.attributes
    http = attrs.request.http
    headers: Mapping[str, str] = http.headers or _header_map(http)
    path, _, query = http.path.partition("?")
    return CheckInput(
        method=http.method,
        host=http.host or headers.get(":authority", ""),
        path=path,
        query=query.partition("#")[0],
        headers=headers,
        source_ip=attrs.source.address.socket_address.address,
        context=attrs.context_extensions,
        request_id=http.id,
        protocol=http.protocol,
    )


def _header_map(http: attribute_context_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    """Envoy's ``encode_raw_headers`` form: repeated entries, joined like the map form."""
    out: dict[str, str] = {}
    for h in http.header_map.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _decision_id_message(decision_id: str) -> bytes:
    resp = external_auth_pb2.CheckResponse()
    resp.dynamic_metadata.fields["decision_id"].string_value = decision_id
    out: bytes = resp.SerializeToString()
    return out


# Serialized messages concatenate as a merge (the Struct's map entries add up), so a response
# is its per-decision part followed by this per-check field. Ids are 16 ASCII characters
# (pipeline.new_decision_id): everything before the id's bytes is then the same.
_ID_LEN = 16
_ID_PREFIX = _decision_id_message("0" * _ID_LEN)[:-_ID_LEN]


def decision_id_field(decision_id: str) -> bytes:
    """``dynamic_metadata.decision_id`` as serialized CheckResponse bytes, to append."""
    if len(decision_id) == _ID_LEN and decision_id.isascii():
        return _ID_PREFIX + decision_id.encode()
    return _decision_id_message(decision_id)


def response_bytes(d: Decision, *, with_id: bool = True) -> bytes:
    """The serialized CheckResponse for a decision; ``with_id`` False leaves out its
    decision id, for ``decision_id_field`` to add per check."""
    static: bytes = check_response(d).SerializeToString()
    return static + decision_id_field(d.decision_id) if with_id else static


def _fill_metadata(fields: Any, d: Decision) -> None:
    """Our dynamic metadata but the decision id (``decision_id_field`` adds it), written in
    place (building a Struct and copying it costs twice as much)."""
    if d.policy:
        fields["policy"].string_value = d.policy
    if d.user is not None:
        fields["user"].string_value = d.user
    if d.client_ip:
        fields["client_ip"].string_value = d.client_ip
    if d.reason is not None:
        fields["reason"].string_value = d.reason.value
    if d.shadow_reason is not None:
        fields["shadow_reason"].string_value = d.shadow_reason.value
    if d.claims:
        fields["claims"].struct_value.update(d.claims)
    if d.lease is not None:
        fields["lease_id"].string_value = d.lease.lease_id
        # Even when empty (a listener whose peer has no IP, e.g. a Unix socket): the access
        # log finds the lease by it, and without it the lease could never be released.
        fields["client_ip"].string_value = d.lease.ip
        if d.lease_tag is not None:
            fields[LEASE_TAG_FIELD].string_value = d.lease_tag


def _add_headers(options: Any, headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        option = options.add()
        option.header.key = name
        option.header.value = value
        option.append_action = _OVERWRITE


def check_response(d: Decision) -> external_auth_pb2.CheckResponse:
    """The CheckResponse for a decision, less its decision id (see ``response_bytes``)."""
    resp = external_auth_pb2.CheckResponse()
    _fill_metadata(resp.dynamic_metadata.fields, d)
    if d.allowed:
        resp.status.SetInParent()  # code OK
        ok = resp.ok_response
        ok.SetInParent()
        _add_headers(ok.headers, d.headers_to_set)
        ok.headers_to_remove.extend(d.headers_to_remove)
        ok.query_parameters_to_remove.extend(d.query_params_to_remove)
        return resp
    assert d.reason is not None
    resp.status.code = code_pb2.UNAUTHENTICATED if d.status == 401 else code_pb2.PERMISSION_DENIED
    denied = resp.denied_response
    denied.status.code = d.status
    _add_headers(denied.headers, d.deny_headers)
    _add_headers(denied.headers, _JSON)
    denied.body = _BODIES[d.reason]
    return resp
