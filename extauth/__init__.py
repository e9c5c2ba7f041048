"""extauth: an Envoy ext_authz service that guards WebSocket upgrades.

Public API::

    from extauth import load_config, ExtAuthServer, serve
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "ExtAuthServer", "load_config", "serve"]

if TYPE_CHECKING:
    from extauth.config import Config, ConfigError, load_config
    from extauth.server import ExtAuthServer, serve


def __getattr__(name: str) -> Any:
    # Lazy: `extauth check-config` should not pay for importing grpc.
    if name in ("Config", "ConfigError", "load_config"):
        from extauth import config

        return getattr(config, name)
    if name in ("ExtAuthServer", "serve"):
        from extauth import server

        return getattr(server, name)
    raise AttributeError(name)
