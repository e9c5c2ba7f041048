"""The configuration file: one validated, immutable object built once and passed explicitly.

Key names are a public contract: new keys may be added, existing ones are never
renamed. Every validation error names the key path (``policies[0].jwt.issuer``)
and what is wrong with it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from extauth.addresses import is_loopback_host, split_host_port
from extauth.claims import MAX_PATH_DEPTH
from extauth.eventloop import EventLoop, available
from extauth.origin import parse_origin_pattern
from extauth.store.url import REDIS_SCHEMES, parse_redis_url

# Algorithms we verify. "none" is absent on purpose and can never be configured.
RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGS = ("ES256", "ES384", "ES512")
OKP_ALGS = ("EdDSA",)
HMAC_ALGS = ("HS256", "HS384", "HS512")
ALGORITHMS = RSA_ALGS + EC_ALGS + OKP_ALGS + HMAC_ALGS
Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEADER_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_SOURCE_RE = re.compile(r"^(query:[A-Za-z0-9_.-]+|header:[A-Za-z0-9-]+|cookie:[A-Za-z0-9_.-]+|subprotocol)$")
_TEMPLATE_FIELD_RE = re.compile(r"\{([^{}]*)\}")
# A JWKS document is a few KiB; a cap well above any real one bounds memory and parse time.
JWKS_MAX_BYTES_LIMIT = 4 * 1024 * 1024
# Upper bounds on durations: beyond them a value is a mistake (and some overflow a Redis TTL).
DAY = 86400
MAX_BAN_SECONDS = 366 * DAY
# Headers an upstream identity header must never overwrite.
_RESERVED_HEADERS = frozenset(
    {"host", "connection", "upgrade", "content-length", "transfer-encoding", "te",
     "sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
     "sec-websocket-extensions", "authorization", "cookie", "origin"}
)


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the key."""


class _Model(BaseModel):
    # Unknown keys are refused: a typo in a security config must not be ignored silently.
    # Infinity and NaN are refused too: they pass ge/gt bounds and then break a Redis TTL or a
    # timer at run time.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _hostport(value: str) -> str:
    split_host_port(value)  # ValueError names the problem
    return value


