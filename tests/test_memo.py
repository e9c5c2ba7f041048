"""The allow memo: a repeated plain-HTTP allow is answered from memory, and the answer is
exactly the one the full pipeline gives (checked against a server with the memo off)."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from extauth import memo
from extauth.config import parse_config
from extauth.decision import Decision
from extauth.envoy_api import decision_id_field
from extauth.memo import KEYED_FIELDS, MEMO_TTL_SECONDS, NOT_KEYED, AllowMemo, FastPath, Reads
from extauth.pipeline import Authorizer
from extauth.reasons import Reason
from extauth.request import CheckInput
from extauth.runtime import build_runtime
from extauth.server import ExtAuthServer
from tests.envoy_msgs import check_request, headers_of, metadata_of, ws_headers
from tests.keys import JwksServer, jwks_for, jwks_server, make_rsa_key, shared_rsa_key, sign
from tests.waiting import async_wait_until

ISS = "https://issuer.example.com"
SRC = "203.0.113.7"


# -- the memo itself ---------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_entry_dies_at_its_valid_until() -> None:
    clock = Clock()
    memo: AllowMemo[bytes] = AllowMemo(10, clock)
    memo.put("k", b"resp", valid_until=1_005.0, policy="api", client_ip=SRC)
    hit = memo.get("k")
    assert hit is not None and hit.payload == b"resp" and hit.policy == "api" and hit.client_ip == SRC
    clock.now = 1_004.9
    assert memo.get("k") is not None
    clock.now = 1_005.0
    assert memo.get("k") is None and len(memo) == 0


def test_entry_life_is_capped_whatever_the_token_says() -> None:
    clock = Clock()
    memo: AllowMemo[bytes] = AllowMemo(10, clock)
    memo.put("k", b"r", valid_until=float("inf"), policy="p", client_ip=SRC)
    clock.now += MEMO_TTL_SECONDS - 0.1
    assert memo.get("k") is not None
    clock.now += 0.1
    assert memo.get("k") is None


def test_bounded_oldest_goes_first_and_zero_disables() -> None:
    memo: AllowMemo[bytes] = AllowMemo(3, Clock())
    for i in range(5):
        memo.put(i, b"r", valid_until=float("inf"), policy="p", client_ip=SRC)
    assert len(memo) == 3 and memo.get(0) is None and memo.get(1) is None and memo.get(4) is not None
    off: AllowMemo[bytes] = AllowMemo(0, Clock())
    off.put("k", b"r", valid_until=float("inf"), policy="p", client_ip=SRC)
    assert off.get("k") is None and len(off) == 0
    with pytest.raises(ValueError):
        AllowMemo(-1)


@pytest.mark.parametrize("decision_id", ["0123456789abcdef", "short", "ä" * 16, "x" * 40])
def test_decision_id_field_merges_into_a_response(decision_id: str) -> None:
    resp = external_auth_pb2.CheckResponse()
    resp.ok_response.headers_to_remove.append("authorization")
    resp.dynamic_metadata.fields["policy"].string_value = "api"
    wire = resp.SerializeToString() + decision_id_field(decision_id)
    merged = external_auth_pb2.CheckResponse.FromString(wire)
    assert merged.dynamic_metadata.fields["decision_id"].string_value == decision_id
    assert merged.dynamic_metadata.fields["policy"].string_value == "api"
    assert list(merged.ok_response.headers_to_remove) == ["authorization"]


# -- through the real gRPC server, against the full pipeline -----------------------------------

def token(sub: str = "alice", lifetime: int = 600) -> str:
    now = int(time.time())
    return sign(shared_rsa_key(), "RS256",
                {"iss": ISS, "aud": "ws", "sub": sub, "iat": now, "exp": now + lifetime}, kid="k1")


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with jwks_server(jwks_for(shared_rsa_key(), "k1", "RS256")) as srv:
        yield srv


def config(jwks_url: str, **top: Any) -> dict[str, Any]:
    jwt = {"issuer": ISS, "audiences": ["ws"], "algorithms": ["RS256"], "jwks_uri": jwks_url}
    return {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": "memory://", "drain_seconds": 0,
        "watch_config": False,
        **top,
        "policies": [
            {"name": "api", "match": {"path_prefix": "/api"}, "websocket_only": False,
             "jwt": {**jwt, "token_sources": ["header:authorization", "query:token", "cookie:session"]},
             "upstream_headers": {"x-user-id": "{sub}"}},
            {"name": "bearer", "match": {"path_prefix": "/bearer"}, "websocket_only": False,
             "jwt": {**jwt, "token_sources": ["header:authorization"]},
             "upstream_headers": {"x-user-id": "{sub}"}},
            {"name": "open", "match": {"path_prefix": "/open"}, "websocket_only": False},
            {"name": "trial", "match": {"path_prefix": "/trial"}, "websocket_only": False, "shadow": True,
             "jwt": {**jwt, "token_sources": ["header:authorization"]}},
            {"name": "chat", "match": {"path_prefix": "/ws"}, "origins": ["https://app.example.com"],
             "jwt": {**jwt, "token_sources": ["query:token"]}},
        ],
    }


class Pair:
    """The same config served twice: with the memo (as shipped) and without (the reference)."""

    def __init__(self, memo: ExtAuthServer, reference: ExtAuthServer,
                 memo_stub: Any, reference_stub: Any) -> None:
        self.memo, self.reference = memo, reference
        self._memo_stub, self._reference_stub = memo_stub, reference_stub

    @property
    def hits(self) -> int:
        return self.memo.metrics.memo_hits.value

    async def check(self, *args: Any, **kw: Any) -> external_auth_pb2.CheckResponse:
        """Ask both; the answers must agree but for the per-check decision id."""
        req = check_request(*args, **kw)
        got = await self._memo_stub.Check(req, timeout=5)
        want = await self._reference_stub.Check(req, timeout=5)
        assert _comparable(got) == _comparable(want)
        assert len(metadata_of(got)["decision_id"]) == 16
        return got  # type: ignore[no-any-return]


def _comparable(resp: external_auth_pb2.CheckResponse) -> Any:
    copy = external_auth_pb2.CheckResponse()
    copy.CopyFrom(resp)
    del copy.dynamic_metadata.fields["decision_id"]
    return copy


@pytest.fixture
async def pair(jwks: JwksServer) -> AsyncIterator[Pair]:
    servers = [ExtAuthServer(parse_config(config(jwks.url, allow_memo_size=size))) for size in (100, 0)]
    for s in servers:
        await s.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{servers[0].port}") as a, \
                grpc.aio.insecure_channel(f"127.0.0.1:{servers[1].port}") as b:
            yield Pair(servers[0], servers[1], external_auth_pb2_grpc.AuthorizationStub(a),
                       external_auth_pb2_grpc.AuthorizationStub(b))
    finally:
        for s in servers:
            await s.stop(drain=0)


def _bearer(tok: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tok}"}


async def test_a_repeated_allow_is_a_hit_with_a_new_decision_id(pair: Pair) -> None:
    tok = token("alice")
    first = await pair.check("/api/items", _bearer(tok), context={"policy": "api"}, source_ip=SRC)
    assert first.status.code == 0 and headers_of(first)["x-user-id"] == "alice" and pair.hits == 0
    second = await pair.check("/api/items", _bearer(tok), context={"policy": "api"}, source_ip=SRC)
    assert pair.hits == 1
    assert metadata_of(second)["decision_id"] != metadata_of(first)["decision_id"]
    assert list(second.ok_response.headers_to_remove) == ["authorization"]
    decisions = {labels["result"]: value for labels, value in _decisions(pair.memo)}
    assert decisions == {"allow": 2.0}  # hits are counted as decisions like any other


def _decisions(server: ExtAuthServer) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for m in server.metrics.decisions.collect() for s in m.samples]


async def test_every_input_the_pipeline_reads_is_in_the_key(pair: Pair) -> None:
    alice, bob = token("alice"), token("bob")
    ctx = {"policy": "api"}
    await pair.check("/api/x", _bearer(alice), context=ctx, source_ip=SRC)
    # Another credential, another client address, a token in another transport, other
    # cookies beside the session cookie (the stripped Cookie header differs), another method:
    # each is its own entry, never someone else's answer.
    variants: list[tuple[tuple[Any, ...], dict[str, Any], dict[str, str]]] = [
        (("/api/x", _bearer(bob)), {"context": ctx, "source_ip": SRC}, {"x-user-id": "bob"}),
        (("/api/x", _bearer(alice)), {"context": ctx, "source_ip": "198.51.100.1"}, {}),
        ((f"/api/x?token={bob}", {"accept": "*/*"}), {"context": ctx, "source_ip": SRC},
         {"x-user-id": "bob"}),
        (("/api/x", {"cookie": f"session={bob}; theme=dark"}), {"context": ctx, "source_ip": SRC},
         {"x-user-id": "bob", "cookie": "theme=dark"}),
        (("/api/x", {"cookie": f"session={bob}; lang=fr"}), {"context": ctx, "source_ip": SRC},
         {"x-user-id": "bob", "cookie": "lang=fr"}),
        (("/api/x", _bearer(bob)), {"context": ctx, "source_ip": SRC, "method": "POST"},
         {"x-user-id": "bob"}),
        (("/api/x", {"accept": "*/*"}), {"context": ctx, "source_ip": SRC}, {}),
    ]
    for args, kw, want_headers in variants:
        resp = await pair.check(*args, **kw)
        assert set(want_headers.items()) <= set(headers_of(resp).items())
    assert pair.hits == 0
    # ... and each of them, repeated, is now a hit (but the denial, which is never kept).
    for args, kw, _ in variants:
        await pair.check(*args, **kw)
    assert pair.hits == len(variants) - 1
    # The policy is what the route chooses: matched by path rather than named, or on another
    # path under it, the same inputs are the same entry.
    await pair.check("/api/y", _bearer(alice), source_ip=SRC)
    assert pair.hits == len(variants)


async def test_one_header_policies_key_on_that_header_alone(pair: Pair) -> None:
    # A policy reading one header digests its value unframed (memo.Reads._digest).
    ctx = {"policy": "bearer"}
    users = ("alice", "bob", "carol")
    tokens = {user: token(user) for user in users}
    for _ in range(2):
        for user in users:
            resp = await pair.check("/bearer/x", _bearer(tokens[user]), context=ctx, source_ip=SRC)
            assert headers_of(resp)["x-user-id"] == user
    assert pair.hits == len(users)
    # Without the header: the pipeline's 401, never remembered.
    for _ in range(2):
        resp = await pair.check("/bearer/x", {"accept": "*/*"}, context=ctx, source_ip=SRC)
        assert resp.denied_response.status.code == 401
    assert pair.hits == len(users)


async def test_trusted_forwarded_for_is_in_the_key(jwks: JwksServer) -> None:
    srv = ExtAuthServer(parse_config(config(jwks.url, client_ip="xff:1")))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            tok = token()
            ips = []
            for xff in ("192.0.2.10", "192.0.2.11", "192.0.2.10"):
                resp = await stub.Check(check_request("/api/x", {**_bearer(tok), "x-forwarded-for": xff},
                                                      context={"policy": "api"}, source_ip="10.0.0.1"))
                ips.append(metadata_of(resp)["client_ip"])
            assert ips == ["192.0.2.10", "192.0.2.11", "192.0.2.10"]
            assert srv.metrics.memo_hits.value == 1
    finally:
        await srv.stop(drain=0)


async def test_upgrades_shadow_and_denials_always_take_the_pipeline(pair: Pair) -> None:
    tok = token()
    for _ in range(2):
        ws = await pair.check(f"/ws?token={tok}", ws_headers(), context={"policy": "chat"}, source_ip=SRC)
        assert ws.status.code == 0
        # An upgrade header on a plain-HTTP policy is an upgrade attempt: not looked up either.
        await pair.check("/api/x", {**_bearer(tok), **ws_headers()}, context={"policy": "api"}, source_ip=SRC)
        shadowed = await pair.check("/trial/x", {"accept": "*/*"}, context={"policy": "trial"}, source_ip=SRC)
        assert shadowed.status.code == 0 and metadata_of(shadowed)["shadow_reason"] == "token_missing"
        denied = await pair.check("/api/x", _bearer(tok + "x"), context={"policy": "api"}, source_ip=SRC)
        assert denied.denied_response.status.code == 401
    assert pair.hits == 0 and len(pair.memo.authorizer.runtime.memo) == 0


async def test_a_long_kept_input_takes_the_pipeline_and_is_never_kept(jwks: JwksServer) -> None:
    # The key keeps some inputs as they are (here the trusted X-Forwarded-For); Envoy accepts
    # 60 KiB of headers. Only short ones are kept, so 10,000 entries stay a few MiB, not 600.
    srv = ExtAuthServer(parse_config(config(jwks.url, client_ip="xff:1")))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            tok = token()

            async def check(xff: str) -> None:
                resp = await stub.Check(check_request("/api/x", {**_bearer(tok), "x-forwarded-for": xff},
                                                      context={"policy": "api"}, source_ip="10.0.0.1"))
                assert resp.status.code == 0 and metadata_of(resp)["client_ip"] == "192.0.2.10"

            for hops in ("192.0.2.1, " * 300, "192.0.2.2, " * 300):
                for _ in range(2):
                    await check(hops + "192.0.2.10")
            assert srv.metrics.memo_hits.value == 0 and len(srv.authorizer.runtime.memo) == 0
            for _ in range(2):
                await check("192.0.2.1, " * 100 + "192.0.2.10")
            assert srv.metrics.memo_hits.value == 1
            # A long path is not kept (the policy it chooses is): it is remembered.
            headers = {**_bearer(tok), "x-forwarded-for": "192.0.2.10"}
            for _ in range(2):
                long_path = check_request("/api/" + "a" * 3000, headers, source_ip="10.0.0.1")
                resp = await stub.Check(long_path)
                assert resp.status.code == 0
            assert srv.metrics.memo_hits.value == 2
    finally:
        await srv.stop(drain=0)


async def test_a_ban_stops_a_remembered_client_at_once(pair: Pair) -> None:
    tok = token()
    for _ in range(2):
        ok = await pair.check("/api/x", _bearer(tok), context={"policy": "api"}, source_ip=SRC)
        assert ok.status.code == 0
    assert pair.hits == 1
    for srv in (pair.memo, pair.reference):
        assert srv.jail is not None
        srv.jail.note_ban(SRC, time.time() + 60)
    banned = await pair.check("/api/x", _bearer(tok), context={"policy": "api"}, source_ip=SRC)
    assert banned.denied_response.status.code == 403 and headers_of(banned)["x-extauth-reason"] == "banned"
    assert pair.hits == 1


async def test_an_entry_lives_until_the_token_expires_at_most(pair: Pair) -> None:
    short = token(lifetime=10)
    await pair.check("/api/x", _bearer(short), context={"policy": "api"}, source_ip=SRC)
    await pair.check("/open/x", {"accept": "*/*"}, context={"policy": "open"}, source_ip=SRC)
    memo = pair.memo.authorizer.runtime.memo
    by_policy = {e.policy: e.expires_at for e in memo._entries.values()}
    exp = float(pair.memo.authorizer.runtime.by_name["api"].verifier.cache.get(short).expires_at)  # type: ignore[union-attr]
    assert by_policy["api"] == exp
    assert time.time() < by_policy["open"] <= time.time() + MEMO_TTL_SECONDS


async def test_a_reload_starts_with_an_empty_memo(jwks: JwksServer, tmp_path: Any) -> None:
    import yaml

    path = tmp_path / "extauth.yaml"
    path.write_text(yaml.safe_dump(config(jwks.url)))
    from extauth.config import load_config

    srv = ExtAuthServer(load_config(path), config_path=path)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            req = check_request("/api/x", _bearer(token()), context={"policy": "api"}, source_ip=SRC)
            await stub.Check(req)
            assert len(srv.authorizer.runtime.memo) == 1
            path.write_text(yaml.safe_dump(config(jwks.url, allow_memo_size=5)))
            assert await srv.reload()
            assert len(srv.authorizer.runtime.memo) == 0 and srv.authorizer.runtime.memo.maxsize == 5
            await stub.Check(req)
            assert srv.metrics.memo_hits.value == 0
    finally:
        await srv.stop(drain=0)


async def test_a_key_leaving_the_jwks_empties_the_memo() -> None:
    # The remembered allow was made with k1; once the issuer stops publishing k1 the next
    # request takes the pipeline again and is denied, with no request in between.
    with jwks_server(jwks_for(shared_rsa_key(), "k1", "RS256")) as issuer:
        cfg = config(issuer.url)
        for policy in cfg["policies"]:
            if "jwt" in policy:
                policy["jwt"]["jwks_refresh_seconds"] = 1
        srv = ExtAuthServer(parse_config(cfg))
        await srv.start()  # starts the key sources' refresh timers
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = external_auth_pb2_grpc.AuthorizationStub(ch)
                req = check_request("/api/x", _bearer(token()), context={"policy": "api"}, source_ip=SRC)
                for _ in range(2):
                    assert (await stub.Check(req)).status.code == 0
                memo = srv.authorizer.runtime.memo
                assert srv.metrics.memo_hits.value == 1 and len(memo) == 1
                issuer.set(jwks_for(make_rsa_key(), "k2", "RS256"))

                async def emptied() -> bool:
                    return len(memo) == 0

                await async_wait_until(emptied, 10, "the memo to be emptied")
                denied = await stub.Check(req)
                assert denied.denied_response.status.code == 401
                assert headers_of(denied)["x-extauth-reason"] == "token_unknown_key"
                assert srv.metrics.memo_hits.value == 1
        finally:
            await srv.stop(drain=0)


# -- the key covers what the pipeline reads ------------------------------------------------------

class _Recorded(Mapping[str, str]):
    """Headers that count every lookup by name ("*" when iterated: every header read)."""

    def __init__(self, headers: Mapping[str, str], reads: collections.Counter[str]) -> None:
        self._headers, self._reads = headers, reads

    def __getitem__(self, name: str) -> str:
        self._reads[name] += 1
        return self._headers[name]

    def __contains__(self, name: object) -> bool:
        self._reads[str(name)] += 1
        return name in self._headers

    def __iter__(self) -> Iterator[str]:
        self._reads["*"] += 1
        return iter(self._headers)

    def __len__(self) -> int:
        self._reads["*"] += 1
        return len(self._headers)


def _recording(req: CheckInput) -> tuple[CheckInput, collections.Counter[str]]:
    reads: collections.Counter[str] = collections.Counter()
    return dataclasses.replace(req, headers=_Recorded(req.headers, reads)), reads


def _reads_config(jwks_url: str) -> Any:
    jwt = {"issuer": ISS, "audiences": ["ws"], "algorithms": ["RS256"], "jwks_uri": jwks_url}
    return parse_config({"client_ip": "xff:1", "policies": [
        {"name": "api", "match": {"path_prefix": "/api"}, "websocket_only": False,
         "jwt": {**jwt, "token_sources": ["header:authorization", "query:token", "cookie:session"]},
         "upstream_headers": {"x-user-id": "{sub}"}, "metadata_claims": ["sub"]},
        {"name": "scoped", "match": {"path_prefix": "/scoped"}, "websocket_only": False,
         "jwt": {**jwt, "token_sources": ["header:authorization"]},
         "claim_rules": [{"path_prefix": "/scoped/admin", "methods": ["POST"],
                          "all_of": [{"claim": "sub", "equals": "root"}]}]},
        {"name": "open", "match": {"path_prefix": "/open"}, "websocket_only": False},
    ]})


# One allowed plain-HTTP request per policy; the cookie rides beside the bearer token.
_PLAIN = {
    "api": ("/api/items", "token=", {"authorization": "Bearer {tok}", "cookie": "theme=dark",
                                      "x-forwarded-for": "192.0.2.10", "accept": "*/*"}),
    "scoped": ("/scoped/items", "", {"authorization": "Bearer {tok}", "x-forwarded-for": "192.0.2.10"}),
    "open": ("/open/x", "a=1", {"x-forwarded-for": "192.0.2.10", "x-request-id": "r-1"}),
}


@pytest.fixture
async def reads_authz(jwks: JwksServer) -> AsyncIterator[Authorizer]:
    rt = build_runtime(_reads_config(jwks.url))
    for verifier in rt.verifiers.values():
        await verifier.start()
    try:
        yield Authorizer(rt, None)
    finally:
        await rt.close_unused(None)


def _plain(policy: str, **changes: Any) -> CheckInput:
    path, query, headers = _PLAIN[policy]
    tok = token()
    req = CheckInput(method="GET", host="svc.example.com", path=path, query=query.replace("{tok}", tok),
                     headers={k: v.replace("{tok}", tok) for k, v in headers.items()},
                     source_ip="10.0.0.1", request_id="req-1")
    return dataclasses.replace(req, **changes)


def _answer(d: Decision) -> Decision:
    return dataclasses.replace(d, decision_id="")


def test_every_check_input_field_is_keyed_unless_it_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {f.name for f in dataclasses.fields(CheckInput)}
    assert set(NOT_KEYED) <= names and set(KEYED_FIELDS) == names - set(NOT_KEYED)
    # A field added to CheckInput is in every key until NOT_KEYED says why it may be left out.
    grown = dataclasses.make_dataclass("Grown", [("tenant", str, "")], bases=(CheckInput,),
                                       slots=True)
    monkeypatch.setattr(memo, "KEYED_FIELDS", tuple(
        f.name for f in dataclasses.fields(grown) if f.name not in NOT_KEYED))
    reads = Reads(secrets=("authorization",))
    req = grown(method="GET", host="h", path="/", query="", headers={}, source_ip="10.0.0.1")
    assert reads.key(req) != reads.key(dataclasses.replace(req, tenant="other"))
    # One the key cannot keep as it is (not a plain value) turns the memo off for every request.
    assert reads.key(dataclasses.replace(req, tenant={"not": "plain"})) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", list(_PLAIN))
async def test_the_key_reads_every_header_the_pipeline_reads(reads_authz: Authorizer, policy: str) -> None:
    # Every header a plain-HTTP allow reads is in the key, or is read again on a hit (the
    # upgrade check) as often as the pipeline reads it. A new input read by the pipeline and
    # not declared in the policy's Reads fails here.
    req, pipeline_reads = _recording(_plain(policy))
    decision = await reads_authz.check(req)
    assert decision.allowed and decision.valid_until is not None, decision
    req, key_reads = _recording(_plain(policy))
    assert FastPath(reads_authz).key(req) is not None
    reads = reads_authz.runtime.by_name[policy].reads
    assert reads is not None
    keyed = {*reads.headers, *reads.secrets}
    unkeyed = {name: n for name, n in pipeline_reads.items() if name not in keyed}
    assert "*" not in unkeyed
    assert all(n <= key_reads[name] for name, n in unkeyed.items()), (unkeyed, key_reads)


@pytest.mark.parametrize("policy", list(_PLAIN))
async def test_inputs_left_out_of_the_key_do_not_change_the_answer(reads_authz: Authorizer,
                                                                   policy: str) -> None:
    reads = reads_authz.runtime.by_name[policy].reads
    assert reads is not None
    base = _plain(policy)
    # Each NOT_KEYED field, changed in a way that keeps the policy (a new entry there needs one).
    changed = {
        "headers": {**base.headers, "x-unrelated": "1"},
        "query": base.query + "&page=2",
        "context": {"unrelated": "x"},
        "host": "other.example.com",
        "path": base.path + "/deeper",
        "request_id": "req-2",
    }
    assert set(changed) == set(NOT_KEYED)
    want = _answer(await reads_authz.check(base))
    fast = FastPath(reads_authz)
    key = fast.key(base)
    assert key is not None
    for name, value in changed.items():
        if name in reads.fields or (name == "query" and reads.query):
            continue  # keyed for this policy
        other = dataclasses.replace(base, **{name: value})
        assert _answer(await reads_authz.check(other)) == want, name
        other_key = fast.key(other)
        assert other_key is not None and other_key[1] == key[1], name


@pytest.mark.parametrize("policy", list(_PLAIN))
async def test_every_keyed_input_changes_the_key(reads_authz: Authorizer, policy: str) -> None:
    reads = reads_authz.runtime.by_name[policy].reads
    assert reads is not None
    base = _plain(policy)
    fast = FastPath(reads_authz)
    key = fast.key(base)
    assert key is not None
    others = [dataclasses.replace(base, **{name: getattr(base, name) + "x"})
              for name in (*KEYED_FIELDS, *reads.fields)]
    others += [dataclasses.replace(base, headers={**base.headers, name: base.headers.get(name, "") + "x"})
               for name in (*reads.headers, *reads.secrets)]
    others += [dataclasses.replace(base, headers={k: v for k, v in base.headers.items() if k != name})
               for name in (*reads.headers, *reads.secrets)]
    if reads.query:
        others.append(dataclasses.replace(base, query=base.query + "x"))
    assert len(others) > len(KEYED_FIELDS)
    for other in others:
        other_key = fast.key(other)
        assert other_key is None or other_key[1] != key[1], other


def test_invalidate_drops_one_users_entries() -> None:
    memo_: AllowMemo[bytes] = AllowMemo(10, Clock())
    for n, user in enumerate(["alice", "bob", "alice", None]):
        memo_.put(n, b"r", valid_until=float("inf"), policy="p", client_ip=SRC, user=user)
    assert memo_.invalidate("alice") == 2
    assert len(memo_) == 2 and memo_.get(1) is not None and memo_.get(0) is None


async def test_a_path_parameter_named_like_a_token_is_never_answered_from_memory(
        reads_authz: Authorizer) -> None:
    # The api policy reads query:token and cookie:session: a remembered allow for its path must
    # not answer the same request with ``;token=`` added (the path is not keyed for it).
    fast = FastPath(reads_authz)
    base = _plain("api", context={"policy": "api"})
    decision = await reads_authz.check(base)
    key = fast.key(base)
    assert decision.allowed and key is not None
    fast.remember(key, decision, b"payload")
    aliased = dataclasses.replace(base, path=base.path + ";token=a.b.c")
    assert fast.key(aliased) is None
    denied = await reads_authz.check(aliased)
    assert denied.reason is Reason.BAD_HANDSHAKE
    # A policy that reads no query or cookie source keys its paths as before.
    assert fast.key(_plain("scoped", path="/scoped/items;token=x")) is not None
