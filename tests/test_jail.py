"""The abuse jail through the real decision path: Authorizer + build_runtime(parse_config(...)) + a real
store (MemoryStore, and a real Redis server from tests/conftest.py).

Nothing about time is mocked: short ban_seconds and polling. The verification cost of a banned
request is measured with the verifier's own counter of signature checks, not with timings.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from extauth.config import Abuse, parse_config
from extauth.jail import Jail, in_networks, parse_networks
from extauth.metrics import Metrics
from extauth.pipeline import Authorizer, Decision
from extauth.reasons import HOSTILE_REASONS, Reason
from extauth.request import CheckInput
from extauth.runtime import build_runtime
from extauth.store.base import (
    AcquireResult,
    BanInfo,
    LeaseInfo,
    LeaseKeys,
    LeaseRef,
    Limits,
    QuotaOverride,
    Revocation,
    RevocationKind,
    RevocationListing,
    Store,
    StoreError,
    TokenIds,
)
from extauth.store.guard import GuardedStore
from extauth.store.memory import MemoryStore
from tests.keys import HMAC_SECRET, sign
from tests.waiting import eventually

ISS = "https://issuer.example.com"
SECRET_ENV = "EXTAUTH_TEST_JAIL_SECRET"
NAT_IP = "198.51.100.10"
ATTACKER = "203.0.113.66"
APP = "https://app.example.com"
PARTNER = "https://partner.example.net"

# -- the classification: every reason code, hostile or not ----------------------------------------

# Every code must be listed here: a new code fails test_every_reason_is_classified until someone
# decides whether it is evidence of forgery.
EXPECTED_HOSTILE: dict[Reason, bool] = {
    Reason.BAD_HANDSHAKE: False,
    Reason.TOKEN_MISSING: False,
    Reason.TOKEN_MALFORMED: False,  # ?token=undefined, two same-name cookies: app bugs
    Reason.TOKEN_BAD_SIGNATURE: True,
    Reason.TOKEN_UNKNOWN_KEY: False,  # key rotation looks exactly like this
    Reason.TOKEN_EXPIRED: False,  # expired but authentic: an honest laptop waking from sleep
    Reason.TOKEN_NOT_YET_VALID: False,  # clock skew
    Reason.TOKEN_CLAIMS: False,
    Reason.TOKEN_REVOKED: False,  # authentic, withdrawn: its owner logs in again
    Reason.JWKS_UNAVAILABLE: False,  # our outage
    Reason.ORIGIN_NOT_ALLOWED: False,  # a partner page we did not list
    Reason.ORIGIN_MISSING: False,
    Reason.NO_POLICY: False,
    Reason.CLAIMS_FORBIDDEN: False,  # an authentic token without the role: an honest user
    Reason.BANNED: False,  # counting it would extend bans forever
    Reason.SOURCE_NOT_IP: False,  # there is no address to count
    Reason.UNSUPPORTED_VERSION: False,
    Reason.QUOTA_USER: False,
    Reason.QUOTA_IP: False,
    Reason.RATE_IP: False,
    Reason.RATE_USER: False,
    Reason.STORE_UNAVAILABLE: False,  # our outage
    Reason.INTERNAL_ERROR: False,  # our bug
}


def test_every_reason_is_classified() -> None:
    assert set(EXPECTED_HOSTILE) == set(Reason)
    assert {r for r, hostile in EXPECTED_HOSTILE.items() if hostile} == set(HOSTILE_REASONS)


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.value)
def test_reason_hostility(reason: Reason) -> None:
    assert reason.hostile is EXPECTED_HOSTILE[reason]


class SpyStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.hostile_calls: list[str] = []

    async def record_hostile(self, ip: str, **kw: Any) -> bool:
        self.hostile_calls.append(ip)
        return await super().record_hostile(ip, **kw)


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.value)
async def test_jail_counts_only_hostile_reasons(reason: Reason) -> None:
    store = SpyStore()
    metrics = Metrics()
    jail = Jail(Abuse(threshold=1), store, metrics)
    jail.observe(ATTACKER, reason)
    await jail.drain()
    assert store.hostile_calls == ([ATTACKER] if EXPECTED_HOSTILE[reason] else [])
    assert jail.is_banned(ATTACKER) is EXPECTED_HOSTILE[reason]
    assert metrics.hostile.labels(reason.value)._value.get() == (1 if EXPECTED_HOSTILE[reason] else 0)


# -- helpers --------------------------------------------------------------------------------------


def token(sub: str, *, secret: str = HMAC_SECRET, lifetime: int = 600, **over: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": "ws", "sub": sub, "iat": now - 5, "exp": now + lifetime, **over}
    return sign(secret, "HS256", claims)


def forged(sub: str = "admin") -> str:
    """A new forgery on each call (the jail counts each token once)."""
    return token(sub, secret="not-the-secret-" + "x" * 48, jti=secrets.token_hex(8))


def self_declared_key() -> str:
    """A forger's token naming its own key (jku): no honest issuer sends one."""
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    claims = {"sub": "admin", "jti": secrets.token_hex(8)}
    return f"{b64({'alg': 'HS256', 'jku': 'https://evil.example/jwks'})}.{b64(claims)}.c2ln"


