"""The admin API's gRPC server on ``admin_listen``: bearer-token check, TLS, start and stop."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from extauth._generated.extauth.admin.v1 import admin_pb2_grpc
from extauth.addresses import is_loopback_host, split_host_port
from extauth.admin.service import AdminServicer
from extauth.admin.tls import server_credentials
from extauth.config import Config, ConfigError
from extauth.logs import log_event
from extauth.metrics import Metrics
from extauth.revocation import RevocationList
from extauth.store.base import Store

if TYPE_CHECKING:
    from extauth.jail import Jail

log = logging.getLogger("extauth.admin")


def is_loopback(listen: str) -> bool:
    """True when a HOST:PORT binds loopback only (127.0.0.0/8, ::1 or localhost)."""
    host, _ = split_host_port(listen)
    return is_loopback_host(host)


class _TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call without ``authorization: Bearer <token>`` (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong admin token (authorization: Bearer <token>)")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        given = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)
        return self._deny


def admin_token(cfg: Config) -> str | None:
    """The token calls must present, or None when none is needed. Raises ConfigError when
    ``admin_listen`` is not loopback and the token variable is empty."""
    token = os.environ.get(cfg.admin_token_env, "")
    if token:
        return token
    if not is_loopback(cfg.admin_listen):
        raise ConfigError(
            f"admin_listen: {cfg.admin_listen} is not a loopback address, so the admin API needs a "
            f"token: set the environment variable {cfg.admin_token_env} (admin_token_env)")
    return None


class AdminServer:
    """The admin API on its own port. ``port`` is the bound port (``admin_listen`` may use port 0)."""

    def __init__(self, config: Callable[[], Config], store: Store, metrics: Metrics,
                 jail: Callable[[], Jail | None] = lambda: None,
                 revocations: RevocationList | None = None) -> None:
        self._config = config
        self._servicer = AdminServicer(store, metrics, config, jail, revocations=revocations)
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.requires_token = False

    def check(self) -> str | None:
        """Validate the token and TLS settings without binding anything (raises ConfigError)."""
        cfg = self._config()
        if cfg.admin_tls is not None:
            server_credentials(cfg.admin_tls)
        return admin_token(cfg)

    async def start(self) -> None:
        cfg = self._config()
        token = self.check()
        interceptors = [_TokenInterceptor(token)] if token else []
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        admin_pb2_grpc.add_AdminServicer_to_server(self._servicer, server)
        tls = cfg.admin_tls
        if tls is None and not is_loopback(cfg.admin_listen):
            log_event(log, logging.WARNING, "admin API off loopback without TLS: its bearer token "
                      "crosses the network in clear text; set admin_tls", listen=cfg.admin_listen)
        try:
            port = (server.add_secure_port(cfg.admin_listen, server_credentials(tls)) if tls is not None
                    else server.add_insecure_port(cfg.admin_listen))
        except RuntimeError as e:  # grpcio raises on a failed bind in recent versions
            raise OSError(f"cannot listen on {cfg.admin_listen}: {e}") from None
        if port == 0:
            raise OSError(f"cannot listen on {cfg.admin_listen}")
        await server.start()
        self._server = server
        self.port = port
        self.requires_token = token is not None
        log_event(log, logging.INFO, "admin API serving", listen=cfg.admin_listen, port=port,
                  token_required=self.requires_token, tls=tls is not None,
                  client_certs=tls is not None and tls.client_ca_file is not None)

    async def stop(self, grace: float = 1.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
