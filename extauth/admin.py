"""The admin gRPC API (``extauth.admin.v1.Admin``): its servicer, its server and a client.

The API listens on its own address, ``admin_listen`` (default ``127.0.0.1:9002``),
never on the ext_authz port. Authentication is a bearer token in the
``authorization`` metadata, compared in constant time with the value of the
environment variable named by ``admin_token_env`` (default ``EXTAUTH_ADMIN_TOKEN``):

* ``admin_listen`` not a loopback address: the token is **required**; the
  server refuses to start when the variable is empty.
* ``admin_listen`` on loopback: the token is checked when the variable is set,
  and not needed when it is unset (anything that can reach loopback already
  runs on the host).

Every call works with every store (``memory://`` included): leases, bans and
the ban/unban path go through the same Store as the request path, so a ban made
here reaches every replica (the jails refresh their ban lists every second; this
replica's jail is updated at once).

``AdminClient`` is the synchronous client the ``extauth admin`` CLI is a thin
shell over; the ``render_*`` helpers print its answers as tables or JSON.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from extauth._generated.extauth.admin.v1 import admin_pb2, admin_pb2_grpc
from extauth.addresses import canonical_ip, client_subject, is_loopback_host
from extauth.config import MAX_BAN_SECONDS, AdminTls, Config, ConfigError
from extauth.jail import in_networks, parse_networks
from extauth.logs import log_event
from extauth.metrics import Metrics
from extauth.store.base import LeaseInfo, LeaseRef, Store, StoreError

if TYPE_CHECKING:
    from extauth.jail import Jail

log = logging.getLogger("extauth.admin")

ADMIN_SERVICE = "extauth.admin.v1.Admin"
DEFAULT_ADMIN = "127.0.0.1:9002"
DEFAULT_TOKEN_ENV = "EXTAUTH_ADMIN_TOKEN"  # noqa: S105 (a variable name, not a secret)

_STORE_FAILURES = (StoreError, TimeoutError, OSError)


class AdminError(Exception):
    """An admin call that failed; the message is fit for a terminal (no traceback)."""


# -- helpers -------------------------------------------------------------------


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(listen: str) -> bool:
    """True when a HOST:PORT binds loopback only (127.0.0.0/8, ::1 or localhost)."""
    host, _ = split_hostport(listen)
    return is_loopback_host(host)


def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``2h``, ``1d``, ``1h30m`` or plain seconds (``90``) -> seconds."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        value = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise ValueError(f"bad duration {text!r}: use e.g. 30s, 15m, 2h, 1d")
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        value = sum(float(n) * scale[u] for n, u in parts)
    if value <= 0:
        raise ValueError(f"bad duration {text!r}: must be positive")
    return value


def normalize_ip(ip: str, ipv6_prefix: int) -> str:
    """An address as the request path keys per-IP quotas and bans (``extauth.addresses``):
    canonical, and an IPv6 address as its /``ipv6_prefix`` network. That network itself is
    accepted too (``2001:db8:1:2::/64``, as ``bans`` lists it); anything else is ValueError."""
    address, slash, length = ip.strip().partition("/")
    canonical = canonical_ip(address)
    if canonical is None:
        raise ValueError(f"not an IP address: {ip!r}")
    subject = client_subject(canonical, ipv6_prefix)
    if slash and (subject == canonical or length != subject.rpartition("/")[2]):
        raise ValueError(f"{ip!r}: give an address, or its /{ipv6_prefix} network for IPv6")
    return subject


def _lease_msg(info: LeaseInfo) -> Any:
    msg = admin_pb2.Lease(lease_id=info.lease_id, policy=info.policy, ip=info.ip, expires_at=info.expires_at)
    if info.user is not None:
        msg.user = info.user
    return msg


# -- server ----------------------------------------------------------------------


class AdminServicer(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        config: Callable[[], Config],
        jail: Callable[[], Jail | None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._config = config
        self._jail = jail
        self._clock = clock

    async def _call(self, context: Any, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await fn()
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except _STORE_FAILURES as e:
            log_event(log, logging.WARNING, "admin call failed: store unavailable", op=op,
                      error=type(e).__name__)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store unavailable: {e}")
        raise AssertionError("unreachable")  # context.abort always raises

    def _policies(self, policy: str) -> list[str]:
        names = [p.name for p in self._config().policies]
        if policy:
            if policy not in names:
                raise ValueError(f"unknown policy {policy!r} (configured: {', '.join(names)})")
            return [policy]
        return names

    async def _leases(self, policy: str, user: str | None, ip: str | None) -> list[LeaseInfo]:
        if (user is None) == (ip is None):
            raise ValueError("give exactly one of user or ip")
        if ip is not None:
            ip = normalize_ip(ip, self._config().ipv6_prefix_length)
        out: list[LeaseInfo] = []
        for name in self._policies(policy):
            out.extend(await self._store.list_leases(name, user=user, ip=ip))
        return sorted(out, key=lambda li: (li.expires_at, li.lease_id))

    async def ListLeases(self, request: Any, context: Any) -> Any:
        subject = request.WhichOneof("subject")
        user = request.user if subject == "user" else None
        ip = request.ip if subject == "ip" else None

        async def run() -> Any:
            leases = await self._leases(request.policy, user, ip)
            return admin_pb2.ListLeasesResponse(leases=[_lease_msg(li) for li in leases])

        return await self._call(context, "list_leases", run)

    async def ReleaseLease(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            if not request.lease_id:
                raise ValueError("lease_id is required")
            user = request.user or None
            ip = request.ip or None
            if user is None and ip is None:
                raise ValueError("give the lease's user or ip: leases are found by listing a subject")
            # Search by one subject (IP first: every lease has one), then check the other matches.
            candidates = await self._leases(request.policy, None if ip else user, ip)
            found = next((li for li in candidates if li.lease_id == request.lease_id), None)
            if found is None or (user is not None and found.user != user):
                return None
            released = await self._store.release([LeaseRef(found.lease_id, found.policy, found.user,
                                                           found.ip)])
            log_event(log, logging.INFO, "lease released by admin", event="admin_release",
                      lease_id=found.lease_id, policy=found.policy, user=found.user, ip=found.ip)
            return admin_pb2.ReleaseLeaseResponse(released=released > 0, lease=_lease_msg(found))

        resp = await self._call(context, "release", run)
        if resp is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live lease {request.lease_id!r} there")
        return resp

    async def ListBans(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            bans = await self._store.list_bans()
            return admin_pb2.ListBansResponse(bans=[
                admin_pb2.BanEntry(ip=b.ip, expires_at=b.expires_at, reason=b.reason) for b in bans])

        return await self._call(context, "list_bans", run)

    async def Ban(self, request: Any, context: Any) -> Any:
        cfg = self._config()

        async def run() -> Any:
            ip = normalize_ip(request.ip, cfg.ipv6_prefix_length)
            seconds = float(request.seconds)
            if not 0 < seconds <= MAX_BAN_SECONDS:
                raise ValueError(f"seconds must be in (0, {MAX_BAN_SECONDS}]")
            if in_networks(ip, parse_networks(cfg.abuse.never_ban)):
                return None
            reason = (request.reason or "manual")[:200]
            await self._store.ban(ip, seconds, reason)
            expires = self._clock() + seconds
            jail = self._jail()
            if jail is not None:
                jail.note_ban(ip, expires)
            self._metrics.bans.labels("manual").inc()
            log_event(log, logging.WARNING, "ban", event="ban", ip=ip, ban_seconds=seconds, reason=reason,
                      manual=True, dry_run=False)
            return admin_pb2.BanResponse(ban=admin_pb2.BanEntry(ip=ip, expires_at=expires, reason=reason))

        if not cfg.abuse.enabled:
            # Nothing would enforce it: say so rather than answer OK for a ban that is ignored.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "abuse.enabled is false: bans are neither made nor enforced")
        resp = await self._call(context, "ban", run)
        if resp is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{request.ip} is in abuse.never_ban and is never banned")
        return resp

    async def Unban(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            ip = normalize_ip(request.ip, self._config().ipv6_prefix_length)
            unbanned = await self._store.unban(ip)
            jail = self._jail()
            if jail is not None:
                jail.forget_ban(ip)
            log_event(log, logging.INFO, "unban", event="unban", ip=ip, was_banned=unbanned)
            return admin_pb2.UnbanResponse(unbanned=unbanned)

        return await self._call(context, "unban", run)

    async def Stats(self, request: Any, context: Any) -> Any:
        resp = admin_pb2.StatsResponse(active_leases=-1, bans=-1)
        errors = []
        try:
            resp.active_leases = await self._store.count_all()
        except _STORE_FAILURES as e:
            errors.append(f"count_all: {e}")
        try:
            resp.bans = len(await self._store.list_bans())
        except _STORE_FAILURES as e:
            errors.append(f"list_bans: {e}")
        resp.store_error = "; ".join(errors)
        for labels, value in _samples(self._metrics.decisions):
            resp.decisions.add(policy=labels.get("policy", ""), result=labels.get("result", ""),
                               reason=labels.get("reason", ""), count=int(value))
        for labels, value in _samples(self._metrics.hostile):
            resp.hostile_signals[labels.get("reason", "")] = int(value)
        for labels, value in _samples(self._metrics.bans):
            resp.bans_issued[labels.get("kind", "")] = int(value)
        return resp


def _samples(counter: Any) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every child of a labelled prometheus Counter."""
    out = []
    for metric in counter.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                out.append((dict(s.labels), float(s.value)))
    return out


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


