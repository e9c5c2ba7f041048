"""Origin allow lists compared in canonical form (RFC 6454 serialization).

A browser sends ``Origin`` on every WebSocket upgrade; that header is the only
defence against Cross-Site WebSocket Hijacking, because cookies ride along on
cross-site upgrades. So the comparison is exact: the header must be one
well-formed serialized origin, it is canonicalized (lower-case scheme and host,
default port dropped), and then looked up. No substring search and no hostname
extraction, which is how ``https://example.com.evil.net`` slips through elsewhere.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# scheme "://" host [":" port], nothing else: no path, userinfo, query or spaces.
_ORIGIN_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(\[[0-9A-Fa-f:.]+\]|[^\[\]/:@?#\s,]+)(?::([0-9]{1,5}))?$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    def serialize(self) -> str:
        if _DEFAULT_PORTS.get(self.scheme) == self.port:
            return f"{self.scheme}://{self.host}"
        return f"{self.scheme}://{self.host}:{self.port}"


def _canonical_host(raw: str) -> str | None:
    host = raw.lower()
    if host.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return None
    if host.endswith("."):
        return None  # "example.com." is a different origin to a browser; refuse it
    labels = host.split(".")
    if not all(_LABEL_RE.match(label) for label in labels):
        return None
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            return None
    return host


def parse_origin(value: str) -> Origin | None:
    """Parse one serialized origin; None for anything that is not exactly one."""
    m = _ORIGIN_RE.match(value)
    if m is None:
        return None
    scheme = m.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    host = _canonical_host(m.group(2))
    if host is None:
        return None
    port_text = m.group(3)
    port = int(port_text) if port_text is not None else _DEFAULT_PORTS[scheme]
    if not 0 < port <= 65535:
        return None
    return Origin(scheme, host, port)


@dataclass(frozen=True, slots=True)
class _Wildcard:
    scheme: str
    suffix: str  # ".example.com": matches one or more labels in front of it
    port: int


def parse_origin_pattern(pattern: str) -> Origin | _Wildcard | None:
    """Validate a configured allow-list entry; raises ValueError when invalid.

    Returns None for the literal ``null`` (opaque origins, sandboxed frames).
    """
    if pattern == "null":
        return None
    wildcard = "://*." in pattern
    text = pattern.replace("://*.", "://", 1) if wildcard else pattern
    origin = parse_origin(text)
    if origin is None or "*" in text:
        raise ValueError(
            f"bad origin {pattern!r}: use scheme://host[:port], optionally scheme://*.domain, or null"
        )
    if wildcard:
        if origin.host.startswith("[") or "." not in origin.host:
            raise ValueError(f"bad origin {pattern!r}: a wildcard needs a domain with at least two labels")
        return _Wildcard(origin.scheme, "." + origin.host, origin.port)
    return origin


# Distinct Origin values seen in practice are few (your own sites), so verdicts
# are memoized; the bound keeps a flood of random origins from growing memory.
_MEMO_MAX = 4096
# No origin is longer: scheme, "://", a 253-character DNS name and ":65535". Longer values
# are refused without being remembered, so the memo's size is bounded in bytes too (Envoy
# accepts header values of up to 60 KiB).
_MAX_ORIGIN_CHARS = 300


class OriginPolicy:
    """An allow list compiled once per config."""

    __slots__ = ("_allow_null", "_exact", "_memo", "_wildcards")

    def __init__(self, patterns: list[str]) -> None:
        self._exact: frozenset[str] = frozenset()
        exact: set[str] = set()
        self._wildcards: tuple[_Wildcard, ...] = ()
        wildcards: list[_Wildcard] = []
        self._allow_null = False
        for p in patterns:
            parsed = parse_origin_pattern(p)
            if parsed is None:
                self._allow_null = True
            elif isinstance(parsed, _Wildcard):
                wildcards.append(parsed)
            else:
                exact.add(parsed.serialize())
        self._exact = frozenset(exact)
        self._wildcards = tuple(wildcards)
        self._memo: dict[str, bool] = {}

    def allows(self, header_value: str) -> bool:
        """True only for exactly one well-formed origin on the list."""
        verdict = self._memo.get(header_value)
        if verdict is None:
            if len(header_value) > _MAX_ORIGIN_CHARS:
                return False
            verdict = self._decide(header_value)
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[header_value] = verdict
        return verdict

    def _decide(self, header_value: str) -> bool:
        if header_value == "null":
            return self._allow_null
        origin = parse_origin(header_value)
        if origin is None:
            return False
        if origin.serialize() in self._exact:
            return True
        for w in self._wildcards:
            if (
                origin.scheme == w.scheme
                and origin.port == w.port
                and origin.host.endswith(w.suffix)
                and len(origin.host) > len(w.suffix)
            ):
                return True
        return False


# A token's own list of allowed origins (``origins_claim``, Keycloak's ``allowed-origins``) is
# read up to this many entries; a longer list, or anything but a list, allows none.
MAX_CLAIM_ORIGINS = 256
_ENTRY_MEMO: dict[str, str | None] = {}


def _claim_entry(entry: str) -> str | None:
    """A claim entry's canonical form when it is exactly one origin: no wildcard, no ``null``,
    no path; None for junk (refused, never matched)."""
    canonical = _ENTRY_MEMO.get(entry, "")
    if canonical == "":
        parsed = parse_origin(entry) if len(entry) <= _MAX_ORIGIN_CHARS else None
        canonical = parsed.serialize() if parsed is not None else None
        if len(entry) <= _MAX_ORIGIN_CHARS:
            if len(_ENTRY_MEMO) >= _MEMO_MAX:
                _ENTRY_MEMO.clear()
            _ENTRY_MEMO[entry] = canonical
    return canonical


def claim_allows(header_value: str, entries: object) -> bool:
    """True when ``header_value`` is one well-formed origin equal, in canonical form, to a
    valid entry of a token's origins claim (a list of strings; junk entries never match)."""
    if not isinstance(entries, list) or len(entries) > MAX_CLAIM_ORIGINS:
        return False
    if len(header_value) > _MAX_ORIGIN_CHARS:
        return False
    origin = parse_origin(header_value)
    if origin is None:
        return False
    wanted = origin.serialize()
    return any(isinstance(e, str) and _claim_entry(e) == wanted for e in entries)
