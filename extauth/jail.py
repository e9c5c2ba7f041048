"""The abuse jail: count hostile signals per client, ban those that forge tokens.

Checks read a local copy of the store's ban list (no round trip); a failing store makes the
jail fail open. Contract and failure modes: docs/operations.md, "The abuse jail".
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable

from extauth.addresses import canonical_network
from extauth.aio import BackgroundTasks, cancel_and_wait
from extauth.config import Abuse
from extauth.logs import log_event
from extauth.metrics import Metrics
from extauth.reasons import Reason
from extauth.store.base import Bans, StoreError

log = logging.getLogger("extauth.jail")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: list[str]) -> tuple[IpNetwork, ...]:
    """In the canonical form client addresses take: ``::ffff:10.0.0.0/104`` is 10.0.0.0/8."""
    return tuple(canonical_network(ipaddress.ip_network(c, strict=False)) for c in cidrs)


def in_networks(ip: str, networks: tuple[IpNetwork, ...]) -> bool:
    """True when ``ip`` (an address, or a subject network such as ``2001:db8:1:2::/64``) lies
    in or overlaps one of ``networks``; False for anything else. A subject network counts
    when it overlaps: banning it would ban what it shares with that network."""
    if not networks:
        return False
    if "/" in ip:
        try:
            net = ipaddress.ip_network(ip, strict=False)
        except ValueError:
            return False
        return any(net.overlaps(n) for n in networks if n.version == net.version)
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        mapped = addr.ipv4_mapped
        if any(mapped in n for n in networks if n.version == 4):
            return True
    return any(addr in n for n in networks if n.version == addr.version)


class Jail:
    """Implements the pipeline's ``JailLike``: ``is_banned(ip)`` and ``observe(ip, reason)``."""

    def __init__(
        self,
        cfg: Abuse,
        store: Bans,
        metrics: Metrics | None = None,
        *,
        refresh_seconds: float = 1.0,
        max_in_flight: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if refresh_seconds <= 0 or max_in_flight < 1:
            raise ValueError("refresh_seconds must be > 0 and max_in_flight >= 1")
        self.store = store
        self.metrics = metrics or Metrics()
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self.cfg = cfg
        self._never_ban: tuple[IpNetwork, ...] = parse_networks(cfg.never_ban)
        # ip -> ban expiry (unix seconds), a copy of the store's ban list.
        self._bans: dict[str, float] = {}
        # Local changes (ip -> (expiry, or None for an unban; change number)) that a refresh
        # already in flight may not have seen yet; re-applied on top of its result.
        self._changes: dict[str, tuple[float | None, int]] = {}
        self._change_no = 0
        self._tasks = BackgroundTasks(limit=max_in_flight)  # store writes of hostile signals
        self._refresher: asyncio.Task[None] | None = None
        self._store_ok = True
        self.dropped = 0  # hostile signals not recorded because too many writes were in flight

    @property
    def store_ok(self) -> bool:
        """False from the first failed store call until the next successful one."""
        return self._store_ok

    # -- settings ----------------------------------------------------------------

    def configure(self, cfg: Abuse) -> None:
        """Apply new abuse settings (hot reload). Takes effect for the next signal."""
        self._never_ban = parse_networks(cfg.never_ban)
        self.cfg = cfg

    def exempt(self, ip: str) -> bool:
        """True for an address in ``never_ban``."""
        return in_networks(ip, self._never_ban)

    # -- JailLike (synchronous, cheap) ---------------------------------------------

    def is_banned(self, ip: str) -> bool:
        if not self.cfg.enabled:
            return False
        expires = self._bans.get(ip)
        if expires is None:
            return False
        if expires <= self._clock():
            self._bans.pop(ip, None)
            return False
        return not self.exempt(ip)

    def observe(self, ip: str, reason: Reason, signal: str | None = None) -> None:
        """Count a hostile signal for ``ip``. ``signal`` names its evidence (a digest of the
        forged token): the same evidence again within the window counts once (Store.record_hostile)."""
        cfg = self.cfg
        if not cfg.enabled or not reason.hostile or self.exempt(ip):
            return
        self.metrics.hostile.labels(reason.value).inc()
        if not self._tasks.spawn(lambda: self._record(ip, reason, cfg, signal)):
            self.dropped += 1  # too many writes in flight, or no running loop

    # -- local view of the store's bans ------------------------------------------

    def note_ban(self, ip: str, expires_at: float) -> None:
        """Enforce a ban locally at once (the store already holds it)."""
        self._bans[ip] = expires_at
        self._change(ip, expires_at)

    def forget_ban(self, ip: str) -> None:
        """Drop a ban locally at once (the store already dropped it)."""
        self._bans.pop(ip, None)
        self._change(ip, None)

    def _change(self, ip: str, expires_at: float | None) -> None:
        self._change_no += 1
        self._changes[ip] = (expires_at, self._change_no)

    async def refresh(self) -> bool:
        """Replace the local ban list with the store's. False (and the old list kept) on failure."""
        started = self._change_no
        try:
            bans = await self.store.list_bans()
        except StoreError as e:
            self._store_failed("list_bans", e)
            return False
        self._store_recovered()
        fresh = {b.ip: b.expires_at for b in bans}
        # A local ban or unban made while the listing was in flight wins over it.
        for ip, (expires_at, no) in list(self._changes.items()):
            if no <= started:
                del self._changes[ip]
            elif expires_at is None:
                fresh.pop(ip, None)
            else:
                fresh[ip] = expires_at
        self._bans = fresh
        return True

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load the ban list once (never raises) and start the background refresher."""
        if self._refresher is not None:
            return
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="extauth-jail-refresh")

    async def drain(self, within: float = 5.0) -> None:
        """Wait (at most ``within`` seconds) for the store writes in flight (tests, shutdown)."""
        await self._tasks.wait(within)

    async def stop(self) -> None:
        """Stop the refresher; let in-flight writes finish briefly, then cancel them."""
        refresher, self._refresher = self._refresher, None
        await cancel_and_wait(refresher)
        await self.drain(within=1.0)
        await self._tasks.cancel()

    async def _refresh_loop(self) -> None:
        me = asyncio.current_task()
        while self._refresher is me:  # stop() clears it
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
            except Exception:  # a bug must not kill the refresher
                log.exception("jail: ban list refresh failed")

    # -- store writes ----------------------------------------------------------------

    async def _record(self, ip: str, reason: Reason, cfg: Abuse, signal: str | None) -> None:
        try:
            reached = await self.store.record_hostile(
                ip, threshold=cfg.threshold, window=float(cfg.window_seconds),
                ban_seconds=float(cfg.ban_seconds), dry_run=cfg.dry_run, signal=signal)
        except StoreError as e:
            self._store_failed("record_hostile", e)
            return
        except Exception:
            log.exception("jail: recording a hostile signal failed")
            return
        self._store_recovered()
        if not reached:
            return
        self.metrics.bans.labels("dry_run" if cfg.dry_run else "enforced").inc()
        if not cfg.dry_run:
            self.note_ban(ip, self._clock() + cfg.ban_seconds)
        log_event(log, logging.WARNING, "would ban" if cfg.dry_run else "ban",
                  event="ban", ip=ip, hostile=cfg.threshold, window_seconds=cfg.window_seconds,
                  ban_seconds=cfg.ban_seconds, dry_run=cfg.dry_run, last_reason=reason.value)

    def _store_failed(self, op: str, err: BaseException) -> None:
        if self._store_ok:
            self._store_ok = False
            log_event(log, logging.WARNING, "store unavailable; jail failing open",
                      event="jail_store_error", op=op, error=f"{type(err).__name__}: {err}"[:200])

    def _store_recovered(self) -> None:
        if not self._store_ok:
            self._store_ok = True
            log_event(log, logging.INFO, "store available again; jail enforcing", event="jail_store_ok")
