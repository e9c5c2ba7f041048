"""The decision pipeline: classify, pick the policy, validate the handshake, check
the origin, verify the token, take a lease.

Everything up to the token is pure and synchronous. The token step awaits only
when keys must be fetched (a cache hit never does), and the lease step is one
store round trip. The pipeline never raises: every outcome is a ``Decision``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from extauth.addresses import canonical_ip, client_subject, forwarded_ip
from extauth.claims import claim_at
from extauth.decision import Decision as Decision  # re-exported: the pipeline's answer
from extauth.handshake import is_extended_connect, is_upgrade_attempt, new_key, validate_handshake
from extauth.lease_tag import LeaseTagger
from extauth.logs import DECISION_LOG, log_event
from extauth.metrics import Metrics
from extauth.origin import claim_allows
from extauth.policy import select_policy
from extauth.reasons import DenyError, Reason
from extauth.redact import loggable_path
from extauth.request import CheckInput
from extauth.revocation import RevocationList, token_ids
from extauth.runtime import CompiledPolicy, Runtime
from extauth.store import new_lease_id
from extauth.store.base import LeaseRef, RequestStore, StoreError
from extauth.tokens import VerifiedToken
from extauth.tokens.cache import token_digest

log = DECISION_LOG

# The request header Envoy reads as the stream's deadline (route max_stream_duration's
# grpc_timeout_header_max); the route removes it before the upstream.
SESSION_HEADER = "grpc-timeout"


def grpc_timeout(seconds: float) -> str:
    """A gRPC ``grpc-timeout`` value (at most 8 digits and a unit) for ``seconds``, rounded up,
    at least 1 ms: 0 would mean no bound at all to Envoy."""
    ms = max(1, math.ceil(seconds * 1000))
    return f"{ms}m" if ms < 100_000_000 else f"{math.ceil(ms / 1000)}S"


# Retry-After when the store gives no better hint (a held slot frees whenever its
# owner disconnects, which we cannot predict).
_QUOTA_RETRY_HINT = 5


class JailLike(Protocol):
    def is_banned(self, ip: str) -> bool: ...
    def observe(self, ip: str, reason: Reason, signal: str | None = None) -> None: ...
    def exempt(self, ip: str) -> bool: ...


@dataclass(slots=True)
class _Ctx:
    """What the pipeline has learned so far; used to build the final Decision."""

    decision_id: str
    client_ip: str  # the subject per-IP quotas and bans count (extauth.addresses.client_subject)
    client_address: str = ""  # the address itself, logged when it differs from client_ip
    # False when a proxy stands in for a client address it could not read: never jailed
    # then, since a ban would hold every client behind that proxy.
    own_address: bool = True
    evidence: str | None = None  # a hostile denial's token, digested: what the jail counts
    websocket: bool = False
    extended_connect: bool = False  # a WebSocket over HTTP/2 or HTTP/3 (RFC 8441, RFC 9220)
    policy: CompiledPolicy | None = None
    verified: VerifiedToken | None = None
    headers_to_set: dict[str, str] = field(default_factory=dict)
    headers_to_remove: list[str] = field(default_factory=list)
    query_params_to_remove: list[str] = field(default_factory=list)
    lease: LeaseRef | None = None
    lease_tag: str | None = None
    stripped: bool = False  # the credential edits above are complete


def client_ip(req: CheckInput, xff_hops: int) -> str:
    """The client address: the connection's source, or the entry ``xff_hops`` from
    the right of X-Forwarded-For when that many trusted proxies append to it, in canonical
    form (``extauth.addresses``). Falls back to the source address when the header is short
    or not an IP, and to the source as given when that is not an IP either."""
    return _client_address(req, xff_hops)[0]


def _client_address(req: CheckInput, xff_hops: int) -> tuple[str, bool]:
    """``client_ip``, and whether it is the client's own: False when a trusted proxy's entry
    is there but is no address, and the source (that proxy, shared by all its clients)
    stands in for it."""
    if xff_hops > 0:
        entries = [e.strip() for e in req.headers.get("x-forwarded-for", "").split(",") if e.strip()]
        if len(entries) >= xff_hops:
            candidate = forwarded_ip(entries[-xff_hops])
            if candidate is not None:
                return candidate, True
            return canonical_ip(req.source_ip) or req.source_ip, False
    return canonical_ip(req.source_ip) or req.source_ip, True


# Decision ids only need to be unique, not secret: a random per-process prefix
# and a counter cost a fraction of reading /dev/urandom on every check.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)


def new_decision_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def internal_error() -> Decision:
    """The 500 for a check whose answer could not be built (the handler's last resort)."""
    reason = Reason.INTERNAL_ERROR
    return Decision(allowed=False, status=reason.status, decision_id=new_decision_id(), reason=reason,
                    deny_headers=_deny_headers(reason, None))


class Authorizer:
    """Holds the current Runtime (swapped whole on reload) and the shared store."""

    def __init__(
        self,
        runtime: Runtime,
        store: RequestStore | None,
        *,
        metrics: Metrics | None = None,
        jail: JailLike | None = None,
        clock: Callable[[], float] = time.time,
        tagger: LeaseTagger | None = None,
        revocations: RevocationList | None = None,
    ) -> None:
        self._runtime = runtime
        self.revocations = revocations
        self.store = store
        self.tagger = tagger or LeaseTagger()
        self.metrics = metrics or Metrics()
        self.jail = jail
        self._clock = clock
        # Bounded by policies x reasons: label values never come from the request.
        self._decision_counters: dict[tuple[str | None, bool, Reason | None, Reason | None], Any] = {}

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @property
    def revocation_generation(self) -> int:
        """Changes whenever this replica's copy of the revocations does."""
        return self.revocations.generation if self.revocations is not None else 0

    def swap(self, runtime: Runtime) -> Runtime:
        """Install a new runtime; checks already running finish on the old one."""
        old, self._runtime = self._runtime, runtime
        return old

    def admit_repeat(self, policy: str, client_ip: str, started: float) -> bool:
        """Whether a remembered allow still stands (its client is not banned); counts it if so."""
        if self.jail is not None and self.jail.is_banned(client_ip):
            return False  # the full pipeline denies it, with its log line and metrics
        self.metrics.memo_hits.inc()
        self._count(policy, True, None, None, time.perf_counter() - started)
        return True

    async def check(self, req: CheckInput, started: float | None = None) -> Decision:
        """The decision for one request. ``started`` (a ``perf_counter`` reading) is when the
        caller began handling it, so the latency metric covers its translation too."""
        rt = self._runtime  # read once: a reload mid-check must not mix configs
        if started is None:
            started = time.perf_counter()
        ctx = _Ctx(decision_id=new_decision_id(), client_ip=req.source_ip)
        try:
            decision = await self._run(rt, req, ctx)
        except DenyError as e:
            decision = self._deny(rt, req, ctx, e)
        except Exception:
            # Never a crash, never an allow: a bug becomes a 500 with a log line.
            log.exception("check failed", extra={"fields": {"decision_id": ctx.decision_id}})
            self.take_back(ctx.lease)
            decision = self._deny(rt, req, ctx, DenyError(Reason.INTERNAL_ERROR, "unexpected exception"))
        self._observe(decision, time.perf_counter() - started)
        return decision

    async def _run(self, rt: Runtime, req: CheckInput, ctx: _Ctx) -> Decision:
        ctx.client_address, ctx.own_address = _client_address(req, rt.config.xff_hops)
        if canonical_ip(ctx.client_address) is None:
            raise DenyError(Reason.SOURCE_NOT_IP, "the client address is not an IP")
        ctx.client_ip = client_subject(ctx.client_address, rt.config.ipv6_prefix_length)
        ctx.websocket = is_upgrade_attempt(req.headers)
        ctx.extended_connect = ctx.websocket and is_extended_connect(req.protocol)
        policy = select_policy(rt.policies, rt.by_name, req.context, req.host, req.path)
        if policy is None:
            raise DenyError(Reason.NO_POLICY, "no policy for route")
        ctx.policy = policy
        if self.jail is not None and self.jail.is_banned(ctx.client_ip):
            raise DenyError(Reason.BANNED)
        pending_origin = None
        if ctx.websocket:
            validate_handshake(req.method, req.headers, req.protocol)
            pending_origin = self._check_origin(policy, req.headers)
        elif policy.policy.websocket_only:
            raise DenyError(Reason.BAD_HANDSHAKE, "plain HTTP request on a WebSocket-only policy")
        if policy.verifier is not None and policy.sources is not None:
            verified = await self._verify(policy, req, ctx)
            self._check_revoked(ctx)
            self._authorize(policy, req, verified, pending_origin)
        elif pending_origin is not None:
            raise DenyError(Reason.ORIGIN_NOT_ALLOWED)
        if ctx.websocket and policy.quota_plan is not None:
            await self._acquire(rt, policy, ctx)
        return self._allow(ctx)

    def take_back(self, lease: LeaseRef | None) -> None:
        """Release, in the background, a granted lease whose allow never reaches Envoy, rather
        than hold its slot for a whole TTL."""
        if lease is not None and self.store is not None:
            self.store.release_later(lease)

    @staticmethod
    def _check_origin(policy: CompiledPolicy, headers: Mapping[str, str]) -> str | None:
        """None when the origin passes; the origin itself when only the token's origins claim
        (checked once the token is verified) can still admit it."""
        origin = headers.get("origin")
        if origin is None:
            if not policy.policy.allow_missing_origin:
                raise DenyError(Reason.ORIGIN_MISSING)
            return None
        if policy.origins.allows(origin):
            return None
        if policy.origins_claim is None or policy.verifier is None:
            raise DenyError(Reason.ORIGIN_NOT_ALLOWED)
        return origin

    @staticmethod
    def _authorize(policy: CompiledPolicy, req: CheckInput, verified: VerifiedToken,
                   pending_origin: str | None) -> None:
        """What the verified claims decide: an origin only the token's own list can admit,
        then the claim rules."""
        if pending_origin is not None and not (
                policy.origins_claim is not None
                and claim_allows(pending_origin, claim_at(verified.claims, policy.origins_claim))):
            raise DenyError(Reason.ORIGIN_NOT_ALLOWED, "origin neither listed nor in the token's claim")
        if policy.claim_rules and not policy.claim_rules.allows(verified.claims, req.method, req.path):
            raise DenyError(Reason.CLAIMS_FORBIDDEN, "a claim rule does not hold")

    @staticmethod
    def _strip(policy: CompiledPolicy, req: CheckInput, ctx: _Ctx) -> str | None:
        """Record the edits that remove every credential copy; the token, if any.
        Raises DenyError when the transports are ambiguous (then nothing is recorded)."""
        assert policy.sources is not None
        extracted = policy.sources.extract(req.headers, req.query, req.path)
        strip = extracted.stripping
        ctx.headers_to_remove.extend(strip.headers_to_remove)
        ctx.headers_to_set.update(strip.headers_to_set)
        ctx.query_params_to_remove.extend(strip.query_params_to_remove)
        ctx.stripped = True
        return extracted.token

    async def _verify(self, policy: CompiledPolicy, req: CheckInput, ctx: _Ctx) -> VerifiedToken:
        assert policy.sources is not None and policy.verifier is not None
        token = self._strip(policy, req, ctx)
        if token is None:
            raise DenyError(Reason.TOKEN_MISSING)
        verified = policy.verifier.verify_cached(token)
        if verified is None:
            try:
                verified = await policy.verifier.verify(token)
            except DenyError as e:
                if e.reason.hostile:
                    ctx.evidence = token_digest(token).hex()
                raise
        ctx.verified = verified
        return verified

    def _check_revoked(self, ctx: _Ctx) -> None:
        """This replica's copy of the revocations (extauth/revocation.py): the whole check for
        plain HTTP, and a shortcut for upgrades, whose acquire checks the store itself."""
        verified = ctx.verified
        if self.revocations is not None and verified is not None and self.revocations.revoked(
                verified.user, token_ids(verified)):
            raise DenyError(Reason.TOKEN_REVOKED)

    async def _acquire(self, rt: Runtime, policy: CompiledPolicy, ctx: _Ctx) -> None:
        assert policy.quota_plan is not None
        limits = policy.quota_plan.limits(ctx.verified.claims if ctx.verified else None, ctx.client_address)
        if self.store is None:
            raise DenyError(Reason.STORE_UNAVAILABLE, "no store configured")
        user = ctx.verified.user if ctx.verified else None
        ref = LeaseRef(new_lease_id(), policy.policy.name, user, ctx.client_ip)
        store = self.store
        token = token_ids(ctx.verified) if ctx.verified else None
        try:
            if not self.tagger.ready:  # once per process
                await self.tagger.load(store, wait=store.timeout, retry=store.reset_seconds)
            result = await store.acquire(ref, limits, rt.config.lease_ttl_seconds, token)
            if result.denied is Reason.BANNED and self.jail is not None and self.jail.exempt(ctx.client_ip):
                # never_ban outranks a ban the store already holds (made before the address was
                # listed there): the jail no longer enforces it, so the store must not either.
                # The ban check records nothing, so asking again counts the attempt once.
                unbanned = dataclasses.replace(limits, enforce_bans=False)
                result = await store.acquire(ref, unbanned, rt.config.lease_ttl_seconds, token)
        except StoreError as e:
            if rt.config.store_on_error == "allow":
                log_event(log, logging.WARNING, "store unavailable; allowing without a lease",
                          decision_id=ctx.decision_id, policy=policy.policy.name, error=type(e).__name__)
                return
            raise DenyError(Reason.STORE_UNAVAILABLE, type(e).__name__) from None
        if not result.granted and result.denied is Reason.TOKEN_REVOKED:
            raise DenyError(Reason.TOKEN_REVOKED, "revoked (store)")
        if not result.granted:
            reason = result.denied or Reason.QUOTA_USER
            retry = result.retry_after if result.retry_after is not None else _QUOTA_RETRY_HINT
            raise DenyError(reason, retry_after=max(1, math.ceil(retry)))
        ctx.lease = ref
        ctx.lease_tag = self.tagger.tag(ref)

    def _allow(self, ctx: _Ctx) -> Decision:
        policy = ctx.policy
        assert policy is not None
        headers = dict(ctx.headers_to_set)
        remove = [*ctx.headers_to_remove, *policy.foreign_identity_headers]
        for name, template in policy.header_templates:
            value = template.render(ctx.verified.claims if ctx.verified else {})
            if value:
                headers[name] = value
            else:
                # Never let a client-supplied identity header through unreplaced.
                remove.append(name)
        if ctx.websocket:
            bound = self._session_bound(policy, ctx)
            if bound is not None:
                headers[SESSION_HEADER] = bound
            else:
                remove.append(SESSION_HEADER)  # a client's own would bound its session: never trusted
        if ctx.extended_connect:
            # The stream has no key: an HTTP/1.1 upstream needs one to accept the upgrade
            # Envoy translates it to (an HTTP/2 one ignores it, RFC 8441 §5).
            headers["sec-websocket-key"] = new_key()
        valid_until = None
        if not ctx.websocket and ctx.lease is None:
            valid_until = ctx.verified.expires_at if ctx.verified else math.inf
        return Decision(
            allowed=True,
            status=200,
            decision_id=ctx.decision_id,
            policy=policy.policy.name,
            user=ctx.verified.user if ctx.verified else None,
            client_ip=ctx.client_ip,
            websocket=ctx.websocket,
            headers_to_set=headers,
            headers_to_remove=tuple(dict.fromkeys(remove)),
            query_params_to_remove=tuple(dict.fromkeys(ctx.query_params_to_remove)),
            lease=ctx.lease,
            lease_tag=ctx.lease_tag,
            valid_until=valid_until,
            claims=policy.metadata_claims.select(ctx.verified.claims)
            if ctx.verified is not None and policy.metadata_claims else None,
        )

    def _session_bound(self, policy: CompiledPolicy, ctx: _Ctx) -> str | None:
        """The ``grpc-timeout`` value that ends this WebSocket at its policy's session bound:
        ``min(token exp, now + max_seconds)`` (docs/revocation.md); None without one."""
        session = policy.policy.session
        if session is None:
            return None
        now = self._clock()
        deadline = now + session.max_seconds if session.max_seconds is not None else math.inf
        if session.close_at_token_expiry and ctx.verified is not None:
            deadline = min(deadline, ctx.verified.expires_at)
        if deadline == math.inf:
            return None
        return grpc_timeout(deadline - now)

    def _deny(self, rt: Runtime, req: CheckInput, ctx: _Ctx, err: DenyError) -> Decision:
        reason = err.reason
        # A shadow policy has no effect but its log and metrics: a key set still being rolled
        # out would otherwise make its honest users look like forgers, and ban them on the
        # enforced policies.
        if (reason.hostile and self.jail is not None and ctx.own_address
                and not (ctx.policy and ctx.policy.policy.shadow)):
            self.jail.observe(ctx.client_ip, reason, ctx.evidence)
        policy_name = ctx.policy.policy.name if ctx.policy else None
        if (ctx.policy is not None and ctx.policy.policy.shadow and reason is not Reason.INTERNAL_ERROR
                and self._strippable(ctx.policy, req, ctx)):
            self.metrics.shadow.labels(policy_name, reason.value).inc()
            allowed = self._allow(ctx)
            self._log(logging.INFO, "shadow deny", req, ctx, reason, err.detail)
            return dataclasses.replace(allowed, shadow_reason=reason, valid_until=None)
        self._log(logging.INFO, "deny", req, ctx, reason, err.detail)
        return Decision(
            allowed=False,
            status=reason.status,
            decision_id=ctx.decision_id,
            reason=reason,
            policy=policy_name,
            user=ctx.verified.user if ctx.verified else None,
            client_ip=ctx.client_ip,
            websocket=ctx.websocket,
            deny_headers=_deny_headers(reason, err.retry_after),
        )

    def _strippable(self, policy: CompiledPolicy, req: CheckInput, ctx: _Ctx) -> bool:
        """Whether a shadow allow can strip every credential copy. A denial that came before
        the token step (origin, ban, handshake) has recorded no edits yet; when the transports
        are ambiguous they cannot be computed, and the request is denied for real rather
        than let a token through to the upstream."""
        if ctx.stripped or policy.sources is None:
            return True
        try:
            self._strip(policy, req, ctx)
        except DenyError:
            return False
        return True

    def _log(self, level: int, msg: str, req: CheckInput, ctx: _Ctx, reason: Reason, detail: str) -> None:
        # Path without its query string or path parameters (they may hold a token); never the token.
        log_event(
            log, level, msg,
            reason=reason.value, status=reason.status,
            policy=ctx.policy.policy.name if ctx.policy else None,
            client_ip=ctx.client_ip,
            user=ctx.verified.user if ctx.verified else None,
            decision_id=ctx.decision_id, request_id=req.request_id,
            host=req.host[:256], route=loggable_path(req.path), protocol=req.protocol[:16], detail=detail,
            # An IPv6 client is counted by its network: the address itself too, for forensics.
            **({"client_address": ctx.client_address} if ctx.client_address != ctx.client_ip else {}),
        )

    def _observe(self, d: Decision, elapsed: float) -> None:
        self._count(d.policy, d.allowed, d.reason, d.shadow_reason, elapsed)

    def _count(self, policy: str | None, allowed: bool, reason: Reason | None,
               shadow_reason: Reason | None, elapsed: float) -> None:
        self.metrics.check_seconds.observe(elapsed)
        key = (policy, allowed, reason, shadow_reason)
        child = self._decision_counters.get(key)
        if child is None:  # a dict hit costs less than building the label tuple
            result = "allow" if allowed else "deny"
            shadow = f"shadow:{shadow_reason.value}" if shadow_reason else ""
            child = self.metrics.decisions.labels(policy or "", result, reason.value if reason else shadow)
            self._decision_counters[key] = child
        child.inc()


def _deny_headers(reason: Reason, retry_after: int | None) -> dict[str, str]:
    headers = {"x-extauth-reason": reason.value}
    if reason is Reason.CLAIMS_FORBIDDEN:
        # RFC 6750 §3.1: authentic, but without the privileges (scopes, roles) the resource needs.
        headers["www-authenticate"] = 'Bearer realm="extauth", error="insufficient_scope"'
    elif reason.status == 401:
        # RFC 6750 §3.1: no error code when the request carried no credentials.
        headers["www-authenticate"] = (
            'Bearer realm="extauth"'
            if reason is Reason.TOKEN_MISSING
            else 'Bearer realm="extauth", error="invalid_token"'
        )
    elif reason is Reason.UNSUPPORTED_VERSION:
        headers["sec-websocket-version"] = "13"
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    elif reason.status == 503:
        headers["retry-after"] = "1"
    return headers