def ws_request(ip: str, tok: str | None, origin: str | None = APP) -> CheckInput:
    headers = {
        "upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
        "sec-websocket-key": base64.b64encode(os.urandom(16)).decode(),
    }
    if origin is not None:
        headers["origin"] = origin
    if tok is not None:
        headers["authorization"] = f"Bearer {tok}"
    return CheckInput(method="GET", host="ws.example.com", path="/ws/room", query="", headers=headers,
                      source_ip=ip)


def config(**abuse: Any) -> Any:
    return parse_config({
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "store": "memory://",
        "abuse": {"threshold": 5, "window_seconds": 60, "ban_seconds": 600, **abuse},
        "policies": [{
            "name": "chat",
            "match": {"path_prefix": "/ws"},
            "origins": [APP],
            "jwt": {"issuer": ISS, "audiences": ["ws"], "algorithms": ["HS256"],
                    "hmac_secret_env": SECRET_ENV},
            "quotas": {"connections_per_user": 2, "connections_per_ip": 1000},
        }],
    })


class FlakyStore(Store):
    """A MemoryStore that raises StoreError while ``down``: an outage we cannot cause for real
    in-process (the Redis variant stops a real server instead)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreError("connection refused (simulated outage)")

    async def acquire(self, ref: LeaseRef, limits: Limits, ttl: float,
                      token: TokenIds | None = None) -> AcquireResult:
        self._check()
        return await self.inner.acquire(ref, limits, ttl, token)

    async def refresh(self, refs: Sequence[LeaseRef], ttl: float) -> int:
        self._check()
        return await self.inner.refresh(refs, ttl)

    async def release(self, refs: Sequence[LeaseRef]) -> int:
        self._check()
        return await self.inner.release(refs)

    async def count(self, policy: str, *, user: str | None = None, ip: str | None = None) -> int:
        self._check()
        return await self.inner.count(policy, user=user, ip=ip)

    async def list_leases(self, policy: str, *, user: str | None = None,
                          ip: str | None = None) -> list[LeaseInfo]:
        self._check()
        return await self.inner.list_leases(policy, user=user, ip=ip)

    async def count_all(self) -> int:
        self._check()
        return await self.inner.count_all()

    async def record_hostile(self, ip: str, *, threshold: int, window: float, ban_seconds: float,
                             dry_run: bool, signal: str | None = None) -> bool:
        self._check()
        return await self.inner.record_hostile(ip, threshold=threshold, window=window,
                                               ban_seconds=ban_seconds, dry_run=dry_run, signal=signal)

    async def ban(self, ip: str, seconds: float, reason: str) -> None:
        self._check()
        await self.inner.ban(ip, seconds, reason)

    async def unban(self, ip: str) -> bool:
        self._check()
        return await self.inner.unban(ip)

    async def list_bans(self) -> list[BanInfo]:
        self._check()
        return await self.inner.list_bans()

    async def ping(self) -> None:
        self._check()

    async def lease_key(self, candidate: str, replaces: bool = False) -> LeaseKeys:
        self._check()
        return await self.inner.lease_key(candidate, replaces)

    async def revoke(self, revocation: Revocation, ttl: float) -> float:
        self._check()
        return await self.inner.revoke(revocation, ttl)

    async def unrevoke(self, kind: RevocationKind, subject: str, value: str = "") -> bool:
        self._check()
        return await self.inner.unrevoke(kind, subject, value)

    async def list_revocations(self) -> RevocationListing:
        self._check()
        return await self.inner.list_revocations()

    async def revocation_epoch(self) -> str:
        self._check()
        return await self.inner.revocation_epoch()

    async def set_quota_override(self, policy: str, user: str, override: QuotaOverride,
                                 ttl: float | None) -> QuotaOverride:
        self._check()
        return await self.inner.set_quota_override(policy, user, override, ttl)

    async def get_quota_override(self, policy: str, user: str) -> QuotaOverride | None:
        self._check()
        return await self.inner.get_quota_override(policy, user)

    async def clear_quota_override(self, policy: str, user: str) -> bool:
        self._check()
        return await self.inner.clear_quota_override(policy, user)

    async def close(self) -> None:
        await self.inner.close()


class Rig:
    """The real decision path wired the way ExtAuthServer wires it."""

    def __init__(self, cfg: Any, store: Store, *, refresh_seconds: float = 0.1) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.store = GuardedStore(store, timeout=0.5, failure_threshold=3, reset_seconds=0.2,
                                  metrics=self.metrics)
        self.jail = Jail(cfg.abuse, self.store, self.metrics, refresh_seconds=refresh_seconds)
        self.authorizer = Authorizer(build_runtime(cfg), self.store, metrics=self.metrics, jail=self.jail)
        verifier = self.authorizer.runtime.by_name["chat"].verifier
        assert verifier is not None
        self.verifier = verifier

    async def check(self, ip: str, tok: str | None, origin: str | None = APP) -> Decision:
        return await self.authorizer.check(ws_request(ip, tok, origin))

    async def hostile(self, ip: str, tok: str) -> Decision:
        """One forged attempt; waits for the jail's background write so counts are exact."""
        d = await self.check(ip, tok)
        await self.jail.drain()
        return d

    def bans_total(self) -> float:
        return float(sum(self.metrics.bans.labels(k)._value.get() for k in ("enforced", "dry_run", "manual")))


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, HMAC_SECRET)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig(config(ban_seconds=1), MemoryStore())
    await r.jail.start()
    try:
        yield r
    finally:
        await r.jail.stop()




