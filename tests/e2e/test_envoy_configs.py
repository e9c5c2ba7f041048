"""The Envoy configs we ship or generate are accepted by the real Envoy, and work."""

from __future__ import annotations

import asyncio
import ssl
import string
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e.harness import (
    OTHER_ORIGIN,
    REPO,
    Envoy,
    Refused,
    Stack,
    envoy_binary,
    free_port,
    generate_bootstrap,
    token,
    wait_until,
)

pytestmark = pytest.mark.e2e

ENVOY_DIR = REPO / "envoy"
# Values for the placeholders of the files under envoy/ (documented in envoy/README.md).
PLACEHOLDERS = {
    "ENVOY_LISTEN_ADDRESS": "127.0.0.1",
    "ENVOY_LISTEN_PORT": "18080",
    "ENVOY_ADMIN_PORT": "0",
    "EXTAUTH_HOST": "127.0.0.1",
    "EXTAUTH_PORT": "9001",
    "UPSTREAM_HOST": "localhost",
    "UPSTREAM_PORT": "8081",
}


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PLACEHOLDERS and envoy-tls.yaml's: its TLS port and a certificate Envoy can read."""
    from extauth.devcert import write_self_signed

    cert = write_self_signed(tmp_path_factory.mktemp("tls"))
    return {**PLACEHOLDERS, "ENVOY_TLS_PORT": "18443",
            "TLS_CERT_FILE": str(cert.cert_file), "TLS_KEY_FILE": str(cert.key_file)}


def substitute(text: str, values: dict[str, str]) -> str:
    """envsubst, strictly: an unknown placeholder is an error, not an empty string."""
    return string.Template(text).substitute(values)


