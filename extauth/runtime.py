"""A Config compiled for the request path: origin sets, token transports, verifiers,
limits and header templates. Built once per (re)load, swapped whole, never mutated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extauth.claims import ClaimRules, ClaimSelector, compile_rules, split_path
from extauth.config import Config, JwtConfig, Match, Policy
from extauth.header_template import Template
from extauth.memo import AllowMemo, Reads
from extauth.origin import OriginPolicy
from extauth.quotas import QuotaPlan
from extauth.store.base import Limits
from extauth.tokens.extract import TokenSources
from extauth.tokens.jwks import KeySource, key_source_identity, make_key_source
from extauth.tokens.jwt import JwtVerifier


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy: Policy
    origins: OriginPolicy
    sources: TokenSources | None
    verifier: JwtVerifier | None
    limits: Limits | None  # the default tier's; None: nothing to count, the store is not touched
    header_templates: tuple[tuple[str, Template], ...]
    claim_rules: ClaimRules
    quota_plan: QuotaPlan | None  # the limits per request (tier, client network); None with limits
    metadata_claims: ClaimSelector
    origins_claim: tuple[str, ...] | None  # the claim path of a token's own allowed origins
    # Copied out of the pydantic model: read on every check by select_policy.
    name: str
    match: Match | None
    # What a plain-HTTP decision under it reads (the allow memo's key); None: never remembered.
    reads: Reads | None = None
    # Identity headers other policies set and this one does not: removed from every request
    # it allows. An upstream behind several policies trusts them because only extauth sets
    # them; a client must not bring its own through a policy that leaves them alone.
    foreign_identity_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    policies: tuple[CompiledPolicy, ...]
    by_name: Mapping[str, CompiledPolicy]
    verifiers: Mapping[str, JwtVerifier]  # keyed by verifier identity, for reuse on reload
    # The verifiers' key sources, keyed by key_source_identity: shared by verifiers that read
    # the same keys, and carried over a reload that keeps them (warm keys, one fetcher).
    key_sources: Mapping[str, KeySource]
    # Serialized allow responses; new and empty with every runtime, so a reload forgets them.
    memo: AllowMemo[bytes]

    async def close_unused(self, keep: Runtime | None) -> None:
        """Close the key sources the next runtime did not take over (the verifiers own none)."""
        kept = set(keep.key_sources) if keep else set()
        for key, source in self.key_sources.items():
            if key not in kept:
                await source.close()


def _verifier_key(jwt: JwtConfig, cfg: Config) -> str:
    return f"{jwt.model_dump_json()}|{cfg.max_token_bytes}|{cfg.token_cache_size}"


def _quota_plan(policy: Policy, cfg: Config) -> QuotaPlan | None:
    if not policy.quotas.counts:
        return None
    return QuotaPlan(policy.quotas, enforce_bans=cfg.abuse.enabled)


def _plain_http_reads(p: Policy, cfg: Config, sources: TokenSources | None,
                      rules: ClaimRules) -> Reads | None:
    """What the pipeline reads of a plain-HTTP request under ``p`` beyond the fields every
    memo key holds (``extauth.memo.KEYED_FIELDS``); None when its allows are not remembered."""
    if p.websocket_only or p.shadow:
        return None  # it denies plain HTTP; a shadow allow may stand for a denial
    secrets, query = sources.inputs() if sources else ((), False)
    return Reads(
        fields=("path",) if rules.scoped else (),  # claim rules scoped by method or path
        headers=("x-forwarded-for",) if cfg.xff_hops else (),  # the client address
        secrets=secrets, query=query,  # the token sources
        parameters=sources.reads_path_parameters if sources else False)


def build_runtime(cfg: Config, previous: Runtime | None = None) -> Runtime:
    """Compile a config. Verifiers whose settings did not change are carried over
    from ``previous`` so a reload keeps warm JWKS and token caches."""
    old = previous.verifiers if previous else {}
    old_sources = previous.key_sources if previous else {}
    verifiers: dict[str, JwtVerifier] = {}
    key_sources: dict[str, KeySource] = {}
    identity = {name for p in cfg.policies for name in p.upstream_headers}
    compiled = []
    for p in cfg.policies:
        verifier = None
        if p.jwt is not None:
            issuer_sources = []
            for issuer in p.jwt.per_issuer():  # each issuer its own key source
                source_key = key_source_identity(issuer)
                source = key_sources.get(source_key) or old_sources.get(source_key)
                if source is None:
                    source = make_key_source(issuer)  # raises ConfigError
                key_sources[source_key] = source
                issuer_sources.append(source)
            key = _verifier_key(p.jwt, cfg)
            verifier = verifiers.get(key) or old.get(key)
            if verifier is None:
                verifier = JwtVerifier(p.jwt, max_token_bytes=cfg.max_token_bytes,
                                       cache_size=cfg.token_cache_size, sources=issuer_sources)
            verifiers[key] = verifier
        sources = TokenSources(p.jwt.token_sources) if p.jwt else None
        rules = compile_rules([r.spec() for r in p.claim_rules])
        plan = _quota_plan(p, cfg)
        compiled.append(
            CompiledPolicy(
                policy=p,
                origins=OriginPolicy(p.origins),
                sources=sources,
                verifier=verifier,
                limits=plan.default if plan is not None else None,
                quota_plan=plan,
                header_templates=tuple((k, Template(v)) for k, v in p.upstream_headers.items()),
                claim_rules=rules,
                metadata_claims=ClaimSelector(p.metadata_claims),
                origins_claim=split_path(p.origins_claim) if p.origins_claim is not None else None,
                name=p.name,
                match=p.match,
                reads=_plain_http_reads(p, cfg, sources, rules),
                foreign_identity_headers=tuple(sorted(identity - p.upstream_headers.keys())),
            )
        )
    memo: AllowMemo[bytes] = AllowMemo(cfg.allow_memo_size)
    for verifier in verifiers.values():
        verifier.on_keys_dropped(memo.clear)
    return Runtime(cfg, tuple(compiled), {c.name: c for c in compiled}, verifiers, key_sources, memo)
