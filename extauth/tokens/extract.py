"""Where a bearer token travels, and how it is stripped before the upstream sees it.

Transports (configured per policy, first present wins):
- ``query:NAME``: ``wss://host/ws?NAME=<jwt>``; removed with query_parameters_to_remove.
- ``header:NAME``: ``Authorization: Bearer <jwt>`` (the scheme is required for
  ``authorization``; other headers carry the bare token); removed with headers_to_remove.
- ``cookie:NAME``: the cookie is cut out of the Cookie header, other cookies stay.
- ``subprotocol``: the browser-friendly transport, since a browser cannot set
  headers on a WebSocket: ``Sec-WebSocket-Protocol: app.v1, bearer.<jwt>``. The
  ``bearer.`` entry is removed and only the real protocols are forwarded, so the
  upstream selects one of them and never sees the token.

Every configured transport that is present is stripped, not just the one used,
so a second copy of a credential can never reach the upstream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

from extauth.reasons import DenyError, Reason

SUBPROTOCOL_PREFIX = "bearer."


@dataclass(slots=True)
class Stripping:
    """Edits to the upstream request that remove every credential copy."""

    headers_to_remove: list[str] = field(default_factory=list)
    headers_to_set: dict[str, str] = field(default_factory=dict)
    query_params_to_remove: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Extracted:
    token: str | None  # None: no configured transport carried one
    source: str | None  # "query", "header", "cookie" or "subprotocol"
    stripping: Stripping


def _unquote(text: str) -> str:
    # unquote() is costly on an 800-byte JWT that never holds a '%'.
    return unquote(text) if "%" in text else text


def _query_values(query: str, name: str) -> list[str]:
    if name not in query and "%" not in query:
        return []
    out = []
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        if sep and _unquote(key) == name:
            out.append(_unquote(value))
    return out


def _bearer(value: str) -> str | None:
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not rest.strip():
        return None
    return rest.strip()


def _cookie_split(header: str, name: str) -> tuple[list[str], list[str]]:
    """Values of cookie ``name`` and the remaining ``k=v`` pairs."""
    found, kept = [], []
    for pair in header.split(";"):
        pair = pair.strip()
        if not pair:
            continue
        key, _, value = pair.partition("=")
        if key.strip() == name:
            found.append(value.strip().strip('"'))
        else:
            kept.append(pair)
    return found, kept


class TokenSources:
    """A compiled ``token_sources`` list."""

    __slots__ = ("_sources",)

    def __init__(self, sources: Sequence[str]) -> None:
        parsed: list[tuple[str, str]] = []
        for s in sources:
            kind, _, name = s.partition(":")
            parsed.append((kind, name.lower() if kind == "header" else name))
        self._sources = tuple(parsed)

    def inputs(self) -> tuple[tuple[str, ...], bool]:
        """Every header ``extract`` reads (lower-case) and whether it reads the query string."""
        headers: list[str] = []
        for kind, name in self._sources:
            if kind == "header":
                headers.append(name)
            elif kind == "cookie":
                headers.append("cookie")
            elif kind == "subprotocol":
                headers.append("sec-websocket-protocol")
        return tuple(dict.fromkeys(headers)), any(kind == "query" for kind, _ in self._sources)

    def extract(self, headers: Mapping[str, str], query: str) -> Extracted:
        """Find the token and the edits that strip all credential copies.

        A transport that carries two different values is ambiguous: deny as
        malformed rather than guess which one the upstream would have used.
        """
        token: str | None = None
        used: str | None = None
        strip = Stripping()
        for kind, name in self._sources:
            values = self._values(kind, name, headers, query, strip)
            if not values:
                continue
            if len(set(values)) > 1:
                raise DenyError(Reason.TOKEN_MALFORMED, f"{kind} carries several tokens")
            if token is None:
                token, used = values[0], kind
        return Extracted(token, used, strip)

    @staticmethod
    def _values(kind: str, name: str, headers: Mapping[str, str], query: str, strip: Stripping) -> list[str]:
        if kind == "query":
            values = _query_values(query, name) if query else []
            if values:
                strip.query_params_to_remove.append(name)
            return values
        if kind == "header":
            raw = headers.get(name)
            if raw is None:
                return []
            strip.headers_to_remove.append(name)
            value = _bearer(raw) if name == "authorization" else raw.strip()
            return [value] if value else []
        if kind == "cookie":
            return _cookie_values(headers, name, strip)
        return _subprotocol_values(headers, strip)


def _cookie_values(headers: Mapping[str, str], name: str, strip: Stripping) -> list[str]:
    raw = headers.get("cookie")
    if raw is None:
        return []
    found, kept = _cookie_split(raw, name)
    if not found:
        return []
    if kept:
        strip.headers_to_set["cookie"] = "; ".join(kept)
    else:
        strip.headers_to_remove.append("cookie")
    return [v for v in found if v]


def _subprotocol_values(headers: Mapping[str, str], strip: Stripping) -> list[str]:
    raw = headers.get("sec-websocket-protocol")
    if raw is None:
        return []
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    tokens = [e[len(SUBPROTOCOL_PREFIX):] for e in entries if e.lower().startswith(SUBPROTOCOL_PREFIX)]
    if not tokens:
        return []
    kept = [e for e in entries if not e.lower().startswith(SUBPROTOCOL_PREFIX)]
    if kept:
        strip.headers_to_set["sec-websocket-protocol"] = ", ".join(kept)
    else:
        strip.headers_to_remove.append("sec-websocket-protocol")
    return tokens
