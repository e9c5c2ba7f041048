from __future__ import annotations

import pytest

from extauth.tokens import VerifiedToken
from extauth.tokens.cache import TokenCache
from tests.keys import FakeClock

NOW = 1_700_000_000.0


def vt(user: str, exp: float = NOW + 600) -> VerifiedToken:
    return VerifiedToken(claims={"sub": user, "exp": exp}, user=user, expires_at=exp)


def test_put_get_roundtrip() -> None:
    c = TokenCache(10, clock=FakeClock(NOW))
    v = vt("alice")
    c.put("tok-a", v)
    assert c.get("tok-a") is v
    assert c.get("tok-b") is None
    assert len(c) == 1


def test_keyed_by_hash_not_token() -> None:
    c = TokenCache(10, clock=FakeClock(NOW))
    token = "eyJhbGciOiJSUzI1NiJ9.secret-payload.sig"
    c.put(token, vt("alice"))
    keys = list(c._entries)
    assert all(isinstance(k, bytes) for k in keys)
    assert all(token.encode() not in k and b"secret" not in k for k in keys)


def test_entry_expires_at_exp() -> None:
    clock = FakeClock(NOW)
    c = TokenCache(10, clock=clock)
    c.put("t", vt("alice", exp=NOW + 10))
    clock.advance(9.999)
    assert c.get("t") is not None
    clock.advance(0.001)  # now == exp
    assert c.get("t") is None
    assert len(c) == 0


def test_already_expired_is_not_stored() -> None:
    c = TokenCache(10, clock=FakeClock(NOW))
    c.put("t", vt("alice", exp=NOW))
    assert len(c) == 0


def test_lru_eviction() -> None:
    c = TokenCache(3, clock=FakeClock(NOW))
    for name in ("a", "b", "c"):
        c.put(name, vt(name))
    assert c.get("a") is not None  # a is now most recently used
    c.put("d", vt("d"))
    assert len(c) == 3
    assert c.get("b") is None  # least recently used went first
    assert {u for u in ("a", "c", "d") if c.get(u) is not None} == {"a", "c", "d"}


def test_bounded_under_many_inserts() -> None:
    c = TokenCache(50, clock=FakeClock(NOW))
    for i in range(1000):
        c.put(f"t{i}", vt(str(i)))
    assert len(c) == 50
    assert c.get("t999") is not None
    assert c.get("t0") is None


def test_put_replaces() -> None:
    c = TokenCache(2, clock=FakeClock(NOW))
    c.put("t", vt("alice"))
    v2 = vt("bob")
    c.put("t", v2)
    assert len(c) == 1
    assert c.get("t") is v2


def test_maxsize_zero_disables() -> None:
    c = TokenCache(0, clock=FakeClock(NOW))
    c.put("t", vt("alice"))
    assert len(c) == 0
    assert c.get("t") is None


def test_negative_maxsize_refused() -> None:
    with pytest.raises(ValueError):
        TokenCache(-1)
