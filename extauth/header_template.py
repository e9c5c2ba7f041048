"""Upstream header templates: ``"{sub}"`` or ``"tenant-{org.id}"`` rendered from a token's claims.

Claims are attacker-influenced text: a value that is missing, not a scalar (or a list of
them), not printable or too long empties the header rather than half-filling it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_FIELD_RE = re.compile(r"\{([^{}]*)\}")
_MAX_HEADER_VALUE = 1024


def _claim_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return ",".join(str(v) for v in value)
    return ""


class Template:
    """One header value's template, parsed once; dotted names walk claim objects."""

    __slots__ = ("_only", "_parts")

    def __init__(self, text: str) -> None:
        # (literal text, None) or ("", the claim path of a {field})
        parts: list[tuple[str, tuple[str, ...] | None]] = []
        pos = 0
        for m in _FIELD_RE.finditer(text):
            if m.start() > pos:
                parts.append((text[pos : m.start()], None))
            parts.append(("", tuple(m.group(1).split("."))))
            pos = m.end()
        if pos < len(text):
            parts.append((text[pos:], None))
        self._parts = tuple(parts)
        # "{sub}", the usual identity header: one lookup.
        path = parts[0][1] if len(parts) == 1 else None
        self._only = path[0] if path is not None and len(path) == 1 else None

    def render(self, claims: Mapping[str, Any]) -> str:
        """The header value for ``claims``; "" when a field is missing or unsafe."""
        if self._only is not None:
            only = claims.get(self._only)
            if isinstance(only, str) and only.isprintable() and 0 < len(only) <= _MAX_HEADER_VALUE:
                return only
        out = []
        for literal, path in self._parts:
            if path is None:
                out.append(literal)
                continue
            value: Any = claims
            for key in path:
                value = value.get(key) if isinstance(value, Mapping) else None
            rendered = _claim_text(value)
            if not rendered:
                return ""
            out.append(rendered)
        result = "".join(out)
        if not result.isprintable() or len(result) > _MAX_HEADER_VALUE:
            return ""
        return result
