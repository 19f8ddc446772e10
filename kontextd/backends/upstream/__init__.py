"""Upstream backends: the real FLUX.1 Kontext [pro]/[max] served by an API (Black Forest Labs, fal).

Each is a `Backend` whose generate() runs on a worker thread of its own lane, many at once, bounded by the
provider's per-key limits. Outputs are downloaded at once and handed back as `EncodedImage`s, so the
worker re-hosts them in our storage before any signed upstream URL expires.
"""

import ipaddress
from typing import Protocol
from urllib.parse import urlsplit

from kontextd.backends.base import Backend
from kontextd.fetch.addresses import refusal_reason
from kontextd.routing import BFL, FAL, UpstreamConfig


class UpstreamBackend(Backend, Protocol):
    def close(self) -> None:
        """Release connections; requests still running end as the worker threads stop."""


def upstream_can_fetch(url: str, own_base_url: str) -> bool:
    """Whether the provider can fetch `url` itself; if not, the image is sent inline (base64).

    Not for data URIs, our own files (they may sit behind a firewall or on loopback), or IP literals in
    non-public ranges. Host names are assumed reachable: resolving them here would prove nothing about the
    provider's network, and the provider reports a URL it cannot fetch.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if url.startswith(own_base_url.rstrip("/") + "/"):
        return False
    host = parts.hostname
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True
    return refusal_reason(address) is None


def build_upstream(config: UpstreamConfig, own_base_url: str) -> UpstreamBackend:
    if config.kind == BFL:
        from kontextd.backends.upstream.bfl import BflBackend

        return BflBackend(config, own_base_url)
    if config.kind == FAL:
        from kontextd.backends.upstream.fal import FalBackend

        return FalBackend(config, own_base_url)
    raise ValueError(f"unknown upstream {config.kind!r}")
