"""The access-log service's handling of one batch: releases, refreshes, restores, failures."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2_grpc

from extauth.accesslog import AccessLogService
from extauth.envoy_api import check_response
from extauth.lease_tag import LeaseTagger
from extauth.metrics import Metrics
from extauth.pipeline import Decision
from extauth.store import new_lease_id
from extauth.store.base import LeaseRef, Limits, StoreError
from extauth.store.memory import MemoryStore
from tests.envoy_msgs import als_message, log_entry

pytestmark = pytest.mark.both_loops


def ref(user: str = "alice") -> LeaseRef:
    return LeaseRef(new_lease_id(), "chat", user, "10.0.0.1")


def metadata(r: LeaseRef, tagger: LeaseTagger) -> dict[str, str]:
    """What extauth put in the allow's dynamic metadata, as Envoy echoes it back."""
    assert r.user is not None
    return {"lease_id": r.lease_id, "policy": r.policy, "user": r.user, "client_ip": r.ip,
            "lease_tag": tagger.tag(r)}


def service(store: MemoryStore, tagger: LeaseTagger, metrics: Metrics | None = None) -> AccessLogService:
    return AccessLogService(lambda: store, lambda: 60.0, metrics or Metrics(), tagger)


async def loaded(store: MemoryStore) -> LeaseTagger:
    tagger = LeaseTagger()
    await tagger.load(store)
    return tagger


class RefreshFails(MemoryStore):
    """A store whose refresh call fails (a timeout on one slow node, say) while releases work."""

    async def refresh(self, refs: Sequence[LeaseRef], ttl: float) -> int:
        raise StoreError("store call refresh timed out after 1000 ms")


async def test_a_failed_refresh_does_not_keep_ended_connections_counted() -> None:
    store = RefreshFails()
    tagger = await loaded(store)
    alive, ended = ref("bob"), ref("alice")
    lim = Limits(connections_per_user=1)
    assert (await store.acquire(alive, lim, 60)).granted
    assert (await store.acquire(ended, lim, 60)).granted
    await service(store, tagger).handle_entries([log_entry(metadata(alive, tagger), "DownstreamPeriodic"),
                                                 log_entry(metadata(ended, tagger), "DownstreamEnd")])
    assert await store.count("chat", user="alice") == 0
    assert (await store.acquire(ref("alice"), lim, 60)).granted  # alice reconnects at once


async def test_refresh_restores_lost_leases_and_counts_them() -> None:
    store = MemoryStore()
    tagger = await loaded(store)
    metrics = Metrics()
    als = service(store, tagger, metrics)
    known, lost = ref("bob"), ref("alice")
    assert (await store.acquire(known, Limits(), 60)).granted
    await als.handle_entries([log_entry(metadata(known, tagger), "DownstreamPeriodic"),
                                  log_entry(metadata(lost, tagger), "DownstreamPeriodic")])
    assert await store.count("chat", user="alice") == 1
    assert metrics.leases_restored._value.get() == 1
    # An end entry in the same batch wins over the refresh: nothing is restored.
    gone = ref("carol")
    await als.handle_entries([log_entry(metadata(gone, tagger), "DownstreamPeriodic"),
                                  log_entry(metadata(gone, tagger), "DownstreamEnd")])
    assert await store.count("chat", user="carol") == 0
    assert metrics.leases_restored._value.get() == 1


async def test_a_lease_without_a_client_ip_is_still_released() -> None:
    # A peer with no IP address (a Unix-socket listener): the lease lives under the empty IP,
    # and the metadata Envoy echoes back must still name it, or the slot is held for a TTL.
    store = MemoryStore()
    tagger = await loaded(store)
    lease = LeaseRef(new_lease_id(), "chat", "alice", "")
    assert (await store.acquire(lease, Limits(), 60)).granted
    decision = Decision(allowed=True, status=200, decision_id="d1", policy="chat", user="alice",
                        client_ip="", websocket=True, lease=lease, lease_tag=tagger.tag(lease))
    echoed = {k: v.string_value for k, v in check_response(decision).dynamic_metadata.fields.items()}
    await service(store, tagger).handle_entries(
        [log_entry(echoed, "DownstreamEnd")])
    assert await store.count("chat", user="alice") == 0


