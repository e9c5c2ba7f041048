"""Envoy's gRPC access-log service: how leases learn that a WebSocket is alive or gone.

ext_authz sees only the upgrade, never the close. With the HCM's
``access_log_options`` (``flush_log_on_tunnel_successfully_established`` and a
periodic ``access_log_flush_interval``) Envoy streams an entry when the tunnel
is up, one per interval while it lives, and one at the end, each carrying the
ext_authz dynamic metadata we returned, so the lease id comes back to us:

- DownstreamTunnelSuccessfullyEstablished: confirm (refresh) the lease
- DownstreamPeriodic: refresh it; a lease the store lost (Redis restarted without
  persistence, refreshes cut off for a TTL) is put back, since the connection is open
- DownstreamEnd: release it, whatever the response code (an upgrade that failed
  upstream after we allowed it must free its slot too)

The stream is lossy by design and Envoy can die: leases expire on their own, so
a lost entry costs at most one TTL of a slot, never a leak.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from extauth.aio import retrieve
from extauth.envoy_api import METADATA_NAMESPACE
from extauth.lease_tag import METADATA_FIELD as LEASE_TAG_FIELD
from extauth.lease_tag import LeaseTagger
from extauth.logs import log_event
from extauth.metrics import Metrics
from extauth.store.base import LeaseLog, LeaseRef

log = logging.getLogger("extauth.accesslog")

_T = accesslog_pb2.AccessLogType
_REFRESH = {_T.DownstreamTunnelSuccessfullyEstablished, _T.DownstreamPeriodic}
_RELEASE = {_T.DownstreamEnd}
# Entries per (type name, outcome) in one batch, for extauth_accesslog_entries_total.
Counts = collections.Counter[tuple[str, str]]

_TYPE_NAMES = {
    _T.DownstreamTunnelSuccessfullyEstablished: "tunnel_established",
    _T.DownstreamPeriodic: "periodic",
    _T.DownstreamEnd: "end",
}


def _lease_in(common: accesslog_pb2.AccessLogCommon) -> tuple[LeaseRef, str | None] | None:
    """Our lease and its tag from an entry's ext_authz metadata; None for entries not ours."""
    fm = common.metadata.filter_metadata
    if METADATA_NAMESPACE not in fm:
        return None
    fields = fm[METADATA_NAMESPACE].fields
    lease = fields.get("lease_id")
    policy = fields.get("policy")
    ip = fields.get("client_ip")
    if lease is None or policy is None or ip is None:
        return None
    user = fields.get("user")
    tag = fields.get(LEASE_TAG_FIELD)
    ref = LeaseRef(
        lease_id=lease.string_value,
        policy=policy.string_value,
        user=user.string_value if user is not None else None,
        ip=ip.string_value,
    )
    return ref, tag.string_value if tag is not None else None


def _action(kind: int, common: accesslog_pb2.AccessLogCommon) -> str | None:
    """"refresh", "release" or None (an entry type we do not act on)."""
    if kind in _REFRESH:
        return "refresh"
    if kind in _RELEASE:
        return "release"
    if kind == _T.NotSet:
        # Older Envoys leave the type unset: an intermediate entry means alive.
        return "refresh" if common.intermediate_log_entry else "release"
    return None


def _at_bound(entry: accesslog_pb2.HTTPAccessLogEntry, common: accesslog_pb2.AccessLogCommon) -> bool:
    """Whether Envoy ended the stream at its session bound (the route's max_stream_duration,
    which the allow's grpc-timeout sets): details ``max_duration_timeout`` (Envoy 1.40 sets no
    response flag for it on an upgraded stream), or the flags DT or UMSDR."""
    flags = common.response_flags
    return bool(entry.response.response_code_details == "max_duration_timeout"
                or flags.duration_timeout or flags.upstream_max_stream_duration_reached)


_Ours = tuple[str, str, LeaseRef, str | None, bool]