def _read_pem(path: str, error: type[Exception], context: str = "") -> bytes:
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
        return _read_pem(path, ConfigError, f"admin_tls.{what}: ")

    cert, key = read(tls.cert_file, "cert_file"), read(tls.key_file, "key_file")
    ca = read(tls.client_ca_file, "client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


class AdminServer:
    """The admin API on its own port. ``port`` is the bound port (``admin_listen`` may use port 0)."""

    def __init__(self, config: Callable[[], Config], store: Store, metrics: Metrics,
                 jail: Callable[[], Jail | None] = lambda: None) -> None:
        self._config = config
        self._servicer = AdminServicer(store, metrics, config, jail)
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


# -- client ------------------------------------------------------------------------


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
            return _read_pem(path, ValueError) if path else None

        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both --tls-cert and --tls-key, or neither")
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


class AdminClient:
    """Synchronous client for the admin API. Every method raises AdminError on failure."""

    def __init__(self, address: str, token: str | None = None, *, timeout: float = 5.0,
                 tls: ClientTls | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = (grpc.secure_channel(address, tls.credentials(), options=tls.options())
                         if tls is not None else grpc.insecure_channel(address))
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code()
            details = e.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and "store" not in details:
                raise AdminError(f"cannot reach the admin API at {self.address}: {details}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise AdminError(f"the admin API at {self.address} did not answer within "
                                 f"{self.timeout:g}s") from None
            raise AdminError(f"{code.name.lower()}: {details}") from None

    def list_leases(self, *, user: str | None = None, ip: str | None = None, policy: str = "") -> list[Any]:
        req = admin_pb2.ListLeasesRequest(policy=policy)
        if user is not None:
            req.user = user
        if ip is not None:
            req.ip = ip
        return list(self._call("ListLeases", req).leases)

    def release(self, lease_id: str, *, user: str | None = None, ip: str | None = None,
                policy: str = "") -> Any:
        return self._call("ReleaseLease", admin_pb2.ReleaseLeaseRequest(
            lease_id=lease_id, policy=policy, user=user or "", ip=ip or ""))

    def list_bans(self) -> list[Any]:
        return list(self._call("ListBans", admin_pb2.ListBansRequest()).bans)

    def ban(self, ip: str, seconds: float, reason: str = "") -> Any:
        return self._call("Ban", admin_pb2.BanRequest(ip=ip, seconds=seconds, reason=reason)).ban

    def unban(self, ip: str) -> bool:
        return bool(self._call("Unban", admin_pb2.UnbanRequest(ip=ip)).unbanned)

    def stats(self) -> Any:
        return self._call("Stats", admin_pb2.StatsRequest())


# -- rendering (CLI) -------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; numbers right-aligned."""
    text_rows = [[str(c) for c in row] for row in rows]
    numeric = [all(_is_num(r[i]) for r in text_rows) and bool(text_rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in text_rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in text_rows)])


def _is_num(s: str) -> bool:
    return bool(re.fullmatch(r"-?\d+(\.\d+)?", s))


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _left(ts: float, now: float) -> str:
    secs = max(0, int(ts - now + 0.5))
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{d}d"] if d else []
    if h or (d and (m or s)):
        parts.append(f"{h}h")
    if m and not d:
        parts.append(f"{m}m")
    if not d and not h:
        parts.append(f"{s}s")
    return "".join(parts)


def lease_dict(msg: Any) -> dict[str, Any]:
    return {"lease_id": msg.lease_id, "policy": msg.policy,
            "user": msg.user if msg.HasField("user") else None, "ip": msg.ip, "expires_at": msg.expires_at}


def ban_dict(msg: Any) -> dict[str, Any]:
    return {"ip": msg.ip, "expires_at": msg.expires_at, "reason": msg.reason}


def stats_dict(msg: Any) -> dict[str, Any]:
    return {
        "active_leases": msg.active_leases,
        "bans": msg.bans,
        "decisions": [{"policy": d.policy, "result": d.result, "reason": d.reason, "count": d.count}
                      for d in msg.decisions],
        "hostile_signals": dict(sorted(msg.hostile_signals.items())),
        "bans_issued": dict(sorted(msg.bans_issued.items())),
        "store_error": msg.store_error or None,
    }


def render_leases(leases: Sequence[Any], *, as_json: bool, now: float | None = None) -> str:
    if as_json:
        return json.dumps([lease_dict(m) for m in leases], indent=2)
    if not leases:
        return "no live leases"
    now = time.time() if now is None else now
    rows = [(m.lease_id, m.policy, m.user if m.HasField("user") else "-", m.ip, _when(m.expires_at),
             _left(m.expires_at, now)) for m in leases]
    return format_table(("LEASE", "POLICY", "USER", "IP", "EXPIRES", "IN"), rows)


def render_bans(bans: Sequence[Any], *, as_json: bool, now: float | None = None) -> str:
    if as_json:
        return json.dumps([ban_dict(b) for b in bans], indent=2)
    if not bans:
        return "no active bans"
    now = time.time() if now is None else now
    rows = [(b.ip, b.reason, _when(b.expires_at), _left(b.expires_at, now)) for b in bans]
    return format_table(("IP", "REASON", "EXPIRES", "IN"), rows)


def render_stats(stats: Any, *, as_json: bool) -> str:
    if as_json:
        return json.dumps(stats_dict(stats), indent=2)
    d = stats_dict(stats)
    lines = [
        f"active leases   {d['active_leases'] if d['active_leases'] >= 0 else 'unknown'}",
        f"active bans     {d['bans'] if d['bans'] >= 0 else 'unknown'}",
    ]
    if d["store_error"]:
        lines.append(f"store error     {d['store_error']}")
    if d["hostile_signals"]:
        lines.append("hostile signals " + ", ".join(f"{k}={v}" for k, v in d["hostile_signals"].items()))
    if d["bans_issued"]:
        lines.append("bans issued     " + ", ".join(f"{k}={v}" for k, v in d["bans_issued"].items()))
    lines.append("")
    decisions = sorted(d["decisions"], key=lambda x: (x["policy"], x["result"], x["reason"]))
    if decisions:
        lines.append(format_table(("POLICY", "RESULT", "REASON", "COUNT"),
                                  [(x["policy"] or "-", x["result"], x["reason"] or "-", x["count"])
                                   for x in decisions]))
    else:
        lines.append("no decisions yet")
    return "\n".join(lines)


# -- CLI (``extauth admin ...``) --------------------------------------------------------


def add_admin_parser(sub: Any) -> None:
    """Add the ``admin`` command group to the ``extauth`` subparsers."""
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin", metavar="ADDR",
        help=f"admin API address (default: admin_listen from -c CONFIG, else {DEFAULT_ADMIN})")
    common.add_argument("-c", "--config", help="read admin_listen and admin_token_env from this config")
    common.add_argument("--token-env", metavar="NAME",
                        help=f"environment variable holding the admin token (default: admin_token_env "
                             f"from -c CONFIG, else {DEFAULT_TOKEN_ENV})")
    common.add_argument("--tls", action="store_true",
                        help="speak TLS (implied by --tls-ca, and by admin_tls in -c CONFIG)")
    common.add_argument("--tls-ca", metavar="PEM", help="CA to trust for the server (default: the system's)")
    common.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
    common.add_argument("--tls-key", metavar="PEM", help="client key, for mutual TLS")
    common.add_argument("--tls-server-name", metavar="NAME",
                        help="the name the server's certificate must carry (default: the address's host)")
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    common.add_argument("--timeout", type=float, default=5.0, metavar="S", help="per-call deadline")
    # The same options after the subcommand; SUPPRESS keeps them from clobbering earlier ones.
    late = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in common._actions:
        kwargs: dict[str, Any] = {"help": argparse.SUPPRESS, "dest": action.dest}
        if action.nargs == 0:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = action.metavar
            if action.type is not None:
                kwargs["type"] = action.type
        late.add_argument(*action.option_strings, **kwargs)

    p = sub.add_parser("admin", parents=[common], help="query and manage a running extauth (admin API)")
    cmds = p.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")

    c = cmds.add_parser("connections", parents=[late], help="live leases of a user or an IP")
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--ip")
    c.add_argument("--policy", default="", help="one policy (default: every policy)")

    c = cmds.add_parser("release", parents=[late], help="release one lease (frees its slot)")
    c.add_argument("lease_id", metavar="LEASE")
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="the lease's user (as listed by `connections`)")
    who.add_argument("--ip", help="the lease's client IP (as listed by `connections`)")
    c.add_argument("--policy", default="", help="the lease's policy (default: search every policy)")

    cmds.add_parser("bans", parents=[late], help="active bans")

    c = cmds.add_parser("ban", parents=[late], help="ban an IP on every replica")
    c.add_argument("ip", metavar="IP")
    c.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                   help="how long: 30s, 15m, 2h, 1d")
    c.add_argument("--reason", default="manual")

    c = cmds.add_parser("unban", parents=[late], help="lift a ban")
    c.add_argument("ip", metavar="IP")

    cmds.add_parser("stats", parents=[late], help="active leases, bans and decisions by reason")
    p.set_defaults(func=run_admin)