# -- the storm simulation -------------------------------------------------------------------------


async def honest_round(rig: Rig, users: int = 50, attempts: int = 4) -> Counter[str]:
    """Every user behind one NAT address reconnects ``attempts`` times at once, then disconnects."""
    outcomes: Counter[str] = Counter()

    async def user(i: int) -> None:
        name = f"user{i:02d}"
        origin = PARTNER if i >= 42 else APP  # a partner page whose origin is not listed
        for n in range(attempts):
            if i < 8:
                tok: str | None = token(name, lifetime=-120)  # expired but authentic
            elif i < 12 and n == 0:
                tok = None  # the first try of a few clients forgets the token
            elif i < 16 and n < 2:
                tok = "undefined"  # an app bug: the page sent its unset variable
            else:
                tok = token(name)
            d = await rig.check(NAT_IP, tok, origin)
            outcomes["allow" if d.allowed else d.reason.value if d.reason else "?"] += 1
            await asyncio.sleep(0)

    await asyncio.gather(*(user(i) for i in range(users)))
    # Disconnects: the slots free up again (errors are the outage's; leases then expire by TTL).
    for lease in await _leases(rig):
        with contextlib.suppress(StoreError):
            await rig.store.release([lease])
    return outcomes


async def _leases(rig: Rig) -> list[LeaseRef]:
    try:
        infos = await rig.store.list_leases("chat", ip=NAT_IP)
    except StoreError:
        return []
    return [LeaseRef(i.lease_id, i.policy, i.user, i.ip) for i in infos]


async def attack(rig: Rig, attempts: int) -> list[Decision]:
    out = []
    for n in range(attempts):
        out.append(await rig.hostile(ATTACKER, self_declared_key() if n % 2 else forged()))
    return out


