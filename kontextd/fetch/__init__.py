"""Guarded fetching of untrusted URLs and decoding of untrusted images."""

from kontextd.fetch.addresses import AllowList, refusal_reason
from kontextd.fetch.guard import FetchError, FetchLimits, GuardedFetcher, Resolver
from kontextd.fetch.images import MAX_IMAGE_SIDE, decode_image, load_image, parse_data_uri

__all__ = [
    "MAX_IMAGE_SIDE",
    "AllowList",
    "FetchError",
    "FetchLimits",
    "GuardedFetcher",
    "Resolver",
    "decode_image",
    "load_image",
    "parse_data_uri",
    "refusal_reason",
]