def validate(path: Path) -> None:
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "warning"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{path}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def envoy_files() -> list[Path]:
    return sorted(p for p in ENVOY_DIR.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def test_envoy_dir_has_configs() -> None:
    assert envoy_files(), "no Envoy configs under envoy/"


@pytest.mark.parametrize("path", envoy_files(), ids=lambda p: p.name)
def test_shipped_config_validates(path: Path, tmp_path: Path, placeholders: dict[str, str]) -> None:
    text = substitute(path.read_text(), placeholders)
    assert "${" not in text
    clusters = {c["name"]: c for c in yaml.safe_load(text)["static_resources"]["clusters"]}
    if "extauth" in clusters:  # the access-log stream's room for a mass close, as generated
        assert clusters["extauth"]["per_connection_buffer_limit_bytes"] == 32 * 1024 * 1024
    out = tmp_path / path.name
    out.write_text(text)
    validate(out)


def test_envoy_config_command_output_validates(tmp_path: Path) -> None:
    """The real command line, in a subprocess, with every option."""
    out = tmp_path / "envoy.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "extauth", "envoy-config", "-c", str(REPO / "examples" / "extauth.yaml"),
         "--listen", "0.0.0.0:18080", "--upstream", "chat=127.0.0.1:18081",
         "--upstream", "api=backend.internal:18082",
         "--route", "/ws=chat:chat", "--route", "/api/v2=api:api", "--route", "/api=api:api",
         "--extauth", "127.0.0.1:9001", "--extauth", "127.0.0.1:9011",
         "--admin-port", "0", "--flush-interval", "5", "--ext-authz-timeout", "1.5",
         "--max-stream-duration", "600", "--max-connections", "1000", "-o", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    validate(out)
    doc = yaml.safe_load(out.read_text())
    res = doc["static_resources"]
    clusters = {c["name"]: c for c in res["clusters"]}
    assert set(clusters) == {"extauth", "chat", "api"}
    assert clusters["api"]["type"] == "STRICT_DNS"  # a host name
    ext_eps = clusters["extauth"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(ext_eps) == 2
    # Room for a mass close's end entries: at Envoy's 1 MiB default it discards them.
    assert clusters["extauth"]["per_connection_buffer_limit_bytes"] == 32 * 1024 * 1024
    hcm = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    # longest prefix first, each a WebSocket route (an Upgrade header) then a plain one
    assert [r["match"]["prefix"] for r in routes] == ["/api/v2", "/api/v2", "/api", "/api", "/ws", "/ws"]
    ws_route, plain_route = routes[4], routes[5]
    for r in (ws_route, plain_route):
        assert r["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"] == {
            "context_extensions": {"policy": "chat"}}
    # The session bound (extauth's grpc-timeout) on the WebSocket route only, never upstream.
    assert ws_route["match"]["headers"] == [{"name": "upgrade", "present_match": True}]
    assert ws_route["route"]["max_stream_duration"] == {"max_stream_duration": "600s",
                                                        "grpc_timeout_header_max": "600s"}
    assert ws_route["request_headers_to_remove"] == ["grpc-timeout"]
    assert "headers" not in plain_route["match"] and "request_headers_to_remove" not in plain_route
    assert plain_route["route"]["max_stream_duration"] == {"max_stream_duration": "600s"}
    assert hcm["access_log_options"] == {"access_log_flush_interval": "5s",
                                         "flush_log_on_tunnel_successfully_established": True}
    authz = hcm["http_filters"][0]
    assert authz["name"] == "envoy.filters.http.ext_authz"
    assert authz["typed_config"].get("failure_mode_allow", False) is False
    assert authz["typed_config"]["status_on_error"] == {"code": "ServiceUnavailable"}
    assert authz["typed_config"]["grpc_service"]["timeout"] == "1.500s"
    assert authz["typed_config"]["clear_route_cache"] is True  # the route reads the session bound
    assert hcm["upgrade_configs"] == [{"upgrade_type": "websocket"}]
    # h2c clients may open RFC 8441 WebSockets too: extauth applies its rules to them.
    assert hcm["http2_protocol_options"] == {"allow_connect": True}
    assert [listener["name"] for listener in res["listeners"]] == ["ingress"]


def test_tls_and_http3_listeners_validate(tmp_path: Path) -> None:
    """TLS only (no cleartext listener): ALPN h2 first with extended CONNECT, and HTTP/3 on
    the same port over UDP, announced by Alt-Svc."""
    from extauth.devcert import write_self_signed

    cert = write_self_signed(tmp_path / "tls")
    out = tmp_path / "envoy.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "extauth", "envoy-config", "-c", str(REPO / "examples" / "extauth.yaml"),
         "--tls-listen", "0.0.0.0:18443", "--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file),
         "--http3", "--upstream", "chat=127.0.0.1:18081", "--admin-port", "0", "-o", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    validate(out)
    doc = yaml.safe_load(out.read_text())
    listeners = {item["name"]: item for item in doc["static_resources"]["listeners"]}
    assert set(listeners) == {"ingress_tls", "ingress_quic"}
    tls, quic = listeners["ingress_tls"], listeners["ingress_quic"]
    tls_chain, quic_chain = tls["filter_chains"][0], quic["filter_chains"][0]
    common = tls_chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    assert common["tls_certificates"] == [{"certificate_chain": {"filename": str(cert.cert_file)},
                                           "private_key": {"filename": str(cert.key_file)}}]
    tls_hcm = tls_chain["filters"][0]["typed_config"]
    assert tls_hcm["http2_protocol_options"] == {"allow_connect": True}
    assert tls_hcm["route_config"]["response_headers_to_add"] == [
        {"header": {"key": "alt-svc", "value": 'h3=":18443"; ma=86400'}}]
    assert quic["address"]["socket_address"] == {"protocol": "UDP", "address": "0.0.0.0", "port_value": 18443}
    assert quic_chain["transport_socket"]["name"] == "envoy.transport_sockets.quic"
    quic_hcm = quic_chain["filters"][0]["typed_config"]
    assert quic_hcm["codec_type"] == "HTTP3"
    assert quic_hcm["http3_protocol_options"] == {"allow_extended_connect": True}
    assert "http2_protocol_options" not in quic_hcm
    # Everything else is the cleartext listener's: ext_authz first, the lease stream, the routes.
    for hcm in (tls_hcm, quic_hcm):
        assert hcm["http_filters"][0]["name"] == "envoy.filters.http.ext_authz"
        assert [a["name"] for a in hcm["access_log"]] == ["envoy.access_loggers.stdout",
                                                         "envoy.access_loggers.http_grpc"]
        assert hcm["upgrade_configs"] == [{"upgrade_type": "websocket"}]


def test_tls_files_missing_here_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from extauth.cli import main

    code = main(["envoy-config", "-c", str(REPO / "examples" / "extauth.yaml"),
                 "--upstream", "app=127.0.0.1:1", "--tls-listen", "127.0.0.1:8443",
                 "--tls-cert", str(tmp_path / "nope.pem"),
                 "--tls-key", str(tmp_path / "nope.key"), "-o", str(tmp_path / "e.yaml")])
    assert code == 0
    err = capsys.readouterr().err
    assert "--tls-cert" in err and "--tls-key" in err and "Envoy reads it at start" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--upstream", "app=127.0.0.1:1", "--route", "/ws=app:nope"], "no policy named 'nope'"),
    (["--upstream", "app=127.0.0.1:1", "--route", "/ws=other:chat"], "unknown upstream 'other'"),
    (["--upstream", "app=127.0.0.1"], "HOST:PORT"),
    (["--upstream", "extauth=127.0.0.1:1"], "ext_authz cluster"),
    ([], "at least one --upstream"),
    # Values Envoy would reject at start, or where 0 would quietly mean "no limit".
    (["--upstream", "app=127.0.0.1:1", "--max-connections", "0"], "--max-connections"),
    (["--upstream", "app=127.0.0.1:1", "--max-stream-duration", "0"], "--max-stream-duration"),
    (["--upstream", "app=127.0.0.1:1", "--max-stream-duration", "-5"], "--max-stream-duration"),
    (["--upstream", "app=127.0.0.1:1", "--stream-idle-timeout", "nan"], "--stream-idle-timeout"),
    (["--upstream", "app=127.0.0.1:1", "--flush-interval", "inf"], "--flush-interval"),
    (["--upstream", "app=127.0.0.1:1", "--ext-authz-timeout", "0"], "--ext-authz-timeout"),
    (["--upstream", "app=127.0.0.1:1", "--ext-authz-timeout", "nan"], "--ext-authz-timeout"),
    (["--upstream", "app=127.0.0.1:1", "--max-stream-duration", "1e300"], "--max-stream-duration"),
    (["--upstream", "app=127.0.0.1:1", "--admin-port", "70000"], "--admin-port"),
    (["--upstream", "app=127.0.0.1:1", "--admin-address", "localhost"], "--admin-address"),
    (["--upstream", "app=127.0.0.1:99999"], "HOST:PORT"),
    (["--upstream", "app=127.0.0.1:1", "--tls-listen", "127.0.0.1:8443"],
     "--tls-listen: give --tls-cert and --tls-key"),
    (["--upstream", "app=127.0.0.1:1", "--tls-listen", "127.0.0.1:8443", "--tls-cert", "c.pem"],
     "--tls-listen: give --tls-key"),
    (["--upstream", "app=127.0.0.1:1", "--http3"], "--http3: only with --tls-listen"),
    (["--upstream", "app=127.0.0.1:1", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
     "--tls-cert, --tls-key: only with --tls-listen"),
    (["--upstream", "app=127.0.0.1:1", "--tls-listen", "0.0.0.0:8080", "--tls-cert", "c", "--tls-key", "k"],
     "the same TCP port"),
    (["--upstream", "app=127.0.0.1:1", "--tls-listen", "localhost:8443", "--tls-cert", "c", "--tls-key", "k"],
     "--tls-listen: expected an IP address"),
])
def test_envoy_config_refuses_bad_input(args: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from extauth.cli import main

    code = main(["envoy-config", "-c", str(REPO / "examples" / "extauth.yaml"),
                 "--listen", "127.0.0.1:8080", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_envoy_config_refuses_a_hostname_to_listen_on_and_an_unwritable_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from extauth.cli import main

    base = ["envoy-config", "-c", str(REPO / "examples" / "extauth.yaml"), "--upstream", "app=127.0.0.1:1"]
    assert main(base) == 2
    assert "give --listen HOST:PORT, --tls-listen HOST:PORT or both" in capsys.readouterr().err
    assert main([*base, "--listen", "localhost:8080"]) == 2
    assert "--listen: expected an IP address, got 'localhost'" in capsys.readouterr().err
    out = tmp_path / "missing-dir" / "envoy.yaml"
    assert main([*base, "--listen", "127.0.0.1:8080", "-o", str(out)]) == 2
    assert f"cannot write {out}" in capsys.readouterr().err


def test_flush_interval_close_to_ttl_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from extauth.cli import main

    code = main(["envoy-config", "-c", str(REPO / "examples" / "extauth.yaml"), "--listen", "127.0.0.1:8080",
                 "--upstream", "app=127.0.0.1:1", "--flush-interval", "45", "-o", str(tmp_path / "e.yaml")])
    assert code == 0
    assert "more than half of lease_ttl_seconds" in capsys.readouterr().err


def test_generated_default_routes_one_per_prefix_naming_no_policy(shared_stack: Stack) -> None:
    # extauth picks the policy itself (config order and hosts), which routes cannot express.
    doc = yaml.safe_load(generate_bootstrap(shared_stack.envoy_args()))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert sorted(r["match"]["prefix"] for r in routes) == ["/alias", "/alias", "/api", "/api", "/ws", "/ws"]
    assert not any("typed_per_filter_config" in r for r in routes)


def test_policies_sharing_a_prefix_on_other_hosts_get_one_route_and_extauth_picks(tmp_path: Path) -> None:
    from extauth.config import parse_config
    from extauth.envoy_config import EnvoyOptions, HostPort, Upstream, generate

    cfg = parse_config({"policies": [
        {"name": "internal", "match": {"hosts": ["internal.example.com"], "path_prefix": "/"},
         "websocket_only": False, "origins": ["https://app.example.com"]},
        {"name": "public", "match": {"hosts": ["public.example.com"], "path_prefix": "/"},
         "websocket_only": False, "allow_missing_origin": True},
        {"name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"]},
    ]})
    out = tmp_path / "envoy.yaml"
    out.write_text(generate(cfg, EnvoyOptions(listen=HostPort("127.0.0.1", 8080),
                                              upstreams=[Upstream("app", HostPort("127.0.0.1", 8081))])))
    hcm = yaml.safe_load(out.read_text())["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"]["prefix"] for r in routes] == ["/ws", "/ws", "/", "/"]
    assert not any("typed_per_filter_config" in r for r in routes)
    validate(out)


async def test_reference_config_works_against_the_real_stack(shared_stack: Stack, tmp_path: Path) -> None:
    """envoy/envoy.yaml is not only valid: filled in with this stack's ports it guards
    WebSockets the same way the generated config does."""
    port = free_port()
    values = {**PLACEHOLDERS, "ENVOY_LISTEN_PORT": str(port),
              "EXTAUTH_PORT": str(shared_stack.extauth[0].port),
              "UPSTREAM_HOST": "127.0.0.1", "UPSTREAM_PORT": str(shared_stack.upstream.port)}
    path = tmp_path / "envoy.yaml"
    path.write_text(substitute((ENVOY_DIR / "envoy.yaml").read_text(), values))
    envoy = Envoy("reference-envoy", path, port, tmp_path)
    try:
        envoy.start()
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        user = f"ref-{uuid.uuid4().hex[:8]}"
        tok = token(user)
        ws_path = f"/ws/ref-{uuid.uuid4().hex[:8]}"
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://127.0.0.1:{port}{ws_path}-denied?token={tok}", origin=OTHER_ORIGIN,  # type: ignore[arg-type]
                          proxy=None)
        assert info.value.response.status_code == 403
        assert info.value.response.headers["x-extauth-reason"] == "origin_not_allowed"
        async with connect(f"ws://127.0.0.1:{port}{ws_path}", origin=shared_stack.cfg.origins[0],  # type: ignore[arg-type]
                           subprotocols=["chat.v1", f"bearer.{tok}"], proxy=None) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "chat.v1"
            await ws.send("ref")
            assert await ws.recv() == "ref"
        [seen] = shared_stack.upstream.requests_to(ws_path)
        assert seen.headers["x-user-id"] == user
        assert tok not in str(seen.headers)
        # The stdout access log: reason recorded, never the query string.
        entries = await asyncio.to_thread(
            wait_until, lambda: [e for e in envoy.access_log() if e["path"].startswith(ws_path)], 5,
            "access-log entries")
        denied = [e for e in entries if e["status"] == 403]
        assert denied and denied[0]["reason"] == "origin_not_allowed"
        assert all("?" not in e["path"] and tok not in str(e) for e in entries)
        r = await shared_stack.try_connect(None, path=ws_path)
        assert isinstance(r, Refused)
    finally:
        envoy.kill()


@pytest.mark.parametrize(("store_timeout_ms", "ext_authz_timeout", "warned"), [
    (500, "0.5", True),    # equal: Envoy's deadline fires first on a slow store
    (800, "0.5", True),
    (800, "1", False),     # raised above the store timeout: extauth decides
    (50, None, False),     # the defaults
])
def test_a_store_timeout_envoy_would_cut_short_warns(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], store_timeout_ms: int,
        ext_authz_timeout: str | None, warned: bool) -> None:
    from extauth.cli import main

    cfg = yaml.safe_load((REPO / "examples" / "extauth.yaml").read_text())
    cfg["store_timeout_ms"] = store_timeout_ms
    path = tmp_path / "extauth.yaml"
    path.write_text(yaml.safe_dump(cfg))
    flag = ["--ext-authz-timeout", ext_authz_timeout] if ext_authz_timeout else []
    out = tmp_path / "e.yaml"
    code = main(["envoy-config", "-c", str(path), "--listen", "127.0.0.1:8080",
                 "--upstream", "app=127.0.0.1:1", *flag, "-o", str(out)])
    assert code == 0 and out.exists()
    assert ("store_on_error never applies" in capsys.readouterr().err) is warned


