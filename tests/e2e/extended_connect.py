"""WebSocket clients over HTTP/2 (RFC 8441, the ``h2`` package) and HTTP/3 (RFC 9220,
``aioquic``): an extended CONNECT with ``:protocol websocket`` on one stream of a multiplexed
connection, the frames by ``websockets``' sans-I/O protocol, as a browser does it::

    async with await H2Client.connect("127.0.0.1", port) as conn:
        ws = await conn.websocket("/ws?token=...", origin="http://allowed.example.test")
        await ws.send("hi")
        assert await ws.recv() == "hi"
        await ws.close()

``websocket`` returns ``Refused`` (the harness's) when the server answers anything but 200.
Every wait has a deadline; nothing here depends on pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side

from tests.e2e.harness import Refused

TIMEOUT = 5.0


@dataclass
class _Stream:
    """What the connection's reader has received for one stream."""

    headers: asyncio.Future[list[tuple[str, str]]]
    data: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)  # None: the stream ended


class _Multiplexed:
    """The part of a client that is the same over HTTP/2 and HTTP/3: streams, and a
    WebSocket on each."""

    scheme = "http"
    protocol_name = ""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self._streams: dict[int, _Stream] = {}
        self.closed = asyncio.Event()
        self.settings: dict[int, int] = {}
        self._settings_seen = asyncio.Event()

    # transport-specific
    def _open_stream(self, headers: list[tuple[str, str]]) -> int:
        raise NotImplementedError

    def _send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        raise NotImplementedError

    # received from the transport
    def _on_settings(self, settings: dict[int, int]) -> None:
        self.settings.update(settings)
        self._settings_seen.set()

    def _on_headers(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        s = self._streams.get(stream_id)
        if s is not None and not s.headers.done():
            s.headers.set_result(headers)

    def _on_data(self, stream_id: int, data: bytes) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.data.put_nowait(data)

    def _on_end(self, stream_id: int) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            if not s.headers.done():
                s.headers.set_exception(ConnectionResetError(f"stream {stream_id} ended without headers"))
            s.data.put_nowait(None)

    def _on_closed(self) -> None:
        self.closed.set()
        for sid in list(self._streams):
            self._on_end(sid)

    @property
    def extended_connect(self) -> bool:
        """Whether the server announced SETTINGS_ENABLE_CONNECT_PROTOCOL (0x8) = 1."""
        return self.settings.get(0x8) == 1

    async def websocket(self, path: str, *, origin: str | None = None,
                        subprotocols: Sequence[str] = (), headers: Sequence[tuple[str, str]] = (),
                        version: str = "13") -> WebSocket | Refused:
        """Open a WebSocket on a new stream; ``Refused`` when answered with anything but 200."""
        await asyncio.wait_for(self._settings_seen.wait(), TIMEOUT)
        if not self.extended_connect:
            raise RuntimeError(f"the server did not enable extended CONNECT over {self.protocol_name}")
        request = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", self.scheme),
                   (":path", path), (":authority", self.authority), ("sec-websocket-version", version)]
        if origin is not None:
            request.append(("origin", origin))
        if subprotocols:
            request.append(("sec-websocket-protocol", ", ".join(subprotocols)))
        request.extend((k.lower(), v) for k, v in headers)
        stream = _Stream(asyncio.get_running_loop().create_future())
        stream_id = self._open_stream(request)
        self._streams[stream_id] = stream
        response = dict(await asyncio.wait_for(stream.headers, TIMEOUT))
        status = int(response[":status"])
        if status != 200:
            body = b""
            with contextlib.suppress(TimeoutError):
                while (chunk := await asyncio.wait_for(stream.data.get(), TIMEOUT)) is not None:
                    body += chunk
            self._streams.pop(stream_id, None)
            return Refused(status, {k: v for k, v in response.items() if not k.startswith(":")}, body)
        return WebSocket(self, stream_id, stream, response)


class WebSocket:
    """One WebSocket on one stream of an HTTP/2 or HTTP/3 connection."""

    def __init__(self, conn: _Multiplexed, stream_id: int, stream: _Stream,
                 response: dict[str, str]) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._stream = stream
        self.response = response
        self.subprotocol = response.get("sec-websocket-protocol")
        self._protocol = Protocol(Side.CLIENT)
        self._frames: list[Frame] = []
        self.close_code: int | None = None
        self._ended = False

    def _flush(self, end: bool = False) -> None:
        data = b"".join(self._protocol.data_to_send())
        if data or end:
            self._conn._send_data(self.stream_id, data, end)

    async def send(self, text: str) -> None:
        self._protocol.send_text(text.encode())
        self._flush()

    async def _next_frame(self, within: float) -> Frame | None:
        while not self._frames:
            if self._ended:
                return None
            chunk = await asyncio.wait_for(self._stream.data.get(), within)
            if chunk is None:
                self._ended = True
                self._protocol.receive_eof()
            else:
                self._protocol.receive_data(chunk)
            self._frames.extend(e for e in self._protocol.events_received() if isinstance(e, Frame))
            self._flush()  # pongs, close replies
        return self._frames.pop(0)

    async def recv(self, within: float = TIMEOUT) -> str:
        """The next text message; raises ConnectionError when the socket closes instead."""
        while True:
            frame = await self._next_frame(within)
            if frame is None or frame.opcode is Opcode.CLOSE:
                self.close_code = self._received_close_code()
                raise ConnectionError(f"closed ({self.close_code})")
            if frame.opcode is Opcode.TEXT:
                return frame.data.decode()

    def _received_close_code(self) -> int:
        # The stream, not a TCP connection, ends the tunnel: the code is the close frame's.
        rcvd = self._protocol.close_rcvd
        return rcvd.code if rcvd is not None else 1006

    async def close(self, within: float = TIMEOUT) -> None:
        """Close handshake, then end the stream (the end of the tunnel, which frees the lease)."""
        with contextlib.suppress(Exception):
            self._protocol.send_close(1000)
            self._flush()
            with contextlib.suppress(TimeoutError):
                while (frame := await self._next_frame(within)) is not None:
                    if frame.opcode is Opcode.CLOSE:
                        break
            self.close_code = self._received_close_code()
        if not self._conn.closed.is_set():
            self._conn._send_data(self.stream_id, b"", True)


