"""Client addresses in one text form, and HOST:PORT, so that a quota, a ban, the never-ban
list and an admin command all agree on who a client is.

Why each spelling and each IPv6 /64 is one client: docs/operations.md, "Who counts as one client".
"""

from __future__ import annotations

import functools
import ipaddress

# RFC 6052's well-known NAT64 prefix. Behind a stateless translator (SIIT-DC), every IPv4
# client reaches an IPv6-only service as 64:ff9b::a.b.c.d: counted by its /64 they would
# all be one client. The prefix is not routed on the internet, so no one can pick an
# address in it to pass for an IPv4 client.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


# Bounded: the hot path calls this on every check, and its argument comes from the network.
@functools.lru_cache(maxsize=8192)
def canonical_ip(value: str) -> str | None:
    """``value`` as an address in canonical text (IPv4-mapped and NAT64 well-known-prefix
    IPv6 as plain IPv4, IPv6 compressed and lower case, brackets dropped); None when it is
    not an IP address."""
    try:
        addr = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if addr in _NAT64:
            return str(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return str(addr)


def canonical_network(network: ipaddress.IPv4Network | ipaddress.IPv6Network,
                      ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network in the form ``canonical_ip`` gives its addresses: an IPv6 network inside
    ``::ffff:0:0/96`` or the NAT64 prefix as the IPv4 network it holds."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        for prefix in (_MAPPED, _NAT64):
            if network.subnet_of(prefix):
                low = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
                return ipaddress.IPv4Network((low, network.prefixlen - 96))
    return network


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
    """What per-IP quotas and bans count for a canonical ``address``: an IPv4 address itself,
    an IPv6 address's /``ipv6_prefix`` network (``2001:db8:1:2::/64``; itself at 128), and
    anything that is not an IP address as it is."""
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


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as (host without brackets, port); ValueError otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)