async def test_reference_tls_config_serves_http2_and_http3_websockets(
        shared_stack: Stack, tmp_path: Path, placeholders: dict[str, str]) -> None:
    """envoy/envoy-tls.yaml, filled in with this stack's ports: RFC 8441 and RFC 9220
    WebSockets through it get the same decisions as through the generated config."""
    from tests.e2e.extended_connect import H2Client, H3Client, WebSocket

    port = free_port()
    values = {**placeholders, "ENVOY_TLS_PORT": str(port),
              "EXTAUTH_PORT": str(shared_stack.extauth[0].port),
              "UPSTREAM_HOST": "127.0.0.1", "UPSTREAM_PORT": str(shared_stack.upstream.port)}
    path = tmp_path / "envoy-tls.yaml"
    path.write_text(substitute((ENVOY_DIR / "envoy-tls.yaml").read_text(), values))
    envoy = Envoy("reference-tls-envoy", path, port, tmp_path)
    tls = ssl.create_default_context(cafile=values["TLS_CERT_FILE"])
    tls.set_alpn_protocols(["h2", "http/1.1"])
    try:
        envoy.start()
        for name, connect in (
                ("h2", lambda: H2Client.connect("127.0.0.1", port, tls=tls, server_name="localhost")),
                ("h3", lambda: H3Client.connect("127.0.0.1", port, verify=True,
                                                cafile=values["TLS_CERT_FILE"]))):
            user = f"reftls-{uuid.uuid4().hex[:8]}"
            tok = token(user)
            ws_path = f"/ws/reftls-{name}-{uuid.uuid4().hex[:8]}"
            async with await connect() as conn:
                refused = await conn.websocket(f"{ws_path}-denied?token={tok}", origin=OTHER_ORIGIN)
                assert isinstance(refused, Refused) and refused.status == 403, refused
                assert refused.reason == "origin_not_allowed"
                ws = await conn.websocket(ws_path, origin=shared_stack.cfg.origins[0],
                                          subprotocols=["chat.v1", f"bearer.{tok}"])
                assert isinstance(ws, WebSocket), ws
                assert ws.subprotocol == "chat.v1"
                await ws.send(name)
                assert await ws.recv() == name
                await ws.close()
            [seen] = shared_stack.upstream.requests_to(ws_path)
            assert seen.headers["x-user-id"] == user and tok not in str(seen.headers)
            assert seen.headers["sec-websocket-key"]  # added by extauth for the HTTP/1.1 app
        entries = await asyncio.to_thread(
            wait_until, lambda: [e for e in envoy.access_log() if e["path"].startswith("/ws/reftls-")], 5,
            "access-log entries")
        assert {e["protocol"] for e in entries} <= {"HTTP/2", "HTTP/3"}
        assert any(e["protocol"] == "HTTP/3" for e in entries)
    finally:
        envoy.kill()
