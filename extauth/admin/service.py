"""The admin API's servicer: leases, bans and stats through the request path's Store."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from extauth._generated.extauth.admin.v1 import admin_pb2, admin_pb2_grpc
from extauth.addresses import canonical_ip, client_subject
from extauth.config import MAX_BAN_SECONDS, Config
from extauth.jail import in_networks, parse_networks
from extauth.logs import log_event
from extauth.metrics import Metrics
from extauth.revocation import RevocationList, revocation_seconds
from extauth.store.base import (
    MAX_REVOCATION_VALUE,
    LeaseInfo,
    LeaseRef,
    QuotaOverride,
    Revocation,
    RevocationKind,
    RevocationLimitError,
    Store,
    StoreError,
    check_override,
)

if TYPE_CHECKING:
    from extauth.jail import Jail

_KINDS: tuple[RevocationKind, ...] = ("jti", "sid", "before")

log = logging.getLogger("extauth.admin")

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


def _revocation_args(kind: str, subject: str, value: str) -> tuple[RevocationKind, str, str]:
    """A revocation's kind, subject and value, checked (ValueError says what is wrong)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    for name, text in (("subject", subject), *((("value", value),) if kind != "before" else ())):
        if not text or len(text) > MAX_REVOCATION_VALUE or not text.isprintable():
            raise ValueError(f"{name} must be 1 to {MAX_REVOCATION_VALUE} printable characters")
    if kind == "before" and value:
        raise ValueError("a 'before' revocation takes no value")
    return kind, subject, value


def _revocation_msg(r: Revocation) -> Any:
    return admin_pb2.Revocation(kind=r.kind, subject=r.subject, value=r.value, before=r.before or 0.0,
                                expires_at=r.expires_at)


def _override_msg(policy: str, user: str, o: QuotaOverride) -> Any:
    msg = admin_pb2.QuotaOverride(policy=policy, user=user, expires_at=o.expires_at or 0.0)
    if o.connections_per_user is not None:
        msg.connections_per_user = o.connections_per_user
    if o.attempts_per_user_per_minute is not None:
        msg.attempts_per_user_per_minute = o.attempts_per_user_per_minute
    return msg


def _lease_msg(info: LeaseInfo) -> Any:
    msg = admin_pb2.Lease(lease_id=info.lease_id, policy=info.policy, ip=info.ip, expires_at=info.expires_at)
    if info.user is not None:
        msg.user = info.user
    return msg


class AdminServicer(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    """Each RPC runs in ``_call``: a ValueError is INVALID_ARGUMENT, a store failure UNAVAILABLE."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        config: Callable[[], Config],
        jail: Callable[[], Jail | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        revocations: RevocationList | None = None,
    ) -> None:
        self._store = store
        # The replica's copy, so a revocation made here applies here at once; else the store.
        self._revocations = revocations or RevocationList(store, metrics)
        self._metrics = metrics
        self._config = config
        self._jail = jail
        self._clock = clock

    async def _call(self, context: Any, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await fn()
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except StoreError as e:
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
            overrides = await self._overrides(request.policy, user) if user is not None else []
            return admin_pb2.ListLeasesResponse(leases=[_lease_msg(li) for li in leases],
                                                quota_overrides=overrides)

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

    async def Revoke(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            kind, subject, value = _revocation_args(request.kind, request.subject, request.value)
            now = self._clock()
            before = None
            if kind == "before":
                before = float(request.before) or now
                if not 0 < before <= now + 366 * 86400:
                    raise ValueError("before must be unix seconds, at most a year ahead")
            ttl = revocation_seconds(self._config())
            try:
                expires = await self._revocations.revoke(Revocation(kind, subject, value, before), ttl)
            except RevocationLimitError as e:
                raise _Refused(str(e)) from None
            recorded = expires > self._clock()
            log_event(log, logging.WARNING, "revoke", event="revoke", kind=kind, subject=subject,
                      value=value or None, before=before, expires_at=expires, recorded=recorded)
            return admin_pb2.RevokeResponse(recorded=recorded, revocation=_revocation_msg(
                Revocation(kind, subject, value, before, expires)))

        try:
            return await self._call(context, "revoke", run)
        except _Refused as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

    async def Unrevoke(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            kind, subject, value = _revocation_args(request.kind, request.subject, request.value)
            found = await self._revocations.unrevoke(kind, subject, value)
            log_event(log, logging.INFO, "unrevoke", event="unrevoke", kind=kind, subject=subject,
                      value=value or None, was_revoked=found)
            return admin_pb2.UnrevokeResponse(unrevoked=found)

        return await self._call(context, "unrevoke", run)

    async def ListRevocations(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            listing = await self._store.list_revocations()
            return admin_pb2.ListRevocationsResponse(
                revocations=[_revocation_msg(r) for r in listing.entries])

        return await self._call(context, "list_revocations", run)

    # -- per-user quota overrides (docs/authorization.md#quota-tiers-and-overrides) ------------

    async def _overrides(self, policy: str, user: str) -> list[Any]:
        out = []
        for name in self._policies(policy):
            found = await self._store.get_quota_override(name, user)
            if found is not None:
                out.append(_override_msg(name, user, found))
        return out

    async def SetQuota(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            if not request.policy or not request.user:
                raise ValueError("policy and user are required")
            (policy,) = self._policies(request.policy)
            seconds = float(request.seconds)
            if seconds < 0 or seconds > MAX_BAN_SECONDS:
                raise ValueError(f"seconds must be in [0, {MAX_BAN_SECONDS}] (0: until cleared)")
            override = QuotaOverride(
                int(request.connections_per_user) if request.HasField("connections_per_user") else None,
                int(request.attempts_per_user_per_minute)
                if request.HasField("attempts_per_user_per_minute") else None)
            check_override(override)  # here: the guard would take a ValueError for a store failure
            stored = await self._store.set_quota_override(policy, request.user, override, seconds or None)
            log_event(log, logging.INFO, "quota override set", event="quota_set", policy=policy,
                      user=request.user, connections_per_user=stored.connections_per_user,
                      attempts_per_user_per_minute=stored.attempts_per_user_per_minute,
                      seconds=seconds or None)
            return admin_pb2.QuotaResponse(overrides=[_override_msg(policy, request.user, stored)])

        return await self._call(context, "set_quota", run)

    async def GetQuota(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            if not request.user:
                raise ValueError("user is required")
            return admin_pb2.QuotaResponse(overrides=await self._overrides(request.policy, request.user))

        return await self._call(context, "get_quota", run)

    async def ClearQuota(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            if not request.user:
                raise ValueError("user is required")
            cleared = False
            for name in self._policies(request.policy):
                cleared |= await self._store.clear_quota_override(name, request.user)
            log_event(log, logging.INFO, "quota override cleared", event="quota_clear",
                      policy=request.policy or None, user=request.user, was_set=cleared)
            return admin_pb2.ClearQuotaResponse(cleared=cleared)

        return await self._call(context, "clear_quota", run)

    async def Stats(self, request: Any, context: Any) -> Any:
        resp = admin_pb2.StatsResponse(active_leases=-1, bans=-1)
        errors = []
        try:
            resp.active_leases = await self._store.count_all()
        except StoreError as e:
            errors.append(f"count_all: {e}")
        try:
            resp.bans = len(await self._store.list_bans())
        except StoreError as e:
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


class _Refused(Exception):
    """A request the store cannot take (too many revocations)."""


def _samples(counter: Any) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every child of a labelled prometheus Counter."""
    out = []
    for metric in counter.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                out.append((dict(s.labels), float(s.value)))
    return out
