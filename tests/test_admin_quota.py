"""Per-user quota overrides through the admin API (a real gRPC channel to a running
ExtAuthServer) and the ``extauth admin quota set | get | clear`` CLI as a subprocess, and what
an override does to the next upgrade (held in the store: every replica on it applies it)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from extauth._generated.extauth.admin.v1 import admin_pb2, admin_pb2_grpc
from extauth.server import ExtAuthServer
from extauth.store.guard import GuardedStore
from extauth.store.memory import MemoryStore
from tests.keys import HMAC_SECRET, sign
from tests.test_admin import ISS, SECRET_ENV, TOKEN_ENV, check, cli, code_of, config_dict, started


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, HMAC_SECRET)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[ExtAuthServer, ExtAuthServer]]:
    shared = MemoryStore()  # two replicas on one store, as on Redis
    a = await started(config_dict(), store=GuardedStore(shared, timeout=5.0))
    b = await started(config_dict(), store=GuardedStore(shared, timeout=5.0))
    try:
        yield a, b
    finally:
        await a.stop(drain=0)
        await b.stop(drain=0)


@pytest.fixture
async def admin(replicas: tuple[ExtAuthServer, ExtAuthServer]) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replicas[0].admin_port}") as channel:
        yield admin_pb2_grpc.AdminStub(channel)


def token(sub: str) -> str:
    now = int(time.time())
    return sign(HMAC_SECRET, "HS256", {"iss": ISS, "aud": "ws", "sub": sub, "iat": now, "exp": now + 600})


async def test_an_override_set_on_one_replica_holds_on_the_other(
        replicas: tuple[ExtAuthServer, ExtAuthServer], admin: Any) -> None:
    a, b = replicas
    tok = token("alice")
    assert [await check(a, f"198.51.100.{i}", tok) for i in range(6)] == ["allow"] * 5 + ["quota_user"]
    set_seven = admin_pb2.SetQuotaRequest(policy="chat", user="alice", connections_per_user=7)
    resp = await admin.SetQuota(set_seven)
    assert [o.connections_per_user for o in resp.overrides] == [7]
    assert [await check(b, f"198.51.101.{i}", tok) for i in range(3)] == ["allow", "allow", "quota_user"]
    # Lowered below what is held: nothing closes, new ones wait.
    await admin.SetQuota(admin_pb2.SetQuotaRequest(policy="chat", user="alice", connections_per_user=2))
    assert await check(a, "198.51.102.1", tok) == "quota_user"
    listing = await admin.ListLeases(admin_pb2.ListLeasesRequest(user="alice"))
    assert len(listing.leases) == 7
    assert [(o.policy, o.connections_per_user) for o in listing.quota_overrides] == [("chat", 2)]
    got = await admin.GetQuota(admin_pb2.GetQuotaRequest(user="alice"))
    assert [(o.policy, o.connections_per_user, o.HasField("attempts_per_user_per_minute"))
            for o in got.overrides] == [("chat", 2, False)]
    cleared = await admin.ClearQuota(admin_pb2.ClearQuotaRequest(user="alice"))
    assert cleared.cleared
    assert not (await admin.GetQuota(admin_pb2.GetQuotaRequest(user="alice"))).overrides
    assert not (await admin.ClearQuota(admin_pb2.ClearQuotaRequest(user="alice"))).cleared


@pytest.mark.parametrize(("request_", "message"), [
    (admin_pb2.SetQuotaRequest(policy="chat", user="alice"), "sets connections_per_user"),
    (admin_pb2.SetQuotaRequest(policy="chat", user="alice", connections_per_user=0), "from 1 to"),
    (admin_pb2.SetQuotaRequest(policy="nope", user="alice", connections_per_user=3), "unknown policy"),
    (admin_pb2.SetQuotaRequest(policy="", user="alice", connections_per_user=3), "policy and user"),
    (admin_pb2.SetQuotaRequest(policy="chat", user="a", connections_per_user=3, seconds=-1), "seconds"),
])
async def test_bad_overrides_are_invalid_argument(admin: Any, request_: Any, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.SetQuota(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    no_user = admin.GetQuota(admin_pb2.GetQuotaRequest(user=""))
    assert await code_of(no_user) == grpc.StatusCode.INVALID_ARGUMENT


async def test_cli_quota_set_get_clear_and_connections(replicas: tuple[ExtAuthServer, ExtAuthServer]) -> None:
    a, _ = replicas
    addr = f"127.0.0.1:{a.admin_port}"
    rc, out, err = await cli("--admin", addr, "quota", "set", "--user", "bob", "--policy", "chat",
                             "--connections", "9", "--attempts-per-minute", "30", "--for", "1h")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["POLICY", "USER", "CONNECTIONS", "ATTEMPTS/MIN"]
    assert lines[1].split()[:4] == ["chat", "bob", "9", "30"]
    rc, out, err = await cli("--admin", addr, "quota", "get", "--user", "bob", "--json")
    assert rc == 0, err
    (entry,) = json.loads(out)
    assert (entry["connections_per_user"], entry["attempts_per_user_per_minute"]) == (9, 30)
    assert 3500 < entry["expires_at"] - time.time() <= 3600
    assert await check(a, "198.51.100.9", token("bob")) == "allow"
    rc, out, err = await cli("--admin", addr, "connections", "--user", "bob")
    assert rc == 0, err
    assert "quota overrides:" in out and "chat" in out.split("quota overrides:")[1]
    rc, out, err = await cli("--admin", addr, "quota", "set", "--user", "bob", "--policy", "chat")
    assert rc == 1 and "give --connections and/or --attempts-per-minute" in err
    rc, out, err = await cli("--admin", addr, "quota", "clear", "--user", "bob")
    assert (rc, out.strip()) == (0, "cleared the quota override of bob"), err
    rc, out, err = await cli("--admin", addr, "quota", "get", "--user", "bob")
    assert (rc, out.strip()) == (0, "no quota override (the configured limits apply)"), err
