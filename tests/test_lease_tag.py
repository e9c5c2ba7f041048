"""Lease tags across replicas when the store loses its data: a Redis restart without
persistence (or FLUSHALL) takes the shared tag key with it while replicas still tag with it.
The replicas must agree again, and the tags of connections already open must keep verifying
on every replica, or their refreshes and releases are ignored and the leases expire under
open connections."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import AsyncIterator

import pytest

from extauth.lease_tag import LeaseTagger, _Hmac, _message
from extauth.store import LeaseRef, MemoryStore
from extauth.store.redis import RedisStore
from tests.redis_servers import RedisServer


def ref(user: str = "alice") -> LeaseRef:
    return LeaseRef(f"lease-of-{user}", "chat", user, "198.51.100.7")


async def _lose_the_data(redis_server: RedisServer, key_prefix: str) -> None:
    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix)
    try:
        keys = store.keys
        await store._client.delete(keys.lease_key(), keys.previous_lease_keys())
    finally:
        await store.close()


@pytest.fixture
async def replicas(redis_server: RedisServer, key_prefix: str) -> AsyncIterator[list[RedisStore]]:
    stores = [RedisStore.from_url(redis_server.url, key_prefix=key_prefix) for _ in range(2)]
    try:
        yield stores
    finally:
        for s in stores:
            await s.close()


async def test_running_replicas_put_their_key_back(replicas: list[RedisStore], redis_server: RedisServer,
                                                   key_prefix: str) -> None:
    old_store, new_store = replicas
    old = LeaseTagger()
    await old.load(old_store)
    tag = old.tag(ref())
    await _lose_the_data(redis_server, key_prefix)
    await old.refresh(old_store)  # its periodic check runs before the new replica starts
    new = LeaseTagger()
    await new.load(new_store)
    assert new.valid(ref(), tag)
    assert old.tag(ref("bob")) == new.tag(ref("bob"))


async def test_when_a_new_replica_got_in_first_every_replica_accepts_both(
        replicas: list[RedisStore], redis_server: RedisServer, key_prefix: str) -> None:
    old_store, new_store = replicas
    old = LeaseTagger()
    await old.load(old_store)
    before = old.tag(ref())  # a connection opened before the data loss
    await _lose_the_data(redis_server, key_prefix)
    new = LeaseTagger()
    await new.load(new_store)  # started in between: its own key becomes the store's
    assert not new.valid(ref(), before)
    await old.refresh(old_store)  # adopts the new key, leaves its own among the previous
    await new.refresh(new_store)  # learns the old one
    assert new.valid(ref(), before) and old.valid(ref(), before)
    after = old.tag(ref("bob"))
    assert after == new.tag(ref("bob")) and new.valid(ref("bob"), after)
    # A forged tag still fails under every accepted key. The first character is changed,
    # never the last: a 16-byte tag's last base64url character carries only two bits, so
    # overwriting the tail with "AA" reproduced the real tag once in 256 runs.
    forged = ("B" if before[0] == "A" else "A") + before[1:]
    assert not new.valid(ref(), forged) and not old.valid(ref("mallory"), before)


async def test_refresh_before_load_does_nothing_and_memory_store_keeps_one_key() -> None:
    store = MemoryStore()
    tagger = LeaseTagger()
    await tagger.refresh(store)
    assert not tagger.ready
    await tagger.load(store)
    tag = tagger.tag(ref())
    await tagger.refresh(store)
    assert tagger.tag(ref()) == tag and tagger.valid(ref(), tag)


def _reference_tag(key: bytes, message: bytes) -> str:
    digest = hmac.new(key, message, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@pytest.mark.parametrize("key_length", [1, 32, 63, 64, 65, 131])
def test_tags_are_hmac_sha256_whatever_the_key_length(key_length: int) -> None:
    # Replicas of other versions compute tags with hmac.new: the keyed prototype must give
    # the same bytes, keys longer than SHA-256's block (hashed first) included.
    key = bytes(7 * i % 256 for i in range(key_length))
    for message in (b"", b"lease\nchat\nalice\n198.51.100.7", bytes(range(256)) * 3):
        assert _Hmac(key).tag(message) == _reference_tag(key, message)
    assert _Hmac(key).tag(b"a") != _Hmac(key + b"x").tag(b"a")


@pytest.mark.parametrize(("key", "message", "tag"), [
    # RFC 4231 test cases 2 and 6, cut to 128 bits.
    (b"Jefe", b"what do ya want for nothing?", "W9zBRr9gdU5qBCQmCJV1xw"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First", "YOQxWR7gtn8Niiaqy_W3fw"),
    # Tags made by the earlier hand-written HMAC: replicas of both versions must agree.
    (bytes(range(32)), _message(LeaseRef("lease-of-alice", "chat", "alice", "198.51.100.7")),
     "D9ahmcKu02PaCAwOR4vDrQ"),
    (bytes(range(32)), _message(LeaseRef("lease-anon", "chat", None, "2001:db8::/64")),
     "70O2QXf1EzZSHF-9HlHRiw"),
])
def test_tags_match_known_vectors(key: bytes, message: bytes, tag: str) -> None:
    assert _Hmac(key).tag(message) == tag
    mac = _Hmac(key)
    assert [mac.tag(message), mac.tag(b"other"), mac.tag(message)][2] == tag  # the prototype is untouched


async def test_a_tagger_tags_with_the_stores_key_as_hmac_sha256() -> None:
    store = MemoryStore()
    tagger = LeaseTagger()
    await tagger.load(store)
    key = bytes.fromhex((await store.lease_key("00" * 32)).current)
    lease = ref()
    assert tagger.tag(lease) == _reference_tag(key, _message(lease))
    assert tagger.valid(lease, _reference_tag(key, _message(lease)))
    assert not tagger.valid(ref("mallory"), tagger.tag(lease))


async def test_a_tag_that_is_not_an_ascii_string_is_invalid_not_an_error() -> None:
    # Tags come from access-log entries that anything reaching `listen` can send: a garbled
    # or forged one is a bad tag like any other, never an exception (compare_digest raises
    # TypeError on non-ASCII str, which dropped the whole batch and ended the stream).
    tagger = LeaseTagger()
    await tagger.load(MemoryStore())
    good = tagger.tag(ref())
    for bad in ("é", good[:-1] + "é", "\udcff", good + "\u00a0", "", None, 42, good.encode()):
        assert not tagger.valid(ref(), bad), bad
    assert tagger.valid(ref(), good)
