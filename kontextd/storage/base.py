"""The storage interface: where generated images live and the URL a client fetches them from."""

from typing import Protocol


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store `data` under `key` (overwriting: a re-run writes the same keys) and return its public URL."""

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""
