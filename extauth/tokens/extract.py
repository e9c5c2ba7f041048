"""Where a bearer token travels, and how it is stripped before the upstream sees it.

Transports (configured per policy, first present wins):
- ``query:NAME``: ``wss://host/ws?NAME=<jwt>``; removed with query_parameters_to_remove.
  Envoy removes a parameter by its raw key, so a key an upstream parser reads as NAME
  but that is not NAME (``name_aliases``: ``?%74oken=``, ``?Token=``, ``?token[]=``,
  ``?token.x=``), or that hides NAME after a ';' (``?x=1;token=<jwt>``, read by
  upstreams that also split on ';'), could not be stripped: it is denied (bad_handshake).
  So is a path parameter (``/ws;token=<jwt>``, in any segment) named like a query or
  cookie source: Envoy cannot strip those at all.
- ``header:NAME``: ``Authorization: Bearer <jwt>`` (the scheme is required for
  ``authorization``; other headers carry the bare token); removed with headers_to_remove,
  and so are the spellings with '_' for '-' (``x_token``), which CGI-style upstreams
  (PHP, WSGI) read as the same header.
- ``cookie:NAME``: the cookie is cut out of the Cookie header, other cookies stay
  (every configured cookie name is cut in one edit of the header). A cookie an
  upstream parser could read as NAME (``name_aliases``: ``Name=``, ``access.token=``,
  ``access%5Ftoken=``, ``access_token[]=``; or NAME after whitespace or ',' inside
  another cookie) is denied (bad_handshake).
- ``subprotocol``: the browser-friendly transport, since a browser cannot set
  headers on a WebSocket: ``Sec-WebSocket-Protocol: app.v1, bearer.<jwt>``. The
  ``bearer.`` entry is removed and only the real protocols are forwarded, so the
  upstream selects one of them and never sees the token.

Every configured transport that is present is stripped, not just the one used,
so a second copy of a credential can never reach the upstream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_plus

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
    # None: no configured transport carried one. Never in a repr: a debug print must not leak it.
    token: str | None = field(repr=False)
    source: str | None  # "query", "header", "cookie" or "subprotocol"
    stripping: Stripping


class ExtractDenied(DenyError):
    """A denial found while extracting, with the edits that strip every credential copy
    seen so far (a shadow policy forwards the request, and must still strip them)."""

    def __init__(self, reason: Reason, detail: str, stripping: Stripping) -> None:
        super().__init__(reason, detail)
        self.stripping = stripping


def _unquote(text: str) -> str:
    # unquote() is costly on an 800-byte JWT that never holds a '%'.
    return unquote(text) if "%" in text else text


# PHP turns '.', ' ' and an unclosed '[' in a variable name into '_' (``access.token`` is
# read as ``access_token``).
def _php(name: str) -> str:
    return name.replace(".", "_").replace(" ", "_").replace("[", "_")


def name_aliases(key: str, name: str) -> bool:
    """Whether a common parser could read the raw query key or cookie name ``key`` as the
    lower-case ``name``: decoded (``%74oken``, '+' as ' '), in another case (``Token``), as an
    array or object under it (``token[]``, ``token[0]``, ``token[x]``: PHP, Rails, Node's
    ``qs``; ``token.x``: ``qs`` with allowDots), or by PHP's '_' for '.', ' ' and '['
    (``access.token``, ``access[token``). True for ``name`` itself too."""
    k = unquote_plus(key) if ("%" in key or "+" in key) else key
    k = k.strip().lower()
    if k == name:
        return True
    base = k.partition("[")[0]
    if base == name or base.partition(".")[0] == name:
        return True
    target = _php(name)
    return _php(base) == target or _php(k) == target


def _may_alias(text: str, name: str) -> bool:
    """A cheap test that ``text`` holds no key ``name_aliases`` could match to ``name``."""
    low = text.lower()
    return "%" in low or "+" in low or _php(name) in _php(low)


def _query_values(query: str, name: str) -> tuple[list[str], list[str]]:
    """Values of parameter ``name`` and the aliases of ``name``: other raw keys a parser reads
    as it (``name_aliases``), or a ``name`` hidden after a ';' inside another parameter
    (``x=1;token=``). Envoy strips by raw key between '&' only, and an upstream may decode
    keys, ignore their case, build arrays or also split on ';' (Rack 2, older parse_qs), so
    an alias could carry a credential past the stripping. An alias is reported by the raw
    key Envoy sees for its piece."""
    folded = name.lower()
    if not _may_alias(query, folded):
        return [], []
    out: list[str] = []
    aliases: list[str] = []
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        if key == name:
            if sep:
                out.append(_unquote(value))
        elif name_aliases(key, folded) or (
            ";" in part
            and any(name_aliases(p.partition("=")[0], folded) for p in part.split(";")[1:])
        ):
            aliases.append(key)
    return out, aliases


def _path_parameter_alias(path: str, names: tuple[str, ...]) -> str | None:
    """The configured name a path parameter (``/ws;token=x``, in any segment) aliases, if any.
    Servlet containers and matrix-variable frameworks read these, and Envoy strips none."""
    if ";" not in path:
        return None
    for segment in path.split("/"):
        for param in segment.split(";")[1:]:
            key = param.partition("=")[0]
            for name in names:
                if name_aliases(key, name):
                    return name
    return None


def _bearer(value: str) -> str | None:
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not rest.strip():
        return None
    return rest.strip()


def _cookie_aliases(key: str, pair: str, names: frozenset[str]) -> list[str]:
    """The configured names an upstream parser could read out of ``pair`` (named ``key``)."""
    low = pair.lower()
    hits: list[str] = []
    for name in names:
        folded = name.lower()
        if not _may_alias(pair, folded):
            continue
        if name_aliases(key, folded) or re.search(r"[\s,]" + re.escape(folded) + r"\s*=", low):
            hits.append(name)
    return hits


def _cookie_split(header: str, names: frozenset[str]) -> tuple[dict[str, list[str]], list[str], set[str]]:
    """Values of every cookie in ``names``, the remaining ``k=v`` pairs, and the names
    that a remaining pair aliases.

    Upstream parsers read more out of a pair than extauth's ';' split does: SimpleCookie
    also splits on whitespace (``theme=dark access_token=``), RFC 2109 parsers on ','
    (``theme=dark, access_token=``), some frameworks ignore the name's case
    (``Access_Token=``), PHP decodes names and maps '.' and '[' to '_' or builds arrays
    (``access.token=``, ``access%5Ftoken=``, ``access_token[]=``). Such a pair could carry a
    credential extauth never verified past the cut, so it is reported as an alias and cut
    too, not kept."""
    found: dict[str, list[str]] = {}
    kept: list[str] = []
    aliased: set[str] = set()
    for pair in header.split(";"):
        pair = pair.strip()
        if not pair:
            continue
        key, _, value = pair.partition("=")
        key = key.strip()
        if key in names:
            found.setdefault(key, []).append(value.strip().strip('"'))
        elif hits := _cookie_aliases(key, pair, names):
            aliased.update(hits)
        else:
            kept.append(pair)
    return found, kept, aliased


class TokenSources:
    """A compiled ``token_sources`` list."""

    __slots__ = ("_cookie_names", "_header_aliases", "_parameter_names", "_sources")

    def __init__(self, sources: Sequence[str]) -> None:
        parsed: list[tuple[str, str]] = []
        for s in sources:
            kind, _, name = s.partition(":")
            parsed.append((kind, name.lower() if kind == "header" else name))
        self._sources = tuple(parsed)
        self._cookie_names = frozenset(name for kind, name in parsed if kind == "cookie")
        # Names a path parameter must not alias: those an upstream reads from parameters.
        self._parameter_names = tuple(dict.fromkeys(
            name.lower() for kind, name in parsed if kind in ("query", "cookie")))
        self._header_aliases = tuple(dict.fromkeys(
            alias for kind, name in parsed if kind == "header" for alias in _underscored(name)))

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

    @property
    def reads_path_parameters(self) -> bool:
        """Whether ``extract`` reads the path: its parameters may alias a query or cookie name."""
        return bool(self._parameter_names)

    def extract(self, headers: Mapping[str, str], query: str, path: str = "") -> Extracted:
        """Find the token and the edits that strip all credential copies.

        A transport that carries two different values is ambiguous: deny as
        malformed rather than guess which one the upstream would have used. A
        query key, cookie or path parameter (in ``path``, without the query) that an
        upstream could read as a configured name, but that is not it, cannot be stripped:
        deny as a bad handshake. A denial (ExtractDenied) still carries the edits that strip
        every credential copy seen.
        """
        token: str | None = None
        used: str | None = None
        # A header's '_' spellings go on every allow, present or not: the allow memo keys on
        # the credential headers only, and must answer every request alike.
        strip = Stripping(headers_to_remove=list(self._header_aliases))
        denial: tuple[Reason, str] | None = None
        if path and self._parameter_names:
            aliased = _path_parameter_alias(path, self._parameter_names)
            if aliased is not None:
                denial = (Reason.BAD_HANDSHAKE, f"a path parameter aliases {aliased!r}")
        cookies: dict[str, list[str]] | None = None
        cookie_aliases: set[str] = set()
        for kind, name in self._sources:
            if kind == "cookie":
                if cookies is None:  # every configured cookie, cut in one edit
                    cookies, cookie_aliases = self._cookies(headers, strip)
                values = [v for v in cookies.get(name, ()) if v]
                if name in cookie_aliases:
                    why = f"a cookie aliases {name!r} (case-changed, or after whitespace or ',')"
                    denial = denial or (Reason.BAD_HANDSHAKE, why)
            elif kind == "query":
                values, aliases = _query_values(query, name) if query else ([], [])
                if values:
                    strip.query_params_to_remove.append(name)
                    # An empty ``?token=`` is stripped but, like an empty cookie or header, is
                    # no token: it must not hide a token in a later transport.
                    values = [v for v in values if v]
                if aliases:
                    strip.query_params_to_remove.extend(aliases)
                    why = f"a query key aliases {name!r} (encoded, case-changed or after ';')"
                    denial = denial or (Reason.BAD_HANDSHAKE, why)
            else:
                values = self._values(kind, name, headers, strip)
            if not values:
                continue
            if len(set(values)) > 1:
                denial = denial or (Reason.TOKEN_MALFORMED, f"{kind} carries several tokens")
            if token is None:
                token, used = values[0], kind
        if denial is not None:
            raise ExtractDenied(denial[0], denial[1], strip)
        return Extracted(token, used, strip)

    def _cookies(self, headers: Mapping[str, str], strip: Stripping) -> tuple[dict[str, list[str]], set[str]]:
        """Values of every configured cookie and the names aliased by another cookie, all
        cut out of the Cookie header in one edit."""
        if not self._cookie_names:
            return {}, set()
        raw = headers.get("cookie")
        if raw is None:
            return {}, set()
        found, kept, aliased = _cookie_split(raw, self._cookie_names)
        if not found and not aliased:
            return {}, set()
        if kept:
            strip.headers_to_set["cookie"] = "; ".join(kept)
        else:
            strip.headers_to_remove.append("cookie")
        return found, aliased

    @staticmethod
    def _values(kind: str, name: str, headers: Mapping[str, str], strip: Stripping) -> list[str]:
        if kind == "header":
            raw = headers.get(name)
            if raw is None:
                return []
            strip.headers_to_remove.append(name)
            value = _bearer(raw) if name == "authorization" else raw.strip()
            return [value] if value else []
        return _subprotocol_values(headers, strip)


# A header name with more '-' and '_' than this gets only its all-'_' and all-'-' spellings
# stripped (there are 2^n).
_MAX_DASHES = 4


def _underscored(name: str) -> list[str]:
    """Every other spelling of header ``name`` with '_' and '-' swapped at some of their places
    (``x_token`` for ``x-token``): CGI-style upstreams (PHP, WSGI's ``HTTP_X_TOKEN``) read
    them all as one header."""
    parts = re.split(r"[-_]", name)
    seps = len(parts) - 1
    if seps == 0:
        return []
    if seps > _MAX_DASHES:
        return [s for s in (name.replace("-", "_"), name.replace("_", "-")) if s != name]
    out = []
    for mask in range(2 ** seps):
        spelled = parts[0]
        for i, part in enumerate(parts[1:]):
            spelled += ("_" if mask >> i & 1 else "-") + part
        if spelled != name:
            out.append(spelled)
    return out


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
