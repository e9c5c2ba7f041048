"""TLS credentials for the admin API from PEM files: the server's and the CLI's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from extauth.config import AdminTls, ConfigError


def read_pem(path: str, error: type[Exception], context: str = "") -> bytes:
    """A certificate or key file's bytes; ``error`` (the caller's kind: ConfigError at start-up,
    ValueError in the CLI) names the file when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise error(f"{context}cannot read {path}: {e.strerror}") from None


def server_credentials(tls: AdminTls) -> grpc.ServerCredentials:
    """The admin API's TLS credentials from the configured files (ConfigError when one
    cannot be read, so a bad path stops start-up instead of serving in clear text)."""
    def read(path: str, what: str) -> bytes:
        return read_pem(path, ConfigError, f"admin_tls.{what}: ")

    cert, key = read(tls.cert_file, "cert_file"), read(tls.key_file, "key_file")
    ca = read(tls.client_ca_file, "client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTls:
    """How ``extauth admin`` speaks TLS: the CA to trust (None: the system's roots), a client
    certificate for mutual TLS, and the name to expect on the server's certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return read_pem(path, ValueError) if path else None

        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both --tls-cert and --tls-key, or neither")
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
