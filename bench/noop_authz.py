"""The framework floor: an ext_authz servicer that answers OK at once, on the same stack as the
product (grpc.aio server with the product's options on the product's default event loop,
grpc.health.v1 so Envoy's gRPC health checks pass). No translation, no policy, no store call:
whatever the product costs above this is extauth's own work.

    .venv/bin/python bench/noop_authz.py --listen 127.0.0.1:PORT

SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from extauth import eventloop

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                      ok_response=external_auth_pb2.OkHttpResponse())


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: Any) -> Any:  # gRPC method name
        return _OK


async def main(listen: str) -> None:
    # The product's server options (extauth/server.py).
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    eventloop.run(main(ap.parse_args().listen), "auto")