class Match(_Model):
    """Host/path selection, used when Envoy's route names no policy (first match in config order)."""

    hosts: list[str] = Field(
        default_factory=list, description="Host names this policy serves (any host when empty).")
    path_prefix: str = Field(default="/", description="Path prefix this policy serves; starts with `/`.")

    @field_validator("hosts")
    @classmethod
    def _lower_hosts(cls, v: list[str]) -> list[str]:
        return [h.strip().lower() for h in v]

    @field_validator("path_prefix")
    @classmethod
    def _slash(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v


class IssuerConfig(_Model):
    """One issuer: its `iss`, audiences, algorithms and exactly one key source (`jwks_file`,
    `jwks_uri` or `hmac_secret_env`)."""

    issuer: str = Field(min_length=1, description="The `iss` every token must carry.")
    audiences: list[str] = Field(min_length=1, description="Accepted `aud` values; a token must name one.")
    algorithms: list[Algorithm] = Field(
        default_factory=lambda: list[Algorithm](["RS256"]), min_length=1,
        description="Accepted algorithms; HS* only with `hmac_secret_env` (then exactly one), never with "
        "a JWKS.")
    jwks_file: str | None = Field(
        default=None, description="A JWKS file, relative to the config file; re-read when it changes.")
    jwks_uri: str | None = Field(
        default=None,
        description="A JWKS URL: https:// (http:// only for localhost, 127.0.0.0/8, ::1, never through "
        "a proxy); no `user:password@`; other hosts go through `https_proxy` when set (`no_proxy` honoured).")
    hmac_secret_env: str | None = Field(
        default=None, description="Environment variable holding the HMAC shared secret.")
    hmac_previous_secret_env: str | None = Field(
        default=None,
        description="While rotating: the variable holding the previous secret, still accepted "
        "(tokens it signed stay valid until they expire), so honest users are never taken for forgers.")
    jwks_refresh_seconds: float = Field(
        default=300, ge=1, le=DAY, description="A `jwks_uri` is refetched on this timer, busy or not.")
    jwks_refetch_cooldown_seconds: float = Field(
        default=30, ge=1, le=DAY,
        description="An unknown `kid` refetches the key set at most once per cooldown.")
    jwks_max_stale_seconds: float = Field(
        default=3600, ge=0, le=30 * DAY,
        description="Keys keep serving this long after the last successful fetch while the endpoint is "
        "down, then 503 `jwks_unavailable`; at least `jwks_refresh_seconds` for a URL.")
    jwks_timeout_seconds: float = Field(
        default=2.0, gt=0, le=30, description="One total deadline per JWKS fetch.")
    jwks_max_bytes: int = Field(
        default=256 * 1024, gt=0, le=JWKS_MAX_BYTES_LIMIT, description="Largest JWKS document accepted.")

    @field_validator("jwks_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        # The keys decide who gets in: fetched in clear text, anyone on the path could
        # substitute them. Plain http is only for an endpoint on this host.
        if v is None:
            return v
        if not v.startswith(("https://", "http://")):
            raise ValueError("must be an https:// URL")
        try:
            parts = urlsplit(v)
            host = parts.hostname
        except ValueError:
            parts, host = None, None
        if parts is None or not host:
            raise ValueError("must be an https:// URL with a host")
        if "@" in parts.netloc:
            # urllib would not send it as credentials but look the whole "user:pass@host" up in DNS.
            raise ValueError("must not contain user:password@ (credentials in the URL are not supported)")
        if v.startswith("http://") and not is_loopback_host(host):
            raise ValueError("must be https:// (plain http:// only for localhost, 127.0.0.0/8 or ::1)")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerConfig:
        self._check_keys()
        return self

    def _check_keys(self) -> None:
        given = [k for k in ("jwks_file", "jwks_uri", "hmac_secret_env") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("exactly one of jwks_file, jwks_uri, hmac_secret_env is required")
        hmac = [a for a in self.algorithms if a in HMAC_ALGS]
        if self.hmac_secret_env and len(hmac) != len(self.algorithms):
            raise ValueError("hmac_secret_env works with HS256/HS384/HS512 only")
        if self.hmac_secret_env and len(self.algorithms) != 1:
            raise ValueError("a shared secret is one key: list exactly one algorithm")
        if self.hmac_previous_secret_env and not self.hmac_secret_env:
            raise ValueError("hmac_previous_secret_env needs hmac_secret_env (the current secret)")
        if self.hmac_previous_secret_env and self.hmac_previous_secret_env == self.hmac_secret_env:
            raise ValueError("hmac_previous_secret_env names the same variable as hmac_secret_env")
        if not self.hmac_secret_env and hmac:
            # Key confusion: an HMAC algorithm next to public keys lets a forger
            # sign with the public key as the shared secret.
            raise ValueError("HS* algorithms need hmac_secret_env, never a JWKS")
        if self.jwks_uri and self.jwks_max_stale_seconds < self.jwks_refresh_seconds:
            # Staleness counts from the last fetch: keys would go stale before the timer
            # refetches them, and every uncached check would fetch the key set itself.
            raise ValueError("jwks_max_stale_seconds must be at least jwks_refresh_seconds")


# The JwtConfig keys that are the policy's, whichever issuer signed the token.
_SHARED_JWT_FIELDS = frozenset({"token_sources", "leeway_seconds", "max_lifetime_seconds", "user_claim"})
MAX_ISSUERS = 16


class JwtConfig(IssuerConfig):
    """Token verification: one issuer given inline (`issuer`, `audiences`, a key source), or several
    under `issuers`, each with its own; the token's `iss` picks one before any key is read."""

    issuer: str = Field(default="", description="The `iss` every token must carry (inline form).")
    audiences: list[str] = Field(
        default_factory=list, description="Accepted `aud` values; a token must name one (inline form).")
    issuers: list[IssuerConfig] = Field(
        default_factory=list, max_length=MAX_ISSUERS,
        description="Several issuers, each with its own `issuer`, `audiences`, `algorithms`, key source and "
        "JWKS bounds; instead of the inline ones. A token's keys are only ever its own issuer's.")
    token_sources: list[str] = Field(
        default_factory=lambda: ["header:authorization"], min_length=1,
        description="Where the token may be: `query:NAME`, `header:NAME`, `cookie:NAME`, `subprotocol`; "
        "every one present is stripped before the upstream sees the request.")
    leeway_seconds: int = Field(
        default=30, ge=0, le=600, description="Clock skew allowed on `exp`, `nbf`, `iat`.")
    max_lifetime_seconds: int = Field(
        default=86400, ge=1, le=366 * DAY,
        description="Longest accepted `exp - iat` (`exp - now` without `iat`): bounds how long a token "
        "revoked at the issuer still passes.")
    user_claim: str = Field(
        default="sub", description="The claim that names the user (per-user quotas, logs).")
    @field_validator("token_sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        for s in v:
            if not _SOURCE_RE.match(s):
                raise ValueError(
                    f"bad token source {s!r}: use query:NAME, header:NAME, cookie:NAME or subprotocol"
                )
        if len(set(v)) != len(v):
            raise ValueError("duplicate token source")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtConfig:
        if not self.issuers:
            if not self.issuer:
                raise _at("issuer", "Field required (or issuers)")
            if not self.audiences:
                raise _at("audiences", "Field required (or issuers)")
            self._check_keys()
            return self
        inline = sorted(self.model_fields_set - _SHARED_JWT_FIELDS - {"issuers"})
        if inline:
            raise ValueError(f"with issuers, give {', '.join(inline)} per issuer")
        names = [i.issuer for i in self.issuers]
        if len(set(names)) != len(names):
            raise ValueError("issuers: each issuer once")
        return self

    def per_issuer(self) -> tuple[JwtConfig, ...]:
        """One single-issuer JwtConfig per issuer, with this policy's shared keys."""
        if not self.issuers:
            return (self,)
        shared = self.model_dump(include=set(_SHARED_JWT_FIELDS))
        return tuple(JwtConfig.model_validate({**i.model_dump(), **shared}) for i in self.issuers)


class QuotaLimits(_Model):
    """Limits held in the store across every replica; a denial is 429 with `Retry-After`. Unset: no limit."""

    connections_per_user: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Concurrent WebSockets per user (`quota_user`).")
    connections_per_ip: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Concurrent WebSockets per client IP (`quota_ip`).")
    attempts_per_ip_per_minute: int | None = Field(
        default=None, ge=1, le=1_000_000_000,
        description="Upgrade attempts per client IP per minute (`rate_ip`).")
    attempts_per_user_per_minute: int | None = Field(
        default=None, ge=1, le=1_000_000_000,
        description="Upgrade attempts per user per minute (`rate_user`).")

    @property
    def any(self) -> bool:
        return any(
            v is not None
            for v in (
                self.connections_per_user,
                self.connections_per_ip,
                self.attempts_per_ip_per_minute,
                self.attempts_per_user_per_minute,
            )
        )


class IpQuota(_Model):
    """Per-IP limits for the clients in one network (a known office NAT), instead of the tier's."""

    cidr: str = Field(description="The network (`203.0.113.0/24`, `2001:db8::/48`); the longest match wins.")
    connections_per_ip: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Concurrent WebSockets per client IP here.")
    attempts_per_ip_per_minute: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Upgrade attempts per client IP per minute here.")

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(f"not a network: {v[:64]!r}") from None

    @model_validator(mode="after")
    def _some_limit(self) -> IpQuota:
        if self.connections_per_ip is None and self.attempts_per_ip_per_minute is None:
            raise ValueError("give connections_per_ip and/or attempts_per_ip_per_minute")
        return self


_TIER_NAME = Annotated[str, Field(min_length=1, max_length=256)]


class Quotas(QuotaLimits):
    """The default tier's limits (the keys above), tiers chosen by a claim, and per-network
    per-IP limits (docs/authorization.md#quota-tiers-and-overrides)."""

    tier_claim: str | list[str] | None = Field(
        default=None,
        description="The claim whose string value picks a tier (`plan`); other values get the default.")
    tiers: dict[_TIER_NAME, QuotaLimits] = Field(
        default_factory=dict, max_length=64,
        description="Limits per `tier_claim` value (`{pro: {connections_per_user: 50}}`); a key a tier "
        "leaves out keeps the default tier's value.")
    ip_overrides: list[IpQuota] = Field(
        default_factory=list, max_length=1024,
        description="Per-IP limits per client network, over the tier's (an office NAT: 500 instead of 20).")

    @model_validator(mode="after")
    def _tiers(self) -> Quotas:
        if self.tiers and self.tier_claim is None:
            raise ValueError("tiers need tier_claim (the claim that names the tier)")
        if self.tier_claim is not None:
            if not self.tiers:
                raise ValueError("tier_claim needs tiers")
            _claim_path(self.tier_claim)
        cidrs = [o.cidr for o in self.ip_overrides]
        if len(set(cidrs)) != len(cidrs):
            raise ValueError("ip_overrides: each cidr once")
        return self

    @property
    def counts(self) -> bool:
        """Whether any limit applies to some request (then every upgrade takes a lease)."""
        return self.any or any(t.any for t in self.tiers.values()) or bool(self.ip_overrides)


ClaimValue = Annotated[str, Field(max_length=1024)] | int | bool
_MAX_CLAIM_RULES = 32
_MAX_CHECKS = 32
_MAX_VALUES = 256


def _claim_path(v: str | list[str]) -> str | list[str]:
    segments = v.split(".") if isinstance(v, str) else v
    if not segments or len(segments) > MAX_PATH_DEPTH or not all(segments):
        raise ValueError(f"a claim path of 1 to {MAX_PATH_DEPTH} non-empty names")
    if any(len(s) > 256 for s in segments):
        raise ValueError("claim names are at most 256 characters")
    return v


class ClaimCheck(_Model):
    """One requirement on one claim: ``claim`` (a dotted path, or its segments as a list for
    names with dots) and exactly one of ``equals``, ``one_of``, ``contains_all``, ``contains_any``."""

    claim: str | list[str] = Field(
        description="A dotted path (`realm_access.roles`), or its names as a list (`[https://x/plan]`).")
    equals: ClaimValue | None = Field(
        default=None, description="The claim is exactly this string, integer or boolean (type included).")
    one_of: list[ClaimValue] | None = Field(
        default=None, min_length=1, max_length=_MAX_VALUES, description="The claim is one of these values.")
    contains_all: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(
        default=None, min_length=1, max_length=_MAX_VALUES,
        description="The claim (an array of strings, or a space-delimited string like `scope`) holds each.")
    contains_any: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(
        default=None, min_length=1, max_length=_MAX_VALUES,
        description="The claim (as for `contains_all`) holds at least one of these.")

    @field_validator("claim")
    @classmethod
    def _claim(cls, v: str | list[str]) -> str | list[str]:
        return _claim_path(v)

    @model_validator(mode="after")
    def _one_test(self) -> ClaimCheck:
        given = [k for k in ("equals", "one_of", "contains_all", "contains_any") if k in self.model_fields_set
                 and getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of equals, one_of, contains_all, contains_any is required")
        return self

    def spec(self) -> dict[str, Any]:
        """The plain form extauth.claims compiles."""
        return self.model_dump(exclude_none=True)


class ClaimRule(_Model):
    """Every ``all_of`` check and, when given, at least one ``any_of`` check must hold for the
    requests the rule covers (all of them, or those under ``path_prefix`` and/or ``methods``)."""

    path_prefix: str | None = Field(
        default=None, description="The rule covers only paths under this prefix (raw or decoded).")
    methods: list[Annotated[str, Field(pattern=r"^[A-Za-z]{1,16}$")]] = Field(
        default_factory=list, description="The rule covers only these methods (all when empty).")
    all_of: list[ClaimCheck] = Field(
        default_factory=list, max_length=_MAX_CHECKS, description="Checks that must all hold.")
    any_of: list[ClaimCheck] = Field(
        default_factory=list, max_length=_MAX_CHECKS, description="Checks of which at least one must hold.")

    @field_validator("path_prefix")
    @classmethod
    def _slash(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @model_validator(mode="after")
    def _some_check(self) -> ClaimRule:
        if not self.all_of and not self.any_of:
            raise ValueError("a rule needs all_of or any_of")
        return self

    def spec(self) -> dict[str, Any]:
        return {
            "path_prefix": self.path_prefix,
            "methods": [m.upper() for m in self.methods],
            "all_of": [c.spec() for c in self.all_of],
            "any_of": [c.spec() for c in self.any_of],
        }


class Session(_Model):
    """How long an allowed WebSocket may stay open (docs/revocation.md): Envoy ends it then,
    through the `grpc-timeout` header extauth sets on the allow."""

    close_at_token_expiry: bool = Field(
        default=False, description="End the WebSocket at its token's own `exp` (without the leeway).")
    max_seconds: int | None = Field(
        default=None, ge=1, le=DAY,
        description="End it this many seconds after the upgrade at the latest: the longest a revoked "
        "user keeps a socket that is already open.")


class Policy(_Model):
    """One protected service. Envoy's route names it (`context_extensions: {policy: NAME}`), else `match`."""

    name: str = Field(description="Unique; letters, digits, `_`, `.`, `-` (at most 64).")
    match: Match | None = Field(default=None, description="Host/path selection when Envoy names no policy.")
    websocket_only: bool = Field(default=True, description="Refuse plain HTTP (400 `bad_handshake`).")
    origins: list[str] = Field(
        default_factory=list,
        description="Allowed origins, compared in canonical form: `https://app.example.com`, "
        "`https://*.example.com` (subdomains only) or `null`. Checked on upgrades only.")
    allow_missing_origin: bool = Field(
        default=False, description="Admit an upgrade without `Origin` (non-browser clients).")
    jwt: JwtConfig | None = Field(
        default=None, description="Token verification; without it the policy has no user.")
    quotas: Quotas = Field(default_factory=Quotas, description="Connection quotas and attempt rates.")
    upstream_headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers added on allow, with claim placeholders (`{x-user-id: \"{sub}\"}`); a client's "
        "own copy of any header some policy sets is replaced or removed on every allow.")
    claim_rules: list[ClaimRule] = Field(
        default_factory=list, max_length=_MAX_CLAIM_RULES,
        description="Required claims, roles and scopes (docs/authorization.md); a verified token that "
        "fails one is 403 `claims_forbidden`.")
    metadata_claims: list[str | list[str]] = Field(
        default_factory=list, max_length=16,
        description="Claims (paths as in `claim_rules`) put in the allow's dynamic metadata under `claims`, "
        "for Envoy RBAC, rate limits and access logs; at most 4 KiB together, objects left out.")
    origins_claim: str | list[str] | None = Field(
        default=None,
        description="A claim listing more allowed origins (Keycloak's `allowed-origins`): an upgrade's "
        "origin passes when it is on `origins` or, in canonical form, on the token's list.")
    session: Session | None = Field(
        default=None,
        description="Bound each allowed WebSocket: `{close_at_token_expiry: true, max_seconds: N}` "
        "(either or both); it ends at the earlier. Needs the Envoy side `extauth envoy-config` emits.")
    shadow: bool = Field(
        default=False, description="Allow everything, but log, count and tag what would have been denied.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("letters, digits, '_', '.', '-' only (max 64)")
        return v

    @field_validator("origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for o in v:
            parse_origin_pattern(o)  # raises ValueError with a precise message
        return v

    @field_validator("upstream_headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, template in v.items():
            low = name.lower()
            if not _HEADER_RE.match(low) or low.startswith(":"):
                raise ValueError(f"bad header name {name!r}")
            if low in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is reserved")
            for field in _TEMPLATE_FIELD_RE.findall(template):
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]*", field):
                    raise ValueError(f"bad claim placeholder {{{field}}} in {name!r}")
            out[low] = template
        return out

    @model_validator(mode="after")
    def _quota_needs_user(self) -> Policy:
        q = self.quotas
        if self.jwt is None and q.tier_claim is not None:
            raise ValueError("quota tiers need a jwt section (the tier is a claim)")
        per_user = [t.connections_per_user or t.attempts_per_user_per_minute for t in [q, *q.tiers.values()]]
        if self.jwt is None and any(per_user):
            raise ValueError("per-user quotas need a jwt section (there is no user without one)")
        if self.jwt is None and any(_TEMPLATE_FIELD_RE.search(t) for t in self.upstream_headers.values()):
            raise ValueError("claim placeholders in upstream_headers need a jwt section")
        if self.jwt is None and self.session is not None and self.session.close_at_token_expiry:
            raise ValueError("session.close_at_token_expiry needs a jwt section (no token without one)")
        if self.jwt is None and self.claim_rules:
            raise ValueError("claim_rules need a jwt section (there are no claims without one)")
        if self.jwt is None and (self.metadata_claims or self.origins_claim is not None):
            raise ValueError("metadata_claims and origins_claim need a jwt section")
        for path in self.metadata_claims:
            _claim_path(path)
        if self.origins_claim is not None:
            _claim_path(self.origins_claim)
        return self


class StoreBreaker(_Model):
    """The circuit breaker in front of the store: checks stop waiting on a store that is down."""

    failure_threshold: int = Field(
        default=3, ge=1, le=1_000_000, description="Consecutive failures that open it.")
    reset_seconds: float = Field(
        default=2.0, gt=0, le=300, description="How long it stays open before one probe call is let through.")


class Abuse(_Model):
    """The jail: bans a client IP after repeated `token_bad_signature` (forgeries), never honest mistakes."""

    enabled: bool = Field(
        default=True, description="False: no bans are made or enforced, and admin `ban` is refused.")
    threshold: int = Field(
        default=5, ge=1, le=1_000_000, description="Bad signatures within the window that ban.")
    window_seconds: int = Field(default=300, ge=1, le=DAY, description="The counting window.")
    ban_seconds: int = Field(default=900, ge=1, le=MAX_BAN_SECONDS, description="How long a ban lasts.")
    never_ban: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"], description="CIDRs never banned.")
    dry_run: bool = Field(default=False, description="Log and count the bans it would make, make none.")

    @field_validator("never_ban")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for c in v:
            ipaddress.ip_network(c, strict=False)
        return v


class AdminTls(_Model):
    """TLS for the admin API: its bearer token must not cross a network in clear text."""

    cert_file: str = Field(description="PEM certificate chain, leaf first.")
    key_file: str = Field(description="PEM private key.")
    client_ca_file: str | None = Field(
        default=None,
        description="Mutual TLS: clients must present a certificate signed by this CA "
        "(the token is still required off loopback).")


ClientIp = Annotated[str, Field(pattern=r"^(source|xff:[0-9]{1,2})$")]


class Config(_Model):
    """The whole file."""

    listen: str = Field(
        default="127.0.0.1:9001",
        description="gRPC `HOST:PORT`: ext_authz Check, Envoy's access-log stream, `grpc.health.v1` "
        "and reflection.")
    store: str = Field(
        default="memory://",
        description="`memory://` (one replica), `redis://`, `rediss://` (TLS), `redis+cluster://h:p,h:p`, "
        "`rediss+cluster://h:p,h:p` (Cluster over TLS).")
    client_ip: ClientIp = Field(
        default="source",
        description="`source` (the connection's address) or `xff:N`: the entry N from the right of "
        "X-Forwarded-For (N trusted proxies); see docs/operations.md, \"Who counts as one client\".")
    ipv6_prefix_length: int = Field(
        default=64, ge=32, le=128,
        description="Per-IP quotas, rates and bans count an IPv6 client by its network of this length; "
        "128 counts single addresses.")
    lease_ttl_seconds: float = Field(
        default=60, gt=0, le=DAY,
        description="A lease not refreshed for this long disappears; keep it a few access-log "
        "flush intervals.")
    store_timeout_ms: float = Field(
        default=50, gt=0, le=10_000,
        description="Per store call; keep it below Envoy's ext_authz timeout (0.5 s in the generated "
        "config), or Envoy answers a slow store with its own 503 first.")
    store_on_error: Literal["deny", "allow"] = Field(
        default="deny", description="`deny`: 503 `store_unavailable`; `allow`: admit without counting.")
    store_breaker: StoreBreaker = Field(
        default_factory=StoreBreaker, description="The store's circuit breaker.")
    max_token_bytes: int = Field(
        default=8192, ge=256, le=65536, description="Longer tokens are refused before any parsing.")
    token_cache_size: int = Field(
        default=10_000, ge=0, le=10_000_000,
        description="Verified-token LRU entries per key set (0 disables).")
    allow_memo_size: int = Field(
        default=10_000, ge=0, le=10_000_000,
        description="Remembered plain-HTTP allows, so a repeated request skips the pipeline (0 disables).")
    admin_listen: str = Field(
        default="127.0.0.1:9002",
        description="Admin gRPC `HOST:PORT`; off loopback it requires the token in `admin_token_env`.")
    admin_token_env: str = Field(
        default="EXTAUTH_ADMIN_TOKEN", description="Environment variable holding the admin bearer token.")
    admin_tls: AdminTls | None = Field(
        default=None, description="Serve the admin API over TLS (without it, off loopback warns at start).")
    metrics_listen: str | None = Field(default=None, description="`HOST:PORT` serving Prometheus `/metrics`.")
    metrics_sample_seconds: float = Field(
        default=5.0, ge=0.1, le=3600,
        description="How often active leases are counted in the store for the gauge (a SCAN on Redis).")
    abuse: Abuse = Field(default_factory=Abuse, description="The abuse jail.")
    drain_seconds: float = Field(
        default=5.0, ge=0, le=300,
        description="On SIGTERM: NOT_SERVING, keep answering this long, then stop.")
    watch_config: bool = Field(
        default=True, description="Reload when the file changes (SIGHUP always reloads).")
    event_loop: EventLoop = Field(
        default="auto",
        description="`auto`: uvloop when installed, else asyncio's own loop; `uvloop` (refused at start "
        "when missing) or `asyncio`. The start-up log line `serving` names the loop.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log threshold.")
    policies: list[Policy] = Field(min_length=1, description="The protected services, at least one.")

    @field_validator("listen", "admin_listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _hostport(v)

    @field_validator("event_loop")
    @classmethod
    def _event_loop(cls, v: EventLoop) -> EventLoop:
        if not available(v):
            raise ValueError("uvloop is not installed (pip install uvloop, or event_loop: auto)")
        return v

    @field_validator("metrics_listen")
    @classmethod
    def _metrics(cls, v: str | None) -> str | None:
        return None if v is None else _hostport(v)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if not v.startswith(("memory://", *(f"{scheme}://" for scheme in REDIS_SCHEMES))):
            raise ValueError("use memory://, redis://, rediss://, redis+cluster:// or rediss+cluster://")
        if not v.startswith("memory://"):
            parse_redis_url(v)  # what serve would refuse, refused here with its reason
        return v

    @field_validator("policies")
    @classmethod
    def _unique(cls, v: list[Policy]) -> list[Policy]:
        names = [p.name for p in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate policy name(s): {', '.join(sorted(dup))}")
        return v

    @property
    def xff_hops(self) -> int:
        """0 means use the connection's source address."""
        return 0 if self.client_ip == "source" else int(self.client_ip.split(":", 1)[1])

    def policy(self, name: str) -> Policy | None:
        for p in self.policies:
            if p.name == name:
                return p
        return None


_AT = "\x00"


def _at(key: str, message: str) -> ValueError:
    """A model validator's error about one key: reported at that key's path."""
    return ValueError(f"{_AT}{key}{_AT}{message}")


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith(_AT):  # a model validator's error about one of its keys (_at)
            key, _, msg = msg[len(_AT):].partition(_AT)
            path = f"{path}.{key}" if path else key
        lines.append(f"{path or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, *, base_dir: Path | None = None) -> Config:
    """Validate a mapping (already parsed YAML) into a Config."""
    if not isinstance(data, dict):
        raise ConfigError("<root>: the config must be a mapping")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: Config, base_dir: Path) -> Config:
    """Make jwks_file paths relative to the config file, not the working directory."""

    def resolved(issuer: IssuerConfig) -> IssuerConfig:
        if issuer.jwks_file and not os.path.isabs(issuer.jwks_file):
            return issuer.model_copy(update={"jwks_file": str(base_dir / issuer.jwks_file)})
        return issuer

    policies = []
    for p in cfg.policies:
        if p.jwt:
            jwt = resolved(p.jwt).model_copy(update={"issuers": [resolved(i) for i in p.jwt.issuers]})
            p = p.model_copy(update={"jwt": jwt})
        policies.append(p)
    return cfg.model_copy(update={"policies": policies})


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """The config with top-level keys replaced (command-line flags), validated like the file."""
    if not overrides:
        return cfg
    try:
        return Config.model_validate({**cfg.model_dump(), **overrides})
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a YAML config file. Raises ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e)}") from None
    return parse_config(data, base_dir=p.resolve().parent)


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping: PyYAML would keep the last
    one silently, and a second ``abuse:`` or ``origins:`` further down a long file would
    quietly replace the first. (Keys that a ``<<`` merge brings in may be overridden, as
    YAML intends.)"""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class says so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {str(key)[:64]!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's quote of the offending line: that line may
    hold a password (the store URL's)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{e.problem or e.context or 'syntax error'}{where}"
    return "syntax error"
