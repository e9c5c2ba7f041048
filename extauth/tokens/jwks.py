"""Key sources for JWT verification: a JWKS file, a JWKS URL, or an HMAC secret.

Every key in a key set is bound to exactly ONE algorithm when the set is built
(its JWKS ``alg`` if present, otherwise the single configured algorithm that fits
its ``kty``/``crv``). The token's header never chooses a key type or algorithm.

URL sources refresh in the background when older than ``jwks_refresh_seconds``,
refetch at most once per ``jwks_refetch_cooldown_seconds`` for an unknown kid,
share one in-flight fetch between all waiters, keep serving the last good keys
while the endpoint is down, and fail closed (``jwks_unavailable``) once those
keys are older than ``jwks_max_stale_seconds``. Once started they also refresh on
a timer, so a key removed at the issuer is noticed without any token needing a
verification: cached verifications are answered without asking the key source.

Every key carries a thumbprint of what it verifies with (its public members and
bound algorithm). A source tells its watcher (``watch``) when a new key set drops
or changes a thumbprint, so verifications made with that key can be forgotten.

A fetch has a total deadline of ``jwks_timeout_seconds`` (connect, TLS, headers
and body together, not per socket read) and runs on this module's own small
thread pool, so a slow endpoint can neither hold a thread for long nor starve
the event loop's default executor. URLs are logged without userinfo or query.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import http.client
import io
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, Protocol
from urllib.parse import urlsplit

from jwt import PyJWK

from extauth.addresses import is_loopback_host
from extauth.config import EC_ALGS, HMAC_ALGS, OKP_ALGS, RSA_ALGS, ConfigError, JwtConfig
from extauth.reasons import DenyError, Reason

__all__ = [
    "FileKeySource",
    "HmacKeySource",
    "JwksError",
    "KeyEntry",
    "KeySet",
    "KeySource",
    "UrlKeySource",
    "build_key_set",
    "hmac_min_bytes",
    "make_key_source",
    "redact_url",
]

log = logging.getLogger("extauth.jwks")

_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
# Private (and multi-prime) members; a JWKS must only publish public keys.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
# How often a file source looks at the file's mtime.
_FILE_CHECK_SECONDS = 1.0
_READ_CHUNK = 64 * 1024


class JwksError(Exception):
    """A key set document that cannot be used."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    kid: str | None
    alg: str
    jwk: PyJWK = field(repr=False)  # an HMAC entry holds the shared secret
    # Identifies the key across fetches (thumbprint()); never logged: for a shared secret
    # it is derived from the secret.
    thumbprint: str = field(default="", repr=False)


def thumbprint(members: Mapping[str, Any], alg: str) -> str:
    """The same key (members and bound algorithm) gives the same value in every fetch."""
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{alg}\n{canonical}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[KeyEntry, ...]
    by_kid: Mapping[str, KeyEntry] = field(default_factory=dict)
    # Shared secrets are keys without a kid: the token's kid is not consulted, and each
    # (the current one, then the one it replaced during a rotation) is tried in turn.
    single_secret: bool = False
    thumbprints: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thumbprints", frozenset(k.thumbprint for k in self.keys))

    def select(self, kid: str | None) -> tuple[KeyEntry, ...]:
        """The keys a token with ``kid`` may be signed with, in the order to try them: the
        one for ``kid``; with no kid, the only key if there is exactly one; every shared
        secret. Empty when there is none."""
        if self.single_secret:
            return self.keys
        if kid is None:
            return self.keys[:1] if len(self.keys) == 1 else ()
        entry = self.by_kid.get(kid)
        return () if entry is None else (entry,)

    def __len__(self) -> int:
        return len(self.keys)


def hmac_min_bytes(alg: str) -> int:
    return _HMAC_MIN_BYTES[alg]


