"""RespLane: one multiplexed RESP connection for the request path on a standalone Redis.

Why: redis-py's asyncio client costs several times more CPU per concurrent EVALSHA (pool
checkout, per-argument encoding, its retry and timeout wrappers; figures in
docs/benchmarks.md). Redis answers the commands of one connection in the order they arrive,
so a single connection can carry every call in flight: a call is one write and one future,
and replies are matched first in, first out.

Scope, on purpose small: one server (``redis://`` or ``rediss://``, with the TLS context
redis-py builds for the same URL), RESP2, used by RedisStore for its scripts and lease
pipelines only. Everything else (SCAN, admin listings) and Cluster stay on redis-py
(``RespLane.from_client`` answers None for a Cluster).

Failure behaviour, the same as redis-py's where it matters:
- every connect is bounded by ``connect_timeout``; AUTH and SELECT replies are checked;
- a reply later than ``reply_timeout`` aborts the connection (the socket timeout): every call
  waiting on it fails, and the next call connects again;
- a lost connection fails every call waiting on it with ``ConnectionError``; nothing is
  retried, because a script may have run before the connection dropped;
- a call cancelled by its caller (the store's per-call timeout) leaves its reply to be read
  and dropped, so the replies that follow still reach their own callers.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extauth.aio import retrieve

Command = Sequence[str | int | bytes]

__all__ = ["Command", "RespLane"]


def encode(commands: Sequence[Command]) -> bytes:
    """Commands as RESP arrays of bulk strings, ready for one write (hiredis packs them in C)."""
    return b"".join([hiredis.pack_command(tuple(cmd)) for cmd in commands])


def _error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class _Waiting:
    """One write's replies: ``count`` of them, for one future."""

    __slots__ = ("count", "deadline", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, deadline: float) -> None:
        self.future = future
        self.count = count
        self.deadline = deadline
        self.replies: list[Any] = []


