"""JWKS URL source against a real local HTTP server; time is an injected clock."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from extauth.config import JwtConfig
from extauth.reasons import DenyError, Reason
from extauth.tokens.jwks import UrlKeySource
from extauth.tokens.jwt import JwtVerifier
from tests.keys import (
    FakeClock,
    JwksServer,
    jwk_for,
    jwks_for,
    jwks_of,
    make_rsa_key,
    shared_rsa_key,
    sign,
)

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


def make(server: JwksServer, clock: FakeClock, **extra: Any) -> JwtVerifier:
    opts: dict[str, Any] = {
        "jwks_refresh_seconds": REFRESH,
        "jwks_refetch_cooldown_seconds": COOLDOWN,
        "jwks_max_stale_seconds": MAX_STALE,
        "jwks_timeout_seconds": 0.5,
        **extra,
    }
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], jwks_uri=server.url, **opts)
    return JwtVerifier(cfg, max_token_bytes=8192, cache_size=0, clock=clock)


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


# -- refresh and staleness ---------------------------------------------------


async def test_background_refresh_serves_current_keys(
    verifier: JwtVerifier, server: JwksServer, clock: FakeClock
) -> None:
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
    v = make(server, clock)
    await v.verify(token())
    server.set(mode="hang")
    clock.advance(REFRESH)
    await v.verify(token())
    assert source(v).fetching
    await v.close()
    assert not source(v).fetching
    server.release()