def _client_settings(args: Any) -> tuple[str, str | None, ClientTls | None]:
    address = args.admin
    token_env = args.token_env
    config_tls = False
    if args.config:
        from extauth.config import load_config

        cfg = load_config(args.config)  # ConfigError: the CLI prints it
        address = address or cfg.admin_listen
        token_env = token_env or cfg.admin_token_env
        config_tls = cfg.admin_tls is not None
    address = address or DEFAULT_ADMIN
    host, port = split_hostport(address)
    if host in ("0.0.0.0", "::", ""):  # a wildcard bind: talk to it over loopback
        address = f"127.0.0.1:{port}" if host != "::" else f"[::1]:{port}"
    token = os.environ.get(token_env or DEFAULT_TOKEN_ENV) or None
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name or config_tls:
        tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return address, token, tls


def run_admin(args: Any) -> int:
    """Run one ``extauth admin`` command. Errors print one line on stderr and return 1."""
    import sys

    try:
        address, token, tls = _client_settings(args)
        with AdminClient(address, token, timeout=args.timeout, tls=tls) as client:
            out = _run(client, args)
    except (AdminError, ValueError) as e:
        print(f"extauth admin: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _run(client: AdminClient, args: Any) -> str:
    cmd = args.admin_command
    as_json = bool(args.json)
    if cmd == "connections":
        return render_leases(client.list_leases(user=args.user, ip=args.ip, policy=args.policy),
                             as_json=as_json)
    if cmd == "release":
        resp = client.release(args.lease_id, user=args.user, ip=args.ip, policy=args.policy)
        if as_json:
            return json.dumps({"released": resp.released, "lease": lease_dict(resp.lease)}, indent=2)
        return f"released {resp.lease.lease_id} ({resp.lease.policy}, {resp.lease.ip})"
    if cmd == "bans":
        return render_bans(client.list_bans(), as_json=as_json)
    if cmd == "ban":
        ban = client.ban(args.ip, parse_duration(args.duration), args.reason)
        if as_json:
            return json.dumps(ban_dict(ban), indent=2)
        return f"banned {ban.ip} until {_when(ban.expires_at)} ({_left(ban.expires_at, time.time())})"
    if cmd == "unban":
        unbanned = client.unban(args.ip)
        if as_json:
            return json.dumps({"ip": args.ip, "unbanned": unbanned})
        return f"unbanned {args.ip}" if unbanned else f"{args.ip} was not banned"
    if cmd == "stats":
        return render_stats(client.stats(), as_json=as_json)
    raise ValueError(f"unknown admin command {cmd!r}")