async def run_simulation(rig: Rig, outage: Callable[[bool], Awaitable[None]]) -> None:
    threshold = rig.cfg.abuse.threshold
    await rig.jail.start()

    # Phase 1: the reconnect storm, with an attacker forging tokens at the same time.
    storm, attack_results = await asyncio.gather(honest_round(rig), attack(rig, threshold))
    assert {d.reason for d in attack_results} == {Reason.TOKEN_BAD_SIGNATURE}
    assert storm["allow"] > 0
    for reason in ("token_expired", "origin_not_allowed", "token_missing", "token_malformed", "quota_user"):
        assert storm[reason] > 0, (reason, storm)

    # The attacker is banned after exactly `threshold` signals; the next attempt costs no verification.
    before = rig.verifier.verifications
    d = await rig.check(ATTACKER, forged())
    assert d.reason is Reason.BANNED and d.status == 403
    d = await rig.check(ATTACKER, token("mallory"))  # even a valid token: the IP is banned
    assert d.reason is Reason.BANNED
    assert rig.verifier.verifications == before
    assert [b.ip for b in await rig.store.list_bans()] == [ATTACKER]
    assert rig.metrics.bans.labels("enforced")._value.get() == 1

    # Phase 2: the store goes down in the middle of another storm.
    await outage(True)
    during = await honest_round(rig)
    assert during["store_unavailable"] > 0, during
    # The jail's refresher notices within its interval, and fails open.
    def list_bans_failed() -> bool:
        return rig.metrics.store_errors.labels("list_bans")._value.get() > 0

    await eventually(lambda: asyncio.sleep(0.05), lambda _: list_bans_failed())
    assert list_bans_failed() and not rig.jail.store_ok
    assert not rig.jail.is_banned(NAT_IP)

    # Phase 3: the store is back; honest traffic flows again.
    await outage(False)
    after = await eventually(lambda: honest_round(rig), lambda c: c["allow"] > 0)
    assert after["allow"] > 0, after
    await eventually(lambda: asyncio.sleep(0.05), lambda _: rig.jail.store_ok)
    assert rig.jail.store_ok

    # Zero bans for the office: no BANNED answer, nothing in the store, one ban issued in total.
    for outcomes in (storm, during, after):
        assert outcomes["banned"] == 0
    assert NAT_IP not in {b.ip for b in await rig.store.list_bans()}
    assert rig.bans_total() == 1
    assert not rig.jail.is_banned(NAT_IP)


async def test_storm_behind_nat_memory_store(caplog: pytest.LogCaptureFixture) -> None:
    flaky = FlakyStore(MemoryStore())
    rig = Rig(config(), flaky)

    async def outage(down: bool) -> None:
        flaky.down = down

    caplog.set_level(logging.INFO, logger="extauth.jail")
    try:
        await run_simulation(rig, outage)
    finally:
        await rig.jail.stop()
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records if r.name == "extauth.jail"]
    assert events.count("ban") == 1
    assert "jail_store_error" in events and "jail_store_ok" in events


@pytest.mark.redis
async def test_storm_behind_nat_real_redis(private_redis: Any, key_prefix: str) -> None:
    from extauth.store.redis import RedisStore

    store = RedisStore.from_url(private_redis.url, key_prefix=key_prefix)
    rig = Rig(config(), store)

    async def outage(down: bool) -> None:
        if down:
            await asyncio.to_thread(private_redis.kill)
        else:
            await asyncio.to_thread(private_redis.start)

    try:
        await run_simulation(rig, outage)
    finally:
        await rig.jail.stop()
        await rig.store.close()


# -- ban lifecycle -----------------------------------------------------------------------------------


async def test_banned_after_threshold_then_free_after_unban(rig: Rig) -> None:
    rig.jail.configure(rig.cfg.abuse.model_copy(update={"ban_seconds": 600}))
    for _ in range(rig.cfg.abuse.threshold - 1):
        assert (await rig.hostile(ATTACKER, forged())).reason is Reason.TOKEN_BAD_SIGNATURE
    assert not rig.jail.is_banned(ATTACKER)
    assert (await rig.hostile(ATTACKER, forged())).reason is Reason.TOKEN_BAD_SIGNATURE
    assert rig.jail.is_banned(ATTACKER)

    verifications = rig.verifier.verifications
    for _ in range(20):
        assert (await rig.check(ATTACKER, forged())).reason is Reason.BANNED
    assert rig.verifier.verifications == verifications  # zero verification cost while banned
    # Another replica's unban reaches this one through the store within the refresh interval.
    assert await rig.store.unban(ATTACKER)
    d = await eventually(lambda: rig.check(ATTACKER, token("bob")), lambda d: d.allowed)
    assert d.allowed


