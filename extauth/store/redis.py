"""RedisStore: leases, attempt windows and bans in Redis (standalone, TLS or Cluster).

Key layout (``P`` is ``key_prefix``, default ``extauth``). Every key carries a
hash tag naming its subject, so every script touches exactly one slot on a
Redis Cluster. Subjects and policy names are escaped: anything outside
``[A-Za-z0-9._@:-]`` is percent-encoded (UTF-8), so ``{``, ``}``, ``|``, ``*``,
spaces and unicode can neither break the hash tag nor a SCAN pattern.

====================================  =======  ======================================================
key                                   type     content
====================================  =======  ======================================================
``P:{u:<user>}:leases:<policy>``      ZSET     ``<lease id>|<ip>`` -> expiry ms
``P:{ip:<ip>}:leases:<policy>``       ZSET     ``<lease id>|<user>`` (or ``<lease id>``) -> expiry ms
``P:{u:<user>}:rate:<policy>``        ZSET     lease id -> attempt ms (admitted attempts, 60 s)
``P:{ip:<ip>}:rate:<policy>``         ZSET     lease id -> attempt ms (admitted attempts, 60 s)
``P:{ip:<ip>}:ban``                   STRING   ban reason, PX expiry
``P:{ip:<ip>}:hostile``               ZSET     signal id -> signal ms (sliding window)
``P:{bans}``                          ZSET     ip -> expiry ms: index for list_bans (bans are rare)
``P:{u:<user>}:revoked``              ZSET     ``j:<jti>`` / ``s:<sid>`` -> expiry ms (revocations)
``P:{u:<user>}:revoked_before``       STRING   ms: the user's tokens issued before it are revoked
``P:{revocations}``                   HASH     ``kind|<user>|<value>`` -> ``<expiry ms>|<before ms>``:
                                               the index every replica copies (docs/revocation.md)
``P:{revocations}:epoch``             STRING   random, replaced with every revocation change
``P:{u:<user>}:quota:<policy>``       HASH     ``c`` / ``r``: the user's quota override (connections,
                                               attempts per minute); PX only when set ``--for``
====================================  =======  ======================================================

Every key but an open-ended quota override has a PX expiry, so idle subjects vanish. Writes use the Redis
server clock (``TIME`` inside the scripts), so replicas with skewed clocks
agree on expiry; reads that filter live leases (count, list, count_all) use
this replica's wall clock, which only shifts by the clock skew the instant
an expiring lease stops being counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from importlib import resources
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from extauth.aio import BackgroundTasks
from extauth.reasons import Reason
from extauth.store.base import (
    MAX_REVOCATIONS,
    PREVIOUS_LEASE_KEY_SECONDS,
    PREVIOUS_LEASE_KEYS,
    AcquireResult,
    BanInfo,
    LeaseInfo,
    LeaseKeys,
    LeaseRef,
    Limits,
    QuotaOverride,
    Revocation,
    RevocationKind,
    RevocationLimitError,
    RevocationListing,
    Store,
    StoreError,
    TokenIds,
    check_override,
    one_subject,
    retry_seconds,
)
from extauth.store.resp import RespLane
from extauth.store.url import parse_redis_url

RedisClient = aioredis.Redis | RedisCluster
# What a Redis outage looks like from redis-py (RedisClusterException is not a RedisError).
_FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@:-")
_SAFE_RE = re.compile(r"[A-Za-z0-9._@:-]*")
_SCRIPTS = ("acquire", "refresh", "hostile", "lease_key", "revoke")
_KIND_CODES: dict[str, str] = {"jti": "j", "sid": "s", "before": "b"}
_NO_REVOCATION_ARGS = ("0", "", "", "")
_NO_OVERRIDE_ARGS = ("",)
# A per-user quota override's fields (acquire.lua's quota override block).
_OVERRIDE_FIELDS = {"connections_per_user": "c", "attempts_per_user_per_minute": "r"}
# Slack before the ban index forgets an entry by its score (the ban key itself is authoritative).
_BAN_INDEX_SLACK_MS = 300_000


def escape(value: str) -> str:
    """Percent-encode everything outside ``[A-Za-z0-9._@:-]`` (injective, cluster- and glob-safe)."""
    if _SAFE_RE.fullmatch(value):  # the common case, in C
        return value
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in value)


def _glob_escape(value: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in value)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(rows: Any) -> list[tuple[str, str]]:
    """HGETALL's reply as (field, value) pairs, whether redis-py made it a dict or a flat list."""
    if isinstance(rows, dict):
        return [(_s(f), _s(v)) for f, v in rows.items()]
    flat = [_s(x) for x in rows]
    return list(zip(flat[::2], flat[1::2], strict=True))