async def test_entries_for_leases_extauth_did_not_issue_are_ignored() -> None:
    # Anything that reaches `listen` can stream access logs: a forged periodic entry must not
    # restore a lease in a victim's name (filling their quota), nor a forged end entry release one.
    store = MemoryStore()
    tagger = await loaded(store)
    metrics = Metrics()
    als = service(store, tagger, metrics)
    real = ref("alice")
    assert (await store.acquire(real, Limits(connections_per_user=2), 60)).granted
    forged = [ref("alice") for _ in range(3)]
    untagged = {**metadata(forged[0], tagger), "lease_tag": ""}
    other_key = LeaseTagger()
    await other_key.load(MemoryStore())  # a tag made with another deployment's key
    await als.handle_entries([
        log_entry(untagged, "DownstreamPeriodic"),
        log_entry(metadata(forged[1], other_key), "DownstreamPeriodic"),
        log_entry({**metadata(real, tagger), "user": "bob"}, "DownstreamEnd"),  # fields changed
    ])
    assert await store.count("chat", user="alice") == 1
    assert metrics.accesslog_entries.labels("periodic", "bad_tag")._value.get() == 2
    assert metrics.accesslog_entries.labels("end", "bad_tag")._value.get() == 1
    await als.handle_entries([log_entry(metadata(real, tagger), "DownstreamEnd")])
    assert await store.count("chat", user="alice") == 0


async def test_each_entry_of_a_batch_is_counted_once_by_type_and_outcome() -> None:
    store = MemoryStore()
    tagger = await loaded(store)
    metrics = Metrics()
    als = service(store, tagger, metrics)
    open_, closed, older = ref("bob"), ref("alice"), ref("carol")
    for lease in (open_, closed, older):
        assert (await store.acquire(lease, Limits(), 60)).granted
    await als.handle_entries([
        log_entry(metadata(open_, tagger), "DownstreamTunnelSuccessfullyEstablished"),
        log_entry(metadata(closed, tagger), "DownstreamTunnelSuccessfullyEstablished"),
        log_entry(metadata(closed, tagger), "DownstreamEnd"),
        log_entry(metadata(older, tagger), "DownstreamPeriodic"),
        log_entry(metadata(older, tagger), "DownstreamPeriodic"),
        log_entry(None, "DownstreamEnd"),  # no metadata of ours: another route's request
        log_entry(metadata(open_, tagger), "UpstreamPoolReady"),  # a type we do not act on
    ])

    def seen(kind: str, outcome: str) -> float:
        return float(metrics.accesslog_entries.labels(kind, outcome)._value.get())

    assert seen("tunnel_established", "refresh") == 2
    assert seen("end", "release") == 1
    assert seen("periodic", "refresh") == 2
    assert seen("end", "ignored") == 1
    assert seen("other", "ignored") == 1
    assert [await store.count("chat", user=u) for u in ("bob", "alice", "carol")] == [1, 0, 1]


