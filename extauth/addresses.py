"""Client addresses in one text form, so that a quota, a ban, the never-ban list and an admin
command all agree on who a client is.

The same IPv4 client can reach extauth as ``10.1.2.3`` or as ``::ffff:10.1.2.3`` (a dual-stack
proxy that appends the mapped form to X-Forwarded-For, an operator pasting it from a log), and
IPv6 has several spellings of one address. Without one form, each spelling is its own quota
bucket and its own jail cell: a ban on one does not hold the other.

Per-IP quotas and bans then count a *subject*: an IPv4 address, or the network an IPv6 address
lies in (``ipv6_prefix_length``, /64 by default). One IPv6 client is routinely given a whole
/64 (RFC 6177; privacy addresses rotate inside it), so per-address counting would let it open
a quota's worth of sockets from each of 2^64 addresses and shed a ban by changing address.
"""

from __future__ import annotations

import functools
import ipaddress


# Bounded: the hot path calls this on every check, and its argument comes from the network.
@functools.lru_cache(maxsize=8192)
def canonical_ip(value: str) -> str | None:
    """``value`` as an address in canonical text (IPv4-mapped IPv6 as plain IPv4, IPv6
    compressed and lower case, brackets dropped); None when it is not an IP address."""
    try:
        addr = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def forwarded_ip(entry: str) -> str | None:
    """An X-Forwarded-For entry as ``canonical_ip``, also in the ``ip:port`` and
    ``[v6]:port`` forms some proxies append (Azure Application Gateway does)."""
    address = canonical_ip(entry)
    if address is not None:
        return address
    entry = entry.strip()
    if entry.startswith("["):  # [v6]:port
        inside, sep, port = entry[1:].partition("]:")
    elif entry.count(":") == 1:  # v4:port (an IPv6 address without brackets parsed above)
        inside, sep, port = entry.partition(":")
    else:
        return None
    if not sep or not port.isdigit():
        return None
    return canonical_ip(inside)


@functools.lru_cache(maxsize=8192)
def client_subject(address: str, ipv6_prefix: int) -> str:
    """What per-IP quotas and bans count for a canonical ``address`` (``canonical_ip``): the
    IPv4 address itself, or the IPv6 address's /``ipv6_prefix`` network, such as
    ``2001:db8:1:2::/64`` (the address itself at 128). Anything that is not an IP address is
    its own subject."""
    if ipv6_prefix >= 128 or ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    except ValueError:
        return address


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for any other
    name, which may resolve to a public address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
