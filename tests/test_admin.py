"""The admin API over a real gRPC channel against a running ExtAuthServer, and the ``extauth admin`` CLI
as a subprocess against the same kind of server."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc

from extauth._generated.extauth.admin.v1 import admin_pb2, admin_pb2_grpc
from extauth.admin import cli as admin_cli
from extauth.admin.render import format_table
from extauth.admin.server import is_loopback
from extauth.config import ConfigError, parse_config
from extauth.server import ExtAuthServer
from extauth.store.base import LeaseRef, Limits
from extauth.store.memory import MemoryStore
from tests.envoy_msgs import check_request, headers_of, ws_headers
from tests.keys import HMAC_SECRET, sign
from tests.test_jail import FlakyStore
from tests.tls_proxy import make_ca, make_leaf_cert

ISS = "https://issuer.example.com"
SECRET_ENV = "EXTAUTH_TEST_ADMIN_SECRET"
TOKEN_ENV = "EXTAUTH_TEST_ADMIN_TOKEN"
ADMIN_TOKEN = "s3cret-admin-token"
LIMITS = Limits(connections_per_user=10, connections_per_ip=10)


def config_dict(**top: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "admin_token_env": TOKEN_ENV,
        "store": "memory://",
        "drain_seconds": 0,
        "abuse": {"threshold": 3, "ban_seconds": 60},
        **top,
        "policies": [
            {
                "name": "chat",
                "match": {"path_prefix": "/ws"},
                "origins": ["https://app.example.com"],
                "jwt": {"issuer": ISS, "audiences": ["ws"], "algorithms": ["HS256"],
                        "hmac_secret_env": SECRET_ENV},
                "quotas": {"connections_per_user": 5, "connections_per_ip": 50},
            },
            {"name": "feed", "match": {"path_prefix": "/feed"}, "origins": ["https://app.example.com"],
             "quotas": {"connections_per_ip": 5}},
        ],
    }


def token(sub: str, secret: str = HMAC_SECRET) -> str:
    now = int(time.time())
    return sign(secret, "HS256", {"iss": ISS, "aud": "ws", "sub": sub, "iat": now, "exp": now + 600})


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, HMAC_SECRET)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


async def started(cfg: dict[str, Any], store: Any = None) -> ExtAuthServer:
    srv = ExtAuthServer(parse_config(cfg), store=store)
    await srv.start()
    assert srv.admin_port > 0
    return srv


@pytest.fixture
async def server() -> AsyncIterator[ExtAuthServer]:
    srv = await started(config_dict())
    try:
        yield srv
    finally:
        await srv.stop(drain=0)


@pytest.fixture
async def admin(server: ExtAuthServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.admin_port}") as channel:
        yield admin_pb2_grpc.AdminStub(channel)


async def add_lease(srv: ExtAuthServer, lease_id: str, policy: str, user: str | None, ip: str) -> None:
    result = await srv.store.acquire(LeaseRef(lease_id, policy, user, ip), LIMITS, 60)
    assert result.granted


async def check(srv: ExtAuthServer, ip: str, tok: str | None) -> str:
    headers = ws_headers(**({"authorization": f"Bearer {tok}"} if tok else {}))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        resp = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            check_request("/ws/room", headers, source_ip=ip), timeout=5)
    return headers_of(resp).get("x-extauth-reason", "allow")


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code()


# -- each call over gRPC ------------------------------------------------------------------------


async def test_list_leases_by_user_and_ip(server: ExtAuthServer, admin: Any) -> None:
    await add_lease(server, "lease-a1", "chat", "alice", "198.51.100.1")
    await add_lease(server, "lease-a2", "chat", "alice", "198.51.100.2")
    await add_lease(server, "lease-b1", "chat", "bob", "198.51.100.1")
    await add_lease(server, "lease-f1", "feed", None, "198.51.100.1")

    resp = await admin.ListLeases(admin_pb2.ListLeasesRequest(user="alice"), timeout=5)
    assert sorted(le.lease_id for le in resp.leases) == ["lease-a1", "lease-a2"]
    lease = next(le for le in resp.leases if le.lease_id == "lease-a1")
    assert lease.policy == "chat" and lease.user == "alice" and lease.ip == "198.51.100.1"
    assert time.time() + 50 < lease.expires_at <= time.time() + 61

    resp = await admin.ListLeases(admin_pb2.ListLeasesRequest(ip="198.51.100.1"), timeout=5)
    assert sorted(le.lease_id for le in resp.leases) == ["lease-a1", "lease-b1", "lease-f1"]
    feed = next(le for le in resp.leases if le.lease_id == "lease-f1")
    assert not feed.HasField("user")

    resp = await admin.ListLeases(admin_pb2.ListLeasesRequest(ip="198.51.100.1", policy="feed"), timeout=5)
    assert [le.lease_id for le in resp.leases] == ["lease-f1"]

    assert await code_of(admin.ListLeases(admin_pb2.ListLeasesRequest(user="alice", policy="nope"),
                                          timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(admin.ListLeases(admin_pb2.ListLeasesRequest(), timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(admin.ListLeases(admin_pb2.ListLeasesRequest(ip="not-an-ip"), timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_release_lease_found_by_id(server: ExtAuthServer, admin: Any) -> None:
    await add_lease(server, "lease-a1", "chat", "alice", "198.51.100.1")
    await add_lease(server, "lease-a2", "chat", "alice", "198.51.100.2")

    resp = await admin.ReleaseLease(admin_pb2.ReleaseLeaseRequest(lease_id="lease-a2", user="alice"),
                                    timeout=5)
    assert resp.released and resp.lease.ip == "198.51.100.2" and resp.lease.policy == "chat"
    # Gone under both indexes (user and IP).
    assert await server.store.count("chat", user="alice") == 1
    assert await server.store.count("chat", ip="198.51.100.2") == 0

    resp = await admin.ReleaseLease(
        admin_pb2.ReleaseLeaseRequest(lease_id="lease-a1", ip="198.51.100.1", policy="chat"), timeout=5)
    assert resp.released and resp.lease.user == "alice"
    assert await server.store.count_all() == 0

    gone = admin_pb2.ReleaseLeaseRequest(lease_id="lease-a1", user="alice")
    assert await code_of(admin.ReleaseLease(gone, timeout=5)) == grpc.StatusCode.NOT_FOUND
    no_subject = admin_pb2.ReleaseLeaseRequest(lease_id="lease-a1")
    assert await code_of(admin.ReleaseLease(no_subject, timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_ban_list_unban_reach_the_request_path(server: ExtAuthServer, admin: Any) -> None:
    ip = "203.0.113.9"
    assert await check(server, ip, token("carol")) == "allow"
    resp = await admin.Ban(admin_pb2.BanRequest(ip=ip, seconds=120, reason="ops ticket 42"), timeout=5)
    assert resp.ban.ip == ip and resp.ban.reason == "ops ticket 42"
    assert abs(resp.ban.expires_at - (time.time() + 120)) < 5
    assert await check(server, ip, token("carol")) == "banned"  # at once on this replica

    bans = (await admin.ListBans(admin_pb2.ListBansRequest(), timeout=5)).bans
    assert [(b.ip, b.reason) for b in bans] == [(ip, "ops ticket 42")]

    assert (await admin.Unban(admin_pb2.UnbanRequest(ip=ip), timeout=5)).unbanned
    assert await check(server, ip, token("carol")) == "allow"
    assert not (await admin.Unban(admin_pb2.UnbanRequest(ip=ip), timeout=5)).unbanned
    assert list((await admin.ListBans(admin_pb2.ListBansRequest(), timeout=5)).bans) == []


async def test_a_ban_holds_every_spelling_of_the_address(server: ExtAuthServer, admin: Any) -> None:
    # An operator pasting the IPv4-mapped form from a log bans the IPv4 client, and a request
    # arriving in that form (a dual-stack hop) is the same client; IPv6 spellings likewise.
    resp = await admin.Ban(admin_pb2.BanRequest(ip="::FFFF:203.0.113.7", seconds=60), timeout=5)
    assert resp.ban.ip == "203.0.113.7"
    assert await check(server, "203.0.113.7", token("carol")) == "banned"
    assert await check(server, "::ffff:203.0.113.7", token("carol")) == "banned"
    # An IPv6 address is banned as its /64, which is how the request path counts it.
    resp = await admin.Ban(admin_pb2.BanRequest(ip="[2001:DB8:0:0::7]", seconds=60), timeout=5)
    assert resp.ban.ip == "2001:db8::/64"
    assert await check(server, "2001:db8::7", token("carol")) == "banned"
    assert await check(server, "2001:db8::1:2:3:4", token("carol")) == "banned"
    assert await check(server, "2001:db8:0:1::7", token("carol")) == "allow"  # the next /64
    assert (await admin.Unban(admin_pb2.UnbanRequest(ip="2001:0db8::0007"), timeout=5)).unbanned
    assert await check(server, "2001:db8::7", token("carol")) == "allow"
    # The network as `bans` lists it is accepted; another length, or an IPv4 one, is not.
    assert (await admin.Ban(admin_pb2.BanRequest(ip="2001:db8::/64", seconds=60), timeout=5)).ban.ip == \
        "2001:db8::/64"
    assert (await admin.Unban(admin_pb2.UnbanRequest(ip="2001:db8::/64"), timeout=5)).unbanned
    for bad in ("2001:db8::/48", "203.0.113.0/24", "203.0.113.7/32"):
        assert await code_of(admin.Ban(admin_pb2.BanRequest(ip=bad, seconds=60), timeout=5)) == \
            grpc.StatusCode.INVALID_ARGUMENT


async def test_with_the_jail_disabled_bans_are_refused_and_not_enforced() -> None:
    # abuse.enabled: false means no bans at all: an admin Ban says so instead of answering OK
    # for a ban nothing would enforce, and a ban already in the store is not enforced either
    # (not by the jail, and not by the acquire script on quota policies).
    srv = await started(config_dict(abuse={"enabled": False}))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.admin_port}") as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            ip = "203.0.113.9"
            assert await code_of(stub.Ban(admin_pb2.BanRequest(ip=ip, seconds=60), timeout=5)) == \
                grpc.StatusCode.FAILED_PRECONDITION
            await srv.store.ban(ip, 60, "left over from when the jail was on")
            assert await check(srv, ip, token("carol")) == "allow"
    finally:
        await srv.stop(drain=0)


async def test_ban_refuses_bad_input_and_never_ban(admin: Any) -> None:
    assert await code_of(admin.Ban(admin_pb2.BanRequest(ip="127.0.0.1", seconds=60), timeout=5)) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(admin.Ban(admin_pb2.BanRequest(ip="nope", seconds=60), timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(admin.Ban(admin_pb2.BanRequest(ip="203.0.113.9", seconds=0), timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_stats(server: ExtAuthServer, admin: Any) -> None:
    assert await check(server, "198.51.100.7", token("dave")) == "allow"
    assert await check(server, "198.51.100.7", None) == "token_missing"
    for n in range(3):  # three forgeries (one token retried would count once)
        forged = token(f"eve{n}", secret="wrong" * 13)
        assert await check(server, "203.0.113.66", forged) == "token_bad_signature"
    assert server.jail is not None
    await server.jail.drain()
    assert await check(server, "203.0.113.66", token("eve")) == "banned"

    stats = await admin.Stats(admin_pb2.StatsRequest(), timeout=5)
    assert stats.active_leases == 1 and stats.bans == 1 and stats.store_error == ""
    by_reason = {(d.policy, d.result, d.reason): d.count for d in stats.decisions}
    assert by_reason[("chat", "allow", "")] == 1
    assert by_reason[("chat", "deny", "token_missing")] == 1
    assert by_reason[("chat", "deny", "token_bad_signature")] == 3
    assert by_reason[("chat", "deny", "banned")] == 1
    assert dict(stats.hostile_signals) == {"token_bad_signature": 3}
    assert stats.bans_issued["enforced"] == 1


async def test_store_down_unavailable_and_partial_stats() -> None:
    flaky = FlakyStore(MemoryStore())
    srv = await started(config_dict(), store=flaky)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.admin_port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            flaky.down = True
            assert await code_of(admin.ListBans(admin_pb2.ListBansRequest(), timeout=5)) == \
                grpc.StatusCode.UNAVAILABLE
            stats = await admin.Stats(admin_pb2.StatsRequest(), timeout=5)
            assert stats.active_leases == -1 and stats.bans == -1 and "simulated outage" in stats.store_error
    finally:
        flaky.down = False
        await srv.stop(drain=0)


# -- authentication -----------------------------------------------------------------------------


async def test_non_loopback_bind_requires_the_bearer_token(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(TOKEN_ENV, ADMIN_TOKEN)
    caplog.set_level(logging.WARNING, logger="extauth.admin")
    srv = await started(config_dict(admin_listen="0.0.0.0:0"))
    try:
        assert srv.admin.requires_token
        # Without admin_tls the token crosses the network in clear text: say so at start.
        assert any("without TLS" in r.getMessage() for r in caplog.records), caplog.text
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.admin_port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            for method, req in [(admin.ListBans, admin_pb2.ListBansRequest()),
                                (admin.Stats, admin_pb2.StatsRequest()),
                                (admin.Ban, admin_pb2.BanRequest(ip="203.0.113.1", seconds=5)),
                                (admin.Unban, admin_pb2.UnbanRequest(ip="203.0.113.1")),
                                (admin.ListLeases, admin_pb2.ListLeasesRequest(user="a")),
                                (admin.ReleaseLease, admin_pb2.ReleaseLeaseRequest(lease_id="x", user="a"))]:
                assert await code_of(method(req, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
                wrong = (("authorization", "Bearer not-it"),)
                assert await code_of(method(req, timeout=5, metadata=wrong)) == \
                    grpc.StatusCode.UNAUTHENTICATED
            ok = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
            resp = await admin.ListBans(admin_pb2.ListBansRequest(), timeout=5, metadata=ok)
            assert list(resp.bans) == []
            await admin.Ban(admin_pb2.BanRequest(ip="203.0.113.1", seconds=5), timeout=5, metadata=ok)
            assert len((await admin.ListBans(admin_pb2.ListBansRequest(), timeout=5, metadata=ok)).bans) == 1
            assert await code_of(admin.ListBans(admin_pb2.ListBansRequest(), timeout=5,
                                                metadata=(("authorization", ADMIN_TOKEN),))) == \
                grpc.StatusCode.UNAUTHENTICATED  # the scheme is part of it
    finally:
        await srv.stop(drain=0)


async def test_non_loopback_bind_without_a_token_refuses_to_start() -> None:
    srv = ExtAuthServer(parse_config(config_dict(admin_listen="0.0.0.0:0")))
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        await srv.start()
    assert srv.port == 0 and srv.admin_port == 0  # nothing was bound
    await srv.stop(drain=0)


async def test_loopback_checks_the_token_only_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, ADMIN_TOKEN)
    srv = await started(config_dict())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.admin_port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            assert await code_of(admin.Stats(admin_pb2.StatsRequest(), timeout=5)) == \
                grpc.StatusCode.UNAUTHENTICATED
            await admin.Stats(admin_pb2.StatsRequest(), timeout=5,
                              metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),))
    finally:
        await srv.stop(drain=0)


def test_helpers() -> None:
    assert is_loopback("127.0.0.1:9002") and is_loopback("[::1]:9002") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:9002") and not is_loopback("10.0.0.1:9002")
    assert not is_loopback("admin.internal:9002")
    assert [admin_cli.parse_duration(s) for s in ("30s", "15m", "2h", "1d", "1h30m", "90")] == \
        [30, 900, 7200, 86400, 5400, 90]
    for bad in ("", "15x", "m", "-5s", "0s", "1h 30m"):
        with pytest.raises(ValueError):
            admin_cli.parse_duration(bad)
    assert format_table(("A", "NUM"), [("x", 5), ("long", 100)]).splitlines() == [
        "A     NUM", "x       5", "long  100"]


def test_a_two_word_command_is_a_subcommand_of_its_group(monkeypatch: pytest.MonkeyPatch) -> None:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--limit", type=int, required=True)

    def run(client: Any, args: argparse.Namespace, as_json: bool) -> str:
        return f"limit {args.limit} json {as_json}"

    extra = admin_cli.Command("example set", "set an example", run, arguments)
    monkeypatch.setattr(admin_cli, "COMMANDS", (*admin_cli.COMMANDS, extra))
    parser = argparse.ArgumentParser()
    admin_cli.add_admin_parser(parser.add_subparsers())
    args = parser.parse_args(["admin", "example", "set", "--limit", "3", "--json"])
    assert args.admin_run(None, args, bool(args.json)) == "limit 3 json True"
    assert parser.parse_args(["admin", "bans"]).admin_run is admin_cli.COMMANDS[2].run
    with pytest.raises(SystemExit):
        parser.parse_args(["admin", "example"])  # the group alone is not a command


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca, ca_key, ca_cert = make_ca(tmp_path, "admin-ca")
    cert, key = make_leaf_cert(tmp_path, ca_key, ca_cert, "admin-server")
    client_cert, client_key = make_leaf_cert(tmp_path, ca_key, ca_cert, "admin-client")
    other_ca, _, _ = make_ca(tmp_path, "other-ca")
    return {"ca": ca, "cert": cert, "key": key, "client_cert": client_cert, "client_key": client_key,
            "other_ca": other_ca}


async def _list_bans(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    target = f"127.0.0.1:{port}"
    channel = (grpc.aio.secure_channel(target, credentials) if credentials
               else grpc.aio.insecure_channel(target))
    async with channel:
        try:
            await admin_pb2_grpc.AdminStub(channel).ListBans(admin_pb2.ListBansRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def test_admin_tls_serves_only_tls_clients_that_trust_it(pki: dict[str, Path]) -> None:
    tls = {"cert_file": str(pki["cert"]), "key_file": str(pki["key"])}
    srv = await started(config_dict(admin_tls=tls))
    try:
        trusted = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
        assert await _list_bans(srv.admin_port, trusted) == grpc.StatusCode.OK
        assert await _list_bans(srv.admin_port, None) == grpc.StatusCode.UNAVAILABLE  # clear text
        untrusted = grpc.ssl_channel_credentials(pki["other_ca"].read_bytes())
        assert await _list_bans(srv.admin_port, untrusted) == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(drain=0)


async def test_admin_mutual_tls_wants_a_client_certificate(pki: dict[str, Path]) -> None:
    tls = {"cert_file": str(pki["cert"]), "key_file": str(pki["key"]), "client_ca_file": str(pki["ca"])}
    srv = await started(config_dict(admin_tls=tls))
    try:
        ca = pki["ca"].read_bytes()
        no_cert = grpc.ssl_channel_credentials(ca)
        assert await _list_bans(srv.admin_port, no_cert) == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.ssl_channel_credentials(ca, pki["client_key"].read_bytes(),
                                                 pki["client_cert"].read_bytes())
        assert await _list_bans(srv.admin_port, with_cert) == grpc.StatusCode.OK
    finally:
        await srv.stop(drain=0)


async def test_an_unreadable_admin_tls_file_stops_start_up(pki: dict[str, Path], tmp_path: Path) -> None:
    srv = ExtAuthServer(parse_config(config_dict(
        admin_tls={"cert_file": str(tmp_path / "missing.pem"), "key_file": str(pki["key"])})))
    with pytest.raises(ConfigError, match=r"admin_tls\.cert_file"):
        await srv.start()
    await srv.stop(drain=0)


async def test_cli_over_tls_and_mutual_tls(pki: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, ADMIN_TOKEN)
    port = _closed_port()
    cfg = config_dict(admin_listen=f"0.0.0.0:{port}", admin_tls={
        "cert_file": str(pki["cert"]), "key_file": str(pki["key"]), "client_ca_file": str(pki["ca"])})
    srv = await started(cfg)
    try:
        path = tmp_path / "extauth.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {TOKEN_ENV: ADMIN_TOKEN, SECRET_ENV: HMAC_SECRET}
        mtls = ("--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client_cert"]),
                "--tls-key", str(pki["client_key"]))
        rc, out, err = await cli("-c", str(path), *mtls, "bans", env=env)  # TLS implied by the config
        assert rc == 0 and out.strip() == "no active bans", err
        rc, out, err = await cli("--admin", f"127.0.0.1:{port}", "--token-env", TOKEN_ENV, *mtls,
                                 "bans", env=env)
        assert rc == 0 and out.strip() == "no active bans", err
        # Without the client certificate, or in clear text: one line, no traceback.
        for args in (("-c", str(path), "--tls-ca", str(pki["ca"])), ("--admin", f"127.0.0.1:{port}")):
            rc, out, err = await cli(*args, "bans", env=env)
            assert rc == 1 and "unavailable" in err.lower() and "Traceback" not in err, err
        rc, out, err = await cli("-c", str(path), "--tls-ca", str(pki["ca"]), "--tls-cert",
                                 str(pki["client_cert"]), "bans", env=env)
        assert rc == 1 and "--tls-key" in err and "Traceback" not in err, err
    finally:
        await srv.stop(drain=0)


# -- the CLI ------------------------------------------------------------------------------------


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV and k != "EXTAUTH_ADMIN_TOKEN"}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extauth", "admin", *args, env=full_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_tables_and_json(server: ExtAuthServer) -> None:
    addr = f"127.0.0.1:{server.admin_port}"
    await add_lease(server, "lease-a1", "chat", "alice", "198.51.100.1")
    await add_lease(server, "lease-f1", "feed", None, "198.51.100.1")

    rc, out, err = await cli("--admin", addr, "connections", "--ip", "198.51.100.1")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["LEASE", "POLICY", "USER", "IP", "EXPIRES", "IN"]
    assert lines[1].split()[:4] == ["lease-a1", "chat", "alice", "198.51.100.1"] or \
        lines[2].split()[:4] == ["lease-a1", "chat", "alice", "198.51.100.1"]
    assert len({line.index("POLICY") for line in lines[:1]}) == 1
    assert all(len(line.split()) == 6 for line in lines)
    # Aligned: every row's POLICY column starts where the header's does.
    col = lines[0].index("POLICY")
    assert all(line[col - 2:col] == "  " and line[col] != " " for line in lines)

    rc, out, err = await cli("connections", "--user", "alice", "--json", "--admin", addr)
    assert rc == 0, err
    leases = json.loads(out)
    assert [(le["lease_id"], le["policy"], le["user"], le["ip"]) for le in leases] == \
        [("lease-a1", "chat", "alice", "198.51.100.1")]

    rc, out, err = await cli("--admin", addr, "release", "lease-f1", "--ip", "198.51.100.1")
    assert rc == 0 and "released lease-f1" in out, err
    assert await server.store.count("feed", ip="198.51.100.1") == 0

    rc, out, err = await cli("--admin", addr, "ban", "203.0.113.77", "--for", "15m", "--reason", "cli test")
    assert rc == 0 and "banned 203.0.113.77" in out, err
    rc, out, err = await cli("--admin", addr, "bans")
    assert rc == 0, err
    assert out.splitlines()[0].split() == ["IP", "REASON", "EXPIRES", "IN"]
    assert "203.0.113.77" in out and "cli test" in out and ("15m" in out or "14m" in out)
    rc, out, err = await cli("--admin", addr, "bans", "--json")
    ban = json.loads(out)[0]
    assert ban["ip"] == "203.0.113.77" and 800 < ban["expires_at"] - time.time() <= 900

    rc, out, err = await cli("--admin", addr, "unban", "203.0.113.77")
    assert rc == 0 and out.strip() == "unbanned 203.0.113.77", err
    rc, out, err = await cli("--admin", addr, "unban", "203.0.113.77", "--json")
    assert rc == 0 and json.loads(out) == {"ip": "203.0.113.77", "unbanned": False}

    assert await check(server, "198.51.100.7", None) == "token_missing"
    rc, out, err = await cli("--admin", addr, "stats")
    assert rc == 0, err
    assert "active leases   1" in out and "active bans     0" in out
    assert any(line.split() == ["chat", "deny", "token_missing", "1"] for line in out.splitlines())
    rc, out, err = await cli("--admin", addr, "stats", "--json")
    stats = json.loads(out)
    assert stats["active_leases"] == 1 and stats["bans_issued"] == {"manual": 1}
    assert {"policy": "chat", "result": "deny", "reason": "token_missing", "count": 1} in stats["decisions"]


async def test_cli_errors_are_one_line_and_nonzero(server: ExtAuthServer) -> None:
    addr = f"127.0.0.1:{server.admin_port}"
    cases = [
        (("--admin", addr, "release", "nope", "--user", "alice"), "not_found"),
        (("--admin", addr, "ban", "203.0.113.1", "--for", "soon"), "bad duration"),
        (("--admin", addr, "ban", "127.0.0.1", "--for", "1m"), "never_ban"),
        (("--admin", addr, "connections", "--ip", "x.y"), "not an IP address"),
        (("--admin", f"127.0.0.1:{_closed_port()}", "--timeout", "2", "bans"), "cannot reach"),
    ]
    for args, message in cases:
        rc, out, err = await cli(*args)
        assert rc == 1, (args, out, err)
        assert message in err and "Traceback" not in err, (args, err)
        assert err.count("\n") == 1
    rc, _, err = await cli("--admin", addr, "ban", "203.0.113.1")  # --for is required: usage error
    assert rc == 2 and "--for" in err


async def test_cli_reads_address_and_token_env_from_the_config(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, ADMIN_TOKEN)
    port = _closed_port()
    cfg = config_dict(admin_listen=f"0.0.0.0:{port}")
    srv = await started(cfg)
    try:
        path = tmp_path / "extauth.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {TOKEN_ENV: ADMIN_TOKEN, SECRET_ENV: HMAC_SECRET}
        rc, out, err = await cli("-c", str(path), "bans", env=env)
        assert rc == 0 and out.strip() == "no active bans", err
        rc, out, err = await cli("-c", str(path), "bans", env={SECRET_ENV: HMAC_SECRET})
        assert rc == 1 and "unauthenticated" in err and "Traceback" not in err
    finally:
        await srv.stop(drain=0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
