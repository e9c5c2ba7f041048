"""Client addresses in one text form, so that a quota, a ban, the never-ban list and an admin
command all agree on who a client is.

The same IPv4 client can reach extauth as ``10.1.2.3`` or as ``::ffff:10.1.2.3`` (a dual-stack
proxy that appends the mapped form to X-Forwarded-For, an operator pasting it from a log), and
IPv6 has several spellings of one address. Without one form, each spelling is its own quota
bucket and its own jail cell: a ban on one does not hold the other.
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