def _leases_in(entries: Any, counts: Counts) -> list[_Ours]:
    """(type name, action, lease, tag, ended at its session bound) of each entry that names
    one of our leases; the others are counted as ignored. Each entry's common properties are
    read once: every field access on a upb message builds a wrapper, and this runs for every
    entry."""
    ours: list[_Ours] = []
    for entry in entries:
        common = entry.common_properties
        code = common.access_log_type
        kind = _TYPE_NAMES.get(code, "other")
        found = _lease_in(common)
        action = _action(code, common) if found is not None else None
        if found is None or action is None:
            counts[kind, "ignored"] += 1
            continue
        ours.append((kind, action, *found, action == "release" and _at_bound(entry, common)))
    return ours


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, store_of: Callable[[], LeaseLog | None], ttl_of: Callable[[], float],
                 metrics: Metrics, tagger: LeaseTagger | None = None) -> None:
        # Callables, so a config reload or store swap is seen by open streams.
        self._store_of = store_of
        self._ttl_of = ttl_of
        self._metrics = metrics
        self._tagger = tagger or LeaseTagger()
        self._closing = asyncio.Event()

    def close_streams(self) -> None:
        """End every open stream (at shutdown); Envoy reconnects elsewhere.
        A stream whose handler has not started yet ends as soon as it does."""
        self._closing.set()

    async def StreamAccessLogs(  # gRPC method name
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        messages = aiter(request_iterator)
        closing = asyncio.ensure_future(self._closing.wait())
        read: asyncio.Future[als_pb2.StreamAccessLogsMessage] | None = None
        try:
            while True:
                # Race each read against shutdown: cancelling a handler blocked in
                # a grpc.aio read does not end the RPC, returning does.
                read = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({read, closing}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    break
                try:
                    message = read.result()
                except StopAsyncIteration:
                    break
                if message.HasField("http_logs"):
                    await self._handle_message(message.http_logs.log_entry)
        finally:
            closing.cancel()
            if read is not None:
                # The handler was cancelled (the Envoy went away) with a read pending or just
                # ended: its end (StopAsyncIteration, or an RPC error) is expected, never worth
                # an "exception was never retrieved" error line on every Envoy restart.
                read.cancel()
                read.add_done_callback(retrieve)
        return als_pb2.StreamAccessLogsResponse()

    async def _handle_message(self, entries: Any) -> None:
        """One message's batch; nothing it raises ends the stream. An exception leaving the
        handler ends the RPC, and every entry Envoy sends until it reconnects is lost (the
        releases among them hold their slots a whole TTL) for the sake of one bad batch."""
        try:
            await self.handle_entries(entries)
        except Exception as e:
            # The type and where it was raised, never the message: it could quote entry fields
            # (lease ids, tags, users), which anyone that reaches `listen` can send.
            frames = traceback.extract_tb(e.__traceback__)
            where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else None
            log_event(log, logging.ERROR, "access-log batch failed; its leases will expire by TTL",
                      entries=len(entries), error=type(e).__name__, where=where)

    async def handle_entries(self, entries: Any) -> None:
        """One batch: refreshes in one pipelined call, releases in another."""
        counts: Counts = collections.Counter()
        try:
            store, refresh, release = await self._sort(entries, counts)
        finally:
            # Once per batch and outcome, not per entry: a batch holds dozens of entries.
            for (kind, outcome), n in counts.items():
                self._metrics.accesslog_entries.labels(kind, outcome).inc(n)
        if store is not None:
            await self._apply(store, refresh, release)

    async def _sort(
        self, entries: Any, counts: Counts
    ) -> tuple[LeaseLog | None, list[LeaseRef], list[LeaseRef]]:
        """The batch's leases to refresh and to release, tags checked, and the store."""
        ours = _leases_in(entries, counts)
        store = self._store_of()
        if store is None or not ours:
            return None, [], []
        try:
            # Off the request path: wait for the load attempt's own end, not a check's bound.
            await self._tagger.load(store)
        except Exception as e:
            log_event(log, logging.WARNING, "lease key unavailable; the leases will expire by TTL",
                      entries=len(ours), error=type(e).__name__)
            return None, [], []
        refresh: list[LeaseRef] = []
        release: list[LeaseRef] = []
        for kind, action, ref, tag, at_bound in ours:
            if not self._tagger.valid(ref, tag):
                # Not a lease this deployment issued: a forged entry, never acted on.
                counts[kind, "bad_tag"] += 1
                continue
            (refresh if action == "refresh" else release).append(ref)
            counts[kind, action] += 1
            if action == "release":
                # A tagged lease names a policy extauth issued it under: a bounded label.
                self._metrics.sessions_ended.labels(ref.policy, "bound" if at_bound else "other").inc()
                if at_bound:
                    log_event(log, logging.INFO, "session ended at its bound", policy=ref.policy,
                              user=ref.user, client_ip=ref.ip, lease_id=ref.lease_id)
        if release:
            # A lease that ends in the same batch as its refresh must not be refreshed.
            gone = {r.lease_id for r in release}
            refresh = [r for r in refresh if r.lease_id not in gone]
        return store, refresh, release

    async def _apply(self, store: LeaseLog, refresh: list[LeaseRef], release: list[LeaseRef]) -> None:
        # Separately, releases first: a failed refresh must not keep ended connections'
        # slots counted (that is a user refused for a whole TTL), nor the reverse.
        if release:
            try:
                await store.release(release)
            except Exception as e:
                # The lease TTL is the safety net: log and move on, never break the stream.
                log_event(log, logging.WARNING, "lease release failed; the leases will expire by TTL",
                          release=len(release), error=type(e).__name__)
        if refresh:
            try:
                live = await store.refresh(refresh, self._ttl_of())
            except Exception as e:
                log_event(log, logging.WARNING, "lease refresh failed; the leases may expire",
                          refresh=len(refresh), error=type(e).__name__)
                return
            if live < len(refresh):
                lost = len(refresh) - live
                self._metrics.leases_restored.inc(lost)
                log_event(log, logging.WARNING, "leases of open connections were missing from the "
                          "store and are restored", restored=lost)
