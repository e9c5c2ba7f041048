"""Policy selection: Envoy's per-route ``context_extensions`` first, then host/path matching."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

from extauth.config import Match


class _HasMatch(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def match(self) -> Match | None: ...


P = TypeVar("P", bound=_HasMatch)


def split_host(host: str) -> str:
    """Host without its port, lower-case ("[::1]:80" -> "[::1]")."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _matches(match: Match, host: str, path: str) -> bool:
    if match.hosts:
        bare = split_host(host)
        full = host.strip().lower()
        if bare not in match.hosts and full not in match.hosts:
            return False
    return path.startswith(match.path_prefix)


def select_policy(
    policies: Sequence[P], by_name: Mapping[str, P], context: Mapping[str, str], host: str, path: str
) -> P | None:
    """The policy named by the route, else the first whose match fits, else None (no_policy).

    A route that names an unknown policy gets None rather than falling through to
    matching: a typo in the Envoy config must deny, not pick some other policy.
    """
    name = context.get("policy")
    if name is not None:
        return by_name.get(name)
    for p in policies:
        if p.match is not None and _matches(p.match, host, path):
            return p
    return None
