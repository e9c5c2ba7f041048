"""Translation between Envoy's ext_authz messages (xds-protos, upb-backed) and the pipeline.

Kept apart from the pipeline so the decision logic never touches protobuf.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.rpc import code_pb2

from extauth.decision import Decision
from extauth.lease_tag import METADATA_FIELD as LEASE_TAG_FIELD
from extauth.policy import select_policy
from extauth.reasons import Reason
from extauth.request import CheckInput
from extauth.runtime import Runtime

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
    if http.headers:
        headers: Mapping[str, str] = http.headers
    else:
        headers = _header_map(http)
    host, path, query = _target(http, headers)
    return CheckInput(
        method=http.method,
        host=host,
        path=path,
        query=query,
        headers=headers,
        source_ip=attrs.source.address.socket_address.address,
        context=attrs.context_extensions,
        request_id=http.id,
        protocol=http.protocol,
    )


def _target(http: attribute_context_pb2.AttributeContext.HttpRequest,
            headers: Mapping[str, str]) -> tuple[str, str, str]:
    """Host, path without the query, and the query (without a fragment), as the pipeline sees them."""
    path, _, query = http.path.partition("?")
    return http.host or headers.get(":authority", ""), path, query.partition("#")[0]


def _header_map(http: attribute_context_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    """Envoy's ``encode_raw_headers`` form: repeated entries, joined like the map form."""
    out: dict[str, str] = {}
    for h in http.header_map.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def repeat_key(request: external_auth_pb2.CheckRequest, rt: Runtime) -> Hashable | None:
    """The allow memo's key for this request, or None when it must take the full pipeline.

    It holds every input the pipeline reads for a plain-HTTP request (extauth/memo.py says
    why that makes a hit exact), read straight from the message: building a CheckInput
    would cost as much as the lookup saves.
    """
    attrs = request.attributes
    http = attrs.request.http
    headers = http.headers
    if not headers or "upgrade" in headers:  # raw header_map form, or any upgrade: full path
        return None
    route: Hashable = attrs.context_extensions.get("policy")
    if route is not None:
        policy = rt.by_name.get(route)  # type: ignore[call-overload]
        kept = 0
    else:
        host, path, _ = _target(http, headers)  # what check_input gives select_policy
        policy = select_policy(rt.policies, rt.by_name, {}, host, path)
        route = (host, path)
        kept = len(host) + len(path)
    if policy is None or not policy.repeatable:
        return None
    names = policy.credential_headers
    if len(names) == 1 and not policy.reads_query:
        digest = _one_digest(headers.get(names[0]))  # the usual policy: one header
    else:
        digest = _framed_digest(headers, names, http.path if policy.reads_query else None)
    xff = headers.get("x-forwarded-for") if rt.config.xff_hops else None
    if xff is not None:
        kept += len(xff)
    if policy.keys_target:  # claim rules scoped by method or path: both are inputs then
        path = _target(http, headers)[1]
        route = (route, http.method, path)
        kept += len(path)
    if kept > _MAX_KEPT_CHARS:
        return None
    return (route, attrs.source.address.socket_address.address, xff, digest)


# The key keeps the request's host, path and X-Forwarded-For as they are (each is an input
# of the pipeline). Envoy accepts 60 KiB of headers: a request whose key would keep more
# than this takes the full pipeline, so the memo's size is bounded in bytes, not only in
# entries.
_MAX_KEPT_CHARS = 2048


# A missing header: shorter than any digest, so no value's digest equals it.
_ABSENT = b"-"


def _one_digest(value: str | None) -> bytes:
    """One credential's digest. Hashed in one call and without framing, which a single
    value does not need: this is about a tenth of a memo hit's cost."""
    if value is None:
        return _ABSENT
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _framed_digest(headers: Mapping[str, str], names: tuple[str, ...], path: str | None) -> bytes:
    """Several credential inputs (and the query string when ``path`` is given) in one digest."""
    digest = hashlib.blake2b(digest_size=16)
    for name in names:
        value = headers.get(name)
        digest.update(_ABSENT if value is None else _framed(value))
    if path is not None:
        digest.update(_framed(path.partition("?")[2]))
    return digest.digest()


def _framed(value: str) -> bytes:
    # Length-prefixed, so no two different sets of values digest the same input.
    return b"%d:%s" % (len(value), value.encode("utf-8", "surrogatepass"))


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
