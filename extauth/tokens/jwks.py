"""Key sources for JWT verification: a JWKS file, a JWKS URL, or an HMAC secret.

A source tells its watchers when a new key set drops or changes a key, so what that key
verified is forgotten. Refresh, refetch and staleness rules: docs/operations.md, "JWKS key sources".
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import logging
import os
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Generic, ParamSpec, Protocol

from jwt import PyJWK

from extauth.aio import cancel_and_wait
from extauth.config import HMAC_ALGS, ConfigError, JwtConfig
from extauth.reasons import DenyError, Reason
from extauth.redact import redact_url, scrub_url
from extauth.tokens import fetch
from extauth.tokens.keyset import JwksError, KeyEntry, KeySet, parse_jwks_bytes, thumbprint

__all__ = [
    "FileKeySource",
    "HmacKeySource",
    "KeySource",
    "UrlKeySource",
    "key_source_identity",
    "make_key_source",
]

log = logging.getLogger("extauth.jwks")

_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
# How often a file source looks at the file's mtime.
_FILE_CHECK_SECONDS = 1.0


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
        # When the keys were last known to be the file's (loaded, or seen unchanged): the
        # stale-keys alert watches this, so only an unreadable file goes "stale".
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
        await cancel_and_wait(self._poller)
        self._poller = None


def _describe(e: BaseException) -> str:
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
        # One thread of its own (one fetch in flight at most): a hanging issuer holds only
        # it, never another issuer's fetch nor the default executor config reloads use.
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
                # fetch() ends by its own deadline; wait_for only covers a queued fetch.
                get = functools.partial(fetch.fetch, self._uri, timeout=self._timeout,
                                        max_bytes=self._max_bytes)
                body = await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(self._executor, get),
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
                            self._safe_uri, scrub_url(_describe(e), self._uri), kept)
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
            log.warning("jwks %s: warm-up failed: %s", self._safe_uri, scrub_url(_describe(e), self._uri))
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
        await cancel_and_wait(self._refresher)
        self._refresher = None
        await cancel_and_wait(self._inflight)
        self._inflight = None
        # A fetch still running in the thread ends by its own deadline; nothing waits for it.
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _join(fetch: asyncio.Future[bool]) -> bool:
    """The shared fetch's outcome for one waiting check; only the waiter's own cancellation
    propagates. A fetch cancelled by ``close()`` (a reload replaced the source) is a failure
    for the checks still waiting on it: they end in a denial with its reason."""
    try:
        return await asyncio.shield(fetch)
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if (me is not None and me.cancelling()) or not fetch.cancelled():
            raise
        return False


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