async def test_ban_expires_after_ban_seconds(rig: Rig) -> None:
    for _ in range(rig.cfg.abuse.threshold):
        await rig.hostile(ATTACKER, forged())
    assert (await rig.check(ATTACKER, token("bob"))).reason is Reason.BANNED
    started = time.monotonic()
    d = await eventually(lambda: rig.check(ATTACKER, token("bob")), lambda d: d.allowed)
    assert d.allowed and time.monotonic() - started < 5


async def test_ban_made_elsewhere_reaches_this_replica_within_a_second(rig: Rig) -> None:
    other = Jail(rig.cfg.abuse, rig.store, Metrics())  # a second replica sharing the store
    for _ in range(rig.cfg.abuse.threshold):
        other.observe(ATTACKER, Reason.TOKEN_BAD_SIGNATURE)
        await other.drain()
    assert other.is_banned(ATTACKER)
    started = time.monotonic()
    d = await eventually(lambda: rig.check(ATTACKER, token("bob")), lambda d: d.reason is Reason.BANNED)
    assert d.reason is Reason.BANNED and time.monotonic() - started < 1.5


async def test_never_ban_is_denied_but_never_banned() -> None:
    rig = Rig(config(never_ban=["127.0.0.0/8", "203.0.113.0/24"]), MemoryStore())
    await rig.jail.start()
    try:
        for _ in range(rig.cfg.abuse.threshold * 3):
            d = await rig.hostile(ATTACKER, forged())
            assert d.reason is Reason.TOKEN_BAD_SIGNATURE
        assert await rig.store.list_bans() == []
        assert not rig.jail.is_banned(ATTACKER)
        assert rig.bans_total() == 0
        assert (await rig.check(ATTACKER, token("bob"))).allowed
    finally:
        await rig.jail.stop()


async def test_an_ipv6_forger_rotating_through_its_64_is_banned_as_one_client(rig: Rig) -> None:
    # One IPv6 client holds a whole /64: a new address per attempt must not reset its count,
    # and the ban holds every address in it, but not the neighbouring /64.
    rig.jail.configure(rig.cfg.abuse.model_copy(update={"ban_seconds": 600}))
    for i in range(rig.cfg.abuse.threshold):
        assert (await rig.hostile(f"2001:db8:1:2::{i + 1:x}", forged())).reason is Reason.TOKEN_BAD_SIGNATURE
    assert rig.jail.is_banned("2001:db8:1:2::/64")
    assert (await rig.check("2001:db8:1:2:aaaa:bbbb:cccc:dddd", token("bob"))).reason is Reason.BANNED
    assert (await rig.check("2001:db8:1:3::1", token("bob"))).allowed
    assert [b.ip for b in await rig.store.list_bans()] == ["2001:db8:1:2::/64"]


async def test_with_ipv6_prefix_128_each_address_is_its_own_client() -> None:
    cfg = config().model_copy(update={"ipv6_prefix_length": 128})
    rig = Rig(cfg, MemoryStore())
    await rig.jail.start()
    try:
        for i in range(cfg.abuse.threshold):
            await rig.hostile(f"2001:db8:1:2::{i + 1:x}", forged())
        assert await rig.store.list_bans() == []
    finally:
        await rig.jail.stop()


async def test_a_64_holding_a_never_ban_address_is_never_banned() -> None:
    rig = Rig(config(never_ban=["2001:db8:1:2::7/128"]), MemoryStore())
    await rig.jail.start()
    try:
        for _ in range(rig.cfg.abuse.threshold * 2):
            assert (await rig.hostile("2001:db8:1:2::66", forged())).reason is Reason.TOKEN_BAD_SIGNATURE
        assert await rig.store.list_bans() == []
        assert (await rig.check("2001:db8:1:2::7", token("bob"))).allowed
    finally:
        await rig.jail.stop()


