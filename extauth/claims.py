"""Claim rules: which verified tokens a policy admits, by the values of their claims.

Compiled once per runtime from a policy's ``claim_rules``; evaluating them is a pure function
of the claims, the method and the path, so a verified-token cache hit or a remembered allow
never outlives a rule's answer. Anything not of the expected shape (a wrong type, a list or a
string over the bounds below, an object where a value is expected) fails the check: a denial,
never an error.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

__all__ = ["MAX_CLAIM_ITEMS", "MAX_CLAIM_TEXT", "MAX_METADATA_BYTES", "ClaimRules", "ClaimSelector",
           "claim_at", "compile_rules", "split_path"]

# Bounds on what a check reads from one claim; beyond them the check fails. A token is at
# most max_token_bytes, so these bound the work per check well below it.
MAX_CLAIM_ITEMS = 1024
MAX_CLAIM_TEXT = 16384
# Claim paths are at most this deep (config-checked): the walk is bounded whatever the token.
MAX_PATH_DEPTH = 8

Scalar = str | int | bool
Check = Callable[[Mapping[str, Any]], bool]
_MISSING = object()


def split_path(claim: str | Sequence[str]) -> tuple[str, ...]:
    """``"realm_access.roles"`` -> ("realm_access", "roles"); a list gives the segments as
    they are (for claim names with dots, such as ``https://example.com/roles``)."""
    return tuple(claim.split(".")) if isinstance(claim, str) else tuple(claim)


def claim_at(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path``, or ``_MISSING``; walks objects only."""
    value: Any = claims
    for key in path:
        if not isinstance(value, Mapping):
            return _MISSING
        value = value.get(key, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _same(a: Any, b: Scalar) -> bool:
    # Type-exact: "1" is not 1, and true is not 1 (bool is an int in Python).
    return type(a) is type(b) and a == b


def _items(value: Any) -> Sequence[str] | None:
    """The strings a claim holds: a space-delimited string (OAuth ``scope``, RFC 6749 §3.3)
    or an array of strings (``roles``, ``groups``); None for anything else or over bounds."""
    if isinstance(value, str):
        if len(value) > MAX_CLAIM_TEXT:
            return None
        return value.split()
    if isinstance(value, list):
        if len(value) > MAX_CLAIM_ITEMS:
            return None
        for item in value:
            if not isinstance(item, str) or len(item) > MAX_CLAIM_TEXT:
                return None
        return value
    return None


def _getter(path: tuple[str, ...]) -> Callable[[Mapping[str, Any]], Any]:
    if len(path) == 1:
        key = path[0]
        return lambda claims: claims.get(key, _MISSING)
    return lambda claims: claim_at(claims, path)


def _equals(path: tuple[str, ...], expected: Scalar) -> Check:
    get = _getter(path)

    def check(claims: Mapping[str, Any]) -> bool:
        return _same(get(claims), expected)
    return check


def _one_of(path: tuple[str, ...], allowed: Sequence[Scalar]) -> Check:
    typed = frozenset((type(v), v) for v in allowed)
    get = _getter(path)

    def check(claims: Mapping[str, Any]) -> bool:
        value = get(claims)
        if not isinstance(value, str | int) or (isinstance(value, str) and len(value) > MAX_CLAIM_TEXT):
            return False
        return (type(value), value) in typed
    return check


def _contains(path: tuple[str, ...], wanted: Sequence[str], *, every: bool) -> Check:
    required = tuple(dict.fromkeys(wanted))
    get = _getter(path)

    def check(claims: Mapping[str, Any]) -> bool:
        items = _items(get(claims))
        if items is None:
            return False
        held = frozenset(items) if len(items) > 8 else items
        for r in required:
            if (r in held) is not every:
                return not every
        return every
    return check


def compile_check(spec: Mapping[str, Any]) -> Check:
    """One check from its config form: ``claim`` and exactly one of ``equals``, ``one_of``,
    ``contains_all``, ``contains_any`` (the config schema guarantees the shape)."""
    path = split_path(spec["claim"])
    if "equals" in spec:
        return _equals(path, spec["equals"])
    if "one_of" in spec:
        return _one_of(path, spec["one_of"])
    if "contains_all" in spec:
        return _contains(path, spec["contains_all"], every=True)
    return _contains(path, spec["contains_any"], every=False)


def normalized_path(path: str) -> str:
    """The path as an upstream that decodes and resolves it would see it, for scoping rules:
    ``/%61dmin/../admin//x`` is ``/admin/x``."""
    decoded = unquote(path, errors="replace").replace("\\", "/")
    resolved = posixpath.normpath(decoded) if decoded else "/"
    if resolved.startswith("//"):  # normpath keeps a leading "//"
        resolved = "/" + resolved.lstrip("/")
    return resolved + ("/" if decoded.endswith("/") and resolved != "/" else "")


@dataclass(frozen=True, slots=True)
class _Rule:
    path_prefix: str | None
    methods: frozenset[str]
    all_of: tuple[Check, ...]
    any_of: tuple[Check, ...]

    def holds(self, claims: Mapping[str, Any]) -> bool:
        for check in self.all_of:
            if not check(claims):
                return False
        if not self.any_of:
            return True
        for check in self.any_of:  # noqa: SIM110 (a loop, not any(): no generator per check)
            if check(claims):
                return True
        return False


class ClaimRules:
    """A policy's compiled claim rules: ``allows`` is True when every rule that applies to the
    request holds for the claims."""

    __slots__ = ("_rules", "_scoped")

    def __init__(self, rules: tuple[_Rule, ...]) -> None:
        self._rules = rules
        self._scoped = any(r.path_prefix is not None or r.methods for r in rules)

    @property
    def scoped(self) -> bool:
        """Whether the answer depends on the method or the path (then a remembered allow must
        key on them too)."""
        return self._scoped

    def __bool__(self) -> bool:
        return bool(self._rules)

    def allows(self, claims: Mapping[str, Any], method: str, path: str) -> bool:
        normalized: str | None = None
        for rule in self._rules:
            if rule.methods and method.upper() not in rule.methods:
                continue
            prefix = rule.path_prefix
            if prefix is not None and not path.startswith(prefix):
                # A rule only adds requirements: scoped by the raw path or the normalized one,
                # whichever matches, so an encoded or dotted spelling cannot step around it.
                if normalized is None:
                    normalized = normalized_path(path)
                if not normalized.startswith(prefix):
                    continue
            if not rule.holds(claims):
                return False
        return True


def compile_rules(specs: Sequence[Mapping[str, Any]]) -> ClaimRules:
    """Rules from their config form (``Policy.claim_rules`` dumped to plain data)."""
    rules = []
    for spec in specs:
        rules.append(_Rule(
            path_prefix=spec.get("path_prefix"),
            methods=frozenset(m.upper() for m in spec.get("methods") or ()),
            all_of=tuple(compile_check(c) for c in spec.get("all_of") or ()),
            any_of=tuple(compile_check(c) for c in spec.get("any_of") or ()),
        ))
    return ClaimRules(tuple(rules))


# What the claims in one allow's metadata may add up to (their JSON form), and per value.
MAX_METADATA_BYTES = 4096
_MAX_METADATA_ITEMS = 64
_MAX_METADATA_TEXT = 1024


def _metadata_value(value: Any) -> Any:
    """A claim as a metadata value: a string, a finite number, a boolean, or a list of those;
    None for anything else (objects, over the bounds)."""
    if isinstance(value, bool) or (isinstance(value, int) and -2**53 <= value <= 2**53):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        return value if len(value) <= _MAX_METADATA_TEXT else None
    if isinstance(value, list) and len(value) <= _MAX_METADATA_ITEMS:
        items = [_metadata_value(v) for v in value]
        if all(i is not None and not isinstance(i, list) for i in items):
            return items
    return None


class ClaimSelector:
    """The claims a policy hands to Envoy in its allow's dynamic metadata, bounded in size:
    a claim that is missing, of another shape or past the budget is left out."""

    __slots__ = ("_paths",)

    def __init__(self, claims: Sequence[str | Sequence[str]]) -> None:
        self._paths = tuple((c if isinstance(c, str) else ".".join(c), split_path(c)) for c in claims)

    def __bool__(self) -> bool:
        return bool(self._paths)

    def select(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        budget = MAX_METADATA_BYTES
        for name, path in self._paths:
            value = _metadata_value(claim_at(claims, path))
            if value is None:
                continue
            size = len(name) + len(json.dumps(value, ensure_ascii=False).encode())
            if size > budget:
                continue
            budget -= size
            out[name] = value
        return out
