"""The request as the pipeline sees it: a plain, Envoy-independent value.

``extauth.envoy_api`` builds it from a CheckRequest; tests and benchmarks build it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


# Not frozen, though never changed: it is built on every check, and a frozen dataclass's
# __init__ costs twice as much.
@dataclass(slots=True)
class CheckInput:
    method: str
    host: str
    path: str  # without the query string
    query: str  # raw query string without '?'; may hold a token: never log it
    headers: Mapping[str, str]  # lower-case names; duplicates already joined with ","
    source_ip: str
    context: Mapping[str, str] = field(default_factory=dict)  # Envoy per-route context_extensions
    request_id: str = ""
    protocol: str = "HTTP/1.1"  # Envoy's: HTTP/1.0, HTTP/1.1, HTTP/2 or HTTP/3 ("" when unknown)
