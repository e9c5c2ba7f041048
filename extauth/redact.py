"""URLs and paths for logs: userinfo may hold a password, a query, fragment or path parameter
a credential."""

from __future__ import annotations

from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    """``url`` with its userinfo, query and fragment replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    # The last "@", as clients split it: a password may contain "@" itself.
    host = parts.netloc.rpartition("@")[2]
    userinfo = "***@" if "@" in parts.netloc else ""
    query = "?***" if parts.query else ""
    fragment = "#***" if parts.fragment else ""
    return f"{parts.scheme}://{userinfo}{host}{parts.path}{query}{fragment}"


def scrub_url(text: str, url: str) -> str:
    """``text`` (an error message) with every part of ``url`` that may be secret cut out."""
    try:
        parts = urlsplit(url)
        secrets = [url, parts.netloc.rpartition("@")[0], parts.query, parts.fragment]
    except ValueError:
        secrets = [url]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def loggable_path(path: str, limit: int = 256) -> str:
    """A request path (without its query) for a log line: path parameters (``;name=value``, in
    any segment) cut, as a client may put a token there, then at most ``limit`` characters."""
    if ";" in path:
        path = "/".join(segment.partition(";")[0] for segment in path.split("/"))
    return path[:limit]
