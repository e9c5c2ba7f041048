"""Shared fixtures. Real Redis-compatible servers for the store tests (see tests/redis_servers.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import uvloop
from _pytest._code import code as _pytest_code

from tests.redis_servers import RedisClusterServers, RedisServer, running_server


def _install_traceback_guard() -> None:
    """CPython 3.11.7 can raise "SystemError: AST constructor recursion depth mismatch" when
    pytest parses a source file to show a failing test's traceback (seen late in full runs,
    with async tests). pytest then stops with INTERNALERROR and reports no failure at all.
    Show that one frame without its source instead. pytest's formatter is private API (its
    class was renamed once), so this does nothing on a pytest where it is not found."""
    formatter = getattr(_pytest_code, "ExceptionInfoFormatter", None) or getattr(
        _pytest_code, "FormattedExcinfo", None)
    original = getattr(formatter, "_getentrysource", None)
    if formatter is None or original is None:
        return

    def entry_source_or_none(self: Any, entry: Any) -> Any:
        try:
            return original(self, entry)
        except SystemError:
            return None

    formatter._getentrysource = entry_source_or_none


_install_traceback_guard()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Async tests run on asyncio's own loop; a module marked ``both_loops`` runs on uvloop
    too, the loop ``extauth serve`` picks by default (extauth/eventloop.py). Those are the
    modules that drive the event loop itself: the server, the access-log stream, the store's
    connections and timeouts."""
    factories: dict[str, Any] = {"asyncio": asyncio.new_event_loop}
    if item.get_closest_marker("both_loops") is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP server that accepts, reads everything and never replies: a hung Redis."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in writers:
            w.transport.abort()
        await server.wait_closed()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One standalone server for the whole session (isolate keys with ``key_prefix``)."""
    with running_server() as server:
        yield server


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
    with running_server() as server:
        yield server


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
