"""The decision pipeline in-process: client IP, shadow mode, store outages, the
verified-token cache, and config swaps under concurrent load."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import pytest

from extauth.addresses import client_subject
from extauth.config import parse_config
from extauth.pipeline import Authorizer, client_ip
from extauth.reasons import Reason
from extauth.request import CheckInput
from extauth.runtime import build_runtime
from extauth.store import open_store
from extauth.store.guard import GuardedStore
from extauth.store.memory import MemoryStore
from tests.envoy_msgs import h2_ws_headers, ws_headers
from tests.keys import jwks_for, shared_rsa_key, sign

ISS = "https://issuer.example.com"


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("keys") / "jwks.json"
    path.write_text(json.dumps(jwks_for(shared_rsa_key(), "k1", "RS256")))
    return str(path)


def token(sub: str = "alice", **over: Any) -> str:
    now = int(time.time())
    return sign(shared_rsa_key(), "RS256", {"iss": ISS, "aud": "ws", "sub": sub, "iat": now,
                                            "exp": now + 600, **over}, kid="k1")


def cfg(jwks_file: str, *, shadow: bool = False, origins: list[str] | None = None, **top: Any) -> Any:
    return parse_config({
        **top,
        "policies": [{
            "name": "chat", "match": {"path_prefix": "/ws"}, "shadow": shadow,
            "origins": origins or ["https://app.example.com"],
            "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file,
                    "token_sources": ["query:token"]},
            "quotas": {"connections_per_user": 3},
            "upstream_headers": {"x-user-id": "{sub}"},
        }],
    })


def req(query: str = "", **headers: str) -> CheckInput:
    h = ws_headers(**headers)
    return CheckInput(method="GET", host="h", path="/ws", query=query, headers=h, source_ip="198.51.100.9")


def h2_req(query: str = "", protocol: str = "HTTP/2", **headers: str) -> CheckInput:
    return CheckInput(method="GET", host="h", path="/ws", query=query, headers=h2_ws_headers(**headers),
                      source_ip="198.51.100.9", protocol=protocol)


def _peer(source_ip: str, xff: str | None = None) -> CheckInput:
    headers = {"x-forwarded-for": xff} if xff is not None else {}
    return CheckInput(method="GET", host="h", path="/", query="", source_ip=source_ip, headers=headers)


def test_client_ip_from_trusted_xff_hops() -> None:
    r = _peer("10.0.0.1", "203.0.113.5, 192.0.2.1, 10.0.0.9")
    assert client_ip(r, 0) == "10.0.0.1"
    assert client_ip(r, 1) == "10.0.0.9"
    assert client_ip(r, 3) == "203.0.113.5"
    assert client_ip(r, 4) == "10.0.0.1"  # fewer entries than trusted hops: use the peer
    assert client_ip(_peer("10.0.0.1", "not-an-ip"), 1) == "10.0.0.1"


def test_client_ip_from_entries_a_proxy_wrote_with_a_port() -> None:
    # Some proxies append ip:port (Azure Application Gateway): without reading it, every
    # client would be keyed as the proxy and share its quotas and bans.
    r = _peer("10.0.0.1", "203.0.113.5:51234, [2001:DB8::1]:443, 10.0.0.9:80")
    assert [client_ip(r, hops) for hops in (1, 2, 3)] == ["10.0.0.9", "2001:db8::1", "203.0.113.5"]
    for garbled in ("203.0.113.5:", "203.0.113.5:x", "[2001:db8::1]", "1.2.3.4:80:90", "unknown"):
        expected = "2001:db8::1" if garbled == "[2001:db8::1]" else "10.0.0.1"
        assert client_ip(_peer("10.0.0.1", garbled), 1) == expected, garbled


def test_client_ip_has_one_spelling_per_address() -> None:
    # Quota keys and bans are per address: the mapped form and IPv6 spellings must not make
    # one client several.
    mapped = _peer("::ffff:192.0.2.7", "::FFFF:203.0.113.5, 2001:DB8:0::1")
    assert client_ip(mapped, 0) == "192.0.2.7"
    assert client_ip(mapped, 1) == "2001:db8::1"
    assert client_ip(mapped, 2) == "203.0.113.5"
    assert client_ip(_peer("unix:/run/envoy.sock"), 0) == "unix:/run/envoy.sock"  # not an IP: as given


def test_ipv4_clients_behind_a_nat64_translator_are_each_their_own_client() -> None:
    # SIIT-DC: IPv4 clients reach an IPv6-only service as 64:ff9b::a.b.c.d (RFC 6052). By
    # their /64 they would all be one client, and one forger would ban them all.
    subjects = {client_subject(client_ip(_peer(f"64:ff9b::203.0.113.{i}"), 0), 64) for i in (5, 6)}
    assert subjects == {"203.0.113.5", "203.0.113.6"}
    other = client_ip(_peer("64:ff9b:1::cb00:7105"), 0)  # a local-use prefix: left as IPv6
    assert client_subject(other, 64) == "64:ff9b:1::/64"


async def test_shadow_mode_allows_and_tags(jwks_file: str) -> None:
    authz = Authorizer(build_runtime(cfg(jwks_file, shadow=True)), GuardedStore(MemoryStore()))
    d = await authz.check(req(origin="https://evil.com"))
    assert d.allowed and d.shadow_reason is Reason.ORIGIN_NOT_ALLOWED and d.reason is None
    count = authz.metrics.shadow.labels("chat", "origin_not_allowed")._value.get()
    assert count == 1
    # A shadow policy still strips the credential.
    d = await authz.check(req(f"token={token(exp=1, iat=0)}"))
    assert d.allowed and d.shadow_reason is Reason.TOKEN_EXPIRED
    assert d.query_params_to_remove == ("token",)


async def test_shadow_allow_strips_the_token_when_denied_before_the_token_step(jwks_file: str) -> None:
    # The origin is checked before the token is read: the shadow allow must still strip it.
    authz = Authorizer(build_runtime(cfg(jwks_file, shadow=True)), GuardedStore(MemoryStore()))
    d = await authz.check(req(f"token={token()}", origin="https://evil.com"))
    assert d.allowed and d.shadow_reason is Reason.ORIGIN_NOT_ALLOWED
    assert d.query_params_to_remove == ("token",)
    assert "x-user-id" in d.headers_to_remove and "x-user-id" not in d.headers_to_set


async def test_shadow_denies_for_real_when_the_token_cannot_be_stripped(jwks_file: str) -> None:
    # Two different tokens in one transport: the edits are ambiguous, so no shadow allow.
    authz = Authorizer(build_runtime(cfg(jwks_file, shadow=True)), GuardedStore(MemoryStore()))
    d = await authz.check(req(f"token={token()}&token={token('bob')}", origin="https://evil.com"))
    assert not d.allowed and d.reason is Reason.ORIGIN_NOT_ALLOWED and d.shadow_reason is None
    d = await authz.check(req(f"token={token()}&token={token('bob')}"))
    assert not d.allowed and d.reason is Reason.TOKEN_MALFORMED


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens here once the socket is closed


@pytest.mark.parametrize(("on_error", "allowed"), [("deny", False), ("allow", True)])
async def test_store_outage_outcome(jwks_file: str, on_error: str, allowed: bool) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    config = cfg(jwks_file, store=url, store_on_error=on_error)
    store = GuardedStore(open_store(url), timeout=0.05, failure_threshold=2, reset_seconds=30)
    authz = Authorizer(build_runtime(config), store)
    try:
        started = time.monotonic()
        decisions = [await authz.check(req(f"token={token()}")) for _ in range(20)]
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert all(d.allowed is allowed for d in decisions)
    if not allowed:
        assert {d.reason for d in decisions} == {Reason.STORE_UNAVAILABLE}
        assert decisions[0].status == 503
    assert all(d.lease is None for d in decisions)
    # Once the breaker is open no check waits for the store.
    assert elapsed < 2.0


async def test_reconnect_storm_verifies_once(jwks_file: str) -> None:
    tok = token()
    # No quotas on this policy, so the storm exercises verification alone.
    no_quota = build_runtime(parse_config({"policies": [{
        "name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
        "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file, "token_sources": ["query:token"]},
    }]}))
    authz = Authorizer(no_quota, None)
    verifier = no_quota.by_name["chat"].verifier
    assert verifier is not None
    before = verifier.verifications
    results = await asyncio.gather(*(authz.check(req(f"token={tok}")) for _ in range(200)))
    assert all(d.allowed and d.user == "alice" for d in results)
    assert verifier.verifications - before == 1


async def test_exactly_n_concurrent_upgrades(jwks_file: str) -> None:
    authz = Authorizer(build_runtime(cfg(jwks_file)), GuardedStore(MemoryStore()))
    tok = token("carol")
    results = await asyncio.gather(*(authz.check(req(f"token={tok}")) for _ in range(30)))
    assert sum(d.allowed for d in results) == 3
    assert {d.reason for d in results if not d.allowed} == {Reason.QUOTA_USER}


def _quota_ip_cfg(jwks_file: str, **top: Any) -> Any:
    base = cfg(jwks_file, **top)
    policy = base.policies[0]
    quotas = policy.quotas.model_copy(update={"connections_per_ip": 2})
    return base.model_copy(update={"policies": [policy.model_copy(update={"quotas": quotas})]})


@pytest.mark.parametrize(("prefix", "allowed"), [(64, 2), (128, 4)])
async def test_ipv6_addresses_of_one_64_share_the_per_ip_quota(
        jwks_file: str, prefix: int, allowed: int, caplog: pytest.LogCaptureFixture) -> None:
    # One IPv6 client holds a /64: by default its addresses are one client for per-IP quotas.
    store = GuardedStore(MemoryStore())
    authz = Authorizer(build_runtime(_quota_ip_cfg(jwks_file, ipv6_prefix_length=prefix)), store)
    decisions = []
    for i, user in enumerate(["u1", "u2", "u3", "u4"]):
        r = req(f"token={token(user)}")
        r = CheckInput(method=r.method, host=r.host, path=r.path, query=r.query, headers=r.headers,
                       source_ip=f"2001:db8:1:2::{i + 1}")
        decisions.append(await authz.check(r))
    assert sum(d.allowed for d in decisions) == allowed
    assert {d.reason for d in decisions if not d.allowed} <= {Reason.QUOTA_IP}
    subject = "2001:db8:1:2::/64" if prefix == 64 else "2001:db8:1:2::1"
    assert decisions[0].client_ip == decisions[0].lease.ip == subject  # type: ignore[union-attr]
    # The log names the subject, and the address itself when they differ.
    caplog.set_level(logging.INFO, logger="extauth.decision")
    r = req(f"token={token('u1')}", origin="https://evil.example")
    await authz.check(CheckInput(method=r.method, host=r.host, path=r.path, query=r.query,
                                 headers=r.headers, source_ip="2001:db8:1:2::9"))
    fields = caplog.records[-1].fields  # type: ignore[attr-defined]
    assert fields["client_ip"] == ("2001:db8:1:2::/64" if prefix == 64 else "2001:db8:1:2::9")
    assert fields.get("client_address") == ("2001:db8:1:2::9" if prefix == 64 else None)


async def test_swap_under_concurrent_load_never_fails_a_check(jwks_file: str) -> None:
    authz = Authorizer(build_runtime(parse_config({"policies": [{
        "name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
        "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file, "token_sources": ["query:token"]},
    }]})), None)
    tok = token()
    stop = asyncio.Event()

    async def reloader() -> int:
        n = 0
        while not stop.is_set():
            origins = ["https://app.example.com"] + ([f"https://r{n}.example.com"] if n % 2 else [])
            runtime = build_runtime(parse_config({"policies": [{
                "name": "chat", "match": {"path_prefix": "/ws"}, "origins": origins,
                "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file,
                        "token_sources": ["query:token"]},
            }]}), authz.runtime)
            authz.swap(runtime)
            n += 1
            await asyncio.sleep(0)
        return n

    task = asyncio.create_task(reloader())
    results = []
    for _ in range(20):
        results += await asyncio.gather(*(authz.check(req(f"token={tok}")) for _ in range(50)))
    stop.set()
    swaps = await task
    assert swaps >= 10
    assert all(d.allowed for d in results), {d.reason for d in results}


async def test_a_lease_granted_before_a_bug_is_taken_back(jwks_file: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug after the acquire (building the allow) must not hold the user's slot for a TTL.
    store = MemoryStore()
    authz = Authorizer(build_runtime(cfg(jwks_file)), GuardedStore(store))  # as the server wires it

    def broken_allow(ctx: Any) -> Any:
        raise RuntimeError("a template bug")

    monkeypatch.setattr(authz, "_allow", broken_allow)
    d = await authz.check(req(f"token={token()}"))
    assert not d.allowed and d.reason is Reason.INTERNAL_ERROR and d.lease is None
    for _ in range(100):
        if await store.count("chat", user="alice") == 0:
            break
        await asyncio.sleep(0.01)
    assert await store.count("chat", user="alice") == 0


async def test_a_policy_without_identity_headers_strips_the_ones_other_policies_set(jwks_file: str) -> None:
    # The upstream behind both policies trusts x-user-id because only extauth sets it: a
    # client must not bring its own through the public policy, which sets none.
    config = parse_config({"policies": [
        {"name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
         "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file,
                 "token_sources": ["query:token"]},
         "upstream_headers": {"X-User-Id": "{sub}", "x-tenant": "{tid}"}},
        {"name": "public", "match": {"path_prefix": "/public"}, "websocket_only": False,
         "origins": ["https://app.example.com"], "upstream_headers": {"x-tenant": "public"}},
    ]})
    authz = Authorizer(build_runtime(config), GuardedStore(MemoryStore()))
    public = CheckInput(method="GET", host="h", path="/public/x", query="", source_ip="198.51.100.9",
                        headers={"x-user-id": "admin", "x-tenant": "acme"})
    d = await authz.check(public)
    assert d.allowed
    assert d.headers_to_remove == ("x-user-id",) and d.headers_to_set == {"x-tenant": "public"}
    # The policy that sets both removes neither (it replaces them; an absent claim removes it).
    d = await authz.check(req(f"token={token()}"))
    assert d.allowed and d.headers_to_set == {"x-user-id": "alice"} and "x-tenant" in d.headers_to_remove
    assert "x-user-id" not in d.headers_to_remove


@pytest.mark.parametrize("protocol", ["HTTP/2", "HTTP/3"])
async def test_an_extended_connect_goes_through_every_step_and_gets_a_key(jwks_file: str,
                                                                          protocol: str) -> None:
    authz = Authorizer(build_runtime(cfg(jwks_file)), GuardedStore(MemoryStore()))
    allowed = [await authz.check(h2_req(f"token={token()}", protocol)) for _ in range(3)]
    assert all(d.allowed and d.websocket and d.lease is not None for d in allowed)
    assert allowed[0].query_params_to_remove == ("token",)
    assert allowed[0].headers_to_set["x-user-id"] == "alice"
    keys = {d.headers_to_set["sec-websocket-key"] for d in allowed}
    assert len(keys) == 3  # fresh for every upgrade
    over = await authz.check(h2_req(f"token={token()}", protocol))
    assert not over.allowed and over.reason is Reason.QUOTA_USER  # the same quota as HTTP/1.1
    other = await authz.check(h2_req(f"token={token('bob')}", protocol, origin="https://evil.com"))
    assert not other.allowed and other.reason is Reason.ORIGIN_NOT_ALLOWED
    keyed = await authz.check(h2_req(f"token={token('bob')}", protocol,
                                     sec_websocket_key="dGhlIHNhbXBsZSBub25jZQ=="))
    assert not keyed.allowed and keyed.reason is Reason.BAD_HANDSHAKE


async def test_an_http1_upgrade_keeps_its_own_key(jwks_file: str) -> None:
    authz = Authorizer(build_runtime(cfg(jwks_file)), GuardedStore(MemoryStore()))
    d = await authz.check(req(f"token={token()}"))
    assert d.allowed and "sec-websocket-key" not in d.headers_to_set
    # Without the key an HTTP/1.1 upgrade is still refused: only HTTP/2 and HTTP/3 need none.
    no_key = CheckInput(method="GET", host="h", path="/ws", query=f"token={token()}",
                        headers=h2_ws_headers(), source_ip="198.51.100.9", protocol="HTTP/1.1")
    assert (await authz.check(no_key)).reason is Reason.BAD_HANDSHAKE


async def test_a_shadow_allow_of_an_extended_connect_gets_a_key(jwks_file: str) -> None:
    authz = Authorizer(build_runtime(cfg(jwks_file, shadow=True)), GuardedStore(MemoryStore()))
    d = await authz.check(h2_req(f"token={token()}", sec_websocket_version="8"))
    assert d.allowed and d.shadow_reason is Reason.UNSUPPORTED_VERSION
    assert len(d.headers_to_set["sec-websocket-key"]) == 24


async def test_forgeries_over_http2_jail_the_client_as_over_http1(jwks_file: str) -> None:
    from extauth.jail import Jail
    from tests.keys import make_rsa_key

    cfg_ = cfg(jwks_file)
    store = MemoryStore()
    authz = Authorizer(build_runtime(cfg_), store, jail=Jail(cfg_.abuse, store))
    forger = make_rsa_key()
    now = int(time.time())
    for i in range(cfg_.abuse.threshold):
        forged = sign(forger, "RS256", {"iss": ISS, "aud": "ws", "sub": "admin", "iat": now,
                                         "exp": now + 600, "jti": f"f{i}"}, kid="k1")
        d = await authz.check(h2_req(f"token={forged}"))
        assert d.reason is Reason.TOKEN_BAD_SIGNATURE
    assert authz.jail is not None
    await authz.jail.drain()  # type: ignore[attr-defined]
    d = await authz.check(h2_req(f"token={token()}"))
    assert not d.allowed and d.reason is Reason.BANNED


@pytest.mark.parametrize("source", ["not-an-ip", "", "unix:/run/envoy.sock", "@abstract", "10.0.0.300"])
async def test_a_source_that_is_not_an_ip_is_denied(jwks_file: str, source: str) -> None:
    store = MemoryStore()
    authz = Authorizer(build_runtime(cfg(jwks_file)), GuardedStore(store))
    d = await authz.check(CheckInput(method="GET", host="h", path="/ws", query=f"token={token()}",
                                     headers=ws_headers(), source_ip=source))
    assert not d.allowed and d.reason is Reason.SOURCE_NOT_IP and d.status == 403
    assert d.deny_headers["x-extauth-reason"] == "source_not_ip"
    assert await store.count_all() == 0


async def test_a_forwarded_client_behind_a_source_that_is_no_ip_is_counted(jwks_file: str) -> None:
    authz = Authorizer(build_runtime(cfg(jwks_file, client_ip="xff:1")), GuardedStore(MemoryStore()))
    ok = await authz.check(CheckInput(method="GET", host="h", path="/ws", query=f"token={token()}",
                                      headers={**ws_headers(), "x-forwarded-for": "203.0.113.5"},
                                      source_ip="unix:/run/envoy.sock"))
    assert ok.allowed and ok.client_ip == "203.0.113.5"
    garbled = await authz.check(CheckInput(method="GET", host="h", path="/ws", query=f"token={token()}",
                                           headers={**ws_headers(), "x-forwarded-for": "junk"},
                                           source_ip="unix:/run/envoy.sock"))
    assert garbled.reason is Reason.SOURCE_NOT_IP


async def test_a_path_parameter_alias_is_refused_and_never_logged(
        jwks_file: str, caplog: pytest.LogCaptureFixture) -> None:
    authz = Authorizer(build_runtime(cfg(jwks_file, shadow=True)), GuardedStore(MemoryStore()))
    secret = token("mallory")
    with caplog.at_level(logging.INFO, logger="extauth.decision"):
        d = await authz.check(CheckInput(method="GET", host="h", path=f"/ws;token={secret}/x",
                                         query=f"token={token()}", headers=ws_headers(),
                                         source_ip="198.51.100.9"))
    # Envoy cannot strip a path parameter: even a shadow policy denies for real.
    assert not d.allowed and d.reason is Reason.BAD_HANDSHAKE
    (record,) = [r for r in caplog.records if r.name == "extauth.decision"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["route"] == "/ws/x" and secret not in json.dumps(fields)
