"""Revocation through a real Envoy in front of two extauth replicas sharing a real Redis: a
revocation written to the store (as any replica's admin API writes it) refuses the next
upgrade at once and the next plain-HTTP request within about a second, whichever replica
answers, however warm its token cache and allow memo; tokens issued after T pass."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from extauth.store.base import Revocation
from extauth.store.redis import RedisStore
from tests.e2e.harness import Refused, Stack, http_request, token
from tests.waiting import async_wait_until

pytestmark = pytest.mark.e2e

TRIES = 6  # Envoy balances round robin over the two replicas: both answer some of these


@pytest.fixture
async def stack_and_store(make_stack: Callable[..., Stack]) -> AsyncIterator[tuple[Stack, RedisStore]]:
    stack = make_stack(replicas=2, lease_ttl=30)
    assert stack.redis is not None
    store = RedisStore.from_url(stack.redis.url + "/0")
    try:
        yield stack, store
    finally:
        await store.close()


async def _upgrades(stack: Stack, user: str, tok: str) -> list[str]:
    out = []
    for _ in range(TRIES):
        r = await stack.try_connect(user, tok=tok)
        if isinstance(r, Refused):
            out.append(r.reason or str(r.status))
        else:
            out.append("allow")
            await r.close()
    return out


async def _requests(stack: Stack, tok: str) -> list[str]:
    out = []
    for _ in range(TRIES):
        status, headers, _ = await asyncio.to_thread(
            http_request, stack.port, "GET", "/api/items", {"authorization": f"Bearer {tok}"})
        out.append("allow" if status == 200 else headers.get("x-extauth-reason", str(status)))
    return out


def _revoked_by_every_replica(stack: Stack) -> bool:
    return all(any(d.get("reason") == "token_revoked" for d in e.decisions()) for e in stack.extauth)


async def test_a_revoked_jti_is_refused_by_both_replicas(stack_and_store: tuple[Stack, RedisStore]) -> None:
    stack, store = stack_and_store
    user = f"user-{uuid.uuid4().hex[:8]}"
    ws_tok, api_tok = token(user, jti="ws-1"), token(user, aud="api", jti="api-1")
    # Warm both replicas: verified-token caches, and the plain-HTTP allows remembered.
    assert await _upgrades(stack, user, ws_tok) == ["allow"] * TRIES
    assert await _requests(stack, api_tok) == ["allow"] * TRIES
    await store.revoke(Revocation("jti", user, "ws-1"), 60)
    await store.revoke(Revocation("jti", user, "api-1"), 60)
    # The upgrade: the acquire script itself refuses it, on either replica, with no wait.
    assert await _upgrades(stack, user, ws_tok) == ["token_revoked"] * TRIES

    async def http_refused() -> bool:
        return await _requests(stack, api_tok) == ["token_revoked"] * TRIES

    await async_wait_until(http_refused, 3.0, "plain HTTP refused on both replicas")
    assert _revoked_by_every_replica(stack)
    # Another token of the same user passes.
    assert await _upgrades(stack, user, token(user, jti="ws-2")) == ["allow"] * TRIES


async def test_log_out_everywhere_then_a_new_login(stack_and_store: tuple[Stack, RedisStore]) -> None:
    stack, store = stack_and_store
    user = f"user-{uuid.uuid4().hex[:8]}"
    now = int(time.time())
    old_ws, old_api = token(user, iat=now - 5), token(user, aud="api", iat=now - 5)
    assert await _upgrades(stack, user, old_ws) == ["allow"] * TRIES
    assert await _requests(stack, old_api) == ["allow"] * TRIES
    await store.revoke(Revocation("before", user, before=now), 60)
    assert await _upgrades(stack, user, old_ws) == ["token_revoked"] * TRIES

    async def http_refused() -> bool:
        return await _requests(stack, old_api) == ["token_revoked"] * TRIES

    await async_wait_until(http_refused, 3.0, "plain HTTP refused on both replicas")
    new_ws, new_api = token(user, iat=now + 1), token(user, aud="api", iat=now + 1)
    assert await _upgrades(stack, user, new_ws) == ["allow"] * TRIES
    assert await _requests(stack, new_api) == ["allow"] * TRIES
