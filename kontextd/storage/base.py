"""The storage interface: where generated images live, under keys kontextd.storage.keys makes.

Two implementations pass one contract suite (tests/test_storage.py): files in the data directory
(`LocalStorage`, the embedded default) and an S3-compatible bucket (`S3Storage`). Storage holds bytes by
key and nothing else: the URL a client is given is rendered per response from the key
(kontextd.storage.urls), so results never freeze a host name or a presigned signature.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, Protocol


class StorageUnavailable(Exception):
    """The storage cannot take this write now (disk full, object store down or refusing); nothing usable
    was stored. The worker hands the request back to run again later, up to a limit
    (kontextd.jobs.lifecycle), and the request never completes without its images."""


class StorageConfigError(Exception):
    """The configured storage cannot be used at all (a bucket that cannot be reached or created, refused
    credentials): raised at start-up, saying which storage and why, so the server does not start."""


@dataclass
class StoredFile:
    """A stored file opened for reading; the caller closes `stream`."""

    stream: BinaryIO
    size: int
    content_type: str


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, whole or not at all (overwriting: a re-run writes the same keys).
        `key` must come from kontextd.storage.keys; anything else is refused with ValueError. Raises
        StorageUnavailable when the storage cannot take it now."""

    def open(self, key: str) -> StoredFile | None:
        """The file stored under `key`, or None when there is none. `key` may come from a client: anything
        that is not a valid key (kontextd.storage.keys) is None, exactly as a missing file is, so the answer
        tells nothing about what else exists."""

    def delete(self, keys: Iterable[str]) -> None:
        """Remove these keys, in as few round trips as the storage allows; missing or invalid keys are not
        an error. Raises StorageUnavailable when the storage cannot be reached (nothing is then known to
        be deleted: the caller tries again later)."""

    def check(self) -> None:
        """Whether the storage answers now, in one request at most (what /health reports): raises
        StorageUnavailable, saying why, when it cannot be reached or used."""

    def presigned_url(self, key: str, expires_in: float) -> str | None:
        """A URL that reads `key` directly from the storage for `expires_in` seconds, without kontextd;
        None when this storage has no such URLs (local files are served by kontextd under /files/)."""

    def close(self) -> None: ...