def _compatible(alg: str, kty: str, crv: Any) -> bool:
    if kty == "RSA":
        return alg in RSA_ALGS
    if kty == "EC":
        return alg in EC_ALGS and _EC_CURVES[alg] == crv
    if kty == "OKP":
        return alg in OKP_ALGS and crv in _OKP_CURVES
    return False


def _bind_alg(jwk: Mapping[str, Any], algorithms: Sequence[str]) -> tuple[str | None, str]:
    """(alg, "") for a usable key, else (None, why-skipped)."""
    kty = jwk.get("kty")
    crv = jwk.get("crv")
    if not isinstance(kty, str):
        return None, "no kty"
    if crv is not None and not isinstance(crv, str):
        return None, "crv is not a string"
    if kty == "oct":
        return None, "symmetric keys are never accepted from a JWKS"
    declared = jwk.get("alg")
    if declared is not None:
        if not isinstance(declared, str):
            return None, "alg is not a string"
        if declared not in algorithms:
            return None, f"alg {declared} is not in the configured algorithms"
        if not _compatible(declared, kty, crv):
            return None, f"alg {declared} does not fit kty {kty}"
        return declared, ""
    fits = [a for a in algorithms if _compatible(a, kty, crv)]
    if not fits:
        return None, f"no configured algorithm fits kty {kty}"
    if len(fits) > 1:
        return None, f"ambiguous: {', '.join(fits)} all fit kty {kty}; publish an alg"
    return fits[0], ""


def build_key_set(data: Any, algorithms: Sequence[str], *, source: str) -> KeySet:
    """Build a KeySet from a parsed JWKS document; unusable keys are skipped with a warning.

    Raises JwksError when the document is not a JWKS or has no usable key.
    """
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError("not a JWKS document (expected an object with a 'keys' list)")
    entries: list[KeyEntry] = []
    by_kid: dict[str, KeyEntry] = {}
    for i, raw in enumerate(data["keys"]):
        if not isinstance(raw, dict):
            log.warning("jwks %s: key #%d skipped: not an object", source, i)
            continue
        kid = raw.get("kid")
        label = f"key #{i}" + (f" (kid {kid!r})" if isinstance(kid, str) else "")
        if kid is not None and not isinstance(kid, str):
            log.warning("jwks %s: %s skipped: kid is not a string", source, label)
            continue
        use = raw.get("use")
        if use is not None and use != "sig":
            log.warning("jwks %s: %s skipped: use is %r, not 'sig'", source, label, use)
            continue
        ops = raw.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            log.warning("jwks %s: %s skipped: key_ops does not allow 'verify'", source, label)
            continue
        try:
            alg, why = _bind_alg(raw, algorithms)
        except Exception as e:
            # One odd key must not cost the whole set (nor a file poller): skip it. The
            # type only: a message could quote key material.
            log.warning("jwks %s: %s skipped: %s", source, label, type(e).__name__)
            continue
        if alg is None:
            log.warning("jwks %s: %s skipped: %s", source, label, why)
            continue
        public = {k: v for k, v in raw.items() if k not in _PRIVATE_MEMBERS}
        if len(public) != len(raw):
            log.warning("jwks %s: %s publishes private key material; only the public part is used",
                        source, label)
        try:
            jwk = PyJWK(public, algorithm=alg)
        except Exception as e:
            log.warning("jwks %s: %s skipped: %s", source, label, type(e).__name__)
            continue
        if kid is not None and kid in by_kid:
            log.warning("jwks %s: %s skipped: duplicate kid", source, label)
            continue
        entry = KeyEntry(kid=kid, alg=alg, jwk=jwk, thumbprint=thumbprint(public, alg))
        entries.append(entry)
        if kid is not None:
            by_kid[kid] = entry
    if not entries:
        raise JwksError("no usable signing key")
    return KeySet(keys=tuple(entries), by_kid=by_kid)


def parse_jwks_bytes(body: bytes, algorithms: Sequence[str], *, source: str) -> KeySet:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise JwksError(f"not valid JSON: {type(e).__name__}") from None
    return build_key_set(data, algorithms, source=source)


