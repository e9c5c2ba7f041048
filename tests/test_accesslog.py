"""The access-log service's handling of one batch: releases, refreshes, restores, failures."""

from __future__ import annotations

from collections.abc import Sequence

from extauth.accesslog import AccessLogService
from extauth.envoy_api import check_response
from extauth.lease_tag import LeaseTagger
from extauth.metrics import Metrics
from extauth.pipeline import Decision
from extauth.store import new_lease_id
from extauth.store.base import LeaseRef, Limits, StoreError
from extauth.store.memory import MemoryStore
from tests.envoy_msgs import log_entry


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
