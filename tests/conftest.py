"""Shared fixtures. Real Redis-compatible servers for the store tests (see tests/redis_servers.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.redis_servers import RedisClusterServers, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One standalone server for the whole session (isolate keys with ``key_prefix``)."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A real 3-master Redis Cluster for the whole session; ``.url`` is redis+cluster://h:p,h:p,h:p."""
    cluster = RedisClusterServers()
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A standalone server of this test's own: kill it, restart it, flush it freely."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture
def restart_redis(redis_server: RedisServer) -> Iterator[Callable[[], RedisServer]]:
    """A callable that restarts the session ``redis_server`` on the same port (state is lost).
    The server is running again after the test whatever happens."""
    try:
        yield redis_server.restart
    finally:
        if not redis_server.running:
            redis_server.start()


@pytest.fixture
def key_prefix() -> str:
    """A key prefix unique to this test, so tests on shared servers never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"
