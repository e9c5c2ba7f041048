"""Revocation through the admin API (a real gRPC channel to a running ExtAuthServer) and the
``extauth admin revoke | unrevoke | revocations`` CLI as a subprocess: tables, --json, errors,
and what a revocation does to the next check."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from extauth._generated.extauth.admin.v1 import admin_pb2, admin_pb2_grpc
from extauth.admin.cli import parse_instant
from extauth.server import ExtAuthServer
from tests.keys import HMAC_SECRET, sign
from tests.test_admin import ISS, SECRET_ENV, TOKEN_ENV, check, cli, code_of, config_dict, started


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, HMAC_SECRET)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


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


def token(sub: str, **claims: Any) -> str:
    now = int(time.time())
    return sign(HMAC_SECRET, "HS256", {"iss": ISS, "aud": "ws", "sub": sub, "iat": now, "exp": now + 600,
                                       **claims})


async def test_revoke_over_grpc_applies_to_the_next_check(server: ExtAuthServer, admin: Any) -> None:
    tok = token("alice", jti="j-1", sid="s-1")
    assert await check(server, "198.51.100.1", tok) == "allow"
    resp = await admin.Revoke(admin_pb2.RevokeRequest(kind="jti", subject="alice", value="j-1"))
    assert resp.recorded and resp.revocation.kind == "jti"
    # The bound: the longest a token may live (max_lifetime_seconds 86400) plus the leeway.
    assert 86_400 < resp.revocation.expires_at - time.time() <= 86_430 + 1
    assert await check(server, "198.51.100.1", tok) == "token_revoked"
    listing = await admin.ListRevocations(admin_pb2.ListRevocationsRequest())
    assert [(r.kind, r.subject, r.value) for r in listing.revocations] == [("jti", "alice", "j-1")]
    unrevoked = await admin.Unrevoke(admin_pb2.UnrevokeRequest(kind="jti", subject="alice", value="j-1"))
    assert unrevoked.unrevoked
    assert await check(server, "198.51.100.1", tok) == "allow"

    # Log out everywhere: every token issued before now; a new login passes.
    resp = await admin.Revoke(admin_pb2.RevokeRequest(kind="before", subject="alice"))
    assert resp.recorded and abs(resp.revocation.before - time.time()) < 5
    assert await check(server, "198.51.100.1", tok) == "token_revoked"
    assert await check(server, "198.51.100.1", token("alice", iat=int(time.time()) + 2)) == "allow"
    # An instant whose tokens have all expired records nothing.
    old = await admin.Revoke(admin_pb2.RevokeRequest(kind="before", subject="bob", before=1_000_000))
    assert not old.recorded
    assert server.metrics.hostile.labels("token_revoked")._value.get() == 0  # never jailed


@pytest.mark.parametrize(("request_", "message"), [
    (admin_pb2.RevokeRequest(kind="user", subject="alice"), "kind must be one of"),
    (admin_pb2.RevokeRequest(kind="jti", subject="alice"), "value must be"),
    (admin_pb2.RevokeRequest(kind="jti", subject="", value="x"), "subject must be"),
    (admin_pb2.RevokeRequest(kind="sid", subject="alice", value="x" * 257), "value must be"),
    (admin_pb2.RevokeRequest(kind="before", subject="alice", value="x"), "takes no value"),
    (admin_pb2.RevokeRequest(kind="before", subject="alice", before=4e10), "at most a year ahead"),
])
async def test_revoke_refuses_bad_input(admin: Any, request_: Any, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.Revoke(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    assert await code_of(admin.Unrevoke(admin_pb2.UnrevokeRequest(kind="x", subject="a"))) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_cli_revoke_unrevoke_and_revocations(server: ExtAuthServer) -> None:
    addr = f"127.0.0.1:{server.admin_port}"
    tok = token("carol", jti="c-1", sid="sess-9")
    rc, out, err = await cli("--admin", addr, "revoke", "--sub", "carol", "--jti", "c-1")
    assert rc == 0 and out.startswith("revoked token c-1 of carol until "), (out, err)
    rc, out, err = await cli("--admin", addr, "revoke", "--sub", "carol", "--sid", "sess-9")
    assert rc == 0 and "revoked session sess-9 of carol" in out, err
    later = datetime.fromtimestamp(int(time.time()) + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rc, out, err = await cli("--admin", addr, "revoke", "--sub", "dave", "--before", later)
    assert rc == 0 and f"every token of dave issued before {later}" in out, err
    assert await check(server, "198.51.100.2", tok) == "token_revoked"

    rc, out, err = await cli("--admin", addr, "revocations")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "SUBJECT", "TOKENS", "EXPIRES", "IN"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["jti", "carol", "c-1"], ["sid", "carol", "sess-9"], ["before", "dave", "issued"]]
    rc, out, err = await cli("--admin", addr, "revocations", "--json")
    rows = json.loads(out)
    assert rows[2] == {"kind": "before", "subject": "dave", "value": None,
                       "before": parse_instant(later), "expires_at": rows[2]["expires_at"]}

    rc, out, err = await cli("--admin", addr, "unrevoke", "--sub", "carol", "--jti", "c-1")
    assert rc == 0 and out.strip() == "unrevoked jti c-1 of carol", err
    rc, out, err = await cli("--admin", addr, "unrevoke", "--sub", "carol", "--jti", "c-1", "--json")
    assert rc == 0
    assert json.loads(out) == {"kind": "jti", "subject": "carol", "value": "c-1", "unrevoked": False}
    rc, out, err = await cli("--admin", addr, "unrevoke", "--sub", "dave")
    assert rc == 0 and out.strip() == "unrevoked the 'issued before' revocation of dave", err
    assert await check(server, "198.51.100.2", tok) == "token_revoked"  # still its sid
    rc, out, err = await cli("--admin", addr, "unrevoke", "--sub", "carol", "--sid", "sess-9")
    assert rc == 0
    assert await check(server, "198.51.100.2", tok) == "allow"
    rc, out, err = await cli("--admin", addr, "revocations")
    assert rc == 0 and out.strip() == "no revocations in force"


async def test_cli_revoke_errors(server: ExtAuthServer) -> None:
    addr = f"127.0.0.1:{server.admin_port}"
    rc, _, err = await cli("--admin", addr, "revoke", "--jti", "x")  # the subject is required
    assert rc == 2 and "--sub" in err
    rc, _, err = await cli("--admin", addr, "revoke", "--sub", "a", "--jti", "x", "--sid", "y")
    assert rc == 2 and "not allowed with" in err
    rc, _, err = await cli("--admin", addr, "revoke", "--sub", "a", "--before", "yesterday")
    assert rc == 2 and "bad time" in err
    rc, _, err = await cli("--admin", addr, "revoke", "--sub", "a" * 300)
    assert rc == 1 and "subject must be" in err and "Traceback" not in err


def test_parse_instant() -> None:
    assert parse_instant("1767225600") == 1767225600.0
    assert parse_instant("2026-01-01T00:00:00Z") == 1767225600.0
    assert parse_instant("2026-01-01T01:00:00+01:00") == 1767225600.0
    assert parse_instant("2026-01-01T00:00:00") == 1767225600.0  # no zone: UTC
    with pytest.raises(ValueError, match="bad time"):
        parse_instant("soon")