KeysWatcher = Callable[[KeySet], None]
P = ParamSpec("P")

# How long after the stale deadline the deadline's own check runs: keys are unusable strictly
# after it, and a timer may fire a little early by the clock the source reads.
_STALE_CHECK_SLACK = 0.05

# What a watcher is told when a URL source's keys become too stale to use.
_NO_KEYS = KeySet(keys=())


def _dropped_keys(old: KeySet | None, new: KeySet) -> bool:
    """Whether ``new`` lacks a key ``old`` had (removed, or its material or algorithm changed)."""
    return old is not None and not old.thumbprints <= new.thumbprints


class WeakCallbacks(Generic[P]):
    """Bound methods to call, held weakly. A key source outlives the verifiers built on it (a
    reload that changes only claim settings keeps it and its warm keys), and a verifier the
    runtimes built on it (each with its allow memo): neither may keep the replaced ones alive."""

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: list[weakref.WeakMethod[Callable[P, None]]] = []

    def add(self, callback: Callable[P, None]) -> None:
        self._refs = [r for r in self._refs if r() is not None]
        self._refs.append(weakref.WeakMethod(callback))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> None:
        for ref in list(self._refs):
            callback = ref()
            if callback is not None:
                callback(*args, **kwargs)


# The JwtConfig fields a key source reads: verifiers that differ only elsewhere (issuer,
# audiences, leeway, claims, token sources) share one source, its keys and its fetches.
KEY_SOURCE_FIELDS = frozenset({
    "algorithms", "jwks_file", "jwks_uri", "hmac_secret_env", "hmac_previous_secret_env",
    "jwks_refresh_seconds", "jwks_refetch_cooldown_seconds", "jwks_max_stale_seconds",
    "jwks_timeout_seconds", "jwks_max_bytes"})


def key_source_identity(cfg: JwtConfig) -> str:
    """Equal for two JwtConfigs exactly when they describe the same key source."""
    return cfg.model_dump_json(include=set(KEY_SOURCE_FIELDS))


class KeySource(Protocol):
    def watch(self, watcher: KeysWatcher) -> None:
        """Call the bound method ``watcher(new)`` (held weakly) whenever a new key set lacks a
        key of the previous one."""
        ...

    async def keys(self) -> KeySet:
        """The key set in use; raises DenyError(JWKS_UNAVAILABLE) when there is none."""
        ...

    async def refetch_for_unknown_kid(self) -> bool:
        """Try to pick up new keys for an unknown kid; True if the key set may have changed."""
        ...

    def key_age_seconds(self) -> float | None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class HmacKeySource:
    """A shared secret read from an environment variable at construction; with
    ``previous_env``, also the secret it replaced (a rotation), tried after it."""

    def __init__(self, env_name: str, alg: str, previous_env: str | None = None) -> None:
        if alg not in HMAC_ALGS:
            raise ConfigError(f"hmac_secret_env: algorithm {alg} is not an HMAC algorithm")
        entries = [_hmac_entry("hmac_secret_env", env_name, alg)]
        if previous_env is not None:
            previous = _hmac_entry("hmac_previous_secret_env", previous_env, alg)
            if previous.thumbprint == entries[0].thumbprint:
                raise ConfigError(f"hmac_previous_secret_env: {previous_env} holds the same secret as "
                                  f"{env_name}")
            entries.append(previous)
        self._set = KeySet(keys=tuple(entries), single_secret=True)

    def watch(self, watcher: KeysWatcher) -> None:
        return None  # read once: it never changes

    async def keys(self) -> KeySet:
        return self._set

    async def refetch_for_unknown_kid(self) -> bool:
        return False

    def key_age_seconds(self) -> float | None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @property
    def key_set(self) -> KeySet:
        return self._set


