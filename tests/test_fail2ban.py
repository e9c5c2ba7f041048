"""The shipped fail2ban filter matches extauth's JSON decision lines for hostile reasons only, and the
shipped Envoy access-log format records the reason without the query string."""

from __future__ import annotations

import base64
import configparser
import logging
import os
import re
import time
from pathlib import Path

import pytest

from extauth.config import parse_config
from extauth.envoy_config import ACCESS_LOG_PATH
from extauth.logs import DECISION_LOG, JsonFormatter, log_event
from extauth.pipeline import Authorizer
from extauth.reasons import HOSTILE_REASONS, Reason
from extauth.request import CheckInput
from extauth.runtime import build_runtime
from extauth.store.guard import GuardedStore
from extauth.store.memory import MemoryStore
from tests.keys import HMAC_SECRET, sign

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "envoy" / "fail2ban" / "extauth-hostile.conf"
ACCESS_LOG_FORMAT = ROOT / "envoy" / "access-log-format.txt"
SECRET_ENV = "EXTAUTH_TEST_F2B_SECRET"
# What fail2ban's <HOST> becomes for this test: an IPv4 or IPv6 address.
HOST_RE = r"(?P<host>[0-9A-Fa-f:.]+)"


def failregexes() -> list[re.Pattern[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(FILTER, encoding="utf-8")
    raw = parser.get("Definition", "failregex")
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    assert lines, "no failregex"
    for line in lines:
        assert line.count("<HOST>") == 1
    return [re.compile(line.replace("<HOST>", HOST_RE)) for line in lines]


def matched_host(line: str) -> str | None:
    for rx in failregexes():
        m = rx.search(line)
        if m:
            return m.group("host")
    return None


def decision_line(reason: Reason, ip: str, msg: str = "deny", **extra: object) -> str:
    """A decision line with the fields and order of Authorizer._log, through the real formatter."""
    record = logging.LogRecord("extauth.decision", logging.INFO, __file__, 1, msg, None, None)
    record.fields = {
        "reason": reason.value, "status": reason.status, "policy": "chat", "client_ip": ip,
        "user": extra.pop("user", None), "decision_id": "0123456789abcdef", "request_id": "req-1",
        "host": "ws.example.com", "route": "/ws/room", "detail": extra.pop("detail", ""), **extra,
    }
    return JsonFormatter().format(record)


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.value)
@pytest.mark.parametrize("ip", ["203.0.113.7", "2001:db8::7"])
def test_filter_matches_exactly_the_hostile_reasons(reason: Reason, ip: str) -> None:
    host = matched_host(decision_line(reason, ip))
    if reason in HOSTILE_REASONS:
        assert host == ip
    else:
        assert host is None


def test_hostile_set_is_the_forgery_code() -> None:
    # The filter names it: it must be updated if this ever changes.
    assert {r.value for r in HOSTILE_REASONS} == {"token_bad_signature"}
    text = FILTER.read_text()
    for r in HOSTILE_REASONS:
        assert r.value in text


@pytest.mark.parametrize("reason", sorted(HOSTILE_REASONS), ids=lambda r: r.value)
def test_filter_ignores_shadow_denials_and_other_loggers(reason: Reason) -> None:
    assert matched_host(decision_line(reason, "203.0.113.7", msg="shadow deny")) is None
    line = decision_line(reason, "203.0.113.7").replace('"logger":"extauth.decision"', '"logger":"extauth.x"')
    assert matched_host(line) is None


def test_filter_cannot_be_steered_by_field_values() -> None:
    # A non-hostile line whose free-text fields carry a hostile-looking payload: JSON escapes the quotes.
    evil = '","reason":"token_bad_signature","client_ip":"192.0.2.1'
    line = decision_line(Reason.TOKEN_EXPIRED, "203.0.113.7", user=evil, detail=evil)
    assert matched_host(line) is None
    # And a hostile line cannot be redirected to another address.
    line = decision_line(Reason.TOKEN_BAD_SIGNATURE, "203.0.113.7", detail='"client_ip":"192.0.2.1"')
    assert matched_host(line) == "203.0.113.7"


def ws(ip: str, tok: str | None, origin: str | None = "https://app.example.com",
       path: str = "/ws/room") -> CheckInput:
    headers = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
               "sec-websocket-key": base64.b64encode(os.urandom(16)).decode()}
    if origin:
        headers["origin"] = origin
    if tok:
        headers["authorization"] = f"Bearer {tok}"
    return CheckInput(method="GET", host="ws.example.com", path=path, query="token=secret-in-query",
                      headers=headers, source_ip=ip)


