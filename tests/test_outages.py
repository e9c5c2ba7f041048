"""Dependency outages through the real server, each with its defined outcome and
automatic recovery: JWKS endpoint down, access-log stream gone."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from extauth.config import parse_config
from extauth.server import ExtAuthServer
from tests.envoy_msgs import check_request, headers_of, ws_headers
from tests.keys import jwks_for, jwks_server, shared_rsa_key, sign
from tests.waiting import eventually

pytestmark = pytest.mark.both_loops

ISS = "https://issuer.example.com"
_SUBJECTS = itertools.count()


def fresh_token() -> str:
    """A token never seen before, so the verified-token cache cannot answer for it."""
    now = int(time.time())
    return sign(shared_rsa_key(), "RS256", {"iss": ISS, "aud": "ws", "sub": f"u{next(_SUBJECTS)}",
                                            "iat": now, "exp": now + 600}, kid="k1")




def reason(resp: external_auth_pb2.CheckResponse) -> str:
    return "allow" if resp.status.code == 0 else headers_of(resp)["x-extauth-reason"]


async def test_jwks_down_stale_then_fail_closed_for_jwks_policies_only(tmp_path: Any) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks_for(shared_rsa_key(), "k1", "RS256")))
    with jwks_server(jwks_for(shared_rsa_key(), "k1", "RS256")) as jwks:
        jwt_common = {"issuer": ISS, "audiences": ["ws"], "token_sources": ["query:token"]}
        cfg = parse_config({
            "listen": "127.0.0.1:0", "drain_seconds": 0, "token_cache_size": 0,
            "policies": [
                {"name": "remote", "origins": ["https://app.example.com"],
                 "jwt": {**jwt_common, "jwks_uri": jwks.url, "jwks_refresh_seconds": 1,
                         "jwks_refetch_cooldown_seconds": 1, "jwks_max_stale_seconds": 1.0,
                         "jwks_timeout_seconds": 0.5}},
                {"name": "local", "origins": ["https://app.example.com"],
                 "jwt": {**jwt_common, "jwks_file": str(jwks_file)}},
            ],
        })
        srv = ExtAuthServer(cfg)
        await srv.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = external_auth_pb2_grpc.AuthorizationStub(ch)

                async def check(policy: str) -> str:
                    req = check_request(f"/ws?token={fresh_token()}", ws_headers(),
                                        context={"policy": policy})
                    return reason(await stub.Check(req, timeout=5))

                assert await check("remote") == "allow"
                jwks.set(mode="500")
                # Stale keys keep serving for a while, then the JWKS-backed policy fails closed...
                got = await eventually(lambda: check("remote"), lambda r: r != "allow")
                assert got == "jwks_unavailable"
                resp = await stub.Check(check_request(f"/ws?token={fresh_token()}", ws_headers(),
                                                      context={"policy": "remote"}), timeout=5)
                assert resp.denied_response.status.code == 503
                # ...while a policy with local keys is unaffected.
                assert await check("local") == "allow"
                # Recovery without a restart.
                jwks.set(jwks_for(shared_rsa_key(), "k1", "RS256"), mode="ok")
                assert await eventually(lambda: check("remote"), lambda r: r == "allow") == "allow"
        finally:
            await srv.stop(drain=0)


async def test_without_access_log_stream_leases_expire_by_ttl() -> None:
    with jwks_server(jwks_for(shared_rsa_key(), "k1", "RS256")) as jwks:
        cfg = parse_config({
            "listen": "127.0.0.1:0", "drain_seconds": 0, "lease_ttl_seconds": 1.0,
            "policies": [{"name": "chat", "origins": ["https://app.example.com"],
                          "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_uri": jwks.url,
                                  "token_sources": ["query:token"]},
                          "quotas": {"connections_per_user": 1}}],
        })
        srv = ExtAuthServer(cfg)
        await srv.start()
        try:
            now = int(time.time())
            tok = sign(shared_rsa_key(), "RS256", {"iss": ISS, "aud": "ws", "sub": "dora", "iat": now,
                                                   "exp": now + 600}, kid="k1")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = external_auth_pb2_grpc.AuthorizationStub(ch)

                async def check() -> str:
                    req = check_request(f"/ws?token={tok}", ws_headers(), context={"policy": "chat"})
                    return reason(await stub.Check(req, timeout=5))

                assert await check() == "allow"
                assert await check() == "quota_user"
                # No access-log entry ever arrives (Envoy crashed, stream lost): the slot
                # comes back once the lease TTL passes, never later.
                started = time.monotonic()
                assert await eventually(check, lambda r: r == "allow", within=5) == "allow"
                assert time.monotonic() - started < 3
        finally:
            await srv.stop(drain=0)
