import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauth.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "extauth.yaml"


def base() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return str(e.value)


def test_example_loads_with_contract_keys() -> None:
    cfg = load_config(EXAMPLE)
    chat = cfg.policy("chat")
    assert chat is not None and chat.jwt is not None
    assert chat.quotas.connections_per_user == 10
    assert chat.jwt.token_sources[-1] == "subprotocol"
    # jwks_file is resolved relative to the config file, not the working directory
    assert Path(chat.jwt.jwks_file or "").is_file()
    assert cfg.store == "memory://" and cfg.store_on_error == "deny"


def test_error_names_the_key_path() -> None:
    data = base()
    del data["policies"][0]["jwt"]["issuer"]
    assert "policies[0].jwt.issuer" in error_of(data)


def test_unknown_key_refused() -> None:
    data = base()
    data["policies"][0]["origns"] = []
    msg = error_of(data)
    assert "policies[0].origns" in msg


def test_bad_origin_named() -> None:
    data = base()
    data["policies"][0]["origins"] = ["https://app.example.com/path"]
    assert "policies[0].origins" in error_of(data)


def test_alg_none_cannot_be_configured() -> None:
    data = base()
    data["policies"][0]["jwt"]["algorithms"] = ["none"]
    assert "policies[0].jwt.algorithms" in error_of(data)


def test_hmac_next_to_jwks_refused() -> None:
    data = base()
    data["policies"][0]["jwt"]["algorithms"] = ["RS256", "HS256"]
    assert "HS*" in error_of(data)


def test_exactly_one_key_source() -> None:
    data = base()
    data["policies"][0]["jwt"]["jwks_uri"] = "https://issuer.example.com/jwks"
    assert "exactly one of" in error_of(data)


def test_bad_token_source() -> None:
    data = base()
    data["policies"][0]["jwt"]["token_sources"] = ["body:token"]
    assert "bad token source" in error_of(data)


def test_duplicate_policy_names() -> None:
    data = base()
    data["policies"][1]["name"] = "chat"
    assert "duplicate policy" in error_of(data)


def test_per_user_quota_needs_jwt() -> None:
    assert "per-user quotas need a jwt" in error_of(
        {"policies": [{"name": "x", "quotas": {"connections_per_user": 1}}]}
    )


def test_reserved_upstream_header_refused() -> None:
    data = base()
    data["policies"][0]["upstream_headers"] = {"Authorization": "{sub}"}
    assert "reserved" in error_of(data)


def test_bad_store_and_client_ip() -> None:
    data = base()
    data["store"] = "mysql://x"
    data["client_ip"] = "xff"
    msg = error_of(data)
    assert "store" in msg and "client_ip" in msg


def test_xff_hops() -> None:
    data = base()
    data["client_ip"] = "xff:2"
    assert parse_config(data).xff_hops == 2


