"""``fetch``: an HTTP(S) GET with a total deadline and a size bound, for key material.

urllib's timeout bounds each socket operation, not the request (a server dripping bytes
would hold the thread forever): here every connect and read gets the time left until one deadline.
"""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from extauth.addresses import is_loopback_host
from extauth.redact import scrub_url

_READ_CHUNK = 64 * 1024


class FetchError(Exception):
    """A fetch that failed; the message says why, for logs (never the URL's secrets)."""


def fetch(url: str, *, timeout: float, max_bytes: int, accept: str = "application/json",
          user_agent: str = "extauth-jwks") -> bytes:
    """The body of a 200 answer to GET ``url``: at most ``max_bytes``, all within ``timeout``
    seconds. Redirects are never followed, nor a proxy used for a loopback host."""
    try:
        return _get(url, timeout, max_bytes, {"Accept": accept, "User-Agent": user_agent})
    except FetchError:
        raise
    except Exception as e:
        raise FetchError(scrub_url(_describe(e), url)) from None


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        return f"unreachable: {e.reason}"
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return str(e) or type(e).__name__


def _get(url: str, timeout: float, max_bytes: int, headers: dict[str, str]) -> bytes:
    if not url.startswith(("https://", "http://")):
        raise FetchError("only http(s) URLs are fetched")
    req = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked above
    opener = _DIRECT if is_loopback_host(urlsplit(url).hostname or "") else _OPENER
    _CALL.deadline = time.monotonic() + timeout
    try:
        with opener.open(req, timeout=timeout) as resp:
            if resp.status != 200:
                raise FetchError(f"HTTP {resp.status}")
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"response larger than {max_bytes} bytes")
            chunks: list[bytes] = []
            size = 0
            while True:
                _remaining()  # between reads too: raises once the deadline passed
                chunk: bytes = resp.read(min(_READ_CHUNK, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"response larger than {max_bytes} bytes")
    finally:
        _CALL.deadline = None
    return b"".join(chunks)


# The deadline of the fetch running on this thread (a fetch runs start to end on one thread).
_CALL = threading.local()


def _remaining() -> float:
    """Seconds left until this thread's fetch deadline; TimeoutError once it passed."""
    deadline: float | None = getattr(_CALL, "deadline", None)
    if deadline is None:
        raise RuntimeError("deadline HTTP call outside fetch()")
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline exceeded")
    return left


class _DeadlineReader(socket.SocketIO):
    """Reads the response through ``sock`` with the time left as each read's timeout."""

    def __init__(self, sock: socket.socket, owner: io.BufferedReader) -> None:
        super().__init__(sock, "rb")
        self._target = sock
        self._owner = owner  # the response's own reader: holds the socket's reference count

    def readinto(self, b: Any) -> int | None:
        self._target.settimeout(_remaining())
        return super().readinto(b)

    def close(self) -> None:
        if self.closed:
            return
        io.RawIOBase.close(self)
        self._owner.close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None) -> None:
        super().__init__(sock, debuglevel, method, url)
        self.fp = io.BufferedReader(_DeadlineReader(sock, self.fp))


def _connect_by_deadline(address: tuple[str, int], timeout: Any = None,
                         source_address: Any = None) -> socket.socket:
    sock = socket.create_connection(address, _remaining(), source_address)
    try:
        sock.settimeout(_remaining())  # bounds the request write and the TLS handshake
    except BaseException:
        sock.close()
        raise
    return sock


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    response_class = _DeadlineResponse

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_by_deadline


class _DeadlineHTTPSConnection(http.client.HTTPSConnection):
    response_class = _DeadlineResponse

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_by_deadline


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPConnection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self) -> None:
        self._tls = ssl.create_default_context()  # verifies the certificate and the host name
        super().__init__(context=self._tls)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPSConnection, req, context=self._tls)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Returning None makes urllib raise HTTPError for the 3xx: never followed.
    def redirect_request(self, req: Any, fp: Any, code: Any, msg: Any, headers: Any, newurl: Any) -> None:
        return None


# Subclasses of the default handlers replace them. An environment proxy serves issuers
# elsewhere (it may be the only way out), never this host: plain http:// is allowed there only
# because the keys never cross a network, and a proxy would carry them in clear text.
_OPENER = urllib.request.build_opener(_NoRedirect, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect, _DeadlineHTTPHandler,
                                      _DeadlineHTTPSHandler)
