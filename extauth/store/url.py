"""Redis store URLs, parsed without connecting: the config validates ``store`` with this, so
``extauth check-config`` refuses a URL ``serve`` could not use, and the client is built from
the same parse (``extauth.store.redis.client_from_url``).

Error messages never quote the URL: it may hold a password.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
_TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                          "ssl_check_hostname", "ssl_ca_data", "ssl_ciphers"})


@dataclass(frozen=True)
class RedisUrl:
    tls: bool
    cluster: bool
    nodes: tuple[tuple[str, int], ...]
    db: int  # always 0 on a cluster
    username: str | None  # from the URL only; the client adds the environment's
    password: str | None
    tls_options: Mapping[str, Any]  # redis-py keyword arguments


def parse_redis_url(url: str) -> RedisUrl:
    """Raises ValueError naming what is wrong."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in REDIS_SCHEMES:
        raise ValueError(f"not a Redis URL: {scheme}://")
    tls = scheme.startswith("rediss")
    cluster = scheme.endswith("+cluster")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user_raw, sep, pass_raw = userinfo.partition(":")
        username = unquote(user_raw) or None
        password = unquote(pass_raw) if sep else None
    tls_options = _tls_options(parse_qs(parts.query, keep_blank_values=False))
    if tls_options and not tls:
        raise ValueError("ssl_* options need rediss:// or rediss+cluster://")
    nodes = _hostports(hosts)
    if cluster:
        if parts.path not in ("", "/"):
            raise ValueError("a Redis Cluster has no database number")
        db = 0
    else:
        if len(nodes) != 1:
            raise ValueError("several hosts need redis+cluster:// (or rediss+cluster://)")
        db_text = parts.path.strip("/") or "0"
        if not db_text.isdigit() or len(db_text) > 5:
            raise ValueError(f"bad database number {db_text[:16]!r}")
        db = int(db_text)
    return RedisUrl(tls, cluster, tuple(nodes), db, username, password, MappingProxyType(tls_options))


def _tls_options(query: dict[str, list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in query.items():
        if name not in _TLS_OPTIONS:
            allowed = ", ".join(sorted(_TLS_OPTIONS))
            raise ValueError(f"unknown store URL option {name!r} (allowed: {allowed})")
        value = values[-1]
        if name == "ssl_check_hostname":
            out[name] = value.lower() in ("1", "true", "yes", "on")
        elif name == "ssl_cert_reqs":
            if value not in ("none", "optional", "required"):
                raise ValueError("ssl_cert_reqs must be none, optional or required")
            out[name] = value
        else:
            out[name] = value
    return out


def _hostports(netloc_hosts: str) -> list[tuple[str, int]]:
    out = []
    for part in netloc_hosts.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [v6]:port
            host, _, rest = part[1:].partition("]")
            port = rest.removeprefix(":") or "6379"
        else:
            host, _, port = part.partition(":")
            port = port or "6379"
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"bad store host {part!r}: expected HOST:PORT with a port from 1 to 65535")
        out.append((host, int(port)))
    if not out:
        raise ValueError("the store URL names no host")
    return out
