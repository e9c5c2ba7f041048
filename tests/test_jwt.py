"""JwtVerifier: real keys, real signatures, an injected clock; no mocks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import pytest

from extauth.config import ConfigError, JwtConfig
from extauth.reasons import DenyError, Reason
from extauth.tokens.jwt import JwtVerifier
from extauth.tokens.keyset import build_key_set
from extauth.tokens.mint import mint_token, public_jwks
from tests.keys import (
    HMAC_SECRET,
    FakeClock,
    b64json,
    b64url,
    forgotten,
    jwk_for,
    jwks_for,
    jwks_of,
    make_ec_key,
    make_rsa_key,
    private_pem,
    public_pem,
    resign_header,
    shared_ec_key,
    shared_ed25519_key,
    shared_rsa_key,
    sign,
    unsigned,
)
from tests.waiting import async_wait_until

ISS = "https://issuer.example"
AUD = "chat"
NOW = 1_700_000_000
DROP = object()


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": NOW, "exp": NOW + 600}
    for k, v in over.items():
        if v is DROP:
            base.pop(k, None)
        else:
            base[k] = v
    return base


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def write_jwks(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def make_verifier(
    tmp_path: Path,
    clock: FakeClock,
    doc: dict[str, Any],
    *,
    algorithms: tuple[str, ...] = ("RS256",),
    max_token_bytes: int = 8192,
    cache_size: int = 100,
    **extra: Any,
) -> JwtVerifier:
    cfg = JwtConfig(
        issuer=ISS,
        audiences=[AUD],
        algorithms=list(algorithms),  # type: ignore[arg-type]
        jwks_file=write_jwks(tmp_path / "jwks.json", doc),
        **extra,
    )
    return JwtVerifier(cfg, max_token_bytes=max_token_bytes, cache_size=cache_size, clock=clock)


@pytest.fixture
def rsa_verifier(tmp_path: Path, clock: FakeClock) -> JwtVerifier:
    return make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"))


def rs256(c: dict[str, Any] | None = None, *, kid: str | None = "k1", **headers: Any) -> str:
    return sign(shared_rsa_key(), "RS256", c if c is not None else claims(), kid=kid, headers=headers)


async def reason_of(v: JwtVerifier, token: str) -> Reason:
    with pytest.raises(DenyError) as ei:
        await v.verify(token)
    return ei.value.reason


# -- valid tokens ------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "keyf"),
    [
        ("RS256", shared_rsa_key),
        ("PS256", shared_rsa_key),
        ("ES256", shared_ec_key),
        ("EdDSA", shared_ed25519_key),
    ],
)
async def test_valid_asymmetric(tmp_path: Path, clock: FakeClock, alg: str, keyf: Any) -> None:
    key = keyf()
    v = make_verifier(tmp_path, clock, jwks_for(key, "k1", alg), algorithms=(alg,))
    got = await v.verify(sign(key, alg, claims(), kid="k1"))
    assert got.user == "alice"
    assert got.expires_at == NOW + 600
    assert got.claims["iss"] == ISS


async def test_valid_es384_alg_inferred_from_curve(tmp_path: Path, clock: FakeClock) -> None:
    key = make_ec_key("P-384")
    doc = {"keys": [jwk_for(key, "k1", None)]}
    v = make_verifier(tmp_path, clock, doc, algorithms=("ES256", "ES384", "RS256"))
    assert (await v.verify(sign(key, "ES384", claims(), kid="k1"))).user == "alice"


async def test_valid_hs256(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    monkeypatch.setenv("TEST_JWT_SECRET", HMAC_SECRET)
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["HS256"], hmac_secret_env="TEST_JWT_SECRET")
    v = JwtVerifier(cfg, max_token_bytes=8192, cache_size=10, clock=clock)
    assert (await v.verify(sign(HMAC_SECRET, "HS256", claims()))).user == "alice"
    # A kid is irrelevant for one shared secret.
    assert (await v.verify(sign(HMAC_SECRET, "HS256", claims(sub="bob"), kid="whatever"))).user == "bob"
    assert await reason_of(v, sign("x" * 64, "HS256", claims())) is Reason.TOKEN_BAD_SIGNATURE
    assert v.key_age_seconds is None


def _rotating(monkeypatch: pytest.MonkeyPatch, clock: FakeClock, previous: str | None) -> JwtVerifier:
    monkeypatch.setenv("TEST_JWT_SECRET", NEXT_SECRET)
    if previous is not None:
        monkeypatch.setenv("TEST_JWT_PREVIOUS", previous)
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["HS256"], hmac_secret_env="TEST_JWT_SECRET",
                    hmac_previous_secret_env="TEST_JWT_PREVIOUS" if previous is not None else None)
    return JwtVerifier(cfg, max_token_bytes=8192, cache_size=10, clock=clock)


NEXT_SECRET = "the-next-secret-" + "n" * 48


async def test_an_hmac_rotation_accepts_tokens_of_both_secrets_and_no_other(
        monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    v = _rotating(monkeypatch, clock, previous=HMAC_SECRET)
    assert (await v.verify(sign(NEXT_SECRET, "HS256", claims(sub="new")))).user == "new"
    # Issued before the rotation: still valid, so its user is not taken for a forger.
    assert (await v.verify(sign(HMAC_SECRET, "HS256", claims(sub="old")))).user == "old"
    assert await reason_of(v, sign("x" * 64, "HS256", claims())) is Reason.TOKEN_BAD_SIGNATURE
    # Each secret stays bound to the one algorithm.
    assert await reason_of(v, sign(HMAC_SECRET, "HS512", claims())) is Reason.TOKEN_BAD_SIGNATURE
    # Once the previous secret is dropped, its tokens fail (a new verifier: a reload).
    after = _rotating(monkeypatch, clock, previous=None)
    assert await reason_of(after, sign(HMAC_SECRET, "HS256", claims(sub="old"))) is Reason.TOKEN_BAD_SIGNATURE
    assert (await after.verify(sign(NEXT_SECRET, "HS256", claims(sub="new")))).user == "new"


@pytest.mark.parametrize(("previous", "message"), [
    ("", "hmac_previous_secret_env: environment variable TEST_JWT_PREVIOUS is empty"),
    ("short", "hmac_previous_secret_env: the secret in TEST_JWT_PREVIOUS is 5 bytes"),
    (NEXT_SECRET, "holds the same secret"),
])
def test_an_hmac_previous_secret_must_be_usable(monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
                                                previous: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _rotating(monkeypatch, clock, previous=previous)


def test_an_hmac_previous_secret_needs_a_current_one_of_another_name() -> None:
    with pytest.raises(ValueError, match="needs hmac_secret_env"):
        JwtConfig(issuer=ISS, audiences=[AUD], jwks_file="/keys.json", hmac_previous_secret_env="OLD")
    with pytest.raises(ValueError, match="same variable"):
        JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["HS256"], hmac_secret_env="S",
                  hmac_previous_secret_env="S")


@pytest.mark.parametrize("value", [None, "", "short-secret"])
def test_hmac_secret_missing_or_short(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("TEST_JWT_SECRET", raising=False)
    else:
        monkeypatch.setenv("TEST_JWT_SECRET", value)
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["HS256"], hmac_secret_env="TEST_JWT_SECRET")
    with pytest.raises(ConfigError, match="TEST_JWT_SECRET"):
        JwtVerifier(cfg, max_token_bytes=8192, cache_size=10)


@pytest.mark.parametrize(("alg", "need"), [("HS384", 48), ("HS512", 64)])
def test_hmac_secret_length_per_alg(monkeypatch: pytest.MonkeyPatch, alg: str, need: int) -> None:
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], algorithms=[alg], hmac_secret_env="S")  # type: ignore[list-item]
    monkeypatch.setenv("S", "a" * (need - 1))
    with pytest.raises(ConfigError, match=str(need)):
        JwtVerifier(cfg, max_token_bytes=8192, cache_size=10)
    monkeypatch.setenv("S", "a" * need)
    JwtVerifier(cfg, max_token_bytes=8192, cache_size=10)


async def test_mint_helpers_roundtrip(tmp_path: Path, clock: FakeClock) -> None:
    key = make_rsa_key()
    doc = public_jwks(public_pem(key), "RS256", "minted")
    v = make_verifier(tmp_path, FakeClock(), doc)  # mint_token uses the real time
    token = mint_token(key=private_pem(key), alg="RS256", claims={"iss": ISS, "aud": AUD, "sub": "m"},
                       kid="minted", lifetime=300)
    got = await v.verify(token)
    assert got.user == "m"
    assert got.claims["exp"] - got.claims["iat"] == 300
    # The JWKS can also be made from the private PEM (its public half).
    assert public_jwks(private_pem(key), "RS256", "minted") == doc
    assert "d" not in doc["keys"][0]


def test_mint_hmac() -> None:
    token = mint_token(key=HMAC_SECRET, alg="HS256", claims={"sub": "x", "iat": 100}, lifetime=5)
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload == {"sub": "x", "iat": 100, "exp": 105}


# -- alg none, key confusion, forged and missing signatures -------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", " none"])
@pytest.mark.parametrize("sig", ["", "c2lnbmF0dXJl"])
async def test_alg_none_any_case(rsa_verifier: JwtVerifier, alg: str, sig: str) -> None:
    token = unsigned({"alg": alg, "typ": "JWT", "kid": "k1"}, claims(), sig)
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_BAD_SIGNATURE
    assert rsa_verifier.verifications == 0


async def test_alg_missing(rsa_verifier: JwtVerifier) -> None:
    token = resign_header(rs256(), {"kid": "k1"})
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_BAD_SIGNATURE


async def test_key_confusion_hs256_with_public_pem(rsa_verifier: JwtVerifier) -> None:
    # The classic attack: HMAC-sign with the RSA public key (which is public) as secret.
    secret = public_pem(shared_rsa_key())
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': 'k1'})}.{b64json(claims())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(sig)}"
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_BAD_SIGNATURE
    assert rsa_verifier.verifications == 0


async def test_forged_signature_other_key(rsa_verifier: JwtVerifier) -> None:
    forged = sign(make_rsa_key(), "RS256", claims(), kid="k1")
    assert await reason_of(rsa_verifier, forged) is Reason.TOKEN_BAD_SIGNATURE


async def test_tampered_payload(rsa_verifier: JwtVerifier) -> None:
    h, _, s = rs256().split(".")
    token = f"{h}.{b64json(claims(sub='admin'))}.{s}"
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_BAD_SIGNATURE


async def test_tampered_signature_bytes(rsa_verifier: JwtVerifier) -> None:
    h, p, s = rs256().split(".")
    raw = bytearray(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
    raw[10] ^= 0x01
    assert await reason_of(rsa_verifier, f"{h}.{p}.{b64url(bytes(raw))}") is Reason.TOKEN_BAD_SIGNATURE


async def test_empty_signature(rsa_verifier: JwtVerifier) -> None:
    h, p, _ = rs256().split(".")
    assert await reason_of(rsa_verifier, f"{h}.{p}.") is Reason.TOKEN_BAD_SIGNATURE


async def test_stripped_signature(rsa_verifier: JwtVerifier) -> None:
    h, p, _ = rs256().split(".")
    assert await reason_of(rsa_verifier, f"{h}.{p}") is Reason.TOKEN_MALFORMED


async def test_alg_not_configured(rsa_verifier: JwtVerifier) -> None:
    # Another issuer's algorithm: denied, but not counted as forgery.
    token = sign(shared_ec_key(), "ES256", claims(), kid="k1")
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_UNKNOWN_KEY


async def test_alg_not_bound_to_key(tmp_path: Path, clock: FakeClock) -> None:
    # PS256 is configured, but k1 is bound to RS256: a PS256 token under k1 is refused
    # even though the signature would verify with that RSA key.
    doc = jwks_for(shared_rsa_key(), "k1", "RS256")
    v = make_verifier(tmp_path, clock, doc, algorithms=("RS256", "PS256"))
    token = sign(shared_rsa_key(), "PS256", claims(), kid="k1")
    assert await reason_of(v, token) is Reason.TOKEN_BAD_SIGNATURE
    assert v.verifications == 0


async def test_expired_but_forged_is_bad_signature(rsa_verifier: JwtVerifier) -> None:
    forged = sign(make_rsa_key(), "RS256", claims(exp=NOW - 3600, iat=NOW - 7200), kid="k1")
    assert await reason_of(rsa_verifier, forged) is Reason.TOKEN_BAD_SIGNATURE


async def test_wrong_claims_but_forged_is_bad_signature(rsa_verifier: JwtVerifier) -> None:
    forged = sign(make_rsa_key(), "RS256", claims(iss="evil", exp=DROP), kid="k1")
    assert await reason_of(rsa_verifier, forged) is Reason.TOKEN_BAD_SIGNATURE


# -- kid ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kid", ["k2", "", "../../../../etc/passwd", "/dev/zero", "k1\u0000", "k1 ", "' OR '1'='1", "K1"]
)
async def test_unknown_or_hostile_kid(rsa_verifier: JwtVerifier, kid: str) -> None:
    # Never looked up anywhere but the key set; not hostile (key rotation looks the same).
    assert await reason_of(rsa_verifier, rs256(kid=kid)) is Reason.TOKEN_UNKNOWN_KEY


@pytest.mark.parametrize("kid", [1, ["k1"], {"k": "k1"}, "k" * 300])
async def test_kid_wrong_type_or_huge(rsa_verifier: JwtVerifier, kid: Any) -> None:
    token = resign_header(rs256(), {"alg": "RS256", "kid": kid})
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_MALFORMED


async def test_no_kid_single_key(rsa_verifier: JwtVerifier) -> None:
    assert (await rsa_verifier.verify(rs256(kid=None))).user == "alice"


async def test_no_kid_several_keys(tmp_path: Path, clock: FakeClock) -> None:
    other = make_rsa_key()
    doc = jwks_of(jwk_for(shared_rsa_key(), "k1", "RS256"), jwk_for(other, "k2", "RS256"))
    v = make_verifier(tmp_path, clock, doc)
    assert await reason_of(v, rs256(kid=None)) is Reason.TOKEN_UNKNOWN_KEY
    assert (await v.verify(sign(other, "RS256", claims(), kid="k2"))).user == "alice"


# -- injected headers and malformed tokens -----------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("jku", "https://evil.example/jwks.json"),
        ("x5u", "https://evil.example/cert.pem"),
        ("jwk", {"kty": "oct", "k": "AAAA"}),
        ("x5c", ["MIIB"]),
        ("crit", ["exp"]),
    ],
)
async def test_injected_key_headers(rsa_verifier: JwtVerifier, name: str, value: Any) -> None:
    # Validly signed, even: a self-declared key is a forgery attempt, and hostile.
    token = rs256(**{name: value})
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_BAD_SIGNATURE
    assert rsa_verifier.verifications == 0


async def test_oversize_token_rejected_before_decoding(rsa_verifier: JwtVerifier) -> None:
    # Not even a JWT: proves the length check comes before any parsing.
    assert await reason_of(rsa_verifier, "A" * (8 * 1024 + 1)) is Reason.TOKEN_MALFORMED
    with pytest.raises(DenyError) as ei:
        await rsa_verifier.verify(rs256(claims(pad="x" * 9000)))
    assert ei.value.reason is Reason.TOKEN_MALFORMED
    assert "longer than" in ei.value.detail
    assert rsa_verifier.verifications == 0
    assert rsa_verifier.verify_cached("A" * 9000) is None


async def test_length_limit_edge(tmp_path: Path, clock: FakeClock) -> None:
    token = rs256()
    doc = jwks_for(shared_rsa_key(), "k1", "RS256")
    exact = make_verifier(tmp_path, clock, doc, max_token_bytes=len(token))
    assert (await exact.verify(token)).user == "alice"
    short = make_verifier(tmp_path, clock, doc, max_token_bytes=len(token) - 1)
    assert await reason_of(short, token) is Reason.TOKEN_MALFORMED


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.replace(".", "é", 1),
        lambda t: t + "é",
        lambda t: "é" + t,
        lambda t: t[:20] + "\u200b" + t[20:],
    ],
)
async def test_non_ascii(rsa_verifier: JwtVerifier, mangle: Any) -> None:
    assert await reason_of(rsa_verifier, mangle(rs256())) is Reason.TOKEN_MALFORMED


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "...",
        "!!!.e30.c2ln",
        "e30.e30.c2ln",  # header {} : no alg, but first: decoding works
        "bm90IGpzb24.e30.c2ln",  # header "not json"
        "WzFd.e30.c2ln",  # header [1]
        "InN0ciI.e30.c2ln",  # header "str"
        "eyJhbGciOiJSUzI1NiJ9=.e30.c2ln",  # padded base64
        "eyJhbGciOiJSUzI1NiJ9.e30+.c2ln",  # non-url alphabet
        ".e30.c2ln",
    ],
)
async def test_malformed_structures(rsa_verifier: JwtVerifier, token: str) -> None:
    reason = await reason_of(rsa_verifier, token)
    if token == "e30.e30.c2ln":
        assert reason is Reason.TOKEN_BAD_SIGNATURE  # a well-formed header without alg
    else:
        assert reason is Reason.TOKEN_MALFORMED


async def test_duplicate_header_members(rsa_verifier: JwtVerifier) -> None:
    _, p, s = rs256().split(".")
    h = b64url(b'{"alg":"RS256","kid":"k1","alg":"none"}')
    assert await reason_of(rsa_verifier, f"{h}.{p}.{s}") is Reason.TOKEN_MALFORMED


async def test_payload_not_json_but_signed(rsa_verifier: JwtVerifier) -> None:
    import jwt as pyjwt

    token = pyjwt.PyJWS().encode(b"not json", private_pem(shared_rsa_key()), algorithm="RS256",
                                 headers={"kid": "k1"})
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_MALFORMED


async def test_payload_json_array_but_signed(rsa_verifier: JwtVerifier) -> None:
    import jwt as pyjwt

    token = pyjwt.PyJWS().encode(b"[1,2]", private_pem(shared_rsa_key()), algorithm="RS256",
                                 headers={"kid": "k1"})
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_MALFORMED


# -- claims ------------------------------------------------------------------


@pytest.mark.parametrize(
    "over",
    [
        {"iss": "https://issuer.example/"},
        {"iss": "https://ISSUER.example"},
        {"iss": DROP},
        {"iss": ["https://issuer.example"]},
        {"aud": "chat2"},
        {"aud": "CHAT"},
        {"aud": ["other", "more"]},
        {"aud": []},
        {"aud": DROP},
        {"aud": [AUD, 1]},
        {"aud": 1},
        {"exp": DROP},
        {"exp": str(NOW + 600)},
        {"exp": True},
        {"exp": None},
        {"iat": "now"},
        {"nbf": [NOW]},
        # Beyond float range: math.isfinite raises OverflowError on such an int.
        {"exp": 10**400},
        {"iat": -(10**400)},
        {"nbf": 10**400},
        {"sub": DROP},
        {"sub": ""},
        {"sub": None},
        {"sub": True},
        {"sub": ["alice"]},
        {"sub": {"id": 1}},
        {"sub": 1.5},
    ],
)
async def test_bad_claims(rsa_verifier: JwtVerifier, over: dict[str, Any]) -> None:
    assert await reason_of(rsa_verifier, rs256(claims(**over))) is Reason.TOKEN_CLAIMS


async def test_non_finite_numbers(rsa_verifier: JwtVerifier) -> None:
    import jwt as pyjwt

    payload = json.dumps(claims()).replace(str(NOW + 600), "NaN").encode()
    token = pyjwt.PyJWS().encode(payload, private_pem(shared_rsa_key()), algorithm="RS256",
                                 headers={"kid": "k1"})
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_MALFORMED


async def test_aud_list_containing_ours(rsa_verifier: JwtVerifier) -> None:
    assert (await rsa_verifier.verify(rs256(claims(aud=["other", AUD])))).user == "alice"


async def test_several_configured_audiences(tmp_path: Path, clock: FakeClock) -> None:
    cfg_doc = jwks_for(shared_rsa_key(), "k1", "RS256")
    cfg = JwtConfig(issuer=ISS, audiences=["a1", "a2"], jwks_file=write_jwks(tmp_path / "j.json", cfg_doc))
    v = JwtVerifier(cfg, max_token_bytes=8192, cache_size=10, clock=clock)
    assert (await v.verify(rs256(claims(aud="a2")))).user == "alice"
    assert (await v.verify(rs256(claims(aud=["x", "a1"])))).user == "alice"
    assert await reason_of(v, rs256(claims(aud="a3"))) is Reason.TOKEN_CLAIMS


async def test_integer_user_claim(rsa_verifier: JwtVerifier) -> None:
    assert (await rsa_verifier.verify(rs256(claims(sub=42)))).user == "42"


@pytest.mark.parametrize("sub", ["u" * 257, "alice\nx-admin: 1", "a\x00b"])
async def test_oversized_or_unprintable_user_is_refused(rsa_verifier: JwtVerifier, sub: str) -> None:
    assert await reason_of(rsa_verifier, rs256(claims(sub=sub))) is Reason.TOKEN_CLAIMS


async def test_user_at_the_bound_is_accepted(rsa_verifier: JwtVerifier) -> None:
    assert (await rsa_verifier.verify(rs256(claims(sub="u" * 256)))).user == "u" * 256


async def test_custom_user_claim(tmp_path: Path, clock: FakeClock) -> None:
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"), user_claim="email")
    assert (await v.verify(rs256(claims(email="a@example.com")))).user == "a@example.com"
    assert await reason_of(v, rs256(claims())) is Reason.TOKEN_CLAIMS


async def test_lifetime_over_max(tmp_path: Path, clock: FakeClock) -> None:
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"), max_lifetime_seconds=3600)
    assert (await v.verify(rs256(claims(exp=NOW + 3600)))).user == "alice"
    assert await reason_of(v, rs256(claims(exp=NOW + 3601))) is Reason.TOKEN_CLAIMS
    # Without iat, the remaining lifetime counts.
    assert await reason_of(v, rs256(claims(iat=DROP, exp=NOW + 3601))) is Reason.TOKEN_CLAIMS
    assert (await v.verify(rs256(claims(iat=DROP, exp=NOW + 3500)))).user == "alice"
    # An old iat with a far exp is still too long-lived.
    assert await reason_of(v, rs256(claims(iat=NOW - 3000, exp=NOW + 1000))) is Reason.TOKEN_CLAIMS


async def test_expired(rsa_verifier: JwtVerifier) -> None:
    token = rs256(claims(iat=NOW - 7200, exp=NOW - 3600))
    assert await reason_of(rsa_verifier, token) is Reason.TOKEN_EXPIRED
    assert not Reason.TOKEN_EXPIRED.hostile


async def test_expiry_leeway_edges(tmp_path: Path, clock: FakeClock) -> None:
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"), leeway_seconds=30,
                      cache_size=0)
    token = rs256(claims(exp=NOW + 100))
    clock.now = NOW + 100 + 29
    assert (await v.verify(token)).user == "alice"
    clock.now = NOW + 100 + 29.999
    assert (await v.verify(token)).user == "alice"
    clock.now = NOW + 100 + 30
    assert await reason_of(v, token) is Reason.TOKEN_EXPIRED


async def test_zero_leeway(tmp_path: Path, clock: FakeClock) -> None:
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"), leeway_seconds=0,
                      cache_size=0)
    clock.now = NOW + 600
    assert await reason_of(v, rs256()) is Reason.TOKEN_EXPIRED
    clock.now = NOW + 599.5
    assert (await v.verify(rs256())).user == "alice"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_not_yet_valid_edges(tmp_path: Path, clock: FakeClock, claim: str) -> None:
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"), leeway_seconds=30)
    extra: dict[str, Any] = {claim: NOW + 30, "exp": NOW + 600}
    if claim == "nbf":
        extra["iat"] = NOW
    assert (await v.verify(rs256(claims(**extra)))).user == "alice"  # exactly at the leeway
    extra[claim] = NOW + 31
    assert await reason_of(v, rs256(claims(**extra))) is Reason.TOKEN_NOT_YET_VALID
    assert not Reason.TOKEN_NOT_YET_VALID.hostile


# -- cache -------------------------------------------------------------------


async def test_cache_hit_skips_verification(rsa_verifier: JwtVerifier) -> None:
    token = rs256()
    first = await rsa_verifier.verify(token)
    assert rsa_verifier.verifications == 1
    assert len(rsa_verifier.cache) == 1
    second = await rsa_verifier.verify(token)
    assert second is first
    assert rsa_verifier.verifications == 1
    assert rsa_verifier.verify_cached(token) is first
    assert rsa_verifier.verify_cached(rs256(claims(sub="bob"))) is None


async def test_cache_entry_dies_at_exp(rsa_verifier: JwtVerifier, clock: FakeClock) -> None:
    token = rs256(claims(exp=NOW + 60))
    await rsa_verifier.verify(token)
    clock.now = NOW + 59
    assert rsa_verifier.verify_cached(token) is not None
    clock.now = NOW + 60
    assert rsa_verifier.verify_cached(token) is None
    # Inside the leeway a full verification still accepts it (and does the work again).
    assert (await rsa_verifier.verify(token)).user == "alice"
    assert rsa_verifier.verifications == 2


async def test_cache_bounded(tmp_path: Path, clock: FakeClock) -> None:
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"), cache_size=3)
    tokens = [rs256(claims(sub=f"u{i}")) for i in range(5)]
    for t in tokens:
        await v.verify(t)
    assert len(v.cache) == 3
    assert v.verify_cached(tokens[0]) is None
    assert v.verify_cached(tokens[4]) is not None


async def test_denials_not_cached(rsa_verifier: JwtVerifier) -> None:
    token = rs256(claims(aud="nope"))
    for _ in range(3):
        assert await reason_of(rsa_verifier, token) is Reason.TOKEN_CLAIMS
    assert len(rsa_verifier.cache) == 0
    assert rsa_verifier.verifications == 3


async def test_cache_disabled(tmp_path: Path, clock: FakeClock) -> None:
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"), cache_size=0)
    token = rs256()
    await v.verify(token)
    await v.verify(token)
    assert v.verifications == 2
    assert v.verify_cached(token) is None


async def test_claims_are_read_only(rsa_verifier: JwtVerifier) -> None:
    got = await rsa_verifier.verify(rs256())
    with pytest.raises(TypeError):
        got.claims["sub"] = "admin"  # type: ignore[index]


# -- key set building and the file source ------------------------------------


def test_key_binding_rules(caplog: pytest.LogCaptureFixture) -> None:
    rsa_key, ec_key = shared_rsa_key(), shared_ec_key()
    doc = jwks_of(
        jwk_for(rsa_key, "rs", "RS256"),
        jwk_for(rsa_key, "ps-not-configured", "PS512"),  # alg not configured: skipped
        jwk_for(rsa_key, "enc", "RS256", use="enc"),  # not a signing key: skipped
        jwk_for(ec_key, "ec-inferred", None),  # ES256 is the only EC alg configured
        jwk_for(ec_key, "ec-wrong-alg", "ES384"),  # P-256 key claiming ES384: skipped
        jwk_for(ec_key, "ec-claims-rsa", "RS256"),  # kty mismatch: skipped
        {"kty": "oct", "k": "c2VjcmV0", "kid": "oct", "alg": "HS256"},  # never from a JWKS
        {"kid": "no-kty"},
        "not an object",  # type: ignore[arg-type]
    )
    ks = build_key_set(doc, ["RS256", "ES256", "PS256"], source="test")
    assert sorted(ks.by_kid) == ["ec-inferred", "rs"]
    assert ks.by_kid["rs"].alg == "RS256"
    assert ks.by_kid["ec-inferred"].alg == "ES256"
    assert "ps-not-configured" in caplog.text and "enc" in caplog.text


@pytest.mark.parametrize("crv", [["Ed25519"], {"Ed25519": 1}])
def test_key_with_a_non_string_crv_is_skipped(caplog: pytest.LogCaptureFixture, crv: Any) -> None:
    odd = {"kty": "OKP", "crv": crv, "x": "AAAA", "kid": "odd"}
    doc = jwks_of(jwk_for(shared_rsa_key(), "rs", "RS256"), odd)
    ks = build_key_set(doc, ["RS256", "EdDSA"], source="test")
    assert list(ks.by_kid) == ["rs"]
    assert "'odd'" in caplog.text and "crv is not a string" in caplog.text


def test_a_key_whose_binding_fails_unexpectedly_is_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from extauth.tokens import keyset

    real = keyset._compatible

    def fragile(alg: str, kty: str, crv: Any) -> bool:
        if kty == "EC":
            raise RuntimeError("x=key-material")
        return real(alg, kty, crv)

    monkeypatch.setattr(keyset, "_compatible", fragile)
    doc = jwks_of(jwk_for(shared_ec_key(), "ec", None), jwk_for(shared_rsa_key(), "rs", "RS256"))
    ks = build_key_set(doc, ["RS256", "ES256"], source="test")
    assert list(ks.by_kid) == ["rs"]
    assert "RuntimeError" in caplog.text and "key-material" not in caplog.text


def test_ambiguous_rsa_key_skipped() -> None:
    doc = jwks_of(jwk_for(shared_rsa_key(), "amb", None), jwk_for(shared_ec_key(), "ec", None))
    ks = build_key_set(doc, ["RS256", "PS256", "ES256"], source="test")
    assert list(ks.by_kid) == ["ec"]


def test_private_members_dropped() -> None:
    from jwt.algorithms import RSAAlgorithm

    priv = RSAAlgorithm.to_jwk(shared_rsa_key(), as_dict=True)
    priv.pop("key_ops", None)
    priv.update({"kid": "p", "alg": "RS256"})
    ks = build_key_set({"keys": [priv]}, ["RS256"], source="test")
    assert not hasattr(ks.by_kid["p"].jwk.key, "private_numbers")


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", '{"keys": {}}', '{"keys": []}', json.dumps({"keys": [{"kty": "oct", "k": "AA"}]})],
)
def test_invalid_jwks_file_is_config_error(tmp_path: Path, content: str) -> None:
    p = tmp_path / "bad-jwks.json"
    p.write_text(content)
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], jwks_file=str(p))
    with pytest.raises(ConfigError, match=r"bad-jwks\.json"):
        JwtVerifier(cfg, max_token_bytes=8192, cache_size=10)


def test_missing_jwks_file_is_config_error(tmp_path: Path) -> None:
    cfg = JwtConfig(issuer=ISS, audiences=[AUD], jwks_file=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"nope\.json"):
        JwtVerifier(cfg, max_token_bytes=8192, cache_size=10)


async def test_file_reload_on_mtime_change(tmp_path: Path, clock: FakeClock) -> None:
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"))
    new_key = make_rsa_key()
    new_token = sign(new_key, "RS256", claims(), kid="k2")
    assert await reason_of(v, new_token) is Reason.TOKEN_UNKNOWN_KEY
    path = tmp_path / "jwks.json"
    write_jwks(path, jwks_of(jwk_for(shared_rsa_key(), "k1", "RS256"), jwk_for(new_key, "k2", "RS256")))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    # Checked at most once per second.
    clock.advance(0.5)
    assert await reason_of(v, new_token) is Reason.TOKEN_UNKNOWN_KEY
    clock.advance(0.6)
    assert (await v.verify(new_token)).user == "alice"
    assert v.key_age_seconds == 0
    clock.advance(5)
    assert v.key_age_seconds == 5


async def test_a_key_removed_from_the_file_is_forgotten_without_traffic(
    tmp_path: Path, clock: FakeClock
) -> None:
    # The started source looks at the file on a timer: cached answers never ask it.
    kept_key = make_rsa_key()
    v = make_verifier(tmp_path, clock, jwks_of(jwk_for(shared_rsa_key(), "k1", "RS256"),
                                               jwk_for(kept_key, "k2", "RS256")))
    await v.start()
    try:
        old, kept = rs256(), sign(kept_key, "RS256", claims(sub="bob"), kid="k2")
        await v.verify(old)
        await v.verify(kept)
        path = tmp_path / "jwks.json"
        write_jwks(path, jwks_for(kept_key, "k2", "RS256"))
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
        clock.advance(2)
        await async_wait_until(forgotten(v, old), 10, "k1's verification to be forgotten")
        assert v.verify_cached(kept) is not None and v.verifications == 2
        assert await reason_of(v, old) is Reason.TOKEN_UNKNOWN_KEY
    finally:
        await v.close()


async def test_jwks_file_with_a_non_string_crv_loads_and_reloads(tmp_path: Path, clock: FakeClock) -> None:
    odd = {"kty": "OKP", "crv": ["Ed25519"], "x": "AAAA", "kid": "odd"}
    doc = jwks_of(jwk_for(shared_rsa_key(), "k1", "RS256"), odd)
    v = make_verifier(tmp_path, clock, doc, algorithms=("RS256", "EdDSA"))
    assert (await v.verify(rs256())).user == "alice"
    new_key = make_rsa_key()
    path = tmp_path / "jwks.json"
    write_jwks(path, jwks_of(jwk_for(shared_rsa_key(), "k1", "RS256"), jwk_for(new_key, "k2", "RS256"), odd))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    clock.advance(2)
    assert (await v.verify(sign(new_key, "RS256", claims(), kid="k2"))).user == "alice"


async def test_file_poller_survives_an_unexpected_error(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from extauth.tokens.jwks import FileKeySource

    kept_key = make_rsa_key()
    v = make_verifier(tmp_path, clock, jwks_of(jwk_for(shared_rsa_key(), "k1", "RS256"),
                                               jwk_for(kept_key, "k2", "RS256")))
    real_load = FileKeySource._load
    loads = 0

    def flaky_load(self: FileKeySource) -> Any:
        nonlocal loads
        loads += 1
        if loads == 1:
            raise RuntimeError("x=key-material")
        return real_load(self)

    monkeypatch.setattr(FileKeySource, "_load", flaky_load)
    path = tmp_path / "jwks.json"

    def touch(seconds: int) -> None:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))
        clock.advance(2)

    async def loaded(n: int) -> bool:
        return loads >= n

    await v.start()
    try:
        old = rs256()
        await v.verify(old)
        touch(2)
        await async_wait_until(lambda: loaded(1), 10, "the failing reload")
        # Only the still-running poller can notice this: no token asks the source.
        write_jwks(path, jwks_for(kept_key, "k2", "RS256"))
        touch(4)
        await async_wait_until(forgotten(v, old), 10, "k1's verification to be forgotten")
        assert "RuntimeError" in caplog.text and "key-material" not in caplog.text
    finally:
        await v.close()


async def test_file_bad_reload_keeps_keys(tmp_path: Path, clock: FakeClock) -> None:
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"))
    path = tmp_path / "jwks.json"
    path.write_text("{ half written")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    clock.advance(2)
    assert (await v.verify(rs256())).user == "alice"


def test_no_internal_state_leaks_token(rsa_verifier: JwtVerifier) -> None:
    # The verifier keeps hashes only; VerifiedToken has no raw token field (``key`` is the
    # verifying key's thumbprint).
    from extauth.tokens import VerifiedToken

    assert set(VerifiedToken.__slots__) == {"claims", "user", "expires_at", "key"}


def test_cli_token_claims(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from extauth.cli import main

    monkeypatch.setenv("EXTAUTH_TEST_CLI_SECRET", HMAC_SECRET)
    assert main(["token", "--secret-env", "EXTAUTH_TEST_CLI_SECRET", "--alg", "HS256", "--sub", "u",
                 "--iss", "i", "--aud", "a", "--claim", "empty=", "--claim", "n=3", "--claim", "v=1.2.3",
                 "--claim", "roles=[\"x\"]"]) == 0
    token = capsys.readouterr().out.strip()
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert (payload["empty"], payload["n"], payload["v"], payload["roles"]) == ("", 3, "1.2.3", ["x"])


async def test_an_unchanged_jwks_file_is_never_stale_and_an_unreadable_one_ages(
        tmp_path: Path, clock: FakeClock) -> None:
    # extauth_jwks_age_seconds feeds the stale-keys alert: a file nobody touched is current.
    v = make_verifier(tmp_path, clock, jwks_for(shared_rsa_key(), "k1", "RS256"))
    clock.advance(2000)  # the next verification looks at the file
    await v.verify(sign(shared_rsa_key(), "RS256", claims(sub="bob", exp=NOW + 5000), kid="k1"))
    assert v.key_age_seconds == 0
    (tmp_path / "jwks.json").unlink()  # the last good keys keep serving, and now they age
    clock.advance(30)
    await v.verify(sign(shared_rsa_key(), "RS256", claims(sub="carol", exp=NOW + 5000), kid="k1"))
    clock.advance(30)
    assert v.key_age_seconds == 60