async def test_filter_against_real_pipeline_lines(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(SECRET_ENV, HMAC_SECRET)
    cfg = parse_config({
        "abuse": {"enabled": False},
        "policies": [{"name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
                      "jwt": {"issuer": "iss", "audiences": ["ws"], "algorithms": ["HS256"],
                              "hmac_secret_env": SECRET_ENV}}],
    })
    auth = Authorizer(build_runtime(cfg), GuardedStore(MemoryStore()))
    now = int(time.time())

    def tok(secret: str = HMAC_SECRET, exp: int = now + 600) -> str:
        return sign(secret, "HS256", {"iss": "iss", "aud": "ws", "sub": "alice", "iat": now - 60, "exp": exp})

    cases = {
        Reason.TOKEN_BAD_SIGNATURE: ws("203.0.113.1", tok(secret="x" * 64)),
        Reason.TOKEN_MALFORMED: ws("203.0.113.2", "not.a-token"),
        Reason.TOKEN_EXPIRED: ws("203.0.113.3", tok(exp=now - 120)),
        Reason.TOKEN_MISSING: ws("203.0.113.4", None),
        Reason.ORIGIN_NOT_ALLOWED: ws("203.0.113.5", tok(), origin="https://partner.example.net"),
        Reason.ORIGIN_MISSING: ws("203.0.113.6", tok(), origin=None),
        Reason.NO_POLICY: ws("203.0.113.8", tok(), path="/elsewhere"),
    }
    # IPv6: extauth counts the client's /64 ("client_ip"); the filter takes the address itself.
    ipv6 = [(Reason.TOKEN_BAD_SIGNATURE, ws("2001:db8:1:2::7", tok(secret="x" * 64))),
            (Reason.TOKEN_EXPIRED, ws("2001:db8:1:2::8", tok(exp=now - 120)))]
    caplog.set_level(logging.INFO, logger=DECISION_LOG.name)
    for reason, req in [*cases.items(), *ipv6]:
        caplog.clear()
        d = await auth.check(req)
        assert d.reason is reason
        lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "extauth.decision"]
        assert len(lines) == 1
        assert "secret-in-query" not in lines[0]
        assert matched_host(lines[0]) == (req.source_ip if reason.hostile else None), lines[0]


def test_log_event_lines_match_too() -> None:
    # The same line through log_event (what the pipeline calls), formatted by the JSON formatter.
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    DECISION_LOG.addHandler(handler)
    old = DECISION_LOG.level
    DECISION_LOG.setLevel(logging.INFO)
    try:
        log_event(DECISION_LOG, logging.INFO, "deny", reason="token_bad_signature", status=401, policy=None,
                  client_ip="198.51.100.9", user=None, decision_id="d", request_id="", host="h",
                  route="/", detail="")
    finally:
        DECISION_LOG.removeHandler(handler)
        DECISION_LOG.setLevel(old)
    assert matched_host(JsonFormatter().format(records[0])) == "198.51.100.9"


def test_access_log_format_records_the_reason_never_the_query() -> None:
    fmt = ACCESS_LOG_FORMAT.read_text(encoding="utf-8").strip()
    assert "\n" not in fmt
    assert "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:reason)%" in fmt
    # The path: the generated config's expression, which withholds path parameters.
    assert ACCESS_LOG_PATH in fmt
    rest = fmt.replace(ACCESS_LOG_PATH, "")
    commands = re.findall(r"%([A-Z_]+)(?:\(([^)]*)\))?(?::\d+)?%", rest)
    assert commands
    for name, arg in commands:
        # No other path, and no header that may carry a token.
        assert "PATH" not in name and "PATH" not in arg.upper() and name != "CEL", (name, arg)
        assert arg.upper() not in ("AUTHORIZATION", "COOKIE", "SEC-WEBSOCKET-PROTOCOL"), arg
