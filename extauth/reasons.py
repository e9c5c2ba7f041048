"""Deny reason codes: a public contract.

The same code appears in the ``x-extauth-reason`` response header, in Envoy
dynamic metadata, in the JSON log line and in metric labels. Codes are never
renamed; new ones may be added. Each code fixes its HTTP status and whether it
is a *hostile* signal (the only signals the abuse jail counts).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReasonInfo:
    status: int
    message: str
    # True only for evidence of forgery. Intended denials (missing origin,
    # expired-but-authentic token, quotas, outages) must never be counted, or
    # the jail repeats the fail2ban incident: honest offices banned for 403s.
    hostile: bool = False


class Reason(enum.StrEnum):
    BAD_HANDSHAKE = "bad_handshake"
    TOKEN_MISSING = "token_missing"
    TOKEN_MALFORMED = "token_malformed"
    TOKEN_BAD_SIGNATURE = "token_bad_signature"
    TOKEN_UNKNOWN_KEY = "token_unknown_key"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    TOKEN_CLAIMS = "token_claims"
    TOKEN_REVOKED = "token_revoked"
    JWKS_UNAVAILABLE = "jwks_unavailable"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    ORIGIN_MISSING = "origin_missing"
    NO_POLICY = "no_policy"
    CLAIMS_FORBIDDEN = "claims_forbidden"
    BANNED = "banned"
    SOURCE_NOT_IP = "source_not_ip"
    UNSUPPORTED_VERSION = "unsupported_version"
    QUOTA_USER = "quota_user"
    QUOTA_IP = "quota_ip"
    RATE_IP = "rate_ip"
    RATE_USER = "rate_user"
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL_ERROR = "internal_error"

    @property
    def info(self) -> ReasonInfo:
        return _INFO[self]

    @property
    def status(self) -> int:
        return _INFO[self].status

    @property
    def hostile(self) -> bool:
        return _INFO[self].hostile


_INFO: dict[Reason, ReasonInfo] = {
    Reason.BAD_HANDSHAKE: ReasonInfo(400, "not a valid WebSocket handshake for this route"),
    Reason.TOKEN_MISSING: ReasonInfo(401, "a bearer token is required"),
    # Not hostile: honest clients send these too. "?token=undefined", "Bearer null",
    # an empty cookie, two same-name cookies (old and new Domain/Path) and an
    # over-long token are application bugs, and an office behind one NAT address
    # must not be banned for one colleague's broken tab.
    Reason.TOKEN_MALFORMED: ReasonInfo(401, "the token is malformed"),
    # The one forgery signal: a well-formed token whose signature fails against a key
    # we hold, alg none or missing, a key-confusion attempt (alg not the key's), or a
    # self-declared key (jku, x5u, jwk, x5c, crit): no honest issuer produces these.
    Reason.TOKEN_BAD_SIGNATURE: ReasonInfo(401, "the token signature is invalid", hostile=True),
    # Not hostile: a kid we do not (yet) have is key rotation as often as forgery
    # (a new key before our refetch, an old key rotated out, a token without kid once
    # the set has two keys), and an algorithm the policy does not list is a
    # misconfigured issuer. Nothing is verified, so nothing is admitted either way.
    Reason.TOKEN_UNKNOWN_KEY: ReasonInfo(401, "the token is signed with a key this service does not accept"),
    Reason.TOKEN_EXPIRED: ReasonInfo(401, "the token has expired"),
    Reason.TOKEN_NOT_YET_VALID: ReasonInfo(401, "the token is not valid yet"),
    Reason.TOKEN_CLAIMS: ReasonInfo(401, "the token claims are not acceptable"),
    # Not hostile: an authentic token its issuer or an operator withdrew (a logout, a stolen
    # session); its honest owner reconnects with a new one.
    Reason.TOKEN_REVOKED: ReasonInfo(401, "the token has been revoked"),
    # Our JWKS endpoint is down and the stale keys ran out: our fault, not the client's.
    Reason.JWKS_UNAVAILABLE: ReasonInfo(503, "signing keys are temporarily unavailable"),
    Reason.ORIGIN_NOT_ALLOWED: ReasonInfo(403, "this origin may not open a connection here"),
    Reason.ORIGIN_MISSING: ReasonInfo(403, "an Origin header is required"),
    Reason.NO_POLICY: ReasonInfo(403, "no policy covers this route"),
    # A verified token whose claims a policy's claim_rules refuse: authentic, so never hostile.
    Reason.CLAIMS_FORBIDDEN: ReasonInfo(403, "the token does not grant access to this resource"),
    Reason.BANNED: ReasonInfo(403, "this client is temporarily banned"),
    # The connection's source (Envoy's view of the peer) is no IP address: a Unix socket, a
    # pipe, a forged Check. It can be neither counted nor jailed, so it is never allowed.
    Reason.SOURCE_NOT_IP: ReasonInfo(403, "the client address is not an IP address"),
    Reason.UNSUPPORTED_VERSION: ReasonInfo(426, "only WebSocket version 13 is supported"),
    Reason.QUOTA_USER: ReasonInfo(429, "too many open connections for this user"),
    Reason.QUOTA_IP: ReasonInfo(429, "too many open connections from this address"),
    Reason.RATE_IP: ReasonInfo(429, "too many connection attempts from this address"),
    Reason.RATE_USER: ReasonInfo(429, "too many connection attempts for this user"),
    Reason.STORE_UNAVAILABLE: ReasonInfo(503, "the quota store is unavailable"),
    Reason.INTERNAL_ERROR: ReasonInfo(500, "internal error"),
}

HOSTILE_REASONS: frozenset[Reason] = frozenset(r for r in Reason if r.hostile)


class DenyError(Exception):
    """Raised inside the pipeline to stop with a reason; never escapes the server."""

    def __init__(self, reason: Reason, detail: str = "", retry_after: int | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        # ``detail`` is for logs only; it must never contain a token.
        self.detail = detail
        self.retry_after = retry_after
