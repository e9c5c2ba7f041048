"""Several issuers per policy: the token's ``iss`` picks the issuer before any key is touched,
each issuer's keys, audiences and algorithms are its own, and keys never cross issuers. Keys
come from two real JWKS servers on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extauth.config import ConfigError, load_config, parse_config
from extauth.pipeline import Authorizer
from extauth.reasons import DenyError, Reason
from extauth.request import CheckInput
from extauth.runtime import build_runtime
from extauth.tokens.jwks import UrlKeySource
from extauth.tokens.jwt import JwtVerifier
from tests.envoy_msgs import ws_headers
from tests.keys import (
    JwksServer,
    b64json,
    jwks_for,
    jwks_server,
    make_ec_key,
    make_rsa_key,
    shared_ec_key,
    shared_rsa_key,
    sign,
)

ISS_A = "https://a.example.com"
ISS_B = "https://kc.example.com/realms/b"


@pytest.fixture
def servers() -> Iterator[tuple[JwksServer, JwksServer]]:
    with jwks_server(jwks_for(shared_rsa_key(), "a1", "RS256")) as a, \
            jwks_server(jwks_for(shared_ec_key(), "b1", "ES256")) as b:
        yield a, b


def jwt_config(a: JwksServer, b: JwksServer, **shared: Any) -> dict[str, Any]:
    return {
        "issuers": [
            {"issuer": ISS_A, "audiences": ["ws"], "algorithms": ["RS256"], "jwks_uri": a.url,
             "jwks_refetch_cooldown_seconds": 60},
            {"issuer": ISS_B, "audiences": ["chat"], "algorithms": ["ES256"], "jwks_uri": b.url,
             "jwks_refetch_cooldown_seconds": 60},
        ],
        "token_sources": ["query:token"],
        **shared,
    }


def verifier(a: JwksServer, b: JwksServer, **shared: Any) -> JwtVerifier:
    cfg = parse_config({"policies": [{"name": "p", "jwt": jwt_config(a, b, **shared)}]})
    assert cfg.policies[0].jwt is not None
    return JwtVerifier(cfg.policies[0].jwt, max_token_bytes=8192, cache_size=100)


def claims(iss: str, aud: str, sub: str = "alice", **over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": iss, "aud": aud, "sub": sub, "iat": now, "exp": now + 600, **over}


def token_a(**over: Any) -> str:
    return sign(shared_rsa_key(), "RS256", {**claims(ISS_A, "ws"), **over}, kid="a1")


def token_b(**over: Any) -> str:
    return sign(shared_ec_key(), "ES256", {**claims(ISS_B, "chat"), **over}, kid="b1")


async def reason_of(v: JwtVerifier, tok: str) -> Reason:
    with pytest.raises(DenyError) as err:
        await v.verify(tok)
    return err.value.reason


async def test_each_issuer_verifies_its_own_tokens(servers: tuple[JwksServer, JwksServer]) -> None:
    v = verifier(*servers)
    try:
        assert (await v.verify(token_a(sub="ann"))).user == "ann"
        assert (await v.verify(token_b(sub="bob"))).user == "bob"
    finally:
        await v.close()


async def test_the_issuer_is_chosen_before_any_key_is_touched(servers: tuple[JwksServer, JwksServer]) -> None:
    a, b = servers
    v = verifier(a, b)
    try:
        # An issuer the policy does not list: no key source is asked.
        assert await reason_of(v, sign(shared_rsa_key(), "RS256", claims("https://evil.test", "ws"),
                                       kid="a1")) is Reason.TOKEN_CLAIMS
        for missing in ({}, {"iss": 7}, {"iss": ["x"]}):
            body = {k: val for k, val in claims(ISS_A, "ws").items() if k != "iss"} | missing
            assert await reason_of(v, sign(shared_rsa_key(), "RS256", body, kid="a1")) is Reason.TOKEN_CLAIMS
        assert a.requests == 0 and b.requests == 0
    finally:
        await v.close()


async def test_keys_never_cross_issuers(servers: tuple[JwksServer, JwksServer]) -> None:
    a, b = servers
    v = verifier(a, b)
    try:
        await v.verify(token_b())  # B's keys are loaded and warm
        b_before = b.requests
        # Claims issuer A, carries B's kid and is signed with B's key and algorithm: A's key
        # set has no such kid, and B's keys are never consulted for an A token.
        crossed = sign(shared_ec_key(), "ES256", claims(ISS_A, "ws"), kid="b1")
        assert await reason_of(v, crossed) is Reason.TOKEN_UNKNOWN_KEY  # ES256 is not one of A's
        crossed_rs = sign(shared_rsa_key(), "RS256", claims(ISS_A, "ws"), kid="b1")
        assert await reason_of(v, crossed_rs) is Reason.TOKEN_UNKNOWN_KEY  # no kid b1 at A
        assert b.requests == b_before  # B's key source was never asked for an A token
        # The reverse: issuer B, signed with A's key under A's kid.
        assert await reason_of(v, sign(shared_rsa_key(), "RS256", claims(ISS_B, "chat"), kid="a1")) \
            is Reason.TOKEN_UNKNOWN_KEY
        assert await reason_of(v, sign(shared_ec_key(), "ES256", claims(ISS_B, "chat"), kid="a1")) \
            is Reason.TOKEN_UNKNOWN_KEY
        assert b.requests - b_before <= 1  # at most B's own cooldown-bounded refetch for kid a1
        # A forged signature under the right issuer and kid is still the forgery signal.
        forged = sign(make_rsa_key(), "RS256", claims(ISS_A, "ws"), kid="a1")
        assert await reason_of(v, forged) is Reason.TOKEN_BAD_SIGNATURE
        # HMAC under an issuer of public keys: key confusion.
        hs = sign("x" * 64, "HS256", claims(ISS_A, "ws"), kid="a1")
        assert await reason_of(v, hs) is Reason.TOKEN_BAD_SIGNATURE
    finally:
        await v.close()


async def test_audiences_are_per_issuer(servers: tuple[JwksServer, JwksServer]) -> None:
    v = verifier(*servers)
    try:
        assert await reason_of(v, token_a(aud="chat")) is Reason.TOKEN_CLAIMS  # B's audience
        assert await reason_of(v, token_b(aud="ws")) is Reason.TOKEN_CLAIMS  # A's audience
        assert await reason_of(v, token_a(exp=int(time.time()) - 100)) is Reason.TOKEN_EXPIRED
    finally:
        await v.close()


async def test_the_unverified_read_is_bounded(servers: tuple[JwksServer, JwksServer]) -> None:
    v = verifier(*servers)
    try:
        header = b64json({"alg": "RS256", "kid": "a1"})
        deep = "[" * 5000 + "]" * 5000
        import base64
        p64 = base64.urlsafe_b64encode(deep.encode()).rstrip(b"=").decode()
        assert await reason_of(v, f"{header}.{p64}.c2ln") is Reason.TOKEN_MALFORMED
        assert await reason_of(v, f"{header}.{b64json(['x'])}.c2ln") is Reason.TOKEN_MALFORMED
        assert await reason_of(v, token_a(pad="x" * 9000)) is Reason.TOKEN_MALFORMED  # over max_token_bytes
    finally:
        await v.close()


async def test_a_key_withdrawn_at_one_issuer_forgets_only_its_verifications(
        servers: tuple[JwksServer, JwksServer]) -> None:
    a, b = servers
    v = verifier(a, b)
    try:
        ta, tb = token_a(), token_b()
        await v.verify(ta)
        await v.verify(tb)
        assert v.verify_cached(ta) is not None and v.verify_cached(tb) is not None
        a.set(jwks_for(make_rsa_key(), "a2", "RS256"))
        source = v.key_sources[0]
        assert isinstance(source, UrlKeySource)
        await source.refresh()
        assert v.verify_cached(ta) is None  # A's key left: verified again (and denied)
        assert v.verify_cached(tb) is not None  # B's verification stands
        assert await reason_of(v, ta) is Reason.TOKEN_UNKNOWN_KEY
    finally:
        await v.close()


async def test_a_policy_with_two_issuers_in_the_pipeline(servers: tuple[JwksServer, JwksServer]) -> None:
    cfg = parse_config({"policies": [{
        "name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
        "jwt": jwt_config(*servers), "upstream_headers": {"x-user-id": "{sub}"},
        "claim_rules": [{"all_of": [{"claim": "tier", "one_of": ["gold"]}]}]}]})
    rt = build_runtime(cfg)
    authz = Authorizer(rt, None)

    def ws(tok: str) -> CheckInput:
        return CheckInput(method="GET", host="h", path="/ws", query=f"token={tok}", headers=ws_headers(),
                          source_ip="198.51.100.9")
    try:
        da = await authz.check(ws(token_a(sub="ann", tier="gold")))
        db = await authz.check(ws(token_b(sub="bob", tier="gold")))
        assert da.allowed and da.headers_to_set["x-user-id"] == "ann"
        assert db.allowed and db.headers_to_set["x-user-id"] == "bob"
        assert (await authz.check(ws(token_b(tier="tin")))).reason is Reason.CLAIMS_FORBIDDEN
        assert len(rt.key_sources) == 2
    finally:
        await rt.close_unused(None)


# -- config --------------------------------------------------------------------------------------

def test_issuers_config_is_checked() -> None:
    one = {"issuer": ISS_A, "audiences": ["ws"], "jwks_uri": "https://a.example.com/jwks"}

    def error(jwt: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as err:
            parse_config({"policies": [{"name": "p", "jwt": jwt}]})
        return str(err.value)

    assert "with issuers, give audiences, issuer, jwks_uri per issuer" in error({**one, "issuers": [one]})
    assert "with issuers, give jwks_uri per issuer" in error(
        {"jwks_uri": "https://a.example.com/jwks", "issuers": [one]})
    assert "each issuer once" in error({"issuers": [one, one]})
    assert "policies[0].jwt.issuers[1].audiences" in error({"issuers": [one, {**one, "issuer": "b",
                                                                               "audiences": []}]})
    assert "exactly one of jwks_file" in error({"issuers": [{"issuer": "b", "audiences": ["x"]}]})
    assert "HS* algorithms need hmac_secret_env" in error(
        {"issuers": [{**one, "algorithms": ["HS256"]}]})
    assert "policies[0].jwt.issuer: Field required" in error({"audiences": ["ws"], "jwks_file": "k.json"})
    # The inline (single-issuer) form is unchanged.
    cfg = parse_config({"policies": [{"name": "p", "jwt": one}]})
    assert cfg.policies[0].jwt is not None and cfg.policies[0].jwt.per_issuer() == (cfg.policies[0].jwt,)


def test_per_issuer_configs_carry_the_policy_keys_and_relative_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(jwks_for(shared_rsa_key(), "a1", "RS256")))
    (tmp_path / "b.json").write_text(json.dumps(jwks_for(make_ec_key(), "b1", "ES256")))
    path = tmp_path / "extauth.yaml"
    path.write_text(json.dumps({"policies": [{"name": "p", "jwt": {
        "issuers": [{"issuer": ISS_A, "audiences": ["ws"], "jwks_file": "a.json"},
                    {"issuer": ISS_B, "audiences": ["chat"], "algorithms": ["ES256"], "jwks_file": "b.json"}],
        "user_claim": "preferred_username", "leeway_seconds": 5}}]}))
    jwt = load_config(path).policies[0].jwt
    assert jwt is not None
    a, b = jwt.per_issuer()
    assert (a.issuer, b.issuer) == (ISS_A, ISS_B)
    assert a.jwks_file == str(tmp_path / "a.json") and b.jwks_file == str(tmp_path / "b.json")
    assert a.user_claim == b.user_claim == "preferred_username" and b.leeway_seconds == 5
    assert b.algorithms == ["ES256"] and a.algorithms == ["RS256"]
