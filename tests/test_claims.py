"""Claim rules: the pure module (extauth/claims.py), their config, and the pipeline's 403
``claims_forbidden`` (never counted by the jail, never hidden by the allow memo)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from extauth.claims import MAX_CLAIM_ITEMS, compile_rules, normalized_path
from extauth.config import ConfigError, parse_config
from extauth.envoy_api import check_input
from extauth.jail import Jail
from extauth.memo import FastPath
from extauth.pipeline import Authorizer
from extauth.reasons import Reason
from extauth.request import CheckInput
from extauth.runtime import build_runtime
from extauth.store.guard import GuardedStore
from extauth.store.memory import MemoryStore
from tests.envoy_msgs import check_request, ws_headers
from tests.keys import jwks_for, shared_rsa_key, sign

ISS = "https://issuer.example.com"

KEYCLOAK = {
    "sub": "alice", "scope": "openid chat:read chat:write", "plan": "pro", "level": 3,
    "email_verified": True, "realm_access": {"roles": ["chat-user", "offline_access"]},
    "groups": ["/acme/ops"], "https://example.com/tenant": "acme",
}


def rules(*specs: dict[str, Any]) -> Any:
    return compile_rules(specs)


def allows(specs: list[dict[str, Any]], claims: dict[str, Any], method: str = "GET",
           path: str = "/ws") -> bool:
    return bool(rules(*specs).allows(claims, method, path))


# -- the checks ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("check", "expected"), [
    ({"claim": "plan", "equals": "pro"}, True),
    ({"claim": "plan", "equals": "free"}, False),
    ({"claim": "level", "equals": 3}, True),
    ({"claim": "level", "equals": "3"}, False),  # type-exact: "3" is not 3
    ({"claim": "email_verified", "equals": True}, True),
    ({"claim": "level", "equals": True}, False),  # true is not 1, nor 3
    ({"claim": "plan", "one_of": ["pro", "internal"]}, True),
    ({"claim": "plan", "one_of": ["free"]}, False),
    ({"claim": "level", "one_of": [1, 2, 3]}, True),
    ({"claim": "scope", "contains_all": ["chat:read", "chat:write"]}, True),
    ({"claim": "scope", "contains_all": ["chat:read", "chat:admin"]}, False),
    ({"claim": "scope", "contains_any": ["chat:admin", "chat:write"]}, True),
    ({"claim": "scope", "contains_any": ["chat"]}, False),  # a word of the string, never a substring
    ({"claim": "realm_access.roles", "contains_any": ["chat-user"]}, True),
    ({"claim": "realm_access.roles", "contains_all": ["chat-user", "admin"]}, False),
    ({"claim": "groups", "contains_all": ["/acme/ops"]}, True),
    ({"claim": ["https://example.com/tenant"], "equals": "acme"}, True),  # a name with dots
    ({"claim": "https://example.com/tenant", "equals": "acme"}, False),  # ... is not a path
    ({"claim": "missing", "equals": "x"}, False),
    ({"claim": "realm_access.missing.deeper", "contains_any": ["x"]}, False),
    ({"claim": "plan.sub", "equals": "x"}, False),  # walking into a string
])
def test_checks(check: dict[str, Any], expected: bool) -> None:
    assert allows([{"all_of": [check]}], KEYCLOAK) is expected


@pytest.mark.parametrize("value", [
    {"roles": ["chat-user"]},  # an object where a list is expected
    ["chat-user", 7],  # a list with a non-string
    ["chat-user", ["nested"]],
    ["x"] * (MAX_CLAIM_ITEMS + 1),  # over the item bound, even though it holds the role
    "chat-user " * 2000,  # over the text bound
    None, 3, True, 1.5,
])
def test_wrong_typed_or_oversized_claims_fail_the_check(value: Any) -> None:
    claims = {**KEYCLOAK, "roles": value}
    if isinstance(value, list) and len(value) > MAX_CLAIM_ITEMS:
        value[0] = "chat-user"
    assert not allows([{"all_of": [{"claim": "roles", "contains_any": ["chat-user"]}]}], claims)
    assert not allows([{"all_of": [{"claim": "roles", "equals": "chat-user"}]}], claims)
    assert not allows([{"all_of": [{"claim": "roles", "one_of": ["chat-user"]}]}], claims)


def test_deeply_nested_claims_are_walked_only_as_deep_as_the_path() -> None:
    deep: Any = "chat-user"
    for _ in range(500):
        deep = {"a": deep}
    claims = {"sub": "x", "a": deep}
    assert not allows([{"all_of": [{"claim": "a.a.a", "equals": "chat-user"}]}], claims)
    assert not allows([{"all_of": [{"claim": "a", "contains_any": ["chat-user"]}]}], claims)


def test_all_of_and_any_of_combine() -> None:
    rule = {"all_of": [{"claim": "plan", "one_of": ["pro", "internal"]}],
            "any_of": [{"claim": "realm_access.roles", "contains_any": ["admin"]},
                       {"claim": "scope", "contains_all": ["chat:write"]}]}
    assert allows([rule], KEYCLOAK)
    assert not allows([rule], {**KEYCLOAK, "scope": "chat:read"})  # neither any_of holds
    assert not allows([rule], {**KEYCLOAK, "plan": "free"})  # the all_of fails
    # Several rules: every rule that applies must hold.
    assert not allows([rule, {"all_of": [{"claim": "plan", "equals": "internal"}]}], KEYCLOAK)


def test_rules_scoped_by_path_prefix_and_method() -> None:
    admin = {"path_prefix": "/ws/admin",
             "all_of": [{"claim": "realm_access.roles", "contains_any": ["admin"]}]}
    writes = {"methods": ["post", "PUT"], "all_of": [{"claim": "scope", "contains_all": ["chat:admin"]}]}
    compiled = rules(admin, writes)
    assert compiled.scoped
    assert compiled.allows(KEYCLOAK, "GET", "/ws/room")
    assert not compiled.allows(KEYCLOAK, "GET", "/ws/admin/users")
    assert not compiled.allows(KEYCLOAK, "POST", "/ws/room")
    assert compiled.allows(KEYCLOAK, "DELETE", "/ws/room")
    # Encoded, dotted or doubled spellings of the scoped path are still in scope.
    for sneaky in ("/ws/%61dmin/users", "/ws/room/../admin", "/ws//admin", "/ws/./admin", "/ws\\admin"):
        assert not compiled.allows(KEYCLOAK, "GET", sneaky), sneaky
    assert not rules({"all_of": [{"claim": "plan", "equals": "pro"}]}).scoped


@pytest.mark.parametrize(("raw", "normal"), [
    ("/a/b", "/a/b"), ("/a/./b/../c", "/a/c"), ("//a//b/", "/a/b/"), ("/%2e%2e/a", "/a"), ("", "/"),
])
def test_normalized_path(raw: str, normal: str) -> None:
    assert normalized_path(raw) == normal


# -- config --------------------------------------------------------------------------------------

def _policy(**over: Any) -> dict[str, Any]:
    return {"policies": [{"name": "p", "match": {"path_prefix": "/"},
                          "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": "/nonexistent"}, **over}]}


@pytest.mark.parametrize(("rule", "message"), [
    ({}, "a rule needs all_of or any_of"),
    ({"all_of": [{"claim": "plan"}]}, "exactly one of equals"),
    ({"all_of": [{"claim": "plan", "equals": "a", "one_of": ["b"]}]}, "exactly one of equals"),
    ({"all_of": [{"claim": "a.b.c.d.e.f.g.h.i", "equals": "x"}]}, "claim path of 1 to 8"),
    ({"all_of": [{"claim": "a..b", "equals": "x"}]}, "claim path of 1 to 8"),
    ({"all_of": [{"claim": "scope", "contains_all": []}]}, "at least 1 item"),
    ({"path_prefix": "ws", "all_of": [{"claim": "plan", "equals": "x"}]}, "must start with '/'"),
    ({"methods": ["GET /"], "all_of": [{"claim": "plan", "equals": "x"}]}, "String should match"),
    ({"all_of": [{"claim": "plan", "equals": 1.5}]}, "claim_rules[0].all_of[0].equals"),
])
def test_bad_rules_are_refused_with_their_key_path(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="claim_rules") as err:
        parse_config(_policy(claim_rules=[rule]))
    assert message in str(err.value)


def test_claim_rules_need_a_jwt_section() -> None:
    with pytest.raises(ConfigError, match="claim_rules need a jwt section"):
        parse_config({"policies": [{"name": "p",
                                    "claim_rules": [{"all_of": [{"claim": "a", "equals": "b"}]}]}]})


# -- the pipeline --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("keys") / "jwks.json"
    path.write_text(json.dumps(jwks_for(shared_rsa_key(), "k1", "RS256")))
    return str(path)


def token(**claims: Any) -> str:
    now = int(time.time())
    return sign(shared_rsa_key(), "RS256", {"iss": ISS, "aud": "ws", "sub": "alice", "iat": now,
                                            "exp": now + 600, **claims}, kid="k1")


CHAT_RULES = [
    {"all_of": [{"claim": "realm_access.roles", "contains_any": ["chat-user"]}]},
    {"path_prefix": "/api/admin", "all_of": [{"claim": "scope", "contains_all": ["chat:admin"]}]},
    {"methods": ["POST"], "all_of": [{"claim": "scope", "contains_all": ["chat:write"]}]},
]


def config(jwks_file: str, *, shadow: bool = False) -> Any:
    jwt = {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file, "token_sources": ["query:token"]}
    return parse_config({"policies": [
        {"name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
         "jwt": jwt, "shadow": shadow, "claim_rules": CHAT_RULES},
        {"name": "api", "match": {"path_prefix": "/api"}, "websocket_only": False,
         "jwt": {**jwt, "token_sources": ["header:authorization"]}, "claim_rules": CHAT_RULES},
    ]})


def ws(tok: str, ip: str = "198.51.100.9") -> CheckInput:
    return CheckInput(method="GET", host="h", path="/ws", query=f"token={tok}", headers=ws_headers(),
                      source_ip=ip)


ROLE = {"realm_access": {"roles": ["chat-user"]}}


async def test_a_verified_token_failing_a_rule_is_403_insufficient_scope(jwks_file: str) -> None:
    cfg = config(jwks_file)
    store = MemoryStore()
    authz = Authorizer(build_runtime(cfg), store, jail=Jail(cfg.abuse, store))
    assert (await authz.check(ws(token(**ROLE)))).allowed
    for _ in range(cfg.abuse.threshold + 2):
        d = await authz.check(ws(token(realm_access={"roles": {"chat-user": True}}), ip="203.0.113.50"))
        assert not d.allowed and d.reason is Reason.CLAIMS_FORBIDDEN and d.status == 403
        assert d.user == "alice"
        assert d.deny_headers["www-authenticate"] == 'Bearer realm="extauth", error="insufficient_scope"'
        assert d.deny_headers["x-extauth-reason"] == "claims_forbidden"
    # Authentic tokens without the role: never evidence of forgery.
    assert await store.list_bans() == []
    assert (await authz.check(ws(token(**ROLE), ip="203.0.113.50"))).allowed


async def test_shadow_policy_tags_a_claims_denial(jwks_file: str) -> None:
    authz = Authorizer(build_runtime(config(jwks_file, shadow=True)), GuardedStore(MemoryStore()))
    d = await authz.check(ws(token()))
    assert d.allowed and d.shadow_reason is Reason.CLAIMS_FORBIDDEN and d.query_params_to_remove == ("token",)


async def test_scoped_rules_in_the_pipeline(jwks_file: str) -> None:
    authz = Authorizer(build_runtime(config(jwks_file)), None)

    async def api(method: str, path: str, **claims: Any) -> Reason | None:
        tok = token(**ROLE, **claims)
        d = await authz.check(CheckInput(method=method, host="h", path=path,
                                         query="", source_ip="198.51.100.9",
                                         headers={"authorization": f"Bearer {tok}"}))
        return d.reason

    assert await api("GET", "/api/items") is None
    assert await api("GET", "/api/admin/x") is Reason.CLAIMS_FORBIDDEN
    assert await api("GET", "/api/%61dmin/x") is Reason.CLAIMS_FORBIDDEN
    assert await api("GET", "/api/admin/x", scope="chat:admin") is None
    assert await api("POST", "/api/items", scope="chat:read") is Reason.CLAIMS_FORBIDDEN
    assert await api("POST", "/api/items", scope="chat:read chat:write") is None


def test_the_allow_memo_keys_on_method_and_path_when_rules_are_scoped(jwks_file: str) -> None:
    # A remembered GET allow must not answer a POST (or another path) that a rule refuses.
    fast = FastPath(Authorizer(build_runtime(config(jwks_file)), None))

    def key(path: str, method: str = "GET") -> Any:
        made = fast.key(check_input(check_request(path, bearer, method=method, context={"policy": "api"})))
        return None if made is None else made[1]

    bearer = {"authorization": f"Bearer {token(**ROLE)}"}
    keys = {key(path, method)
            for method, path in (("GET", "/api/a"), ("POST", "/api/a"), ("GET", "/api/admin/a"))}
    assert len(keys) == 3 and None not in keys
    assert key("/api/a?x=1") == key("/api/a?x=2")


# -- claims to Envoy -----------------------------------------------------------------------------

def test_selected_claims_are_bounded_and_of_metadata_shape() -> None:
    from extauth.claims import MAX_METADATA_BYTES, ClaimSelector
    claims = {**KEYCLOAK, "obj": {"a": 1}, "big": "x" * 5000, "nums": [1, 2.5, True], "mixed": [1, {"a": 1}],
              "huge": 2**80}
    sel = ClaimSelector(["plan", "realm_access.roles", ["https://example.com/tenant"], "obj", "big", "nums",
                         "mixed", "huge", "missing", "level"])
    assert sel.select(claims) == {"plan": "pro", "realm_access.roles": ["chat-user", "offline_access"],
                                  "https://example.com/tenant": "acme", "nums": [1, 2.5, True], "level": 3}
    many = ClaimSelector([f"c{i}" for i in range(16)])
    out = many.select({f"c{i}": "v" * 1000 for i in range(16)})
    assert 0 < len(out) < 16 and len(json.dumps(out)) <= MAX_METADATA_BYTES + 16 * 8


async def test_selected_claims_reach_the_allow_metadata(jwks_file: str) -> None:
    from extauth.envoy_api import check_response
    cfg = parse_config({"policies": [{
        "name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
        "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file, "token_sources": ["query:token"]},
        "metadata_claims": ["plan", "realm_access.roles", "absent"]}]})
    authz = Authorizer(build_runtime(cfg), None)
    d = await authz.check(ws(token(plan="pro", **ROLE)))
    assert d.allowed and d.claims == {"plan": "pro", "realm_access.roles": ["chat-user"]}
    fields = check_response(d).dynamic_metadata.fields
    claims = fields["claims"].struct_value.fields
    assert claims["plan"].string_value == "pro"
    assert [v.string_value for v in claims["realm_access.roles"].list_value.values] == ["chat-user"]
    denied = await authz.check(ws("not-a-token"))
    assert denied.claims is None and "claims" not in check_response(denied).dynamic_metadata.fields


# -- per-tenant origins --------------------------------------------------------------------------

def test_claim_origins_are_compared_canonically_and_junk_never_matches() -> None:
    from extauth.origin import MAX_CLAIM_ORIGINS, claim_allows
    tenant = ["https://Acme.Example:443", "https://*.example.com", "*", "null", "https://x.example/path",
              7, None, "https://acme.example.com.", "HTTPS://chat.acme.test:8443"]
    assert claim_allows("https://acme.example", tenant)
    assert claim_allows("https://chat.acme.test:8443", tenant)
    for refused in ("https://a.example.com", "null", "https://x.example", "https://acme.example.com",
                    "https://acme.example.evil", "https://acme.example, https://evil.test"):
        assert not claim_allows(refused, tenant), refused
    assert not claim_allows("https://acme.example", "https://acme.example")  # not a list
    assert not claim_allows("https://acme.example", {"https://acme.example": True})
    assert not claim_allows("https://acme.example", ["https://x.test"] * MAX_CLAIM_ORIGINS + ["https://acme.example"])


def _origin_config(jwks_file: str) -> Any:
    return parse_config({"policies": [{
        "name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
        "jwt": {"issuer": ISS, "audiences": ["ws"], "jwks_file": jwks_file, "token_sources": ["query:token"]},
        "origins_claim": "allowed-origins"}]})


async def test_the_static_list_and_the_token_claim_combine_as_a_union(jwks_file: str) -> None:
    authz = Authorizer(build_runtime(_origin_config(jwks_file)), None)
    acme = token(**{"allowed-origins": ["https://acme.example", "junk"]})
    plain = token()

    async def reason(tok: str, origin: str | None) -> Reason | None:
        r = CheckInput(method="GET", host="h", path="/ws", query=f"token={tok}",
                       headers=ws_headers(origin=origin), source_ip="198.51.100.9")
        return (await authz.check(r)).reason

    assert await reason(acme, "https://acme.example") is None  # from the token's claim
    assert await reason(acme, "HTTPS://ACME.EXAMPLE:443") is None  # in canonical form
    assert await reason(acme, "https://app.example.com") is None  # from the static list
    assert await reason(plain, "https://app.example.com") is None
    assert await reason(plain, "https://acme.example") is Reason.ORIGIN_NOT_ALLOWED  # another tenant's
    assert await reason(acme, "https://other.example") is Reason.ORIGIN_NOT_ALLOWED
    assert await reason(acme, "junk") is Reason.ORIGIN_NOT_ALLOWED
    assert await reason(acme, None) is Reason.ORIGIN_MISSING
    # An origin only a token could admit needs a verified token first.
    assert await reason("garbage", "https://acme.example") is Reason.TOKEN_MALFORMED


def test_origins_claim_and_metadata_claims_need_jwt() -> None:
    for key, value in (("origins_claim", "allowed-origins"), ("metadata_claims", ["plan"])):
        with pytest.raises(ConfigError, match="need a jwt section"):
            parse_config({"policies": [{"name": "p", key: value}]})
    with pytest.raises(ConfigError, match="claim path"):
        parse_config(_policy(origins_claim="a..b"))