class H2Client(_Multiplexed):
    """One HTTP/2 connection (h2c, or TLS with ALPN h2) carrying any number of WebSockets."""

    protocol_name = "HTTP/2"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str,
                 scheme: str) -> None:
        import h2.config
        import h2.connection

        super().__init__(authority)
        self.scheme = scheme
        self._reader = reader
        self._writer = writer
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                        header_encoding="utf-8"))
        self._h2.initiate_connection()
        self._write()
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                      server_name: str | None = None) -> H2Client:
        """Connect (TLS when ``tls`` is given: it must offer ALPN h2) and send the preface."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=tls, server_hostname=(server_name or host) if tls else None), TIMEOUT)
        if tls is not None:
            alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            if alpn != "h2":
                writer.close()
                raise RuntimeError(f"the server chose ALPN {alpn!r}, not h2")
        return cls(reader, writer, server_name or f"{host}:{port}", "https" if tls else "http")

    def _write(self) -> None:
        data = self._h2.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _read(self) -> None:
        import h2.events

        try:
            while data := await self._reader.read(65536):
                for event in self._h2.receive_data(data):
                    if isinstance(event, h2.events.RemoteSettingsChanged):
                        self._on_settings({int(k): v.new_value for k, v in event.changed_settings.items()})
                    elif isinstance(event, h2.events.ResponseReceived):
                        self._on_headers(event.stream_id, list(event.headers))  # type: ignore[arg-type]
                    elif isinstance(event, h2.events.DataReceived):
                        self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        self._on_data(event.stream_id, event.data)
                    elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                        self._on_end(event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                self._write()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._on_closed()

    def _open_stream(self, headers: list[tuple[str, str]]) -> int:
        stream_id: int = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, headers)
        self._write()
        return stream_id

    def _send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        import h2.exceptions

        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.send_data(stream_id, data, end_stream=end)
        self._write()

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            self._h2.close_connection()
            self._write()
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), TIMEOUT)
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    async def __aenter__(self) -> H2Client:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class H3Client(_Multiplexed):
    """One HTTP/3 connection over QUIC (``aioquic``) carrying any number of WebSockets."""

    protocol_name = "HTTP/3"
    scheme = "https"

    def __init__(self, authority: str) -> None:
        super().__init__(authority)
        self._protocol: Any = None
        self._h3: Any = None
        self._cm: Any = None

    @classmethod
    async def connect(cls, host: str, port: int, *, server_name: str = "localhost",
                      verify: bool = False, cafile: str | None = None) -> H3Client:
        from aioquic.asyncio import connect
        from aioquic.asyncio.protocol import QuicConnectionProtocol
        from aioquic.h3.connection import H3_ALPN, H3Connection
        from aioquic.h3.events import DataReceived, HeadersReceived
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.events import ConnectionTerminated, StreamReset

        client = cls(f"{server_name}:{port}")

        class _Protocol(QuicConnectionProtocol):  # type: ignore[misc]
            def __init__(self, *args: Any, **kw: Any) -> None:
                super().__init__(*args, **kw)
                self.h3 = H3Connection(self._quic)

            def quic_event_received(self, event: Any) -> None:
                if isinstance(event, ConnectionTerminated):
                    client._on_closed()
                    return
                if isinstance(event, StreamReset):
                    client._on_end(event.stream_id)
                for e in self.h3.handle_event(event):
                    if isinstance(e, HeadersReceived):
                        client._on_headers(e.stream_id, [(k.decode(), v.decode()) for k, v in e.headers])
                    elif isinstance(e, DataReceived) and e.data:
                        client._on_data(e.stream_id, e.data)
                    if getattr(e, "stream_ended", False):
                        client._on_end(e.stream_id)
                settings = self.h3.received_settings
                if settings is not None and not client._settings_seen.is_set():
                    client._on_settings({int(k): int(v) for k, v in settings.items()})

        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name,
                                   verify_mode=ssl.CERT_REQUIRED if verify else ssl.CERT_NONE)
        if cafile is not None:
            config.load_verify_locations(cafile)
        client._cm = connect(host, port, configuration=config, create_protocol=_Protocol)
        client._protocol = await asyncio.wait_for(client._cm.__aenter__(), TIMEOUT)
        client._h3 = client._protocol.h3
        return client

    def _open_stream(self, headers: list[tuple[str, str]]) -> int:
        stream_id: int = self._protocol._quic.get_next_available_stream_id()
        self._h3.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in headers])
        self._protocol.transmit()
        return stream_id

    def _send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        with contextlib.suppress(Exception):
            self._h3.send_data(stream_id, data, end)
            self._protocol.transmit()

    async def aclose(self) -> None:
        if self._cm is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._cm.__aexit__(None, None, None), TIMEOUT)

    async def __aenter__(self) -> H3Client:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