def _lim(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _load_script(name: str) -> str:
    return resources.files("extauth.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Every Redis or socket failure surfaces as StoreError (what the breaker counts)."""
    try:
        yield
    except StoreError:
        raise
    except _FAILURES as e:
        raise StoreError(f"redis: {type(e).__name__}: {e}") from e


class Keys:
    """The key layout in one place (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError("key_prefix must be non-empty and contain no '{' or '}'")
        self.prefix = prefix

    @staticmethod
    def user_tag(user: str) -> str:
        return "{u:" + escape(user) + "}"

    @staticmethod
    def ip_tag(ip: str) -> str:
        return "{ip:" + escape(ip) + "}"

    def leases(self, tag: str, policy: str) -> str:
        return f"{self.prefix}:{tag}:leases:{escape(policy)}"

    def rate(self, tag: str, policy: str) -> str:
        return f"{self.prefix}:{tag}:rate:{escape(policy)}"

    def ban(self, ip: str) -> str:
        return f"{self.prefix}:{self.ip_tag(ip)}:ban"

    def hostile(self, ip: str) -> str:
        return f"{self.prefix}:{self.ip_tag(ip)}:hostile"

    def lease_key(self) -> str:
        return f"{self.prefix}:{{lease_key}}"

    def previous_lease_keys(self) -> str:
        return f"{self.prefix}:{{lease_key}}:previous"  # the same slot as lease_key

    def bans_index(self) -> str:
        return f"{self.prefix}:{{bans}}"

    def revoked(self, user: str) -> str:
        return f"{self.prefix}:{self.user_tag(user)}:revoked"

    def revoked_before(self, user: str) -> str:
        return f"{self.prefix}:{self.user_tag(user)}:revoked_before"  # the same slot

    def revocations(self) -> str:
        return f"{self.prefix}:{{revocations}}"

    def quota_override(self, user: str, policy: str) -> str:
        return f"{self.prefix}:{self.user_tag(user)}:quota:{escape(policy)}"  # the user's slot

    def revocation_epoch(self) -> str:
        return f"{self.prefix}:{{revocations}}:epoch"  # the same slot as the index

    @staticmethod
    def revocation_field(kind: str, subject: str, value: str) -> str:
        return f"{kind}|{escape(subject)}|{escape(value)}"

    def ip_leases_pattern(self) -> str:
        # Every lease is listed under its IP exactly once, so counting IP keys counts each lease once.
        return f"{_glob_escape(self.prefix)}:{{ip:*}}:leases:*"

    # Lease members carry the *other* subject so a listing can name it.
    @staticmethod
    def user_member(ref: LeaseRef) -> str:
        return f"{escape(ref.lease_id)}|{escape(ref.ip)}"

    @staticmethod
    def ip_member(ref: LeaseRef) -> str:
        lid = escape(ref.lease_id)
        return lid if ref.user is None else f"{lid}|{escape(ref.user)}"

    def lease_slots(self, ref: LeaseRef) -> list[tuple[str, str]]:
        """(leases key, member) for every key a lease is listed under."""
        out = [(self.leases(self.ip_tag(ref.ip), ref.policy), self.ip_member(ref))]
        if ref.user is not None:
            out.append((self.leases(self.user_tag(ref.user), ref.policy), self.user_member(ref)))
        return out


def client_from_url(url: str, *, socket_timeout: float = 1.0, connect_timeout: float = 1.0) -> RedisClient:
    """A redis.asyncio client for ``redis://``, ``rediss://``, ``redis+cluster://h:p,h:p`` or
    ``rediss+cluster://...``. Credentials come from the URL, else EXTAUTH_REDIS_USERNAME /
    EXTAUTH_REDIS_PASSWORD; TLS options from the query (``?ssl_ca_certs=...&ssl_cert_reqs=required``).
    Every socket has a timeout, and redis-py retries at most once, immediately, on a broken
    connection (a stale pooled socket after a restart); the breaker handles real outages.
    """
    parsed = parse_redis_url(url)
    username = parsed.username or os.environ.get("EXTAUTH_REDIS_USERNAME") or None
    password = parsed.password or os.environ.get("EXTAUTH_REDIS_PASSWORD") or None
    common: dict[str, Any] = {
        "username": username,
        "password": password,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "decode_responses": True,
        "client_name": "extauth",
    }
    if parsed.tls:
        common["ssl"] = True
        common.update(parsed.tls_options)
    if parsed.cluster:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes], **common)
    host, port = parsed.nodes[0]
    return aioredis.Redis(host=host, port=port, db=parsed.db, **common)


class RedisStore(Store):
    """The shared store on redis.asyncio (a client, or :meth:`from_url`); ``key_prefix``
    namespaces every key. Acquire is one EVALSHA on a standalone Redis, refresh and release one
    pipeline per ``batch_size`` refs; there the request path runs on ``RespLane`` (resp.py)."""

    def __init__(self, client: RedisClient, *, key_prefix: str = "extauth", batch_size: int = 500) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self.keys = Keys(key_prefix)
        self._batch = max(1, batch_size)
        self._scripts = {name: client.register_script(_load_script(name)) for name in _SCRIPTS}
        self._init_lock = asyncio.Lock()
        self._tasks = BackgroundTasks()  # rollbacks; a failed one only over-counts until the TTL
        self._initialized = not self._cluster
        self._lane = None if self._cluster else RespLane.from_client(client)

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str = "extauth", socket_timeout: float = 1.0,
                 connect_timeout: float = 1.0) -> RedisStore:
        client = client_from_url(url, socket_timeout=socket_timeout, connect_timeout=connect_timeout)
        return cls(client, key_prefix=key_prefix)

    @property
    def client(self) -> RedisClient:
        return self._client

    @property
    def is_cluster(self) -> bool:
        return self._cluster

    # -- plumbing ----------------------------------------------------------

    async def _ready(self) -> None:
        """Discover a cluster's topology once, before any concurrent use: redis-py's lazy
        initialize() run by many first calls at once tears down connections in use."""
        if self._initialized:
            return
        async with self._init_lock:
            if not self._initialized and isinstance(self._client, RedisCluster):
                await self._client.initialize()
            self._initialized = True

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        if self._lane is None:
            # redis-py's Script runs EVALSHA and, on NOSCRIPT (SCRIPT FLUSH, a restarted or
            # failed-over server), loads the script (on every primary of a cluster) and retries.
            return await self._scripts[name](keys=list(keys), args=list(args))
        # On the lane: a pipeline of one, which reloads the script on NOSCRIPT and raises errors.
        (result,) = await self._pipeline([self._evalsha(name, keys, args)], raw=True)
        return result

    async def _pipeline(self, commands: Sequence[tuple[str | int, ...]], *, raw: bool = False) -> list[Any]:
        """Run commands in one non-transactional pipeline (per node on a cluster); EVALSHA
        commands that meet NOSCRIPT get their scripts reloaded and the batch runs once more
        (every command we pipeline is idempotent). ``raw``: the replies need none of redis-py's
        response callbacks (EVALSHA, ZREM), so the lane may carry them."""
        results: list[Any] = []
        lane = self._lane if raw else None
        for attempt in range(2):
            if lane is not None:
                results = await lane.pipeline(commands)
            else:
                pipe = self._client.pipeline(transaction=False)
                for cmd in commands:
                    pipe.execute_command(*cmd)
                results = list(await pipe.execute(raise_on_error=False))
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                used = {cmd[1] for cmd in commands if cmd[0] == "EVALSHA"}
                for script in self._scripts.values():
                    if script.sha in used:
                        script.sha = await self._client.script_load(script.script)
                continue
            break
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def _evalsha(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> tuple[str | int, ...]:
        return ("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)

    async def _now_ms(self) -> int:
        return int(time.time() * 1000)

    # -- leases ------------------------------------------------------------

    @staticmethod
    def _decode(res: Sequence[Any], subjects: Sequence[tuple[Reason, Reason]]) -> AcquireResult:
        code, index, ms = int(res[0]), int(res[1]), int(res[2])
        if code == 0:
            return AcquireResult(True)
        if code == 1:
            return AcquireResult(False, Reason.BANNED, retry_seconds(max(ms, 0) / 1000))
        if code == 4:
            return AcquireResult(False, Reason.TOKEN_REVOKED)
        rate_reason, quota_reason = subjects[index - 1]
        reason = rate_reason if code == 2 else quota_reason
        return AcquireResult(False, reason, retry_seconds(ms / 1000))

    def _revocation_block(self, user: str, token: TokenIds | None) -> tuple[list[str], list[str]]:
        """acquire.lua's revocation block: its keys (the user's slot) and its four ARGV."""
        if token is None:
            return [], list(_NO_REVOCATION_ARGS)
        iat = "" if token.issued_at is None else str(int(token.issued_at * 1000))
        return ([self.keys.revoked(user), self.keys.revoked_before(user)],
                ["2", token.jti or "", token.sid or "", iat])

    async def acquire(self, ref: LeaseRef, limits: Limits, ttl: float,
                      token: TokenIds | None = None) -> AcquireResult:
        k = self.keys
        ttl_ms = max(1, round(ttl * 1000))
        attempt = escape(ref.lease_id)
        ip_tag = k.ip_tag(ref.ip)
        ip_keys = [k.rate(ip_tag, ref.policy), k.leases(ip_tag, ref.policy)]
        ip_args = [_lim(limits.attempts_per_ip_per_minute), _lim(limits.connections_per_ip), k.ip_member(ref)]
        ip_subject = (Reason.RATE_IP, Reason.QUOTA_IP)
        user_subject = (Reason.RATE_USER, Reason.QUOTA_USER)
        ban, has_ban = ([k.ban(ref.ip)], "1") if limits.enforce_bans else ([], "0")
        with _errors():
            await self._ready()
            if ref.user is None:
                res = await self._script("acquire", [*ban, *ip_keys],
                                         [attempt, ttl_ms, "1", has_ban, *_NO_REVOCATION_ARGS,
                                          *_NO_OVERRIDE_ARGS, *ip_args])
                return self._decode(res, [ip_subject])
            rev_keys, rev_args = self._revocation_block(ref.user, token)
            # The user's quota override (issue 24), in the user's slot: subject 2 of a standalone
            # call (after the IP), subject 1 of a Cluster's user-slot call.
            ovr_key = k.quota_override(ref.user, ref.policy)
            user_tag = k.user_tag(ref.user)
            user_keys = [k.rate(user_tag, ref.policy), k.leases(user_tag, ref.policy)]
            user_args = [_lim(limits.attempts_per_user_per_minute), _lim(limits.connections_per_user),
                         k.user_member(ref)]
            if not self._cluster:
                # Standalone: one EVALSHA over both subjects, one round trip, fully atomic.
                res = await self._script("acquire", [*ban, *rev_keys, ovr_key, *ip_keys, *user_keys],
                                         [attempt, ttl_ms, "1", has_ban, *rev_args, "2", *ip_args,
                                          *user_args])
                return self._decode(res, [ip_subject, user_subject])
            return await self._acquire_cluster(ref, attempt, ttl_ms, ip_keys, ip_args,
                                               [*rev_keys, ovr_key, *user_keys], [*rev_args, "1", *user_args],
                                               limits.enforce_bans)

    async def _acquire_cluster(
        self, ref: LeaseRef, attempt: str, ttl_ms: int,
        ip_keys: list[str], ip_args: list[str], user_keys: list[str], user_args: list[str],
        enforce_bans: bool = True,
    ) -> AcquireResult:
        """Redis Cluster: the IP's keys and the user's keys live in different slots, so no single
        script can see both. Two scripts, each atomic in its own slot:

        1. IP slot: ban, rate_ip and quota_ip checks; when all pass it *records* the attempt
           and the lease under the IP.
        2. User slot: the revocation check and the user's quota override (``user_keys``/
           ``user_args`` begin with those two blocks), rate_user and quota_user; it records
           only when step 1 recorded.
           When step 1 denied for quota_ip only, step 2 runs check-only so the reported reason
           follows the same order as on a standalone Redis (rate_user/quota_user before quota_ip).
        3. If step 2 denies after step 1 recorded, step 1 is rolled back (ZREM of the IP's
           lease member and attempt entry).

        Because the IP slot is claimed *before* the user slot is checked, two racing attempts
        can both see the other's IP entry and both be denied at the edge of the quota
        (a transient false deny) but the sum can never exceed either limit: no over-admission.
        If the rollback itself fails (network), the IP entry only over-counts until its TTL.
        """
        ip_subject = (Reason.RATE_IP, Reason.QUOTA_IP)
        user_subject = (Reason.RATE_USER, Reason.QUOTA_USER)
        k = self.keys
        ban, has_ban = ([k.ban(ref.ip)], "1") if enforce_bans else ([], "0")
        ip_res = await self._script("acquire", [*ban, *ip_keys],
                                    [attempt, ttl_ms, "1", has_ban, *_NO_REVOCATION_ARGS, *_NO_OVERRIDE_ARGS,
                                     *ip_args])
        ip_code = int(ip_res[0])
        if ip_code in (1, 2):
            return self._decode(ip_res, [ip_subject])
        recorded = ip_code == 0
        try:
            user_res = await self._script("acquire", user_keys,
                                          [attempt, ttl_ms, "1" if recorded else "0", "0", *user_args])
        except asyncio.CancelledError:
            # The caller's timeout fired: roll back in the background, never delay the cancellation.
            if recorded:
                self._tasks.spawn(lambda: self._rollback_ip(ip_keys, attempt, ip_args[2]))
            raise
        except Exception:
            if recorded:
                with contextlib.suppress(*_FAILURES):
                    await self._rollback_ip(ip_keys, attempt, ip_args[2])
            raise
        if int(user_res[0]) != 0:
            if recorded:
                await self._rollback_ip(ip_keys, attempt, ip_args[2])
            return self._decode(user_res, [user_subject])
        return self._decode(ip_res, [ip_subject])

    async def _rollback_ip(self, ip_keys: list[str], attempt: str, member: str) -> None:
        # Both keys share the IP's slot; ZREM is idempotent.
        await self._pipeline([("ZREM", ip_keys[1], member), ("ZREM", ip_keys[0], attempt)], raw=True)

    def _chunks(self, refs: Sequence[LeaseRef]) -> Iterator[Sequence[LeaseRef]]:
        for i in range(0, len(refs), self._batch):
            yield refs[i:i + self._batch]

    async def _per_lease(
        self, refs: Sequence[LeaseRef], command: Callable[[str, str], tuple[str | int, ...]]
    ) -> int:
        """Run ``command(key, member)`` on both keys of every lease, pipelined in batches;
        return how many leases had at least one key answer 1."""
        hits = 0
        with _errors():
            await self._ready()
            for chunk in self._chunks(refs):
                commands: list[tuple[str | int, ...]] = []
                owners: list[int] = []
                for n, ref in enumerate(chunk):
                    for key, member in self.keys.lease_slots(ref):
                        commands.append(command(key, member))
                        owners.append(n)
                results = await self._pipeline(commands, raw=True)
                hits += len({owner for owner, r in zip(owners, results, strict=True) if int(r) == 1})
        return hits

    async def refresh(self, refs: Sequence[LeaseRef], ttl: float) -> int:
        ttl_ms = max(1, round(ttl * 1000))
        return await self._per_lease(
            refs, lambda key, member: self._evalsha("refresh", [key], [member, ttl_ms])
        )

    async def release(self, refs: Sequence[LeaseRef]) -> int:
        return await self._per_lease(refs, lambda key, member: ("ZREM", key, member))

    def _subject_key(self, policy: str, user: str | None, ip: str | None) -> str:
        one_subject(user, ip)
        tag = self.keys.user_tag(user) if user is not None else self.keys.ip_tag(ip or "")
        return self.keys.leases(tag, policy)

    async def count(self, policy: str, *, user: str | None = None, ip: str | None = None) -> int:
        key = self._subject_key(policy, user, ip)
        with _errors():
            await self._ready()
            return int(await self._client.zcount(key, f"({await self._now_ms()}", "+inf"))

    async def list_leases(
        self, policy: str, *, user: str | None = None, ip: str | None = None
    ) -> list[LeaseInfo]:
        key = self._subject_key(policy, user, ip)
        with _errors():
            await self._ready()
            rows: list[Any] = list(await self._client.zrangebyscore(
                key, f"({await self._now_ms()}", "+inf", withscores=True))
        out = []
        for member_raw, score in rows:
            lid_enc, sep, other_enc = _s(member_raw).partition("|")
            lid = unquote(lid_enc)
            other = unquote(other_enc) if sep else None  # no "|": an anonymous lease
            if user is not None:
                info = LeaseInfo(lid, policy, user, other or "", float(score) / 1000)
            else:
                info = LeaseInfo(lid, policy, other, ip or "", float(score) / 1000)
            out.append(info)
        return out

    async def _scan(self, pattern: str) -> AsyncIterator[str]:
        # On a cluster redis-py's scan_iter walks every primary.
        async for key in self._client.scan_iter(match=pattern, count=1000, _type="zset"):
            yield _s(key)

    async def count_all(self) -> int:
        """SCAN every lease key (each lease once, under its IP) and ZCOUNT its live members.
        O(keys): meant for sampling metrics every few seconds, not for the request path."""
        total = 0
        with _errors():
            await self._ready()
            now = await self._now_ms()
            batch: list[str] = []
            async for key in self._scan(self.keys.ip_leases_pattern()):
                batch.append(key)
                if len(batch) >= self._batch:
                    total += sum(await self._pipeline([("ZCOUNT", k, f"({now}", "+inf") for k in batch]))
                    batch = []
            if batch:
                total += sum(await self._pipeline([("ZCOUNT", k, f"({now}", "+inf") for k in batch]))
        return int(total)

    # -- rates, abuse, bans ----------------------------------------------------

    async def record_hostile(self, ip: str, *, threshold: int, window: float, ban_seconds: float,
                             dry_run: bool, signal: str | None = None) -> bool:
        k = self.keys
        with _errors():
            await self._ready()
            res = await self._script(
                "hostile", [k.hostile(ip), k.ban(ip)],
                [int(threshold), max(1, round(window * 1000)), signal or secrets.token_urlsafe(9),
                 max(1, round(ban_seconds * 1000)), "1" if dry_run else "0", "hostile"],
            )
            reached, expires_ms = int(res[0]), int(res[1])
            if expires_ms:
                # The index lives in its own slot: a second call, only when a ban is set (rare).
                await self._client.zadd(k.bans_index(), {ip: expires_ms})
        return reached == 1

    async def ban(self, ip: str, seconds: float, reason: str) -> None:
        ms = max(1, round(seconds * 1000))
        with _errors():
            await self._ready()
            now = await self._now_ms()
            await self._pipeline([
                ("SET", self.keys.ban(ip), reason, "PX", ms),
                ("ZADD", self.keys.bans_index(), now + ms, ip),
            ])

    async def unban(self, ip: str) -> bool:
        with _errors():
            await self._ready()
            deleted, _ = await self._pipeline([
                ("DEL", self.keys.ban(ip)),
                ("ZREM", self.keys.bans_index(), ip),
            ])
        return int(deleted) == 1

    async def list_bans(self) -> list[BanInfo]:
        index = self.keys.bans_index()
        with _errors():
            await self._ready()
            now = await self._now_ms()
            _, ips_raw = await self._pipeline([
                ("ZREMRANGEBYSCORE", index, "-inf", now - _BAN_INDEX_SLACK_MS),
                ("ZRANGE", index, 0, -1),
            ])
            ips = [_s(ip) for ip in ips_raw]
            if not ips:
                return []
            commands: list[tuple[str | int, ...]] = []
            for ip in ips:
                commands += [("GET", self.keys.ban(ip)), ("PTTL", self.keys.ban(ip))]
            results = await self._pipeline(commands)
            out: list[BanInfo] = []
            gone: list[str] = []
            for n, ip in enumerate(ips):
                reason, pttl = results[2 * n], int(results[2 * n + 1])
                if reason is None or pttl < 0:
                    gone.append(ip)
                    continue
                out.append(BanInfo(ip, (now + pttl) / 1000, _s(reason)))
            if gone:
                await self._client.zrem(index, *gone)
        return sorted(out, key=lambda b: (b.expires_at, b.ip))

    async def ping(self) -> None:
        with _errors():
            await self._ready()
            await self._client.ping()

    async def lease_key(self, candidate: str, replaces: bool = False) -> LeaseKeys:
        # One script (lua/lease_key.lua): the first replica to ask creates the key, every
        # other one reads it, and a store that lost it gets it back from the replicas.
        k = self.keys
        with _errors():
            await self._ready()
            current, previous = await self._script(
                "lease_key", [k.lease_key(), k.previous_lease_keys()],
                [candidate, "1" if replaces else "0", PREVIOUS_LEASE_KEY_SECONDS, PREVIOUS_LEASE_KEYS])
        return LeaseKeys(_s(current), tuple(_s(p) for p in previous))

    # -- revocation ---------------------------------------------------------------

    async def revoke(self, revocation: Revocation, ttl: float) -> float:
        if (revocation.kind == "before") != (revocation.before is not None):
            raise ValueError("a 'before' revocation, and only one, names its instant")
        k = self.keys
        value = "" if revocation.before is not None else revocation.value
        field = k.revocation_field(revocation.kind, revocation.subject, value)
        arg = value if revocation.before is None else str(int(revocation.before * 1000))
        with _errors():
            await self._ready()
            count, present = await self._pipeline([("HLEN", k.revocations()),
                                                   ("HEXISTS", k.revocations(), field)])
            if not int(present) and int(count) >= MAX_REVOCATIONS:
                raise RevocationLimitError(f"{MAX_REVOCATIONS} revocations are in force")
            # First where the acquire script reads it (the subject's slot), then the index
            # the replicas copy, then the epoch that tells them to.
            expires_ms, before_ms = await self._script(
                "revoke", [k.revoked(revocation.subject), k.revoked_before(revocation.subject)],
                [_KIND_CODES[revocation.kind], arg, max(1, round(ttl * 1000))])
            if int(expires_ms) > await self._now_ms():
                await self._pipeline([
                    ("HSET", k.revocations(), field, f"{int(expires_ms)}|{int(before_ms)}"),
                    ("SET", k.revocation_epoch(), secrets.token_hex(8)),
                ])
        return int(expires_ms) / 1000

    async def unrevoke(self, kind: RevocationKind, subject: str, value: str = "") -> bool:
        k = self.keys
        if kind == "before":
            value = ""
            in_slot: tuple[str | int, ...] = ("DEL", k.revoked_before(subject))
        else:
            in_slot = ("ZREM", k.revoked(subject), f"{_KIND_CODES[kind]}:{value}")
        with _errors():
            await self._ready()
            removed, indexed, _ = await self._pipeline([
                in_slot,
                ("HDEL", k.revocations(), k.revocation_field(kind, subject, value)),
                ("SET", k.revocation_epoch(), secrets.token_hex(8)),
            ])
        return int(removed) == 1 or int(indexed) == 1

    async def list_revocations(self) -> RevocationListing:
        k = self.keys
        with _errors():
            await self._ready()
            epoch, rows = await self._pipeline([("GET", k.revocation_epoch()),
                                                ("HGETALL", k.revocations())])
            now = await self._now_ms()
            fields = _pairs(rows)
            out: list[Revocation] = []
            gone: list[str] = []
            for field, entry in fields:
                kind, _, rest = field.partition("|")
                subject_enc, _, value_enc = rest.partition("|")
                expires_raw, _, before_raw = entry.partition("|")
                try:
                    expires, before = int(expires_raw), int(before_raw or 0)
                except ValueError:
                    gone.append(field)
                    continue
                if expires <= now or kind not in _KIND_CODES:
                    gone.append(field)
                    continue
                out.append(Revocation(kind, unquote(subject_enc), unquote(value_enc),  # type: ignore[arg-type]
                                      before / 1000 if kind == "before" else None, expires / 1000))
            if gone:
                await self._client.hdel(k.revocations(), *gone)
        out.sort(key=lambda r: (r.subject, r.kind, r.value))
        return RevocationListing("" if epoch is None else _s(epoch), tuple(out))

    async def revocation_epoch(self) -> str:
        with _errors():
            await self._ready()
            epoch = await self._client.get(self.keys.revocation_epoch())
        return "" if epoch is None else _s(epoch)

    # -- per-user quota overrides (acquire.lua's quota override block) -------------------

    async def set_quota_override(self, policy: str, user: str, override: QuotaOverride,
                                 ttl: float | None) -> QuotaOverride:
        check_override(override)
        key = self.keys.quota_override(user, policy)
        given = {code: str(getattr(override, name)) for name, code in _OVERRIDE_FIELDS.items()
                 if getattr(override, name) is not None}
        absent = [code for code in _OVERRIDE_FIELDS.values() if code not in given]
        # HSET first, then HDEL what it no longer sets: an acquire in between never sees no override.
        commands: list[tuple[str | int, ...]] = [("HSET", key, *(x for kv in given.items() for x in kv))]
        if absent:
            commands.append(("HDEL", key, *absent))
        commands.append(("PEXPIRE", key, max(1, round(ttl * 1000))) if ttl is not None else ("PERSIST", key))
        with _errors():
            await self._ready()
            await self._pipeline(commands)
        return dataclasses.replace(override, expires_at=None if ttl is None else time.time() + ttl)

    async def get_quota_override(self, policy: str, user: str) -> QuotaOverride | None:
        key = self.keys.quota_override(user, policy)
        with _errors():
            await self._ready()
            values, pttl = await self._pipeline([("HMGET", key, *_OVERRIDE_FIELDS.values()), ("PTTL", key)])
        limits = [int(v) if v is not None else None for v in values]
        if all(v is None for v in limits):
            return None
        pttl = int(pttl)
        return QuotaOverride(limits[0], limits[1], time.time() + pttl / 1000 if pttl >= 0 else None)

    async def clear_quota_override(self, policy: str, user: str) -> bool:
        with _errors():
            await self._ready()
            removed = await self._client.delete(self.keys.quota_override(user, policy))
        return int(removed) == 1

    async def close(self) -> None:
        await self._tasks.wait(2.0)  # let rollbacks finish (bounded by the socket timeouts)
        with _errors():
            if self._lane is not None:
                await self._lane.close()
            await self._client.aclose()


__all__ = ["Keys", "RedisClient", "RedisStore", "client_from_url", "escape"]