class FileKeySource:
    """A JWKS file: loaded at construction, reloaded when its mtime changes."""

    def __init__(self, path: str, algorithms: Sequence[str], clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._algorithms = tuple(algorithms)
        self._clock = clock
        try:
            self._stamp = self._stat()
            self._set = self._load()
        except (OSError, JwksError) as e:
            raise ConfigError(f"jwks_file: {path}: {_describe(e)}") from None
        # When the key set in use was last known to be the file's: loaded, or the file seen
        # unchanged since. Its age is what the stale-keys alert watches, so a file left alone
        # for months is not "stale"; one that can no longer be read or parsed is.
        self._current_at = clock()
        self._checked_at = self._current_at
        self._watchers: WeakCallbacks[[KeySet]] = WeakCallbacks()
        self._poller: asyncio.Task[None] | None = None
        log.info("jwks %s: loaded %d key(s)", path, len(self._set))

    def watch(self, watcher: KeysWatcher) -> None:
        self._watchers.add(watcher)

    def _stat(self) -> tuple[int, int]:
        st = os.stat(self._path)
        return st.st_mtime_ns, st.st_size

    def _load(self) -> KeySet:
        with open(self._path, "rb") as f:
            body = f.read()
        return parse_jwks_bytes(body, self._algorithms, source=self._path)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked_at < _FILE_CHECK_SECONDS:
            return
        self._checked_at = now
        try:
            stamp = self._stat()
        except OSError as e:
            log.warning("jwks %s: cannot stat, keeping %d key(s): %s",
                        self._path, len(self._set), _describe(e))
            return
        if stamp == self._stamp:
            self._current_at = now
            return
        self._stamp = stamp
        try:
            new = self._load()
        except (OSError, JwksError) as e:
            log.warning("jwks %s: reload failed, keeping %d key(s): %s",
                        self._path, len(self._set), _describe(e))
            return
        old, self._set = self._set, new
        self._current_at = now
        log.info("jwks %s: reloaded %d key(s)", self._path, len(new))
        if _dropped_keys(old, new):
            self._watchers(new)

    async def keys(self) -> KeySet:
        self._maybe_reload()
        return self._set

    async def refetch_for_unknown_kid(self) -> bool:
        before = self._set
        self._maybe_reload()
        return self._set is not before

    def key_age_seconds(self) -> float | None:
        return max(0.0, self._clock() - self._current_at)

    async def start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Look at the file on a timer too: checks answered from the token cache never do."""
        while True:
            await asyncio.sleep(_FILE_CHECK_SECONDS)
            try:
                self._maybe_reload()
            except Exception as e:
                # A dead poller would silently stop key removals from being noticed.
                log.error("jwks %s: reload check failed, keeping %d key(s): %s",
                          self._path, len(self._set), type(e).__name__)

    async def close(self) -> None:
        await _cancel(self._poller)
        self._poller = None


def redact_url(uri: str) -> str:
    """``uri`` for logs: no userinfo (it may hold a password), no query or fragment
    (they may hold an API key)."""
    try:
        parts = urlsplit(uri)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparsable url>"
    userinfo = "***@" if "@" in parts.netloc else ""
    query = "?***" if parts.query else ""
    fragment = "#***" if parts.fragment else ""
    return f"{parts.scheme}://{userinfo}{host}{parts.path}{query}{fragment}"


# -- HTTP with a total deadline -----------------------------------------------
#
# urllib's timeout bounds each socket operation, not the request: a server that
# drips a byte every (timeout - e) seconds holds the thread indefinitely. Here
# every connect and every read gets the time LEFT until one deadline as its
# timeout, so the whole GET ends by the deadline. The deadline lives in a
# thread-local: a fetch runs start to end on one worker thread.

_CALL = threading.local()


def _remaining() -> float:
    """Seconds left until this thread's fetch deadline; TimeoutError once it passed."""
    deadline: float | None = getattr(_CALL, "deadline", None)
    if deadline is None:
        raise RuntimeError("JWKS HTTP call outside _http_get")
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


# Subclasses of the default handlers replace them. Proxies from the environment apply to an
# issuer elsewhere (a corporate egress proxy may be the only way out), never to one on this
# host: plain http:// is allowed there only because the keys never leave the machine, and a
# proxy would fetch them in clear text and answer with whatever it likes.
_OPENER = urllib.request.build_opener(_NoRedirect, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect, _DeadlineHTTPHandler,
                                      _DeadlineHTTPSHandler)


def _http_get(uri: str, timeout: float, max_bytes: int) -> bytes:
    """GET ``uri``: at most ``max_bytes`` of body, all of it within ``timeout`` seconds."""
    if not uri.startswith(("https://", "http://")):
        raise JwksError("only http(s) URLs are fetched")
    req = urllib.request.Request(  # noqa: S310 - scheme checked above
        uri, headers={"Accept": "application/json", "User-Agent": "extauth-jwks"}
    )
    opener = _DIRECT if is_loopback_host(urlsplit(uri).hostname or "") else _OPENER
    _CALL.deadline = time.monotonic() + timeout
    try:
        with opener.open(req, timeout=timeout) as resp:
            status = resp.status
            if status != 200:
                raise JwksError(f"HTTP {status}")
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise JwksError(f"response larger than {max_bytes} bytes")
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
                    raise JwksError(f"response larger than {max_bytes} bytes")
    finally:
        _CALL.deadline = None
    return b"".join(chunks)


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


class UrlKeySource:
    """A JWKS URL with background refresh, bounded refetches and stale serving."""

    def __init__(self, cfg: JwtConfig, clock: Callable[[], float] = time.time) -> None:
        if cfg.jwks_uri is None:
            raise ConfigError("jwks_uri: required for a URL key source")
        self._uri = cfg.jwks_uri
        self._safe_uri = redact_url(cfg.jwks_uri)  # the only form that reaches logs and details
        self._algorithms = tuple(cfg.algorithms)
        self._clock = clock
        self._refresh = cfg.jwks_refresh_seconds
        self._cooldown = cfg.jwks_refetch_cooldown_seconds
        self._max_stale = cfg.jwks_max_stale_seconds
        self._timeout = cfg.jwks_timeout_seconds
        self._max_bytes = cfg.jwks_max_bytes
        # After a failed fetch, wait this long before the next attempt so a down
        # endpoint is not hammered by every request.
        self._retry_after_failure = min(self._refresh, max(self._cooldown, 1.0))
        self._set: KeySet | None = None
        self._fetched_at: float | None = None  # last success
        self._attempted_at: float | None = None  # start of the last attempt
        self._failed_at: float | None = None  # end of the last failed attempt
        self._inflight: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._stale_check: asyncio.TimerHandle | None = None
        # This source's own fetch thread (started at the first fetch): an issuer that hangs
        # holds only its own, until its deadline, and never delays another issuer's fetch.
        # One is enough: a source has at most one fetch in flight. Config-bounded in number
        # (one per distinct jwks_uri and settings), and never the default executor, which
        # config reloads use.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="extauth-jwks")
        self._watchers: WeakCallbacks[[KeySet]] = WeakCallbacks()
        self._stale_announced = False
        self._closed = False
        self.fetches = 0
        self.fetch_failures = 0

    # -- state ---------------------------------------------------------------

    @property
    def uri(self) -> str:
        """The URL for display: without userinfo or query (they may hold credentials)."""
        return self._safe_uri

    @property
    def fetching(self) -> bool:
        return self._inflight is not None

    def watch(self, watcher: KeysWatcher) -> None:
        self._watchers.add(watcher)

    def key_age_seconds(self) -> float | None:
        if self._fetched_at is None:
            return None
        return max(0.0, self._clock() - self._fetched_at)

    def _usable(self, now: float) -> KeySet | None:
        if self._set is None or self._fetched_at is None:
            return None
        if now - self._fetched_at > self._max_stale:
            return None
        return self._set

    def _may_attempt(self, now: float) -> bool:
        if self._closed:
            return False
        return self._failed_at is None or now - self._failed_at >= self._retry_after_failure

    def _scrub(self, text: str) -> str:
        """An error description with any part of the raw URL that may be secret cut out."""
        try:
            parts = urlsplit(self._uri)
            secrets = [self._uri, parts.netloc.rpartition("@")[0], parts.query, parts.fragment]
        except ValueError:
            secrets = [self._uri]
        for secret in sorted(filter(None, secrets), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    # -- fetching ------------------------------------------------------------

    def _start_fetch(self) -> asyncio.Task[bool]:
        if self._inflight is None:
            self._attempted_at = self._clock()
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
        return self._inflight

    async def _fetch(self) -> bool:
        # Counted when it ends, with its outcome: ok = fetches - failures must never go down
        # (a fetch in flight counted as ok, then failing, read as a counter reset).
        try:
            try:
                # _http_get ends by its own deadline; wait_for only covers a queued fetch.
                loop = asyncio.get_running_loop()
                body = await asyncio.wait_for(
                    loop.run_in_executor(self._executor, _http_get, self._uri, self._timeout,
                                         self._max_bytes),
                    timeout=self._timeout,
                )
                new = parse_jwks_bytes(body, self._algorithms, source=self._safe_uri)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.fetches += 1
                self.fetch_failures += 1
                self._failed_at = self._clock()
                kept = len(self._set) if self._set is not None else 0
                log.warning("jwks %s: fetch failed (%s); keeping %d key(s)",
                            self._safe_uri, self._scrub(_describe(e)), kept)
                return False
            self.fetches += 1
            old = self._set
            self._set = new
            self._fetched_at = self._clock()
            self._failed_at = None
            self._schedule_stale_check()
            if old is None or old.thumbprints != new.thumbprints:
                log.info("jwks %s: fetched %d key(s)", self._safe_uri, len(new))
            else:
                log.debug("jwks %s: refreshed %d key(s)", self._safe_uri, len(new))
            if _dropped_keys(old, new):
                self._watchers(new)
            return True
        finally:
            self._inflight = None

    async def refresh(self) -> bool:
        """Fetch now (or join the fetch in flight); True on success. Never raises."""
        if self._closed:
            return False
        return await _join(self._start_fetch())

    async def wait_idle(self) -> None:
        """Wait for the fetch in flight, if any (tests, orderly shutdown)."""
        task = self._inflight
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    # -- KeySource -----------------------------------------------------------

    async def keys(self) -> KeySet:
        now = self._clock()
        usable = self._usable(now)
        if usable is not None:
            assert self._fetched_at is not None
            if now - self._fetched_at >= self._refresh and self._inflight is None and self._may_attempt(now):
                self._start_fetch()  # background: keep serving the current keys meanwhile
            return usable
        # Never loaded, or too stale to use: wait for a fetch (shared), if one may run.
        if self._inflight is not None or self._may_attempt(now):
            await self.refresh()
        usable = self._usable(self._clock())
        if usable is None:
            if self._set is None:
                raise DenyError(Reason.JWKS_UNAVAILABLE, f"jwks {self._safe_uri}: never loaded")
            raise DenyError(Reason.JWKS_UNAVAILABLE, f"jwks {self._safe_uri}: keys stale beyond max_stale")
        return usable

    async def refetch_for_unknown_kid(self) -> bool:
        if self._inflight is not None:
            return await _join(self._inflight)
        now = self._clock()
        if self._attempted_at is not None and now - self._attempted_at < self._cooldown:
            return False
        if not self._may_attempt(now):
            return False
        return await self.refresh()

    async def start(self) -> None:
        try:
            await self.keys()
        except Exception as e:
            log.warning("jwks %s: warm-up failed: %s", self._safe_uri, self._scrub(_describe(e)))
        if self._refresher is None and not self._closed:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_on_timer())

    async def _refresh_on_timer(self) -> None:
        """Refresh every ``jwks_refresh_seconds`` whatever the traffic: checks answered from
        the token cache never call keys(), and a key removed at the issuer must still be
        noticed. After a failure, try again sooner (but not more often than a failure allows)."""
        while not self._closed:
            if self._fetched_at is None or self._failed_at is not None:
                wait = self._retry_after_failure
            else:
                wait = self._fetched_at + self._refresh - self._clock()
            await asyncio.sleep(max(wait, 1.0))
            if self._inflight is None and self._may_attempt(self._clock()):
                await self.refresh()
            self._announce_if_stale()

    def _schedule_stale_check(self) -> None:
        """Look again just after these keys pass ``jwks_max_stale_seconds``: what they verified
        (token cache, allow memo) must stop passing then, not at the refresh timer's next tick,
        which after a failed fetch can be up to ``jwks_refresh_seconds`` later."""
        if self._stale_check is not None:
            self._stale_check.cancel()
        self._stale_check = asyncio.get_running_loop().call_later(
            self._max_stale + _STALE_CHECK_SLACK, self._announce_if_stale)

    def _announce_if_stale(self) -> None:
        """Keys past ``jwks_max_stale_seconds`` are no longer used to verify (fail closed);
        the verifications they made go with them, once, until a fetch succeeds again."""
        stale = self._set is not None and self._usable(self._clock()) is None
        if stale and not self._stale_announced:
            self._watchers(_NO_KEYS)
        self._stale_announced = stale

    async def close(self) -> None:
        self._closed = True
        if self._stale_check is not None:
            self._stale_check.cancel()
        await _cancel(self._refresher)
        self._refresher = None
        await _cancel(self._inflight)
        self._inflight = None
        # A fetch still running in the thread ends by its own deadline; nothing waits for it.
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _join(fetch: asyncio.Future[bool]) -> bool:
    """The shared fetch's outcome, for one of the checks waiting on it. A fetch cancelled by
    ``close()`` (a reload replaced this source while checks that started on the old config
    still wait on it) is a failed one for them, so they end in a denial with its reason;
    only the waiter's own cancellation propagates."""
    try:
        return await asyncio.shield(fetch)
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if (me is not None and me.cancelling()) or not fetch.cancelled():
            raise
        return False


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _hmac_entry(option: str, env_name: str, alg: str) -> KeyEntry:
    """The secret in ``env_name`` as a key bound to ``alg``; ConfigError naming ``option``."""
    secret = os.environ.get(env_name, "")
    if not secret:
        raise ConfigError(f"{option}: environment variable {env_name} is empty or not set")
    raw = secret.encode("utf-8")
    need = _HMAC_MIN_BYTES[alg]
    if len(raw) < need:
        raise ConfigError(f"{option}: the secret in {env_name} is {len(raw)} bytes; "
                          f"{alg} needs at least {need}")
    k = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    members = {"kty": "oct", "k": k}
    return KeyEntry(kid=None, alg=alg, jwk=PyJWK(members, algorithm=alg), thumbprint=thumbprint(members, alg))


def make_key_source(cfg: JwtConfig, clock: Callable[[], float] = time.time) -> KeySource:
    """The key source a JwtConfig describes. Raises ConfigError."""
    if cfg.hmac_secret_env:
        return HmacKeySource(cfg.hmac_secret_env, cfg.algorithms[0], cfg.hmac_previous_secret_env)
    if cfg.jwks_file:
        return FileKeySource(cfg.jwks_file, cfg.algorithms, clock)
    if cfg.jwks_uri:
        return UrlKeySource(cfg, clock)
    raise ConfigError("jwt: one of jwks_file, jwks_uri, hmac_secret_env is required")
