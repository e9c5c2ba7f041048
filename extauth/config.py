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

from extauth.addresses import is_loopback_host
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
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class Match(_Model):
    hosts: list[str] = Field(default_factory=list)
    path_prefix: str = "/"

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


class JwtConfig(_Model):
    issuer: str = Field(min_length=1)
    audiences: list[str] = Field(min_length=1)
    algorithms: list[Algorithm] = Field(default_factory=lambda: list[Algorithm](["RS256"]), min_length=1)
    jwks_file: str | None = None
    jwks_uri: str | None = None
    hmac_secret_env: str | None = None
    # A rotation: the secret before hmac_secret_env's, still accepted (tokens it signed are
    # valid until they expire), so honest users are never taken for forgers.
    hmac_previous_secret_env: str | None = None
    token_sources: list[str] = Field(default_factory=lambda: ["header:authorization"], min_length=1)
    leeway_seconds: int = Field(default=30, ge=0, le=600)
    max_lifetime_seconds: int = Field(default=86400, ge=1, le=366 * DAY)
    user_claim: str = "sub"
    # JWKS caching: refresh on TTL; an unknown kid refetches at most once per
    # cooldown; stale keys serve while the endpoint is down, then fail closed.
    jwks_refresh_seconds: float = Field(default=300, ge=1, le=DAY)
    jwks_refetch_cooldown_seconds: float = Field(default=30, ge=1, le=DAY)
    jwks_max_stale_seconds: float = Field(default=3600, ge=0, le=30 * DAY)
    jwks_timeout_seconds: float = Field(default=2.0, gt=0, le=30)
    jwks_max_bytes: int = Field(default=256 * 1024, gt=0, le=JWKS_MAX_BYTES_LIMIT)

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
    def _one_key_source(self) -> JwtConfig:
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
        return self

    @property
    def jwks_backed(self) -> bool:
        return self.jwks_uri is not None


class Quotas(_Model):
    connections_per_user: int | None = Field(default=None, ge=1, le=1_000_000_000)
    connections_per_ip: int | None = Field(default=None, ge=1, le=1_000_000_000)
    attempts_per_ip_per_minute: int | None = Field(default=None, ge=1, le=1_000_000_000)
    attempts_per_user_per_minute: int | None = Field(default=None, ge=1, le=1_000_000_000)

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


class Policy(_Model):
    name: str
    match: Match | None = None
    websocket_only: bool = True
    origins: list[str] = Field(default_factory=list)
    allow_missing_origin: bool = False
    jwt: JwtConfig | None = None
    quotas: Quotas = Field(default_factory=Quotas)
    upstream_headers: dict[str, str] = Field(default_factory=dict)
    # Allow everything, but log, count and tag what would have been denied.
    shadow: bool = False

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
        if self.jwt is None and (q.connections_per_user or q.attempts_per_user_per_minute):
            raise ValueError("per-user quotas need a jwt section (there is no user without one)")
        if self.jwt is None and any(_TEMPLATE_FIELD_RE.search(t) for t in self.upstream_headers.values()):
            raise ValueError("claim placeholders in upstream_headers need a jwt section")
        return self


class StoreBreaker(_Model):
    # Consecutive failures that open the breaker, and how long it stays open
    # before one probe call is let through.
    failure_threshold: int = Field(default=3, ge=1, le=1_000_000)
    reset_seconds: float = Field(default=2.0, gt=0, le=300)


class Abuse(_Model):
    enabled: bool = True
    threshold: int = Field(default=5, ge=1, le=1_000_000)
    window_seconds: int = Field(default=300, ge=1, le=DAY)
    ban_seconds: int = Field(default=900, ge=1, le=MAX_BAN_SECONDS)
    never_ban: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    dry_run: bool = False

    @field_validator("never_ban")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for c in v:
            ipaddress.ip_network(c, strict=False)
        return v


class AdminTls(_Model):
    """TLS for the admin API: its bearer token must not cross a network in clear text."""

    cert_file: str  # PEM certificate chain, leaf first
    key_file: str  # PEM private key
    # Mutual TLS: clients must present a certificate signed by this CA (the token is still required
    # off loopback).
    client_ca_file: str | None = None


ClientIp = Annotated[str, Field(pattern=r"^(source|xff:[0-9]{1,2})$")]


class Config(_Model):
    listen: str = "127.0.0.1:9001"
    store: str = "memory://"
    client_ip: ClientIp = "source"
    # Per-IP quotas and bans count an IPv6 client by its network of this length
    # (extauth/addresses.py says why); 128 counts single addresses.
    ipv6_prefix_length: int = Field(default=64, ge=32, le=128)
    lease_ttl_seconds: float = Field(default=60, gt=0, le=DAY)
    store_timeout_ms: float = Field(default=50, gt=0, le=10_000)
    store_on_error: Literal["deny", "allow"] = "deny"
    store_breaker: StoreBreaker = Field(default_factory=StoreBreaker)
    max_token_bytes: int = Field(default=8192, ge=256, le=65536)
    token_cache_size: int = Field(default=10_000, ge=0, le=10_000_000)
    # Remembered plain-HTTP allows (extauth/memo.py); 0 disables the memo.
    allow_memo_size: int = Field(default=10_000, ge=0, le=10_000_000)
    admin_listen: str = "127.0.0.1:9002"
    admin_token_env: str = "EXTAUTH_ADMIN_TOKEN"
    admin_tls: AdminTls | None = None
    metrics_listen: str | None = None
    # How often active leases are counted in the store for the gauge (a SCAN on Redis).
    metrics_sample_seconds: float = Field(default=5.0, ge=0.1, le=3600)
    abuse: Abuse = Field(default_factory=Abuse)
    drain_seconds: float = Field(default=5.0, ge=0, le=300)
    watch_config: bool = True
    # uvloop when installed (extauth/eventloop.py says why), or asyncio's own loop.
    event_loop: EventLoop = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    policies: list[Policy] = Field(min_length=1)

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


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = e["msg"].removeprefix("Value error, ")
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
    policies = []
    for p in cfg.policies:
        if p.jwt and p.jwt.jwks_file and not os.path.isabs(p.jwt.jwks_file):
            jwt = p.jwt.model_copy(update={"jwks_file": str(base_dir / p.jwt.jwks_file)})
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