async def _never_ban_lifts_a_stored_ban(store: Store) -> None:
    # The office was banned before anyone listed it in never_ban; listing it (a reload) must
    # let its users in on every policy, quota-counted WebSockets included, without an unban.
    rig = Rig(config(), store)
    await rig.jail.start()
    try:
        await rig.store.ban(NAT_IP, 600, "hostile")
        await rig.jail.refresh()
        assert (await rig.check(NAT_IP, token("alice"))).reason is Reason.BANNED
        rig.jail.configure(rig.cfg.abuse.model_copy(update={"never_ban": ["198.51.100.0/24"]}))
        for user in ("alice", "bob"):
            d = await rig.check(NAT_IP, token(user))
            assert d.allowed and d.lease is not None, d
        assert await rig.store.count("chat", ip=NAT_IP) == 2  # each attempt counted once
        assert [b.ip for b in await rig.store.list_bans()] == [NAT_IP]  # lifted, not deleted
        assert (await rig.check("203.0.113.7", token("carol"))).allowed
        await rig.store.ban("203.0.113.7", 600, "manual")
        await rig.jail.refresh()
        assert (await rig.check("203.0.113.7", token("carol"))).reason is Reason.BANNED  # others stay banned
    finally:
        await rig.jail.stop()


async def test_never_ban_lifts_a_ban_the_store_already_holds() -> None:
    await _never_ban_lifts_a_stored_ban(MemoryStore())


@pytest.mark.redis
async def test_never_ban_lifts_a_ban_the_store_already_holds_real_redis(redis_server: Any,
                                                                        key_prefix: str) -> None:
    from extauth.store.redis import RedisStore

    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix)
    try:
        await _never_ban_lifts_a_stored_ban(store)
    finally:
        await store.close()


async def test_a_shadow_policy_never_feeds_the_jail(monkeypatch: pytest.MonkeyPatch) -> None:
    # A policy in shadow mode with a key set the issuer does not use yet: every honest token
    # fails its signature there. Its users must not be banned on the enforced policy.
    monkeypatch.setenv("EXTAUTH_TEST_JAIL_NEW_SECRET", "the-next-secret-" + "n" * 48)
    base = config()
    shadow = base.policies[0].model_copy(update={
        "name": "chat-v2", "shadow": True, "match": base.policies[0].match.model_copy(
            update={"path_prefix": "/v2"}),
        "jwt": base.policies[0].jwt.model_copy(update={"hmac_secret_env": "EXTAUTH_TEST_JAIL_NEW_SECRET"}),
    })
    rig = Rig(base.model_copy(update={"policies": [*base.policies, shadow]}), MemoryStore())
    await rig.jail.start()
    try:
        for i in range(rig.cfg.abuse.threshold * 2):
            req = dataclasses.replace(ws_request(NAT_IP, token(f"user{i}")), path="/v2/room")
            d = await rig.authorizer.check(req)
            assert d.allowed and d.shadow_reason is Reason.TOKEN_BAD_SIGNATURE, d
            await rig.jail.drain()
        shadowed = rig.metrics.shadow.labels("chat-v2", "token_bad_signature")._value.get()
        assert shadowed == rig.cfg.abuse.threshold * 2
        assert rig.metrics.hostile.labels("token_bad_signature")._value.get() == 0
        assert await rig.store.list_bans() == []
        assert (await rig.check(NAT_IP, token("frank"))).allowed  # the enforced policy
        # The enforced policy still counts forgeries.
        for _ in range(rig.cfg.abuse.threshold):
            await rig.hostile(ATTACKER, forged())
        assert rig.jail.is_banned(ATTACKER)
    finally:
        await rig.jail.stop()


async def test_a_proxy_standing_in_for_an_unreadable_client_address_is_never_banned() -> None:
    # Behind a load balancer (client_ip: xff:1), a forger whose entry the proxy wrote in a form
    # that is no address is keyed as the proxy: a ban would lock out everyone behind it.
    lb = "10.0.0.1"
    rig = Rig(config().model_copy(update={"client_ip": "xff:1"}), MemoryStore())

    async def via_lb(entry: str, tok: str) -> Decision:
        req = ws_request(lb, tok)
        req = dataclasses.replace(req, headers={**req.headers, "x-forwarded-for": entry})
        d = await rig.authorizer.check(req)
        await rig.jail.drain()
        return d

    await rig.jail.start()
    try:
        for _ in range(rig.cfg.abuse.threshold * 2):
            assert (await via_lb("unknown", forged())).reason is Reason.TOKEN_BAD_SIGNATURE
        assert await rig.store.list_bans() == []
        assert (await via_lb("unknown", token("alice"))).allowed
        # A forger the proxy names with a port is keyed, and banned, as itself alone.
        for _ in range(rig.cfg.abuse.threshold):
            await via_lb(f"{ATTACKER}:51234", forged())
        assert [b.ip for b in await rig.store.list_bans()] == [ATTACKER]
        assert (await via_lb(f"{ATTACKER}:40000", token("mallory"))).reason is Reason.BANNED
        assert (await via_lb(f"{NAT_IP}:40001", token("bob"))).allowed
    finally:
        await rig.jail.stop()


