"""The storage a server is configured with: files in the data directory, or an S3-compatible bucket."""

import re
from pathlib import Path

from kontextd.storage.base import Storage
from kontextd.storage.local import LocalStorage

ACCEPTED = "nothing (files in the data directory) or s3://bucket[/prefix]"

# S3's naming rules for general purpose buckets: 3-63 lowercase letters, digits, dots and hyphens, starting
# and ending with a letter or digit, no two dots in a row, not an IP address, no reserved prefix or suffix.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# A prefix is `/`-separated segments of the characters S3 calls safe in keys; `.` and `..` are no segment.
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9!_.*'()-]+")
MAX_PREFIX_LENGTH = 512  # of S3's 1024 bytes for a whole key, leaving ample room for ours


def open_storage(url: str | None, files_root: Path, presign_endpoint: str | None = None) -> Storage:
    """The storage `url` names: None or "" is LocalStorage in `files_root`; `s3://bucket[/prefix]` is
    S3Storage (configured from the standard AWS environment; presigned URLs for `presign_endpoint` when
    given). Raises ValueError for any other form, and StorageConfigError when the bucket cannot be used."""
    if not url:
        if presign_endpoint:
            raise ValueError("--presign-endpoint needs object storage (--storage s3://...)")
        return LocalStorage(files_root)
    bucket, prefix = parse_s3_url(url)
    from kontextd.storage.s3 import S3Storage  # boto3 is loaded only by servers that use it

    return S3Storage(bucket, prefix, presign_endpoint=presign_endpoint)


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) from `s3://bucket[/prefix]`, both checked; the prefix has no leading or trailing /."""
    scheme, separator, rest = url.partition("://")
    if scheme.lower() != "s3" or not separator:
        raise ValueError(f"storage {url!r}: expected {ACCEPTED}")
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket:  # never echoed: it would print a secret
        raise ValueError(
            "storage: credentials do not go in the storage URL (set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE); expected {ACCEPTED}"
        )
    check_bucket_name(bucket)
    return bucket, clean_prefix(prefix)


def check_bucket_name(bucket: str) -> None:
    problem = None
    if not _BUCKET.fullmatch(bucket):
        problem = "3-63 lowercase letters, digits, dots, hyphens; a letter or digit first and last"
    elif ".." in bucket:
        problem = "no two dots in a row"
    elif _IP_ADDRESS.fullmatch(bucket):
        problem = "not an IP address"
    elif bucket.startswith(_RESERVED_PREFIXES) or bucket.endswith(_RESERVED_SUFFIXES):
        problem = "not a reserved prefix or suffix (xn--, sthree-, -s3alias, ...)"
    if problem:
        raise ValueError(f"storage: {bucket!r} is not an S3 bucket name ({problem}); expected {ACCEPTED}")


def clean_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    segments = prefix.split("/")
    if (
        len(prefix) > MAX_PREFIX_LENGTH
        or any(segment in ("", ".", "..") for segment in segments)
        or not all(_PREFIX_SEGMENT.fullmatch(segment) for segment in segments)
    ):
        raise ValueError(
            f"storage: prefix {prefix!r} is not usable: `/`-separated names of letters, digits and "
            f"!_.*'()- (no empty, `.` or `..` part, at most {MAX_PREFIX_LENGTH} characters); "
            f"expected {ACCEPTED}"
        )
    return prefix
