"""/metrics over real HTTP from a running server, with the names the docs and dashboard use."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from extauth.config import parse_config
from extauth.server import ExtAuthServer
from tests.envoy_msgs import check_request, ws_headers
from tests.keys import jwks_for, jwks_server, shared_rsa_key, sign
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
ISS = "https://issuer.example.com"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body: str = r.read().decode()
        return body


def value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not exported")


async def test_metrics_endpoint_exports_the_documented_names() -> None:
    with jwks_server(jwks_for(shared_rsa_key(), "k1", "RS256")) as jwks:
        cfg = parse_config({
            "listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "metrics_sample_seconds": 0.1,
            "drain_seconds": 0,
            "policies": [{"name": "chat", "origins": ["https://app.example.com"],
                          "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_uri": jwks.url,
                                  "token_sources": ["query:token"]},
                          "quotas": {"connections_per_user": 5}}],
        })
        srv = ExtAuthServer(cfg)
        await srv.start()
        try:
            now = int(time.time())
            tok = sign(shared_rsa_key(), "RS256", {"iss": ISS, "aud": "ws", "sub": "a", "iat": now,
                                                   "exp": now + 60}, kid="k1")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = external_auth_pb2_grpc.AuthorizationStub(ch)
                ctx = {"policy": "chat"}
                await stub.Check(check_request(f"/ws?token={tok}", ws_headers(), context=ctx), timeout=5)
                await stub.Check(check_request("/ws", ws_headers(origin="https://evil.com"), context=ctx),
                                 timeout=5)
            def one_lease() -> bool:
                return value(scrape(srv.metrics_port), "extauth_active_leases") == 1

            await asyncio.to_thread(wait_until, one_lease, 10.0, "the sampled lease gauge")
            text = scrape(srv.metrics_port)
            assert value(text, "extauth_decisions_total", policy="chat", result="allow") == 1
            assert value(text, "extauth_decisions_total", reason="origin_not_allowed") == 1
            assert value(text, "extauth_check_duration_seconds_count") == 2
            assert value(text, "extauth_jwks_fetches_total", policy="chat", result="ok") >= 1
            assert value(text, "extauth_jwks_age_seconds", policy="chat") >= 0
            assert value(text, "extauth_store_breaker_open") == 0
            assert "token=" not in text
        finally:
            await srv.stop(drain=0)


def test_dashboard_queries_use_exported_metric_names() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    names = set()
    for e in exprs:
        names |= set(re.findall(r"\bextauth_[a-z_]+", e))
    known = {
        "extauth_decisions_total", "extauth_check_duration_seconds_bucket", "extauth_active_leases",
        "extauth_store_call_duration_seconds_bucket", "extauth_store_errors_total",
        "extauth_store_breaker_open", "extauth_jwks_fetches_total", "extauth_jwks_age_seconds",
        "extauth_accesslog_entries_total", "extauth_bans_total", "extauth_hostile_signals_total",
        "extauth_config_reloads_total", "extauth_shadow_denials_total",
    }
    assert names and names <= known, names - known
    # Every metric family we export is on the dashboard.
    assert {n.removesuffix("_bucket") for n in names} >= {n.removesuffix("_bucket") for n in known}



def test_loop_histogram_is_cumulative_in_prometheus_form() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from extauth.metrics import LoopCounter, LoopHistogram

    reg = CollectorRegistry()
    h = LoopHistogram("t_seconds", "test", (0.001, 0.00005, 0.01), registry=reg)
    c = LoopCounter("t_events", "test", ("kind",), registry=reg)
    for v in (0.00005, 0.0002, 0.0002, 0.5):  # a value equal to a bound falls in that bucket
        h.observe(v)
    c.labels("a").inc()
    c.labels("a").inc()
    text = generate_latest(reg).decode()
    assert value(text, "t_seconds_bucket", le="5e-05") == 1
    assert value(text, "t_seconds_bucket", le="0.001") == 3
    assert value(text, "t_seconds_bucket", le="0.01") == 3
    assert value(text, "t_seconds_bucket", le="+Inf") == 4
    assert value(text, "t_seconds_count") == 4
    assert abs(value(text, "t_seconds_sum") - 0.50045) < 1e-9
    assert value(text, "t_events_total", kind="a") == 2
