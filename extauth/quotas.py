"""Which limits one upgrade is counted against: the tier a claim names (or the default tier),
then the per-IP limits of the client's network when one is listed. Compiled once per runtime;
a per-user override held in the store is applied by the acquire itself, in the same round trip.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from typing import Any

from extauth.claims import claim_at, split_path
from extauth.config import IpQuota, QuotaLimits, Quotas
from extauth.store.base import Limits

__all__ = ["QuotaPlan"]

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Client addresses whose network lookup is remembered (a NAT address repeats all day).
_MEMO_MAX = 4096


def _merged(base: Limits, tier: QuotaLimits) -> Limits:
    """``base`` with every limit ``tier`` gives replaced."""
    given = {k: v for k, v in tier.model_dump().items() if v is not None}
    return dataclasses.replace(base, **given)


class QuotaPlan:
    """A policy's limits per request: ``limits(claims, address)``."""

    __slots__ = ("_claim", "_default", "_memo", "_networks", "_tiers")

    def __init__(self, quotas: Quotas, *, enforce_bans: bool) -> None:
        self._default = Limits(
            connections_per_user=quotas.connections_per_user,
            connections_per_ip=quotas.connections_per_ip,
            attempts_per_user_per_minute=quotas.attempts_per_user_per_minute,
            attempts_per_ip_per_minute=quotas.attempts_per_ip_per_minute,
            # The jail enforces bans for every request; the acquire script checks them too (in
            # the same round trip), so both follow abuse.enabled.
            enforce_bans=enforce_bans,
        )
        self._claim = split_path(quotas.tier_claim) if quotas.tier_claim is not None else None
        self._tiers = {name: _merged(self._default, tier) for name, tier in quotas.tiers.items()}
        # Longest prefix first: the most specific network decides.
        self._networks: tuple[tuple[IpNetwork, IpQuota], ...] = tuple(sorted(
            ((ipaddress.ip_network(o.cidr), o) for o in quotas.ip_overrides),
            key=lambda item: item[0].prefixlen, reverse=True))
        self._memo: dict[str, IpQuota | None] = {}

    @property
    def default(self) -> Limits:
        return self._default

    def tier(self, claims: Mapping[str, Any] | None) -> str | None:
        """The tier the claims name; None for the default tier."""
        if self._claim is None or claims is None:
            return None
        value = claim_at(claims, self._claim)
        return value if isinstance(value, str) and value in self._tiers else None

    def limits(self, claims: Mapping[str, Any] | None, address: str) -> Limits:
        tier = self.tier(claims)
        limits = self._default if tier is None else self._tiers[tier]
        if self._networks:
            network = self._network(address)
            if network is not None:
                limits = dataclasses.replace(
                    limits,
                    connections_per_ip=network.connections_per_ip or limits.connections_per_ip,
                    attempts_per_ip_per_minute=network.attempts_per_ip_per_minute
                    or limits.attempts_per_ip_per_minute)
        return limits

    def _network(self, address: str) -> IpQuota | None:
        if address in self._memo:
            return self._memo[address]
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            found = None  # not an IP (a Unix socket peer): no network applies
        else:
            found = next((limits for net, limits in self._networks
                          if net.version == ip.version and ip in net), None)
        if len(address) <= 64:
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[address] = found
        return found
