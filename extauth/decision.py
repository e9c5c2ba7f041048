"""The pipeline's answer: a plain, Envoy-independent value (``extauth.envoy_api`` encodes it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extauth.reasons import Reason
from extauth.store.base import LeaseRef


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int  # 200 when allowed
    decision_id: str
    reason: Reason | None = None
    policy: str | None = None
    user: str | None = None
    client_ip: str = ""
    websocket: bool = False
    headers_to_set: Mapping[str, str] = field(default_factory=dict)
    headers_to_remove: tuple[str, ...] = ()
    query_params_to_remove: tuple[str, ...] = ()
    deny_headers: Mapping[str, str] = field(default_factory=dict)
    lease: LeaseRef | None = None
    lease_tag: str | None = None  # extauth/lease_tag.py: the access log checks it
    shadow_reason: Reason | None = None
    # Until when (unix seconds) the same request would be allowed the same way: set only on
    # plain-HTTP allows that took no lease, for the allow memo (extauth/memo.py).
    valid_until: float | None = None
    # The policy's metadata_claims of the verified token (extauth.claims.ClaimSelector).
    claims: Mapping[str, Any] | None = None