async def test_one_bad_token_in_a_reconnect_loop_is_one_signal(rig: Rig) -> None:
    # A developer's client sends a staging token to production and reconnects every second:
    # the same token, failing its signature each time, must not ban the office it sits in.
    staging = token("dev", secret="the-staging-secret-" + "s" * 48)
    for _ in range(rig.cfg.abuse.threshold * 10):
        assert (await rig.hostile(NAT_IP, staging)).reason is Reason.TOKEN_BAD_SIGNATURE
    assert await rig.store.list_bans() == [] and not rig.jail.is_banned(NAT_IP)
    assert (await rig.check(NAT_IP, token("alice"))).allowed
    # A forger's distinct tokens still count one each.
    for _ in range(rig.cfg.abuse.threshold):
        await rig.hostile(ATTACKER, forged())
    assert rig.jail.is_banned(ATTACKER)


async def test_dry_run_counts_would_be_bans_without_enforcing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extauth.jail")
    rig = Rig(config(dry_run=True), MemoryStore())
    await rig.jail.start()
    try:
        for _ in range(rig.cfg.abuse.threshold):
            await rig.hostile(ATTACKER, forged())
        assert rig.metrics.bans.labels("dry_run")._value.get() == 1
        assert rig.metrics.bans.labels("enforced")._value.get() == 0
        assert await rig.store.list_bans() == []
        await asyncio.sleep(0.3)  # a refresh or two
        assert not rig.jail.is_banned(ATTACKER)
        assert (await rig.check(ATTACKER, forged())).reason is Reason.TOKEN_BAD_SIGNATURE
        assert (await rig.check(ATTACKER, token("bob"))).allowed
    finally:
        await rig.jail.stop()
    bans = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "ban"]
    assert len(bans) == 1
    fields = bans[0].fields  # type: ignore[attr-defined]
    assert fields["dry_run"] is True and fields["ip"] == ATTACKER
    assert fields["hostile"] == 5 and fields["ban_seconds"] == 600


async def test_ban_log_line_is_one_json_event(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    from extauth.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="extauth.jail")
    for _ in range(rig.cfg.abuse.threshold):
        await rig.hostile(ATTACKER, forged())
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "extauth.jail"]
    events = [json.loads(line) for line in lines]
    ban = [e for e in events if e.get("event") == "ban"]
    assert len(ban) == 1
    assert ban[0]["logger"] == "extauth.jail" and ban[0]["ip"] == ATTACKER
    assert ban[0]["hostile"] == 5 and ban[0]["ban_seconds"] == 1 and ban[0]["dry_run"] is False
    assert all("\n" not in line for line in lines)


async def test_store_down_fails_open_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extauth.jail")
    flaky = FlakyStore(MemoryStore())
    await flaky.inner.ban(ATTACKER, 600, "manual")
    rig = Rig(config(), flaky)
    await rig.jail.start()
    try:
        assert rig.jail.is_banned(ATTACKER)
        flaky.down = True
        for _ in range(rig.cfg.abuse.threshold * 2):
            rig.jail.observe("192.0.2.9", Reason.TOKEN_BAD_SIGNATURE)
        await rig.jail.drain()
        await asyncio.sleep(0.3)
        assert not rig.jail.is_banned("192.0.2.9")  # could not be recorded: fail open
        assert rig.jail.is_banned(ATTACKER)  # the last known list still holds until expiry
        flaky.down = False
        await eventually(lambda: asyncio.sleep(0.05), lambda _: rig.jail.store_ok)
        assert rig.jail.store_ok
    finally:
        await rig.jail.stop()
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records if r.name == "extauth.jail"]
    assert events.count("jail_store_error") == 1
    assert events.count("jail_store_ok") == 1


