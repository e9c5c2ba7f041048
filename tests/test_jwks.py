"""JWKS URL source against a real local HTTP server; time is an injected clock."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from extauth.config import JwtConfig
from extauth.reasons import DenyError, Reason
from extauth.tokens import fetch as fetch_module
from extauth.tokens.jwks import UrlKeySource
from extauth.tokens.jwt import JwtVerifier
from tests.keys import (
    FakeClock,
    JwksServer,
    forgotten,
    jwk_for,
    jwks_for,
    jwks_of,
    make_rsa_key,
    refresh_timers,
    shared_rsa_key,
    sign,
)
from tests.waiting import async_wait_until

ISS = "https://issuer.example"
AUD = "chat"
NOW = 1_700_000_000

REFRESH = 300.0
COOLDOWN = 30.0
MAX_STALE = 3600.0


def claims(**over: Any) -> dict[str, Any]:
    return {"iss": ISS, "aud": AUD, "sub": "alice", "iat": NOW, "exp": NOW + 600, **over}


def token(kid: str = "k1", key: Any = None, **over: Any) -> str:
    return sign(key or shared_rsa_key(), "RS256", claims(**over), kid=kid)


@pytest.fixture
def server() -> Iterator[JwksServer]:
    srv = JwksServer(jwks_for(shared_rsa_key(), "k1", "RS256")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def make(server: JwksServer, clock: FakeClock, cache_size: int = 0, **extra: Any) -> JwtVerifier:
    opts: dict[str, Any] = {
        "jwks_refresh_seconds": REFRESH,
        "jwks_refetch_cooldown_seconds": COOLDOWN,
        "jwks_max_stale_seconds": MAX_STALE,
        "jwks_timeout_seconds": 0.5,
        **extra,
    }
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], jwks_uri=server.url, **opts)
    return JwtVerifier(cfg, max_token_bytes=8192, cache_size=cache_size, clock=clock)


@pytest.fixture
async def verifier(server: JwksServer, clock: FakeClock) -> AsyncIterator[JwtVerifier]:
    v = make(server, clock)
    try:
        yield v
    finally:
        await v.close()


def source(v: JwtVerifier) -> UrlKeySource:
    src = v.key_source
    assert isinstance(src, UrlKeySource)
    return src


async def reason_of(v: JwtVerifier, tok: str) -> Reason:
    with pytest.raises(DenyError) as ei:
        await v.verify(tok)
    return ei.value.reason


# -- loading -----------------------------------------------------------------


async def test_lazy_first_fetch(verifier: JwtVerifier, server: JwksServer) -> None:
    assert server.requests == 0
    assert verifier.key_age_seconds is None
    assert (await verifier.verify(token())).user == "alice"
    assert server.requests == 1
    assert verifier.jwks_fetches == 1
    assert verifier.jwks_fetch_failures == 0
    assert verifier.key_age_seconds == 0


async def test_start_warms_keys(verifier: JwtVerifier, server: JwksServer, clock: FakeClock) -> None:
    await verifier.start()
    assert server.requests == 1
    clock.advance(12)
    assert verifier.key_age_seconds == 12
    await verifier.verify(token())
    assert server.requests == 1


async def test_start_never_raises(server: JwksServer, clock: FakeClock) -> None:
    server.set(mode="500")
    v = make(server, clock)
    await v.start()
    assert v.jwks_fetch_failures == 1
    assert v.key_age_seconds is None
    assert await reason_of(v, token()) is Reason.JWKS_UNAVAILABLE
    await v.close()


async def test_concurrent_first_requests_share_one_fetch(verifier: JwtVerifier, server: JwksServer) -> None:
    results = await asyncio.gather(*(verifier.verify(token(sub=f"u{i}")) for i in range(50)))
    assert {r.user for r in results} == {f"u{i}" for i in range(50)}
    assert server.requests == 1


@pytest.mark.parametrize("mode", ["500", "garbage", "redirect", "huge"])
async def test_never_loaded_fails_closed(server: JwksServer, clock: FakeClock, mode: str) -> None:
    server.set(mode=mode)
    v = make(server, clock, jwks_max_bytes=64 * 1024)
    assert await reason_of(v, token()) is Reason.JWKS_UNAVAILABLE
    assert Reason.JWKS_UNAVAILABLE.status == 503
    assert not Reason.JWKS_UNAVAILABLE.hostile
    assert v.jwks_fetch_failures == 1
    await v.close()


async def test_redirect_is_not_followed(server: JwksServer, clock: FakeClock) -> None:
    server.set(mode="redirect")
    v = make(server, clock)
    assert await reason_of(v, token()) is Reason.JWKS_UNAVAILABLE
    assert server.requests == 1  # the 302 was not followed anywhere
    await v.close()


async def test_size_cap(server: JwksServer, clock: FakeClock) -> None:
    v = make(server, clock, jwks_max_bytes=100)  # the real document is bigger than this
    assert await reason_of(v, token()) is Reason.JWKS_UNAVAILABLE
    await v.close()


async def test_hang_beyond_timeout(server: JwksServer, clock: FakeClock) -> None:
    server.set(mode="hang")
    v = make(server, clock, jwks_timeout_seconds=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await reason_of(v, token()) is Reason.JWKS_UNAVAILABLE
    assert loop.time() - started < 5  # bounded (generous bound: no timing precision assumed)
    server.release()
    await v.close()


async def test_unreachable_endpoint(clock: FakeClock) -> None:
    srv = JwksServer().start()
    url = srv.url
    srv.stop()  # nothing listens on that port any more
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], jwks_uri=url, jwks_timeout_seconds=0.5)
    v = JwtVerifier(cfg, max_token_bytes=8192, cache_size=0, clock=clock)
    assert await reason_of(v, token()) is Reason.JWKS_UNAVAILABLE
    await v.close()


async def test_failed_first_load_retries_after_backoff(server: JwksServer, clock: FakeClock) -> None:
    server.set(mode="500")
    v = make(server, clock)
    for _ in range(20):
        assert await reason_of(v, token()) is Reason.JWKS_UNAVAILABLE
    assert server.requests == 1  # a down endpoint is not hammered per request
    server.set(mode="ok")
    clock.advance(COOLDOWN)
    assert (await v.verify(token())).user == "alice"
    assert server.requests == 2
    await v.close()


# -- unknown kids ------------------------------------------------------------


async def test_flood_of_random_kids_is_bounded(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock
) -> None:
    await verifier.verify(token())
    assert server.requests == 1
    clock.advance(COOLDOWN + 1)  # the cooldown has passed: exactly one refetch is allowed
    kids = [secrets.token_urlsafe(8) for _ in range(200)]
    results = await asyncio.gather(*(verifier.verify(token(kid=k)) for k in kids), return_exceptions=True)
    assert all(isinstance(r, DenyError) and r.reason is Reason.TOKEN_UNKNOWN_KEY for r in results)
    assert server.requests <= 2
    assert server.requests == 2
    # And another flood inside the cooldown fetches nothing.
    for k in kids[:50]:
        assert await reason_of(verifier, token(kid=k)) is Reason.TOKEN_UNKNOWN_KEY
    assert server.requests == 2


async def test_unknown_kid_right_after_load_does_not_refetch(
    verifier: JwtVerifier, server: JwksServer
) -> None:
    for i in range(200):
        assert await reason_of(verifier, token(kid=f"random-{i}")) is Reason.TOKEN_UNKNOWN_KEY
    assert server.requests == 1


@pytest.mark.parametrize(
    "kid", ["../../etc/passwd", "..%2F..%2Fjwks", "http://evil.example/jwks", "k1/../k1"]
)
async def test_traversal_kids(verifier: JwtVerifier, server: JwksServer, kid: str) -> None:
    assert await reason_of(verifier, token(kid=kid)) is Reason.TOKEN_UNKNOWN_KEY
    assert server.requests == 1


async def test_key_rotation(verifier: JwtVerifier, server: JwksServer, clock: FakeClock) -> None:
    await verifier.verify(token())
    new_key = make_rsa_key()
    server.set(jwks_of(jwk_for(shared_rsa_key(), "k1", "RS256"), jwk_for(new_key, "k2", "RS256")))
    rotated = token(kid="k2", key=new_key)
    # Inside the cooldown the new kid is unknown and nothing is fetched.
    assert await reason_of(verifier, rotated) is Reason.TOKEN_UNKNOWN_KEY
    assert server.requests == 1
    clock.advance(COOLDOWN)
    assert (await verifier.verify(rotated)).user == "alice"
    assert server.requests == 2
    # The old key keeps working while it is still published.
    assert (await verifier.verify(token())).user == "alice"
    # The old key is retired: picked up by the periodic refresh.
    server.set(jwks_of(jwk_for(new_key, "k2", "RS256")))
    clock.advance(REFRESH)
    assert (await verifier.verify(token())).user == "alice"  # served from current keys meanwhile
    await source(verifier).wait_idle()
    assert server.requests == 3
    assert await reason_of(verifier, token()) is Reason.TOKEN_UNKNOWN_KEY


async def test_concurrent_unknown_kids_join_inflight_fetch(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock
) -> None:
    await verifier.verify(token())
    new_key = make_rsa_key()
    server.set(jwks_of(jwk_for(new_key, "k2", "RS256")))
    clock.advance(COOLDOWN)
    results = await asyncio.gather(*(verifier.verify(token(kid="k2", key=new_key)) for _ in range(30)))
    assert all(r.user == "alice" for r in results)
    assert server.requests == 2


# -- keys leaving the key set --------------------------------------------------
# The timer refresh runs on real time (jwks_refresh_seconds 1, its floor); token times
# come from the fake clock, which stands still.


@pytest.fixture
async def timed(server: JwksServer, clock: FakeClock) -> AsyncIterator[JwtVerifier]:
    """A caching verifier, started: its key source refreshes every second by itself."""
    v = make(server, clock, cache_size=100, jwks_refresh_seconds=1)
    try:
        yield v
    finally:
        await v.close()


async def test_a_removed_key_is_noticed_without_traffic_and_its_verifications_forgotten(
    timed: JwtVerifier, server: JwksServer
) -> None:
    other_key = make_rsa_key()
    server.set(jwks_of(jwk_for(shared_rsa_key(), "k1", "RS256"), jwk_for(other_key, "k2", "RS256")))
    await timed.start()
    old, other = token(), token(kid="k2", key=other_key, sub="bob")
    assert (await timed.verify(old)).user == "alice" and (await timed.verify(other)).user == "bob"
    assert timed.verify_cached(old) is not None and timed.verifications == 2
    server.set(jwks_of(jwk_for(other_key, "k2", "RS256")))  # k1 retired at the issuer
    # Only cache lookups from here on: the timer alone must fetch and forget.
    await async_wait_until(forgotten(timed, old), 10, "k1's verification to be forgotten")
    assert timed.verify_cached(other) is not None  # k2 is still published: kept
    assert await reason_of(timed, old) is Reason.TOKEN_UNKNOWN_KEY
    assert (await timed.verify(other)).user == "bob" and timed.verifications == 2


async def test_a_key_whose_material_changes_under_its_kid_is_forgotten(
    timed: JwtVerifier, server: JwksServer
) -> None:
    await timed.start()
    old = token()
    await timed.verify(old)
    new_key = make_rsa_key()
    server.set(jwks_for(new_key, "k1", "RS256"))
    await async_wait_until(forgotten(timed, old), 10, "the old k1's verification to go")
    assert await reason_of(timed, old) is Reason.TOKEN_BAD_SIGNATURE
    assert (await timed.verify(token(key=new_key))).user == "alice"


async def test_keys_past_max_stale_take_their_cached_verifications_with_them(
    server: JwksServer, clock: FakeClock
) -> None:
    v = make(server, clock, cache_size=100, jwks_refresh_seconds=1, jwks_max_stale_seconds=60)
    try:
        await v.start()
        tok = token()
        await v.verify(tok)
        server.set(mode="500")
        clock.advance(30)  # stale, still usable: the cached verification stands
        await async_wait_until(lambda: _fetched(server, 2), 10, "a failed timer refresh")
        assert v.verify_cached(tok) is not None
        clock.advance(31)  # past max_stale: fail closed, the cache included
        await async_wait_until(forgotten(v, tok), 10, "the cached verification to go")
        assert await reason_of(v, tok) is Reason.JWKS_UNAVAILABLE
        server.set(mode="ok")
        clock.advance(2)  # past the back-off after a failure
        await async_wait_until(lambda: _fetched_ok(v), 10, "a successful timer refresh")
        assert (await v.verify(tok)).user == "alice" and v.verifications == 2
    finally:
        await v.close()


async def test_cached_verifications_go_when_the_keys_pass_max_stale_not_at_the_next_refresh(
    server: JwksServer
) -> None:
    # After a failed refresh the timer sleeps a whole refresh period (4 s here); the keys
    # pass max_stale 1.5 s into it. What they verified must stop passing then, not 2.5 s later.
    refresh, max_stale = 4.0, 5.5
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], jwks_uri=server.url, jwks_refresh_seconds=refresh,
                    jwks_refetch_cooldown_seconds=refresh, jwks_max_stale_seconds=max_stale,
                    jwks_timeout_seconds=0.5)
    v = JwtVerifier(cfg, max_token_bytes=8192, cache_size=100)  # the real clock: the timers' own
    try:
        fetched = time.monotonic()  # before start: a stall meanwhile can only lengthen gone_after
        await v.start()
        now = int(time.time())
        tok = token(iat=now, exp=now + 600)
        await v.verify(tok)
        server.set(mode="500")
        await async_wait_until(lambda: _fetched(server, 2), 10, "the timer's failed refresh")
        assert v.verify_cached(tok) is not None  # stale but usable: the verification stands
        await async_wait_until(forgotten(v, tok), 10, "the cached verification to go")
        gone_after = time.monotonic() - fetched
        assert max_stale - 0.5 <= gone_after < 2 * refresh - 1.0, gone_after  # the next tick: 8 s
        assert await reason_of(v, tok) is Reason.JWKS_UNAVAILABLE
    finally:
        await v.close()


async def test_issuers_that_hang_never_delay_another_issuers_fetch() -> None:
    # Two issuers hang until their deadline (3 s); a third answers at once. Its keys must
    # load while the other two still hang: no fetch waits behind another issuer's.
    hanging = [JwksServer(jwks_for(shared_rsa_key(), "k1", "RS256")).start() for _ in range(2)]
    healthy = JwksServer(jwks_for(shared_rsa_key(), "k1", "RS256")).start()
    for server in hanging:
        server.set(mode="hang")

    def verifier(server: JwksServer) -> JwtVerifier:
        cfg = JwtConfig(issuer=ISS, audiences=[AUD], jwks_uri=server.url, jwks_timeout_seconds=3.0)
        return JwtVerifier(cfg, max_token_bytes=8192, cache_size=0)

    stuck = [verifier(server) for server in hanging]
    fine = verifier(healthy)
    try:
        pending = [asyncio.create_task(v.start()) for v in stuck]
        await async_wait_until(lambda: _fetched(hanging[0], 1), 5, "the first hanging fetch")
        await async_wait_until(lambda: _fetched(hanging[1], 1), 5, "the second hanging fetch")
        started = time.monotonic()
        await fine.start()
        assert fine.key_age_seconds is not None, "the healthy issuer's keys did not load"
        assert time.monotonic() - started < 2.0
        assert not any(task.done() for task in pending)  # the other two still hang
        await asyncio.gather(*pending)
    finally:
        for v in (*stuck, fine):
            await v.close()
        for server in (*hanging, healthy):
            server.stop()


async def _fetched_ok(v: JwtVerifier) -> bool:
    return v.key_age_seconds == 0


async def test_refetching_the_same_keys_keeps_cached_verifications(
    timed: JwtVerifier, server: JwksServer
) -> None:
    await timed.start()
    tok = token()
    await timed.verify(tok)
    await async_wait_until(lambda: _fetched(server, 3), 10, "two timer refreshes")
    assert timed.verify_cached(tok) is not None and timed.verifications == 1


async def _fetched(server: JwksServer, n: int) -> bool:
    return server.requests >= n


async def test_one_timer_per_source_and_close_stops_it(server: JwksServer, clock: FakeClock) -> None:
    v = make(server, clock, jwks_refresh_seconds=1)
    await v.start()
    await v.start()  # a reload warms every verifier again
    assert len(refresh_timers()) == 1
    await v.close()
    assert refresh_timers() == []


# -- refresh and staleness ---------------------------------------------------


async def test_background_refresh_serves_current_keys(server: JwksServer, clock: FakeClock) -> None:
    # The hang ends when the test releases it, never by the fetch timeout (a stalled host
    # must not end it early).
    verifier = make(server, clock, jwks_timeout_seconds=5)
    try:
        await verifier.verify(token())
        server.set(mode="hang")
        clock.advance(REFRESH)
        # The refresh hangs in the background; requests are answered from the current keys.
        assert (await verifier.verify(token())).user == "alice"
        assert source(verifier).fetching
        for _ in range(10):
            assert (await verifier.verify(token())).user == "alice"
        server.release()
        await source(verifier).wait_idle()
        assert server.requests == 2  # one fetch in flight at a time, not one per request
    finally:
        await verifier.close()


async def test_stale_keys_served_then_fail_closed(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="extauth.jwks")

    def fresh() -> str:
        return token(iat=clock.now, exp=clock.now + 600)

    await verifier.verify(fresh())
    server.set(mode="500")
    clock.advance(REFRESH)
    assert (await verifier.verify(fresh())).user == "alice"
    await source(verifier).wait_idle()
    assert verifier.jwks_fetch_failures == 1
    # Still inside max_stale (counted from the last success): keep serving.
    clock.now = NOW + MAX_STALE
    assert (await verifier.verify(fresh())).user == "alice"
    await source(verifier).wait_idle()
    assert verifier.key_age_seconds == MAX_STALE
    clock.now = NOW + MAX_STALE + 1
    assert await reason_of(verifier, fresh()) is Reason.JWKS_UNAVAILABLE
    fetches = server.requests
    # Failing closed does not turn into a fetch per request.
    for _ in range(20):
        assert await reason_of(verifier, fresh()) is Reason.JWKS_UNAVAILABLE
    assert server.requests == fetches
    # The endpoint recovers: keys come back after the retry backoff.
    server.set(mode="ok")
    clock.advance(COOLDOWN)
    assert (await verifier.verify(fresh())).user == "alice"
    assert verifier.key_age_seconds == 0
    assert "fetch failed" in caplog.text and "fetched 1 key" in caplog.text
    assert fresh() not in caplog.text


@pytest.mark.parametrize("mode", ["garbage", "huge"])
async def test_garbage_refresh_keeps_old_keys(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock, mode: str
) -> None:
    await verifier.verify(token())
    server.set(mode=mode)
    clock.advance(REFRESH)
    await verifier.verify(token())
    await source(verifier).wait_idle()
    assert verifier.jwks_fetch_failures == 1
    assert (await verifier.verify(token())).user == "alice"
    assert verifier.key_age_seconds == REFRESH


async def test_a_key_with_a_non_string_crv_costs_only_itself(server: JwksServer, clock: FakeClock) -> None:
    odd = {"kty": "OKP", "crv": ["Ed25519"], "x": "AAAA", "kid": "odd"}
    server.set(jwks_of(jwk_for(shared_rsa_key(), "k1", "RS256"), odd))
    v = make(server, clock, algorithms=["RS256", "EdDSA"])
    try:
        assert (await v.verify(token())).user == "alice"
        assert v.jwks_fetch_failures == 0
    finally:
        await v.close()


async def test_empty_key_list_is_a_failure(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock
) -> None:
    await verifier.verify(token())
    server.set({"keys": []})
    clock.advance(REFRESH)
    await verifier.verify(token())
    await source(verifier).wait_idle()
    assert verifier.jwks_fetch_failures == 1
    assert (await verifier.verify(token())).user == "alice"


async def test_close_cancels_inflight_fetch(server: JwksServer, clock: FakeClock) -> None:
    v = make(server, clock, jwks_timeout_seconds=5)
    await v.verify(token())
    server.set(mode="hang")
    clock.advance(REFRESH)
    await v.verify(token())
    assert source(v).fetching
    await v.close()
    assert not source(v).fetching
    server.release()


async def test_checks_waiting_on_a_fetch_that_close_cancels_are_denied(
        server: JwksServer, clock: FakeClock) -> None:
    # A reload replaces the verifier and closes the old one while checks that started on the
    # old config wait on its first fetch: they must end in a denial with its reason, not
    # with a CancelledError that leaves the gRPC call unanswered.
    server.set(mode="hang")
    v = make(server, clock)
    waiting = asyncio.ensure_future(reason_of(v, token()))
    async def fetching() -> bool:
        return source(v).fetching

    await async_wait_until(fetching, 5, "the first fetch to start")
    await v.close()
    assert await waiting is Reason.JWKS_UNAVAILABLE
    server.release()


async def test_a_fetch_counts_when_it_ends_so_the_ok_count_never_goes_down(
        server: JwksServer, clock: FakeClock) -> None:
    v = make(server, clock, jwks_timeout_seconds=5)
    server.set(mode="hang")
    waiting = asyncio.ensure_future(reason_of(v, token()))

    async def fetching() -> bool:
        return source(v).fetching

    await async_wait_until(fetching, 5, "the fetch to start")
    assert (v.jwks_fetches, v.jwks_fetch_failures) == (0, 0)  # in flight: not an ok yet
    server.set(mode="500")
    server.release()
    assert await waiting is Reason.JWKS_UNAVAILABLE
    assert (v.jwks_fetches, v.jwks_fetch_failures) == (1, 1)  # ok stayed 0 throughout
    await v.close()


# -- total fetch deadline and the fetch threads ----------------------------------


class SlowDripServer:
    """A real server on 127.0.0.1:0 that answers every request with a few bytes every 0.2 s:
    each socket read succeeds well inside any per-read timeout, and the response does not
    end for DRIP_SECONDS (so a client without a total deadline fails the test, not hangs it)."""

    DRIP_SECONDS = 10.0

    def __init__(self, phase: str) -> None:
        # "headers": drips inside a header line; "body": inside the body;
        # "unsized": a 10 kB body without Content-Length, at once, then closes.
        self.phase = phase
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/jwks.json"

    def start(self) -> SlowDripServer:
        self._accepter.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                if self.phase == "unsized":
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + b" " * 10_000)
                    return
                if self.phase == "headers":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 100000\r\n\r\n{\"keys\": [")
                until = time.monotonic() + self.DRIP_SECONDS
                while not self._stop.wait(0.2) and time.monotonic() < until:
                    conn.sendall(b"  ")
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._accepter.join(5)
        for t in self._threads:
            t.join(5)
        self._sock.close()


@pytest.fixture(params=["headers", "body"])
def slow_drip(request: pytest.FixtureRequest) -> Iterator[SlowDripServer]:
    srv = SlowDripServer(request.param).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_http_get_has_a_total_deadline(slow_drip: SlowDripServer) -> None:
    # The thread itself must give up: abandoning it from asyncio would leave it stuck.
    timeout = 1.0
    started = time.monotonic()
    with pytest.raises(fetch_module.FetchError, match=r"timed out|deadline exceeded"):
        fetch_module.fetch(slow_drip.url, timeout=timeout, max_bytes=256 * 1024)
    # A bound on behaviour, not a benchmark: generous for a loaded 2-core machine.
    assert time.monotonic() - started < timeout + 2


async def test_slow_drip_endpoint_fails_closed_within_the_timeout(
    slow_drip: SlowDripServer, clock: FakeClock
) -> None:
    timeout = 1.0
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], jwks_uri=slow_drip.url, jwks_timeout_seconds=timeout)
    v = JwtVerifier(cfg, max_token_bytes=8192, cache_size=0, clock=clock)
    started = time.monotonic()
    try:
        assert await reason_of(v, token()) is Reason.JWKS_UNAVAILABLE
        assert v.jwks_fetch_failures == 1
    finally:
        await v.close()
    assert time.monotonic() - started < timeout + 2


async def test_each_source_fetches_on_one_thread_of_its_own(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Threads are bounded by the config (one per distinct JWKS source), never by traffic, and
    # none is the default executor's (config reloads run there).
    doc = json.dumps(jwks_for(shared_rsa_key(), "k1", "RS256")).encode()
    lock = threading.Lock()
    threads: dict[str, set[int]] = {}

    def fake_get(uri: str, *, timeout: float, max_bytes: int) -> bytes:
        thread = threading.current_thread()
        assert thread.name.startswith("extauth-jwks"), thread.name
        with lock:
            threads.setdefault(uri, set()).add(thread.ident or 0)
        return doc

    monkeypatch.setattr(fetch_module, "fetch", fake_get)
    sources = [
        UrlKeySource(JwtConfig(issuer=ISS, audiences=[AUD], jwks_uri=f"https://idp{i}.example/jwks",
                               jwks_timeout_seconds=10), clock)
        for i in range(3)
    ]
    try:
        for _ in range(4):
            assert all(await asyncio.gather(*(s.refresh() for s in sources)))
    finally:
        for s in sources:
            await s.close()
    assert len(threads) == 3
    assert all(len(idents) == 1 for idents in threads.values())  # one thread per source, reused
    assert len(set.union(*threads.values())) == 3  # and no two sources share one


async def test_default_executor_free_while_fetches_are_stuck(
    slow_drip: SlowDripServer, clock: FakeClock
) -> None:
    cfgs = [JwtConfig(issuer=ISS, audiences=[AUD], jwks_uri=f"{slow_drip.url}?n={i}",
                      jwks_timeout_seconds=2.0) for i in range(4)]
    sources = [UrlKeySource(c, clock) for c in cfgs]
    fetches = [asyncio.ensure_future(s.refresh()) for s in sources]
    try:
        await asyncio.sleep(0.2)
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 1) == "free"
        assert not any(await asyncio.gather(*fetches))
    finally:
        for s in sources:
            await s.close()


@pytest.mark.parametrize("phase", ["unsized"])
def test_size_cap_without_content_length(phase: str) -> None:
    srv = SlowDripServer(phase).start()  # 10 kB, no Content-Length, then close
    try:
        with pytest.raises(fetch_module.FetchError, match="larger than 1000 bytes"):
            fetch_module.fetch(srv.url, timeout=2.0, max_bytes=1000)
        assert len(fetch_module.fetch(srv.url, timeout=2.0, max_bytes=64 * 1024)) == 10_000
    finally:
        srv.stop()


# -- the URL never reaches a log line or a detail whole ------------------------------


async def test_url_credentials_never_logged_nor_in_details(
    server: JwksServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="extauth.jwks")
    host = server.url.split("://", 1)[1]
    secret_urls = [
        f"http://user:password@{host}?key=secret",  # userinfo: the fetch fails
        f"{server.url}?key=secret&other=secret",  # query only: the fetch works
    ]
    details: list[str] = []
    for url in secret_urls:
        # The config refuses userinfo; constructed unvalidated, the source must still not leak it.
        cfg = JwtConfig.model_construct(issuer=ISS, audiences=[AUD], jwks_uri=url, jwks_timeout_seconds=1.0)
        v = JwtVerifier(cfg, max_token_bytes=8192, cache_size=0, clock=clock)
        try:
            await v.start()
            server.set(mode="500")
            clock.advance(MAX_STALE + 1)  # the keys (if any) are too old, the refetch fails
            with pytest.raises(DenyError) as ei:
                await v.verify(token())
            assert ei.value.reason is Reason.JWKS_UNAVAILABLE
            details.append(ei.value.detail)
            assert "password" not in source(v).uri and "secret" not in source(v).uri
        finally:
            server.set(mode="ok")
            await v.close()
    assert server.requests >= 2  # the query-only URL was really fetched
    assert "fetched 1 key" in caplog.text and "fetch failed" in caplog.text
    for text in [caplog.text, *details]:
        assert "password" not in text and "secret" not in text
        assert "user:" not in text
    assert all("***" in d for d in details)


_FETCH_VIA_ENV_PROXY = """
import sys
from extauth.tokens.fetch import fetch
for uri in sys.argv[1:]:
    try:
        fetch(uri, timeout=5, max_bytes=4096)
        print("fetched", uri)
    except Exception as e:
        print("failed", uri, type(e).__name__)
"""


def test_a_jwks_on_this_host_is_never_fetched_through_a_proxy() -> None:
    # Plain http:// is allowed only on this host, where the keys never cross a network: a
    # proxy from the environment would fetch them in clear text and could answer anything.
    asked: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            asked.append(self.path)  # a proxy is sent the absolute URL
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy")}
        env["http_proxy"] = f"http://127.0.0.1:{proxy.server_address[1]}"
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: a direct fetch is refused
        port = closed.getsockname()[1]
        try:
            out = subprocess.run(
                [sys.executable, "-c", _FETCH_VIA_ENV_PROXY, f"http://localhost:{port}/jwks.json",
                 f"http://127.0.0.1:{port}/jwks.json", "http://issuer.invalid/jwks.json"],
                env=env, capture_output=True, text=True, timeout=60, cwd=os.getcwd()).stdout
        finally:
            closed.close()
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert f"failed http://localhost:{port}/jwks.json" in out and f"failed http://127.0.0.1:{port}" in out
    # The proxy itself works: an issuer elsewhere is fetched through it, and only that one.
    assert "fetched http://issuer.invalid/jwks.json" in out
    assert asked == ["http://issuer.invalid/jwks.json"]
