"""The storage interface: where generated images live and the URL a client fetches them from."""

from dataclasses import dataclass
from typing import BinaryIO, Protocol


@dataclass
class StoredFile:
    """A stored file opened for reading; the caller closes `stream`."""

    stream: BinaryIO
    size: int
    content_type: str


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store `data` under `key` (overwriting: a re-run writes the same keys) and return its public URL.
        `key` must come from kontextd.storage.keys; anything else is refused with ValueError."""

    def open(self, key: str) -> StoredFile | None:
        """The file stored under `key`, or None when there is none. `key` may come from a client: anything
        that is not a valid key (kontextd.storage.keys) is None, exactly as a missing file is, so the answer
        tells nothing about what else exists."""

    def delete(self, key: str) -> None:
        """Remove `key`; a missing or invalid key is not an error."""
