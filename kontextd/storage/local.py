"""The embedded storage: files in the data directory, served by the API under /files/."""

from pathlib import Path, PurePosixPath

from kontextd.atomic import write_atomic


class LocalStorage:
    def __init__(self, root: Path, public_base_url: str) -> None:
        self.root = root
        self._base_url = public_base_url.rstrip("/")
        root.mkdir(parents=True, exist_ok=True)

    def path_of(self, key: str) -> Path | None:
        """The file behind `key`, or None when the key is not a plain relative path inside the root."""
        parts = PurePosixPath(key).parts
        if not parts or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
            return None
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes, content_type: str) -> str:
        path = self.path_of(key)
        if path is None:
            raise ValueError(f"invalid storage key {key!r}")
        # Synced and renamed: once the request is recorded as done, its image is whole on disk.
        write_atomic(path, data, mode=0o644)
        return f"{self._base_url}/files/{key}"

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        if path is not None:
            path.unlink(missing_ok=True)
            # Drop the request's folder once its last file is gone.
            if path.parent != self.root and not any(path.parent.iterdir()):
                path.parent.rmdir()
