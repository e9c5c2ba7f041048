"""A lean WebSocket echo upstream for the benchmarks: a bare asyncio Protocol speaking just
enough RFC 6455 (101 handshake, echo of text/binary frames, pong, close handshake) and a tiny
``200 ok`` for plain HTTP. It runs in its own process so its CPU never mixes with the load
generator's, and it costs far less per handshake than a full WebSocket library: on a 2-core
machine every microsecond the upstream spends is taken from Envoy and extauth.

    .venv/bin/python bench/ws_upstream.py --port PORT

Prints ``ready`` on stdout once listening; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import signal
import sys

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 64 * 1024
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def frame(first_byte: int, payload: bytes) -> bytes:
    """One unmasked server frame (FIN/opcode byte given)."""
    n = len(payload)
    if n < 126:
        head = bytes((first_byte, n))
    elif n < 65536:
        head = bytes((first_byte, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first_byte, 127)) + n.to_bytes(8, "big")
    return head + payload


def unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("buf", "transport", "ws")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ws = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.ws:
            self._frames()
        else:
            self._http()

    def _http(self) -> None:
        t = self.transport
        assert t is not None
        while not self.ws:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    t.close()
                return
            head = bytes(self.buf[:end])
            del self.buf[:end + 4]
            headers: dict[bytes, bytes] = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"websocket" in headers.get(b"upgrade", b"").lower():
                key = headers.get(b"sec-websocket-key", b"")
                accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())  # noqa: S324 - RFC 6455
                t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
                self.ws = True
                if self.buf:
                    self._frames()
                return
            t.write(_OK)

    def _frames(self) -> None:
        t = self.transport
        assert t is not None
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, pos = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, pos = int.from_bytes(buf[2:10], "big"), 10
            mask = b""
            if b1 & 0x80:
                if len(buf) < pos + 4:
                    return
                mask, pos = bytes(buf[pos:pos + 4]), pos + 4
            if len(buf) < pos + n:
                return
            payload = bytes(buf[pos:pos + n])
            del buf[:pos + n]
            if mask:
                payload = unmask(payload, mask)
            opcode = b0 & 0x0F
            if opcode == 0x8:  # close: answer with the same status code, then close TCP
                t.write(frame(0x88, payload[:2]))
                t.close()
                return
            if opcode == 0x9:  # ping
                t.write(frame(0x8A, payload))
            elif opcode in (0x0, 0x1, 0x2):  # echo data frames as they came (RSV bits cleared)
                t.write(frame(b0 & 0x8F, payload))


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    try:
        asyncio.run(main(ap.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(0)