class RespConnection(asyncio.Protocol):
    """One connection's protocol: a write per call, its replies matched first in, first out."""

    def __init__(self, reply_timeout: float) -> None:
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._reply_timeout = reply_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport by construction (create_connection); a cast, not an isinstance
        # check, because uvloop's transports do not derive from asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    @property
    def usable(self) -> bool:
        return not self.lost and self._transport is not None and not self._transport.is_closing()

    def send(self, data: bytes, count: int) -> asyncio.Future[list[Any]]:
        if not self.usable:
            raise RedisConnectionError("redis connection lost")
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._waiting.append(_Waiting(future, count, time.monotonic() + self._reply_timeout))
        self._transport.write(data)
        if self._timer is None:
            self._timer = loop.call_later(self._reply_timeout, self._check_late)
        return future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        try:
            while (reply := self._reader.gets()) is not False:
                head = waiting[0]
                head.replies.append(_error(reply) if isinstance(reply, hiredis.ReplyError) else reply)
                if len(head.replies) == head.count:
                    waiting.popleft()
                    if not head.future.done():  # its caller may have given up (cancelled)
                        head.future.set_result(head.replies)
        except (hiredis.ProtocolError, IndexError):
            # Garbage, or a reply nobody asked for: nothing after it can be trusted.
            self.abort()

    def _check_late(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        delay = self._waiting[0].deadline - time.monotonic()
        if delay <= 0:
            self.abort(RedisTimeoutError("redis reply timed out"))
        else:
            self._timer = asyncio.get_running_loop().call_later(delay, self._check_late)

    def abort(self, exc: Exception | None = None) -> None:
        self._fail(exc or RedisConnectionError("redis protocol error"))
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"redis connection lost: {exc}" if exc else "redis connection closed"
        self._fail(RedisConnectionError(reason))

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            w = self._waiting.popleft()
            if not w.future.done():
                w.future.set_exception(exc)


class RespLane:
    """Calls and pipelines over one lazily (re)connected connection; safe for any number of
    concurrent callers on one event loop."""

    def __init__(self, host: str, port: int, *, db: int = 0, username: str | None = None,
                 password: str | None = None, connect_timeout: float = 1.0, reply_timeout: float = 1.0,
                 client_name: str | None = None,
                 ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None) -> None:
        self.host = host
        self.port = port
        # A context, or how to build one at the first connect (it reads certificate files,
        # and a missing one is then a store error, as it is for redis-py, not a start-up crash).
        self._ssl = ssl_context
        self._db = db
        self._username = username
        self._password = password
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._client_name = client_name
        self._conn: RespConnection | None = None
        self._connecting: asyncio.Task[RespConnection] | None = None

    @classmethod
    def from_client(cls, client: Any) -> RespLane | None:
        """A lane to the server a redis-py client talks to, or None when the lane cannot speak
        for it: a Cluster, a Unix socket, a credential provider or a custom connection class."""
        if type(client) is not aioredis.Redis:
            return None
        pool = client.connection_pool
        kw = pool.connection_kwargs
        if kw.get("credential_provider"):
            return None
        if pool.connection_class is aioredis.SSLConnection:
            # The very context redis-py would use for this client (CA, client certificate,
            # verification mode, hostname check, minimum version, ciphers), built as late.
            ssl_context: Callable[[], ssl.SSLContext] | None = pool.connection_class(**kw).ssl_context.get
        elif pool.connection_class is aioredis.Connection:
            ssl_context = None
        else:
            return None
        return cls(kw.get("host", "localhost"), int(kw.get("port", 6379)), db=int(kw.get("db", 0)),
                   username=kw.get("username"), password=kw.get("password"),
                   connect_timeout=kw.get("socket_connect_timeout") or 1.0,
                   reply_timeout=kw.get("socket_timeout") or 1.0, client_name=kw.get("client_name"),
                   ssl_context=ssl_context)

    @property
    def tls(self) -> bool:
        return self._ssl is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for the next connect (built on first use), None for plain TCP."""
        if self._ssl is None or isinstance(self._ssl, ssl.SSLContext):
            return self._ssl
        self._ssl = self._ssl()
        return self._ssl

    async def call(self, *args: str | int | bytes) -> Any:
        """One command; an error reply raises (``NoScriptError``, ``ResponseError``)."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """Commands in one write; their replies in order, error replies as exceptions in the
        list (as redis-py's ``execute(raise_on_error=False)``)."""
        if not commands:
            return []
        conn = self._conn if self._conn is not None and self._conn.usable else await self._connect()
        return await conn.send(encode(commands), len(commands))

    async def _connect(self) -> RespConnection:
        # Concurrent callers share one connect attempt; a caller that gives up (its timeout)
        # does not cancel it for the others.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            # When every caller gave up, nobody awaits the attempt: retrieve its failure here
            # (the callers that waited got it), or asyncio logs "Task exception was never
            # retrieved" with a traceback for each connect that failed unwatched.
            self._connecting.add_done_callback(retrieve)
        return await asyncio.shield(self._connecting)

    async def _open(self) -> RespConnection:
        try:
            self._conn = await self._dial()
            return self._conn
        finally:
            self._connecting = None

    async def _dial(self) -> RespConnection:
        loop = asyncio.get_running_loop()
        try:
            ssl_context = self.ssl_context()
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: RespConnection(self._reply_timeout), self.host, self.port, ssl=ssl_context)
                try:
                    await self._handshake(conn)
                except BaseException:
                    conn.abort()
                    raise
        except TimeoutError as e:
            raise RedisTimeoutError(f"redis connect to {self.host}:{self.port} timed out") from e
        except OSError as e:
            raise RedisConnectionError(f"redis connect to {self.host}:{self.port}: {e}") from e
        return conn

    async def _handshake(self, conn: RespConnection) -> None:
        setup: list[Command] = []
        if self._password is not None:
            setup.append(("AUTH", self._username, self._password) if self._username
                         else ("AUTH", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        if self._client_name:
            setup.append(("CLIENT", "SETNAME", self._client_name))
        if not setup:
            return
        for reply in await conn.send(encode(setup), len(setup)):
            if isinstance(reply, Exception):
                raise RedisConnectionError(f"redis connection setup refused: {reply}")

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.abort(RedisConnectionError("redis lane closed"))
            self._conn = None