async def test_observe_bounds_in_flight_writes() -> None:
    class SlowStore(MemoryStore):
        async def record_hostile(self, ip: str, **kw: Any) -> bool:
            await asyncio.sleep(0.2)
            return await super().record_hostile(ip, **kw)

    jail = Jail(Abuse(threshold=1000), SlowStore(), Metrics(), max_in_flight=4)
    for i in range(10):
        jail.observe(f"192.0.2.{i}", Reason.TOKEN_BAD_SIGNATURE)  # returns at once
    assert len(jail._tasks) == 4 and jail.dropped == 6
    await jail.stop()
    assert not jail._tasks


def test_observe_without_a_loop_does_not_raise() -> None:
    jail = Jail(Abuse(), MemoryStore(), Metrics())
    jail.observe(ATTACKER, Reason.TOKEN_BAD_SIGNATURE)
    assert jail.dropped == 1


async def test_configure_applies_on_reload() -> None:
    store = MemoryStore()
    jail = Jail(Abuse(threshold=2), store, Metrics())
    jail.configure(Abuse(threshold=2, never_ban=["203.0.113.0/24"]))
    for _ in range(5):
        jail.observe(ATTACKER, Reason.TOKEN_BAD_SIGNATURE)
    await jail.drain()
    assert not jail.is_banned(ATTACKER)
    jail.configure(Abuse(threshold=2, never_ban=[]))
    for _ in range(2):
        jail.observe(ATTACKER, Reason.TOKEN_BAD_SIGNATURE)
    await jail.drain()
    assert jail.is_banned(ATTACKER)
    jail.configure(Abuse(enabled=False, never_ban=[]))
    assert not jail.is_banned(ATTACKER)


def test_never_ban_matching() -> None:
    nets = parse_networks(["127.0.0.0/8", "::1/128", "10.0.0.0/8"])
    assert in_networks("127.0.0.1", nets) and in_networks("::1", nets) and in_networks("10.2.3.4", nets)
    assert in_networks("::ffff:10.1.1.1", nets)  # v4-mapped v6
    assert not in_networks("203.0.113.66", nets) and not in_networks("not-an-ip", nets)
    # Entries in the forms client addresses never take are put in the form they do take.
    mapped = parse_networks(["::ffff:10.0.0.0/104", "64:ff9b::c633:6400/120"])
    assert mapped == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("198.51.100.0/24"))
    assert in_networks("10.0.0.5", mapped) and in_networks(NAT_IP, mapped)
    assert not in_networks("11.0.0.5", mapped)
    # A client subject that is a network counts when it overlaps one (it would ban it too).
    assert in_networks("::/64", nets) and not in_networks("2001:db8::/64", nets)
    assert not in_networks("not/a-network", nets)


async def test_server_wires_the_jail_and_reconfigures_it_on_reload(tmp_path: Any) -> None:
    import yaml

    from extauth.server import ExtAuthServer

    def write(**abuse: Any) -> None:
        data = {
            "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "drain_seconds": 0,
            "watch_config": False, "abuse": abuse,
            "policies": [{"name": "chat", "match": {"path_prefix": "/ws"}, "origins": [APP],
                          "jwt": {"issuer": ISS, "audiences": ["ws"], "algorithms": ["HS256"],
                                  "hmac_secret_env": SECRET_ENV}}],
        }
        path.write_text(yaml.safe_dump(data))

    from extauth.config import load_config

    path = tmp_path / "extauth.yaml"
    write(enabled=False)
    srv = ExtAuthServer(load_config(path), config_path=path)
    await srv.start()
    try:
        assert srv.jail is None and srv.authorizer.jail is None
        write(enabled=True, threshold=2, ban_seconds=30)
        assert await srv.reload()
        jail = srv.jail
        assert jail is not None and srv.authorizer.jail is jail and jail.cfg.threshold == 2
        for _ in range(2):
            await srv.authorizer.check(ws_request(ATTACKER, forged()))
        await jail.drain()
        assert (await srv.authorizer.check(ws_request(ATTACKER, token("bob")))).reason is Reason.BANNED
        write(enabled=True, threshold=7, never_ban=["203.0.113.0/24"])
        assert await srv.reload()
        assert srv.jail is jail and jail.cfg.threshold == 7
        assert (await srv.authorizer.check(ws_request(ATTACKER, token("bob")))).allowed  # now exempt
    finally:
        await srv.stop(drain=0)
    assert jail._refresher is None