@contextlib.asynccontextmanager
async def streaming(als: AccessLogService) -> AsyncIterator[als_pb2_grpc.AccessLogServiceStub]:
    """The service on a real grpc.aio server, as Envoy reaches it: a stream of messages."""
    server = grpc.aio.server()
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(als, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield als_pb2_grpc.AccessLogServiceStub(channel)
    finally:
        als.close_streams()
        await server.stop(grace=None)


async def test_a_non_ascii_tag_is_a_bad_tag_and_neither_its_batch_nor_the_stream_is_lost() -> None:
    # One entry with a non-ASCII tag used to raise out of the batch (compare_digest on str):
    # the valid releases beside it were dropped, holding their slots a whole TTL, and the
    # stream ended, losing what Envoy sent next.
    store = MemoryStore()
    tagger = await loaded(store)
    metrics = Metrics()
    ended, forged_over, later = ref("alice"), ref("bob"), ref("carol")
    for lease in (ended, forged_over, later):
        assert (await store.acquire(lease, Limits(), 60)).granted
    async with streaming(service(store, tagger, metrics)) as stub:
        call = stub.StreamAccessLogs()
        await call.write(als_message([
            log_entry({**metadata(forged_over, tagger), "lease_tag": "\u00e9"}, "DownstreamEnd"),
            log_entry(metadata(ended, tagger), "DownstreamEnd"),
            log_entry({**metadata(forged_over, tagger), "lease_tag": tagger.tag(forged_over)[:-1] + "\u00e9"},
                      "DownstreamPeriodic"),
        ]))
        await call.write(als_message([log_entry(metadata(later, tagger), "DownstreamEnd")], first=False))
        await call.done_writing()
        await call  # the handler returned normally (an exception would fail the RPC here)
    assert await store.count("chat", user="alice") == 0  # released beside the bad entries
    assert await store.count("chat", user="bob") == 1  # never acted on
    assert await store.count("chat", user="carol") == 0  # the stream went on
    assert metrics.accesslog_entries.labels("end", "bad_tag")._value.get() == 1
    assert metrics.accesslog_entries.labels("periodic", "bad_tag")._value.get() == 1


async def test_a_batch_that_fails_unexpectedly_is_logged_and_the_stream_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    # Whatever handling one message raises, the stream must keep reading: ending it loses
    # every entry Envoy sends until it reconnects. No bug is known to raise there any more,
    # so the fault is injected where the batch asks for the store.
    store = MemoryStore()
    tagger = await loaded(store)
    first, later = ref("alice"), ref("carol")
    for lease in (first, later):
        assert (await store.acquire(lease, Limits(), 60)).granted
    calls = 0

    def store_of() -> MemoryStore:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(f"unexpected, quoting {first.lease_id} {tagger.tag(first)}")
        return store

    als = AccessLogService(store_of, lambda: 60.0, Metrics(), tagger)
    with caplog.at_level(logging.ERROR, logger="extauth.accesslog"):
        async with streaming(als) as stub:
            call = stub.StreamAccessLogs()
            await call.write(als_message([log_entry(metadata(first, tagger), "DownstreamEnd")]))
            await call.write(als_message([log_entry(metadata(later, tagger), "DownstreamEnd")], first=False))
            await call.done_writing()
            await call
    assert await store.count("chat", user="carol") == 0  # the next message was handled
    assert await store.count("chat", user="alice") == 1  # the failed batch's lease waits for its TTL
    [record] = [r for r in caplog.records if r.name == "extauth.accesslog"]
    fields = getattr(record, "fields", {})
    assert fields["error"] == "RuntimeError" and fields["entries"] == 1
    # Entry values (lease ids, tags) never reach the log, not even through the exception.
    logged = record.getMessage() + repr(fields) + str(record.exc_info)
    assert first.lease_id not in logged and tagger.tag(first) not in logged


async def test_an_envoy_that_goes_away_mid_stream_leaves_no_error_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    # Envoy restarting cancels the handler while it waits for the next message: that read's
    # end is expected, never an "exception was never retrieved" error line in the logs.
    store = MemoryStore()
    tagger = await loaded(store)
    lease = ref("alice")
    assert (await store.acquire(lease, Limits(), 60)).granted
    handled = asyncio.Event()
    als = service(store, tagger)
    real = als.handle_entries

    async def handle(entries: Any) -> None:
        await real(entries)
        handled.set()

    als.handle_entries = handle  # type: ignore[method-assign]
    ended = asyncio.Event()
    stream = als.StreamAccessLogs

    async def stream_until_ended(*args: Any) -> Any:
        try:
            return await stream(*args)
        finally:
            ended.set()

    als.StreamAccessLogs = stream_until_ended  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        async with streaming(als) as stub:
            call = stub.StreamAccessLogs()
            await call.write(als_message([log_entry(metadata(lease, tagger), "DownstreamEnd")]))
            await asyncio.wait_for(handled.wait(), 10)  # the handler now waits for the next one
            call.cancel()  # the Envoy is gone
            await asyncio.wait_for(ended.wait(), 10)
        gc.collect()  # an unretrieved exception is reported when its task is collected
        await asyncio.sleep(0)
    assert await store.count("chat", user="alice") == 0
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text
