"""Address classification and allow-list parsing: pure unit tests on ipaddress objects, no sockets."""

from __future__ import annotations

import ipaddress

import pytest

from kontextd.fetch.addresses import AllowList, refusal_reason


def _teredo(server: str, client: str) -> ipaddress.IPv6Address:
    """A Teredo address (2001::/32) for ``server`` and the obfuscated ``client``."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    value |= 0x8000 << 48 | 0xC035 << 32  # flags and obfuscated port: irrelevant to the classification
    value |= int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return ipaddress.IPv6Address(value)


REFUSED = [
    # IPv4
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "reserved"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("100.64.0.1", "shared address space"),
    ("100.127.255.254", "shared address space"),
    ("127.0.0.1", "loopback"),
    ("127.0.0.2", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.0.1", "link-local"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.0.0.8", "reserved"),
    ("192.0.2.1", "documentation"),
    ("192.88.99.1", "reserved"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.254", "benchmarking"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.5", "documentation"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    # Cloud metadata
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("fd20:ce::254", "metadata"),
    # IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("febf:ffff::1", "link-local"),
    ("fec0::1", "site-local"),
    ("fc00::1", "unique-local"),
    ("fd12:3456:789a::1", "unique-local"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001:2::1", "benchmarking"),
    ("2001:10::1", "reserved"),
    ("100::1", "reserved"),
    ("5f00::1", "reserved"),
    ("4000::1", "reserved"),  # outside 2000::/3, unallocated
    ("::2:1", "reserved"),  # IPv4-compatible 0.2.0.1
    # IPv4-mapped
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.1.2.3", "private"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:0.0.0.0", "unspecified"),
    # IPv4-translated (SIIT)
    ("::ffff:0:10.0.0.1", "private"),
    # IPv4-compatible
    ("::127.0.0.1", "loopback"),
    ("::192.168.0.1", "private"),
    # 6to4
    ("2002:7f00:1::", "loopback"),
    ("2002:a9fe:a9fe::1", "metadata"),
    ("2002:c0a8:101::1", "private"),
    # NAT64, well-known and local-use prefixes
    ("64:ff9b::127.0.0.1", "loopback"),
    ("64:ff9b::10.0.0.1", "private"),
    ("64:ff9b::169.254.169.254", "metadata"),
    ("64:ff9b:1::10.0.0.1", "private"),
    ("64:ff9b:1::8.8.8.8", "local-use NAT64"),
]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_refused_addresses(address: str, reason: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "172.32.0.1",  # just past 172.16.0.0/12
        "100.128.0.1",  # just past 100.64.0.0/10
        "198.20.0.1",  # just past 198.18.0.0/15
        "223.255.255.254",
        "2606:4700::1",
        "2001:4860:4860::8888",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "2002:808:808::1",
        "64:ff9b::8.8.8.8",
    ],
)
def test_public_addresses(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None


def test_teredo_unwraps_client_and_server() -> None:
    public = _teredo("65.54.227.120", "8.8.4.4")
    assert public.teredo == (ipaddress.IPv4Address("65.54.227.120"), ipaddress.IPv4Address("8.8.4.4"))
    assert refusal_reason(public) is None
    assert refusal_reason(_teredo("65.54.227.120", "127.0.0.1")) == "loopback"
    assert refusal_reason(_teredo("65.54.227.120", "169.254.169.254")) == "metadata"
    assert refusal_reason(_teredo("10.0.0.1", "8.8.4.4")) == "private"


def test_zone_id_does_not_hide_the_address() -> None:
    assert refusal_reason(ipaddress.IPv6Address("fe80::1%eth0")) == "link-local"
    assert refusal_reason(ipaddress.IPv6Address("fd00:ec2::254%2")) == "metadata"


def test_parse_mixed_entries() -> None:
    allow = AllowList.parse(" 127.0.0.1 , LocalHost,::1/128,10.0.0.0/8, [fd00::1], images.test. ,")
    assert allow.hosts == frozenset({"localhost", "images.test"})
    assert set(allow.networks) == {
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::1/128"),
    }
    assert allow


@pytest.mark.parametrize("spec", [None, "", "  ", " , ,"])
def test_empty_allow_list_is_falsy(spec: str | None) -> None:
    allow = AllowList.parse(spec)
    assert not allow
    assert not allow.allows("localhost", ipaddress.ip_address("127.0.0.1"))


@pytest.mark.parametrize(
    "entry",
    [
        "10.0.0.1/8",  # host bits set: ambiguous, so refused rather than guessed
        "::1/129",
        "300.1.1.1",
        "127.1",
        "*.example.com",
        "http://localhost",
        "local host",
        "-bad.test",
        "fe80::1%eth0",
        "a" * 64 + ".test",
    ],
)
def test_parse_rejects_bad_entries(entry: str) -> None:
    with pytest.raises(ValueError, match="allow-list entry") as info:
        AllowList.parse(f"127.0.0.1,{entry}")
    assert repr(entry) in str(info.value)


def test_allows_by_host_name() -> None:
    allow = AllowList.parse("localhost,images.test")
    loopback = ipaddress.ip_address("127.0.0.1")
    assert allow.allows("localhost", loopback)
    assert allow.allows("LOCALHOST", loopback)
    assert allow.allows("images.test.", ipaddress.ip_address("::1"))
    assert not allow.allows("sub.localhost", loopback)
    assert not allow.allows("localhost.test", loopback)
    assert not allow.allows("127.0.0.1", loopback)


def test_allows_by_network() -> None:
    allow = AllowList.parse("127.0.0.0/8,::1,fd00::/8")
    assert allow.allows("anything", ipaddress.ip_address("127.0.0.2"))
    assert allow.allows("anything", ipaddress.ip_address("::1"))
    assert allow.allows("anything", ipaddress.ip_address("fd12::1"))
    assert allow.allows("anything", ipaddress.IPv6Address("fd12::1%eth0"))
    assert not allow.allows("anything", ipaddress.ip_address("10.0.0.1"))
    assert not allow.allows("anything", ipaddress.ip_address("::2"))


def test_ipv4_not_matched_by_ipv6_network() -> None:
    # 127.0.0.1 and ::127.0.0.1 share an integer value; only the matching family may count.
    allow = AllowList.parse("::/96")
    assert not allow.allows("x", ipaddress.ip_address("127.0.0.1"))
    assert allow.allows("x", ipaddress.ip_address("::127.0.0.1"))
