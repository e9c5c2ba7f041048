"""The gRPC server: ext_authz Check, Envoy's access-log stream, grpc.health.v1 and reflection
on one port, plus its lifecycle (start, hot reload, graceful drain).

Public API (what ``extauth serve`` is a thin shell over)::

    server = ExtAuthServer(load_config(path), config_path=path)
    await server.start()
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from extauth.accesslog import AccessLogService
from extauth.addresses import split_host_port
from extauth.admin.server import AdminServer
from extauth.config import Config, ConfigError, load_config, with_overrides
from extauth.decision import Decision
from extauth.envoy_api import check_input, decision_id_field, response_bytes
from extauth.eventloop import loop_name
from extauth.jail import Jail
from extauth.lease_tag import REFRESH_SECONDS as LEASE_KEY_REFRESH_SECONDS
from extauth.lease_tag import LeaseTagger
from extauth.logs import log_event
from extauth.memo import FastPath
from extauth.metrics import JwksCollector, Metrics
from extauth.pipeline import Authorizer, internal_error, new_decision_id
from extauth.redact import redact_url
from extauth.revocation import RevocationList
from extauth.runtime import Runtime, build_runtime
from extauth.store import open_store
from extauth.store.guard import GuardedStore

log = logging.getLogger("extauth.server")

# In-flight checks finish within their store timeout; this only bounds a stuck one.
_CHECK_GRACE_SECONDS = 2.0

AUTHZ_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
ALS_SERVICE = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name


class AuthorizationService:
    """``Authorization/Check``: translate, decide, encode. It answers serialized bytes (see
    ``add_to_server``), so a repeated plain-HTTP allow (``FastPath``) builds no message."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer
        self._fast = FastPath(authorizer)

    async def Check(self, request: external_auth_pb2.CheckRequest, context: Any) -> bytes:  # gRPC method name
        started = time.perf_counter()
        authorizer, fast = self._authorizer, self._fast
        decision: Decision | None = None
        try:
            req = check_input(request)
            key = fast.key(req)
            if key is not None and (remembered := fast.lookup(key, started)) is not None:
                return remembered + decision_id_field(new_decision_id())
            decision = await authorizer.check(req, started)
            if decision.lease is not None and _past_deadline(context):
                authorizer.metrics.leases_past_deadline.inc()
                authorizer.take_back(decision.lease)
            payload = response_bytes(decision, with_id=False)
            fast.remember(key, decision, payload)
            return payload + decision_id_field(decision.decision_id)
        except Exception:
            # check() itself never raises; this guards the translation and the encoding.
            log.exception("check translation failed")
            if decision is not None:
                authorizer.take_back(decision.lease)  # its allow never reaches Envoy
            decision = internal_error()
        return response_bytes(decision)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register Check as the generated code would, but with a pass-through serializer:
        Check returns bytes. Registered methods are matched in gRPC's core, without the
        per-call walk over generic handlers."""
        handlers = {"Check": grpc.unary_unary_rpc_method_handler(
            self.Check, request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=bytes)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTHZ_SERVICE, handlers),))
        server.add_registered_method_handlers(AUTHZ_SERVICE, handlers)


def _past_deadline(context: Any) -> bool:
    """Whether Envoy's deadline (grpc-timeout) has passed, so the answer reaches no one.
    A loop stalled past it lets a check finish uncancelled (``cancelled()`` stays False);
    Envoy then never applies the allow nor logs its lease, which must be given back now."""
    remaining = context.time_remaining() if context is not None else None
    return remaining is not None and remaining <= 0


def guard_settings(cfg: Config) -> dict[str, Any]:
    """The guard's bounds from the config (``GuardedStore.configure``)."""
    return {"timeout": cfg.store_timeout_ms / 1000,
            "failure_threshold": cfg.store_breaker.failure_threshold,
            "reset_seconds": cfg.store_breaker.reset_seconds}


def build_store(cfg: Config, metrics: Metrics | None = None) -> GuardedStore:
    """The configured store behind a per-call timeout and a circuit breaker."""
    return GuardedStore(open_store(cfg.store), metrics=metrics, **guard_settings(cfg))


