"""Access rules as pure functions (sans-IO): parse CIDR lists, normalise peer
addresses, decide whether a peer may talk to the server.

Rules: ``deny`` wins over ``allow``; an empty ``allow`` list allows every
address that ``deny`` does not name. An IPv4-mapped IPv6 address
(``::ffff:a.b.c.d``, what an IPv6 socket bound to ``::`` reports for an IPv4
client) is taken as the IPv4 address ``a.b.c.d``, in peers and in rules alike,
so ``10.0.0.0/8`` matches such a client too. Peers without an IP address (Unix
sockets) are not subject to the rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

__all__ = ["AccessRules", "Network", "normalise_address", "parse_networks", "peer_key"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def normalise_address(host: str | Address) -> Address:
    """``host`` as an address object: a zone (``fe80::1%eth0``) dropped, an IPv4-mapped
    IPv6 address turned into its IPv4 address. Raises ValueError for a non-address."""
    if isinstance(host, str):
        host = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        return host.ipv4_mapped
    return host


def peer_key(host: str) -> str:
    """The key that counts a peer's connections: its address as the kernel reports it,
    an IPv4-mapped IPv6 address reduced to IPv4 (cheap: no parsing)."""
    if host[:7].lower() == "::ffff:" and "." in host:
        return host[7:]
    return host


def _normalise_network(network: Network) -> Network:
    """An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) as the IPv4 one (``10.0.0.0/8``)."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 \
            and network.subnet_of(_MAPPED):
        base = network.network_address.ipv4_mapped
        assert base is not None
        return ipaddress.IPv4Network((base, network.prefixlen - 96))
    return network


def parse_networks(value: Any) -> tuple[str, ...]:
    """A list of CIDR networks -> a tuple of their canonical forms (``"10.0.0.0/8"``).

    ``value`` is a list of strings (a TOML array) or one string of comma-separated
    entries (environment, flags; empty means none). An entry is a network
    (``10.0.0.0/8``, ``2001:db8::/32``) or one address (``192.0.2.7`` = ``/32``);
    host bits are ignored (``10.1.2.3/8`` is ``10.0.0.0/8``). Raises ValueError
    naming the first bad entry.
    """
    if isinstance(value, str):
        entries: Iterable[Any] = [part.strip() for part in value.split(",")] \
            if value.strip() else []
    elif isinstance(value, list | tuple):
        entries = value
    else:
        raise ValueError(f"{value!r} is not a list of CIDR networks")
    networks = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"{entry!r} is not a CIDR network (a string like '10.0.0.0/8')")
        try:
            network = ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not a CIDR network like 10.0.0.0/8 or "
                             "2001:db8::/32") from None
        text = str(_normalise_network(network))
        if text not in networks:
            networks.append(text)
    return tuple(networks)


parse_networks.metavar = "CIDR,..."  # type: ignore[attr-defined]


class AccessRules:
    """Compiled ``allow`` and ``deny`` lists; :meth:`check` decides for one peer.

    Build it from the canonical strings :func:`parse_networks` returns (or any CIDR
    strings). Immutable; cheap to share between threads.
    """

    __slots__ = ("allow", "deny")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow: tuple[Network, ...] = tuple(
            _normalise_network(ipaddress.ip_network(n, strict=False)) for n in allow)
        self.deny: tuple[Network, ...] = tuple(
            _normalise_network(ipaddress.ip_network(n, strict=False)) for n in deny)

    def __bool__(self) -> bool:
        """False when there is nothing to check (both lists empty)."""
        return bool(self.allow or self.deny)

    def check(self, host: str | Address) -> str | None:
        """None if ``host`` may connect, else why not: ``"denied by NETWORK"`` or
        ``"not in allow"``. A host that is not an IP address (a Unix socket peer) is
        allowed."""
        try:
            address = normalise_address(host)
        except ValueError:
            return None
        for network in self.deny:
            if address in network:  # False across IP versions
                return f"denied by {network}"
        if self.allow and not any(address in network for network in self.allow):
            return "not in allow"
        return None

    def permits(self, host: str | Address) -> bool:
        """True if ``host`` may connect."""
        return self.check(host) is None