def test_top_level_contract_keys_have_defaults() -> None:
    cfg = parse_config({"policies": [{"name": "p"}]})
    assert cfg.listen == "127.0.0.1:9001"
    assert cfg.lease_ttl_seconds > 0 and cfg.store_timeout_ms == 50
    assert cfg.abuse.never_ban == ["127.0.0.0/8", "::1/128"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extauth", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_check_config_cli_ok_and_error(tmp_path: Path) -> None:
    ok = _cli("check-config", "-c", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    data = base()
    data["policies"][0]["quotas"]["connections_per_user"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    res = _cli("check-config", "-c", str(bad))
    assert res.returncode == 2
    assert "policies[0].quotas.connections_per_user" in res.stderr
    assert "Traceback" not in res.stderr


def test_check_config_missing_jwks_file(tmp_path: Path) -> None:
    data = base()
    data["policies"][0]["jwt"]["jwks_file"] = str(tmp_path / "nope.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    res = _cli("check-config", "-c", str(bad))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "nope.json" in res.stderr


def test_not_yaml(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    p.write_text("policies: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


# -- JWKS endpoint and bounds -------------------------------------------------------


def _jwks_uri_policy(**jwt: object) -> dict:
    return {"policies": [{"name": "p", "jwt": {"issuer": "i", "audiences": ["a"], **jwt}}]}


@pytest.mark.parametrize("uri", [
    "https://idp.example.com/.well-known/jwks.json",
    "http://127.0.0.1:8080/jwks",
    "http://127.8.9.10/jwks",
    "http://[::1]:8080/jwks",
    "http://localhost:8080/jwks",
])
def test_jwks_uri_https_or_loopback_http(uri: str) -> None:
    jwt = parse_config(_jwks_uri_policy(jwks_uri=uri)).policies[0].jwt
    assert jwt is not None and jwt.jwks_uri == uri


@pytest.mark.parametrize("uri", [
    "http://idp.example.com/jwks",
    "http://10.0.0.5/jwks",
    "http://127.0.0.1.nip.io/jwks",  # a name, not a loopback address
    "http://[::ffff:127.0.0.1]/jwks",
])
def test_jwks_uri_plain_http_off_loopback_refused(uri: str) -> None:
    msg = error_of(_jwks_uri_policy(jwks_uri=uri))
    assert "policies[0].jwt.jwks_uri" in msg and "https://" in msg


@pytest.mark.parametrize("uri", ["ftp://idp.example.com/jwks", "file:///etc/jwks.json", "https://", "https:///jwks"])
def test_jwks_uri_not_an_https_url_refused(uri: str) -> None:
    assert "policies[0].jwt.jwks_uri" in error_of(_jwks_uri_policy(jwks_uri=uri))


@pytest.mark.parametrize("uri", ["https://user:pw@idp.example.com/jwks", "http://127.0.0.1@idp.example.com/jwks",
                                 "http://user@127.0.0.1/jwks"])
def test_jwks_uri_with_userinfo_refused(uri: str) -> None:
    msg = error_of(_jwks_uri_policy(jwks_uri=uri))
    assert "policies[0].jwt.jwks_uri" in msg and "user:password@" in msg


def test_jwks_uri_error_does_not_echo_the_url() -> None:
    msg = error_of(_jwks_uri_policy(jwks_uri="http://user:hunter2@idp.example.com/jwks?key=s3cret"))
    assert "hunter2" not in msg and "s3cret" not in msg


def test_jwks_max_bytes_capped() -> None:
    uri = "https://idp.example.com/jwks"
    assert "policies[0].jwt.jwks_max_bytes" in error_of(_jwks_uri_policy(jwks_uri=uri, jwks_max_bytes=10**12))
    assert "policies[0].jwt.jwks_max_bytes" in error_of(_jwks_uri_policy(jwks_uri=uri, jwks_max_bytes=0))
    jwt = parse_config(_jwks_uri_policy(jwks_uri=uri, jwks_max_bytes=4 * 1024 * 1024)).policies[0].jwt
    assert jwt is not None and jwt.jwks_max_bytes == 4 * 1024 * 1024


def test_jwks_defaults_are_valid() -> None:
    jwt = parse_config(_jwks_uri_policy(jwks_uri="https://idp.example.com/jwks")).policies[0].jwt
    assert jwt is not None
    assert jwt.jwks_max_bytes == 256 * 1024
    assert jwt.jwks_refresh_seconds >= 1 and jwt.jwks_refetch_cooldown_seconds >= 1


@pytest.mark.parametrize(("key", "value"),
                         [("jwks_refresh_seconds", 0.2), ("jwks_refetch_cooldown_seconds", 0)])
def test_jwks_fetch_intervals_are_at_least_a_second(key: str, value: float) -> None:
    # A zero cooldown would let every forged kid trigger a fetch of the issuer's JWKS.
    uri = "https://idp.example.com/jwks"
    assert f"policies[0].jwt.{key}" in error_of(_jwks_uri_policy(jwks_uri=uri, **{key: value}))
    jwt = parse_config(_jwks_uri_policy(jwks_uri=uri, **{key: 1})).policies[0].jwt
    assert jwt is not None and getattr(jwt, key) == 1


def test_jwks_max_stale_below_the_refresh_interval_refused() -> None:
    # Keys would go stale before the timer refetched them: every uncached check would fetch.
    uri = "https://idp.example.com/jwks"
    msg = error_of(_jwks_uri_policy(jwks_uri=uri, jwks_refresh_seconds=300, jwks_max_stale_seconds=0))
    assert "jwks_max_stale_seconds must be at least jwks_refresh_seconds" in msg
    jwt = parse_config(_jwks_uri_policy(jwks_uri=uri, jwks_refresh_seconds=300,
                                        jwks_max_stale_seconds=300)).policies[0].jwt
    assert jwt is not None and jwt.jwks_max_stale_seconds == 300


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/abc",  # database number
    "redis://a:1,b:2",  # several hosts without +cluster
    "redis://u:hunter2@h:6379?ssl_ca_certs=/x.pem",  # TLS options without TLS
    "rediss://u:hunter2@h:6379?ssl_cert_reqs=bogus",
    "rediss://h:6379?password=hunter2",  # not an option
    "redis://u:hunter2@127.0.0.1:99999",  # port out of range
    "redis://u:hunter2@127.0.0.1:0",
    "redis+cluster://a:1,b:2/3",  # a cluster has no database
    "redis://",
])
def test_store_urls_that_serve_would_refuse_are_refused(url: str) -> None:
    # check-config must refuse what serve cannot use, naming the key, never quoting the password.
    data = base()
    data["store"] = url
    msg = error_of(data)
    assert msg.startswith("store: ") and "hunter2" not in msg, msg


@pytest.mark.parametrize("url", [
    "redis://u:p%40ss@127.0.0.1:6390/2", "rediss://127.0.0.1:6390?ssl_cert_reqs=none",
    "rediss+cluster://a:7000,[::1]:7001?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
])
def test_usable_store_urls_pass(url: str) -> None:
    data = base()
    data["store"] = url
    assert parse_config(data).store == url


@pytest.mark.parametrize(("key", "value"), [
    ("lease_ttl_seconds", float("inf")),
    ("lease_ttl_seconds", 1e30),
    ("lease_ttl_seconds", float("nan")),
    ("store_breaker.reset_seconds", float("inf")),
    ("abuse.ban_seconds", 10**16),
    ("abuse.window_seconds", 10**16),
    ("policies[0].quotas.connections_per_user", 10**30),
])
def test_infinite_or_absurd_values_refused(key: str, value: float) -> None:
    # Each passed its lower bound and broke at run time: an infinite lease TTL was a 500 on
    # every upgrade, a 1e16 s window made each forged token a store error that opened the
    # breaker for everyone, an infinite reset_seconds kept the breaker open forever.
    data = base()
    target: Any = data
    *parents, leaf = key.replace("[0]", ".0").split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    target[leaf] = value
    assert error_of(data).startswith(f"{key}: "), error_of(data)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "extauth.yaml"
    path.write_text(text)
    return path


def test_yaml_error_never_quotes_the_file(tmp_path: Path) -> None:
    # PyYAML's message quotes the offending line; here that line holds the store's password.
    path = write(tmp_path, "store: redis://default:Tr0ub4dor: 3@redis.internal:6379/0\n"
                           "policies: [{name: p}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "Tr0ub4dor" not in str(e.value)
    assert str(e.value) == f"{path}: not valid YAML: mapping values are not allowed here (line 1, column 33)"


@pytest.mark.parametrize("text", [
    "policies: [{name: p}]\nabuse: {enabled: true}\nabuse: {enabled: false}\n",
    "policies:\n- name: p\n  origins: [https://app.example.com]\n  origins: [https://evil.example.net]\n",
])
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str) -> None:
    # The second would silently win: a later abuse: block switching the jail off, a later origins:.
    with pytest.raises(ConfigError, match=r"duplicate key '(abuse|origins)'"):
        load_config(write(tmp_path, text))


def test_a_merged_key_may_be_overridden(tmp_path: Path) -> None:
    text = ("policies:\n- &chat {name: chat, origins: [https://a.example.com]}\n"
            "- <<: *chat\n  name: chat2\n  origins: [https://b.example.com]\n")
    cfg = load_config(write(tmp_path, text))
    assert [p.origins for p in cfg.policies] == [["https://a.example.com"], ["https://b.example.com"]]
