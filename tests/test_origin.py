import pytest

from extauth.origin import OriginPolicy, parse_origin, parse_origin_pattern

ALLOW = OriginPolicy(["https://app.example.com", "https://*.example.com", "http://localhost:8081"])


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM",  # canonical form is lower-case
        "https://app.example.com:443",  # default port omitted in canonical form
        "https://chat.example.com",
        "https://a.b.example.com",
        "http://localhost:8081",
    ],
)
def test_allowed(origin: str) -> None:
    assert ALLOW.allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.com",
        "https://example.com",  # wildcard never matches the bare domain
        "https://evilexample.com",  # look-alike suffix
        "https://example.com.evil.net",
        "https://app.example.com.evil.net",
        "https://evil.net/https://app.example.com",
        "http://app.example.com",  # scheme matters
        "https://app.example.com:8443",  # port matters
        "https://app.example.com/",  # a path is not an origin
        "https://app.example.com/chat",
        "https://user@app.example.com",  # userinfo
        "https://app.example.com, https://evil.com",  # several values
        "https://evil.com, https://app.example.com",
        " https://app.example.com",  # stray spaces
        "https://app.example.com ",
        "null",  # opaque origin, not listed
        "",
        "https://app.example.com.",
        "https://app..example.com",
        "https://-app.example.com",
        "ftp://app.example.com",
        "https://*.example.com",
        "https://app.example.com?x=1",
        "https://app.example.com#x",
        "https://app.example.com:0",
        "https://app.example.com:99999",
        "https://app!example.com",  # Envoy's replacement for non-UTF-8 bytes
        "http://localhost",
        "https://APP.EXAMPLE.COM\t",
    ],
)
def test_refused(origin: str) -> None:
    assert not ALLOW.allows(origin)


def test_null_only_when_listed() -> None:
    assert OriginPolicy(["null"]).allows("null")
    assert not OriginPolicy(["https://a.example.com"]).allows("null")


def test_ipv6_and_ipv4_canonical() -> None:
    p = OriginPolicy(["http://[::1]:8080", "http://127.0.0.1:8080"])
    assert p.allows("http://[0:0:0:0:0:0:0:1]:8080")
    assert p.allows("http://127.0.0.1:8080")
    assert not p.allows("http://127.0.0.2:8080")


def test_parse_origin_serializes_canonically() -> None:
    o = parse_origin("HTTPS://Example.COM:443")
    assert o is not None and o.serialize() == "https://example.com"
    o = parse_origin("http://example.com:8080")
    assert o is not None and o.serialize() == "http://example.com:8080"


@pytest.mark.parametrize(
    "pattern", ["example.com", "https://", "https://*.com", "https://a.*.example.com", "https://*", "*"]
)
def test_bad_patterns_rejected(pattern: str) -> None:
    with pytest.raises(ValueError):
        parse_origin_pattern(pattern)


def test_a_longest_origin_is_allowed_and_a_longer_value_never_remembered() -> None:
    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 49]) + ".example.com"
    assert len(host) == 253  # the longest DNS name
    policy = OriginPolicy(["https://*.example.com"])
    assert policy.allows(f"https://{host}") and policy.allows(f"HTTPS://{host.upper()}:443")
    # Envoy passes header values of up to 60 KiB: each refused without growing the memo.
    before = len(policy._memo)
    for i in range(50):
        assert not policy.allows(f"https://{i}{'x' * 60_000}.example.com")
    assert len(policy._memo) == before
