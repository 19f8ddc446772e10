"""Which IP addresses we may connect to on behalf of untrusted input, and the operator's allow-list.

The tables are spelled out here rather than taken from ``ipaddress``'s ``is_private``/``is_global``, whose
contents changed between Python patch releases; a security boundary should not move with the interpreter.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_v4 = ipaddress.IPv4Network
_v6 = ipaddress.IPv6Network

# Instance metadata services: checked first so the refusal names the real danger.
_METADATA: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle ...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS VPC DNS resolver
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "168.63.129.16",  # Azure WireServer: a public address reachable only from inside Azure
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::253",  # AWS VPC DNS resolver over IPv6
        "fd20:ce::254",  # GCP metadata over IPv6
    )
)

# Most specific first: the first match gives the reason.
_V4_RANGES: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_v4("0.0.0.0/32"), "unspecified"),
    (_v4("0.0.0.0/8"), "reserved"),
    (_v4("10.0.0.0/8"), "private"),
    (_v4("100.64.0.0/10"), "shared address space"),
    (_v4("127.0.0.0/8"), "loopback"),
    (_v4("169.254.0.0/16"), "link-local"),
    (_v4("172.16.0.0/12"), "private"),
    (_v4("192.0.0.0/24"), "reserved"),  # IETF protocol assignments
    (_v4("192.0.2.0/24"), "documentation"),
    (_v4("192.88.99.0/24"), "reserved"),  # deprecated 6to4 relay anycast
    (_v4("192.168.0.0/16"), "private"),
    (_v4("198.18.0.0/15"), "benchmarking"),
    (_v4("198.51.100.0/24"), "documentation"),
    (_v4("203.0.113.0/24"), "documentation"),
    (_v4("224.0.0.0/4"), "multicast"),
    (_v4("255.255.255.255/32"), "broadcast"),
    (_v4("240.0.0.0/4"), "reserved"),
)

_V6_RANGES: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_v6("::/128"), "unspecified"),
    (_v6("::1/128"), "loopback"),
    (_v6("100::/64"), "reserved"),  # discard-only
    (_v6("2001:2::/48"), "benchmarking"),
    (_v6("2001::/23"), "reserved"),  # IETF protocol assignments (Teredo is unwrapped before this)
    (_v6("2001:db8::/32"), "documentation"),
    (_v6("3fff::/20"), "documentation"),
    (_v6("5f00::/16"), "reserved"),  # SRv6 SIDs
    (_v6("fc00::/7"), "unique-local"),
    (_v6("fe80::/10"), "link-local"),
    (_v6("fec0::/10"), "site-local"),
    (_v6("ff00::/8"), "multicast"),
)

_GLOBAL_UNICAST_V6 = _v6("2000::/3")
_MAPPED = _v6("::ffff:0:0/96")
_TRANSLATED = _v6("::ffff:0:0:0/96")  # SIIT, RFC 7915
_COMPATIBLE = _v6("::/96")
_NAT64 = _v6("64:ff9b::/96")
_NAT64_LOCAL = _v6("64:ff9b:1::/48")
_SIX_TO_FOUR = _v6("2002::/16")
_TEREDO = _v6("2001::/32")


def _low32(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """IPv4 addresses an IPv6 address tunnels or translates to, or None when it embeds none."""
    if ip in _MAPPED or ip in _TRANSLATED or ip in _COMPATIBLE or ip in _NAT64:
        return [_low32(ip)]
    if ip in _SIX_TO_FOUR:
        return [ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)]
    if ip in _TEREDO:
        # Both ends matter: the server relays, the (de-obfuscated) client receives.
        server = ipaddress.IPv4Address((int(ip) >> 64) & 0xFFFFFFFF)
        client = ipaddress.IPv4Address(~int(ip) & 0xFFFFFFFF)
        return [server, client]
    return None


def _first_match(ip: IPAddress, table: tuple[tuple[IPNetwork, str], ...]) -> str | None:
    for network, reason in table:
        if ip in network:
            return reason
    return None


def refusal_reason(ip: IPAddress) -> str | None:
    """None when ``ip`` is a public unicast address we may connect to, otherwise a short reason."""
    if isinstance(ip, ipaddress.IPv6Address):
        # A zone id ("%eth0") would defeat equality with the metadata constants.
        ip = ipaddress.IPv6Address(int(ip))
    if ip in _METADATA:
        return "metadata"
    if isinstance(ip, ipaddress.IPv4Address):
        return _first_match(ip, _V4_RANGES)

    # :: and ::1 sit inside the IPv4-compatible block but mean themselves.
    if ip.packed[:15] == bytes(15) and ip.packed[15] <= 1:
        return _first_match(ip, _V6_RANGES)
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        for inner in embedded:
            reason = refusal_reason(inner)
            if reason is not None:
                return reason
        return None
    if ip in _NAT64_LOCAL:
        # The embedded address's position depends on the local prefix length; /96 is the common layout,
        # and the prefix is site-local either way.
        return refusal_reason(_low32(ip)) or "local-use NAT64"
    reason = _first_match(ip, _V6_RANGES)
    if reason is None and ip not in _GLOBAL_UNICAST_V6:
        return "reserved"
    return reason


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _normalise_host(host: str) -> str:
    return host.lower().rstrip(".")


def _valid_hostname(host: str) -> bool:
    labels = host.split(".")
    # A numeric last label would be read as an IPv4 address by URL parsers and resolvers.
    return (
        0 < len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()
    )


@dataclass(frozen=True)
class AllowList:
    """Hosts and networks the operator trusts even though their addresses would otherwise be refused."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> AllowList:
        """Parse "127.0.0.1,localhost,::1/128,10.0.0.0/8": host names, addresses or CIDR networks."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in (spec or "").split(","):
            entry = raw.strip()
            if not entry:
                continue
            literal = entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry
            if "%" in literal:
                raise ValueError(f"Invalid allow-list entry {entry!r}: zone ids are not supported")
            try:
                networks.append(ipaddress.ip_network(literal))
                continue
            except ValueError as exc:
                if "/" in literal or ":" in literal:
                    raise ValueError(f"Invalid allow-list entry {entry!r}: {exc}") from None
            host = _normalise_host(entry)
            if not _valid_hostname(host):
                raise ValueError(f"Invalid allow-list entry {entry!r}: not a host name, address or network")
            hosts.add(host)
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, ip: IPAddress) -> bool:
        if _normalise_host(host) in self.hosts:
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            ip = ipaddress.IPv6Address(int(ip))
        # Membership compares raw integers, so an IPv4 address must not be tested against an IPv6 network.
        return any(ip.version == net.version and ip in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)
