"""The session bound in-process: the grpc-timeout an allowed upgrade carries (min(token exp,
now + max_seconds)), a client's own removed, plain HTTP untouched, and the config's checks."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from extauth.config import ConfigError, parse_config
from extauth.pipeline import SESSION_HEADER, Authorizer, grpc_timeout
from extauth.request import CheckInput
from extauth.runtime import build_runtime
from extauth.store.guard import GuardedStore
from extauth.store.memory import MemoryStore
from tests.envoy_msgs import ws_headers
from tests.keys import jwks_for, shared_rsa_key
from tests.test_pipeline import ISS, token


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("keys") / "jwks.json"
    path.write_text(json.dumps(jwks_for(shared_rsa_key(), "k1", "RS256")))
    return str(path)


def _authorizer(jwks_file: str, session: dict[str, Any] | None, now: float) -> Authorizer:
    policy: dict[str, Any] = {
        "name": "chat", "match": {"path_prefix": "/"}, "websocket_only": False,
        "origins": ["https://app.example.com"],
        "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file,
                "token_sources": ["query:token"]},
        "quotas": {"connections_per_user": 10},
    }
    if session is not None:
        policy["session"] = session
    cfg = parse_config({"policies": [policy]})
    return Authorizer(build_runtime(cfg), GuardedStore(MemoryStore()), clock=lambda: now)


def _req(query: str, websocket: bool = True, **extra: str) -> CheckInput:
    headers = ws_headers(**extra) if websocket else dict(extra)
    return CheckInput(method="GET", host="h", path="/x", query=query, headers=headers,
                      source_ip="198.51.100.9")


def test_grpc_timeout_values() -> None:
    assert grpc_timeout(2) == "2000m"
    assert grpc_timeout(0.0001) == "1m"  # never 0, which Envoy reads as no bound
    assert grpc_timeout(-5) == "1m"  # a token already past its exp (inside the leeway)
    assert grpc_timeout(86_400) == "86400000m"
    assert grpc_timeout(10**6) == "1000000S"  # at most 8 digits


@pytest.mark.parametrize(("session", "exp_in", "expected"), [
    ({"max_seconds": 2}, 3600, "2000m"),
    ({"close_at_token_expiry": True}, 300, "300000m"),
    ({"close_at_token_expiry": True, "max_seconds": 60}, 300, "60000m"),
    ({"close_at_token_expiry": True, "max_seconds": 600}, 300, "300000m"),
])
async def test_an_allowed_upgrade_carries_its_bound(jwks_file: str, session: dict[str, Any],
                                                     exp_in: int, expected: str) -> None:
    now = float(int(time.time()))
    authorizer = _authorizer(jwks_file, session, now)
    tok = token(iat=int(now), exp=int(now) + exp_in)
    d = await authorizer.check(_req(f"token={tok}", **{"grpc-timeout": "1000S"}))
    assert d.allowed, d.reason
    assert d.headers_to_set[SESSION_HEADER] == expected  # the client's own is overwritten
    assert SESSION_HEADER not in d.headers_to_remove


async def test_without_a_session_the_clients_grpc_timeout_is_removed_on_upgrades_only(jwks_file: str) -> None:
    now = time.time()
    authorizer = _authorizer(jwks_file, None, now)
    d = await authorizer.check(_req(f"token={token()}", **{"grpc-timeout": "1S"}))
    assert d.allowed and SESSION_HEADER in d.headers_to_remove and SESSION_HEADER not in d.headers_to_set
    # Plain HTTP (a gRPC client's deadline) is left alone.
    plain = await authorizer.check(_req(f"token={token()}", websocket=False, **{"grpc-timeout": "1S"}))
    assert plain.allowed and SESSION_HEADER not in plain.headers_to_remove
    bounded = _authorizer(jwks_file, {"max_seconds": 5}, now)
    plain = await bounded.check(_req(f"token={token()}", websocket=False))
    assert plain.allowed and SESSION_HEADER not in plain.headers_to_set


def test_session_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="max_seconds"):
        parse_config({"policies": [{"name": "p", "session": {"max_seconds": 0}}]})
    with pytest.raises(ConfigError, match="close_at_token_expiry needs a jwt"):
        parse_config({"policies": [{"name": "p", "session": {"close_at_token_expiry": True}}]})
    with pytest.raises(ConfigError, match=r"extra|not permitted"):
        parse_config({"policies": [{"name": "p", "session": {"max_second": 5}}]})
    cfg = parse_config({"policies": [{"name": "p", "session": {"max_seconds": 30}}]})
    assert cfg.policies[0].session is not None and cfg.policies[0].session.max_seconds == 30


async def test_the_lease_streams_end_entries_count_sessions_ended_at_their_bound() -> None:
    from extauth.accesslog import AccessLogService
    from extauth.lease_tag import METADATA_FIELD, LeaseTagger
    from extauth.metrics import Metrics
    from extauth.store.base import LeaseRef, Limits
    from tests.envoy_msgs import log_entry

    store, metrics, tagger = MemoryStore(), Metrics(), LeaseTagger()
    await tagger.load(store)
    service = AccessLogService(lambda: store, lambda: 60.0, metrics, tagger)
    entries = []
    for n, details in enumerate(("max_duration_timeout", "via_upstream", "")):
        ref = LeaseRef(f"lease-{n}", "chat", "alice", "198.51.100.9")
        assert (await store.acquire(ref, Limits(), 60)).granted
        entry = log_entry({"lease_id": ref.lease_id, "policy": "chat", "user": "alice",
                           "client_ip": ref.ip, METADATA_FIELD: tagger.tag(ref)}, "DownstreamEnd")
        entry.response.response_code_details = details
        entries.append(entry)
    forged = log_entry({"lease_id": "x", "policy": "made-up", "client_ip": "1.2.3.4",
                        METADATA_FIELD: "bad"}, "DownstreamEnd")
    await service.handle_entries([*entries, forged])
    ended = metrics.sessions_ended
    assert ended.labels("chat", "bound")._value.get() == 1
    assert ended.labels("chat", "other")._value.get() == 2
    assert ("made-up", "other") not in {tuple(k) for k in ended._metrics}  # forged: never a label
    assert await store.count("chat", user="alice") == 0