class ExtAuthServer:
    def __init__(self, config: Config, *, config_path: str | Path | None = None,
                 metrics: Metrics | None = None, store: GuardedStore | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
        # ``overrides`` (from command-line flags) are applied to every reloaded file too.
        self.overrides = dict(overrides or {})
        self.config = with_overrides(config, self.overrides)
        config = self.config
        self.config_path = Path(config_path) if config_path else None
        self.metrics = metrics or Metrics()
        self.store = store or build_store(config, self.metrics)
        self.jail: Jail | None = (
            Jail(config.abuse, self.store, self.metrics) if config.abuse.enabled else None)
        # One lease tagger for the checks that issue leases and the access log that takes them back.
        tagger = self.tagger = LeaseTagger()
        self.revocations = RevocationList(self.store, self.metrics)
        self.authorizer = Authorizer(build_runtime(config), self.store, metrics=self.metrics, jail=self.jail,
                                     tagger=tagger, revocations=self.revocations)
        # A remembered plain-HTTP allow may be a revoked token's: every change forgets them all.
        self.revocations.on_change(lambda: self.authorizer.runtime.memo.clear())
        self.admin = AdminServer(lambda: self.config, self.store, self.metrics, lambda: self.jail,
                                 revocations=self.revocations)
        self.health = HealthServicer()
        self.accesslog = AccessLogService(
            lambda: self.store, lambda: self.authorizer.runtime.config.lease_ttl_seconds, self.metrics,
            tagger)
        self._server: grpc.aio.Server | None = None
        self.port: int = 0
        self.metrics_port: int = 0
        self._metrics_http: Any = None
        self._sampler: asyncio.Task[None] | None = None
        self._lease_keys: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self.metrics.registry.register(JwksCollector(self._verifiers_by_policy))

    def _verifiers_by_policy(self) -> dict[str, Any]:
        return {p.name: p.verifier for p in self.authorizer.runtime.policies if p.verifier is not None}

    @property
    def admin_port(self) -> int:
        """The admin API's bound port (0 when it is not serving)."""
        return self.admin.port

    async def start(self) -> None:
        self.admin.check()  # a non-loopback admin_listen without a token: refuse before binding anything
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        AuthorizationService(self.authorizer).add_to_server(server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.accesslog, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (AUTHZ_SERVICE, ALS_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await server.start()
        self._server = server
        if self.jail is not None:
            await self.jail.start()
        await self.revocations.start()
        try:
            await self.admin.start()
        except OSError as e:
            # The admin API is not on the request path: keep serving checks without it.
            log_event(log, logging.ERROR, "admin API not serving", listen=self.config.admin_listen,
                      error=str(e))
        await self._warm(self.authorizer.runtime)
        self._start_metrics()
        self._lease_keys = asyncio.create_task(self._check_lease_key())
        # SERVING only once config is loaded and the port is open.
        for name in ("", AUTHZ_SERVICE, ALS_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log_event(log, logging.INFO, "serving", listen=self.config.listen, port=self.port,
                  event_loop=loop_name(asyncio.get_running_loop()),
                  policies=[p.name for p in self.config.policies], store=redact_url(self.config.store))

    def _start_metrics(self) -> None:
        if not self.config.metrics_listen:
            return
        host, port = split_host_port(self.config.metrics_listen)
        httpd, _thread = start_http_server(port, addr=host, registry=self.metrics.registry)
        self._metrics_http = httpd
        self.metrics_port = httpd.server_address[1]
        self._sampler = asyncio.create_task(self._sample_store())

    async def _check_lease_key(self) -> None:
        """Keep this replica's lease-tag key in the store (extauth/lease_tag.py: a store that
        lost its data gets it back, or the replicas converge on the one that won). Until the
        key is loaded (the store was down or slow at start) it is loaded here, as soon as the
        store answers, rather than only when a check needs it and fails without it."""
        while True:
            if self.tagger.ready:
                await asyncio.sleep(LEASE_KEY_REFRESH_SECONDS)
            try:
                if self.tagger.ready:
                    await self.tagger.refresh(self.store)
                else:
                    # The attempt the checks share: waited for to its own end, off the request path.
                    await self.tagger.load(self.store, retry=self.store.reset_seconds)
            except Exception as e:  # the store's own metrics tell an outage; try again later
                log_event(log, logging.DEBUG, "lease key check failed", error=type(e).__name__)
                if not self.tagger.ready:
                    # Once the failure the tagger remembers has passed; never a busy loop.
                    await asyncio.sleep(max(self.tagger.retry_in, 0.05))

    async def _sample_store(self) -> None:
        """Active leases come from the store (shared by all replicas), not a per-process guess."""
        while True:
            interval = self.authorizer.runtime.config.metrics_sample_seconds
            try:
                self.metrics.active_leases.set(await self.store.count_all())
            except Exception as e:  # the breaker and store metrics already tell the story
                log_event(log, logging.DEBUG, "lease sampling failed", error=type(e).__name__)
            await asyncio.sleep(interval)

    @staticmethod
    async def _warm(runtime: Runtime) -> None:
        """Load URL key sets before the runtime serves (never raises)."""
        for verifier in runtime.verifiers.values():
            await verifier.start()

    async def reload(self) -> bool:
        """Re-read the config file and swap it in whole; on any error keep the old one."""
        if self.config_path is None:
            return False
        async with self._reload_lock:
            try:
                cfg = await asyncio.to_thread(load_config, self.config_path)
                cfg = with_overrides(cfg, self.overrides)
                self._check_reloadable(cfg)
                runtime = build_runtime(cfg, self.authorizer.runtime)
            except (ConfigError, ValueError) as e:
                self.metrics.reloads.labels("error").inc()
                log_event(log, logging.ERROR, "reload refused; keeping the current config", error=str(e))
                return False
            except Exception as e:
                # Anything else a broken file can raise (RecursionError on deep YAML, say)
                # is refused the same way: the watcher and SIGHUP must outlive any file.
                self.metrics.reloads.labels("error").inc()
                log_event(log, logging.ERROR, "reload refused; keeping the current config",
                          error=type(e).__name__)
                return False
            await self._warm(runtime)
            old: Runtime = self.authorizer.swap(runtime)
            if cfg.log_level != self.config.log_level:
                logging.getLogger().setLevel(cfg.log_level.upper())
            self.config = cfg
            self.store.configure(**guard_settings(cfg))  # store_timeout_ms and store_breaker apply live
            await self._reload_jail(cfg)
            await old.close_unused(runtime)
            self.metrics.reloads.labels("ok").inc()
            log_event(log, logging.INFO, "config reloaded", policies=[p.name for p in cfg.policies])
            return True

    async def _reload_jail(self, cfg: Config) -> None:
        if self.jail is not None:
            self.jail.configure(cfg.abuse)
        elif cfg.abuse.enabled:
            self.jail = Jail(cfg.abuse, self.store, self.metrics)
            await self.jail.start()
            self.authorizer.jail = self.jail

    def _check_reloadable(self, cfg: Config) -> None:
        # Sockets and the store connection are not swapped live: say so instead
        # of silently ignoring the change.
        for key in ("listen", "store", "admin_listen", "admin_tls", "admin_token_env", "metrics_listen",
                    "watch_config", "event_loop"):
            if getattr(cfg, key) != getattr(self.config, key):
                raise ValueError(f"{key}: changing it needs a restart")

    async def stop(self, drain: float | None = None) -> None:
        """Graceful drain: NOT_SERVING first so Envoy's health checks move away, keep
        answering checks for ``drain`` seconds, then finish in-flight calls and stop."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        wait = self.config.drain_seconds if drain is None else drain
        if wait > 0:
            log_event(log, logging.INFO, "draining", seconds=wait)
            await asyncio.sleep(wait)
        await self.admin.stop()
        # Envoy's access-log streams never end on their own and would hold the
        # grace period open; they are lossy by design (leases expire), and Envoy
        # reconnects them to another replica. Checks in flight get the grace.
        self.accesslog.close_streams()
        await self._server.stop(grace=_CHECK_GRACE_SECONDS)
        self._server = None
        if self.jail is not None:
            await self.jail.stop()
        await self.revocations.stop()
        for task in (self._sampler, self._lease_keys):
            if task is not None:
                task.cancel()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        await self.authorizer.runtime.close_unused(None)
        await self.store.close()
        log_event(log, logging.INFO, "stopped")

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: Config, *, config_path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> None:
    """Run until SIGTERM/SIGINT (drain, then exit); SIGHUP reloads the config file."""
    server = ExtAuthServer(config, config_path=config_path, overrides=overrides)
    await server.start()
    # Everything built so far (modules, config, verifiers, pools) lives as long as the process.
    # Frozen, the cyclic GC stops walking it: a full collection would otherwise pause checks
    # for tens of milliseconds to find nothing.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload()))
    watcher = asyncio.create_task(_watch(server)) if config.watch_config and config_path else None
    await stopping.wait()
    if watcher:
        watcher.cancel()
    await server.stop()


async def _watch(server: ExtAuthServer, interval: float = 1.0) -> None:
    """Reload when the config file's mtime changes (cheap stat, once a second)."""
    assert server.config_path is not None
    path = server.config_path

    def mtime() -> float | None:
        try:
            return path.stat().st_mtime
        except OSError:
            return None

    last = mtime()
    while True:
        await asyncio.sleep(interval)
        current = mtime()
        if current is not None and current != last:
            last = current
            await server.reload()
