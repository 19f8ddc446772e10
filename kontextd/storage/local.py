"""The embedded storage: files in the data directory, served by the API under /files/."""

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from kontextd.atomic import write_atomic
from kontextd.storage import keys
from kontextd.storage.base import StorageUnavailable, StoredFile

# Refuse to follow a symlink at either level of `<request id>/<name>`: a link planted in the root (by
# anyone who can write there) must not lead outside it, and checking a resolved path first and opening it
# afterwards would leave a window to swap the link in. (os.open makes descriptors non-inheritable itself.)
_NO_FOLLOW = os.O_NOFOLLOW

# A write refused for want of space (or of quota): the disk may free up, so the request runs again later.
_FULL = (errno.ENOSPC, errno.EDQUOT)


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not keys.is_valid(key):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root.joinpath(*key.split("/"))

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            # Synced and renamed: once the request is recorded as done, its image is whole on disk.
            write_atomic(path, data, mode=0o644)
        except OSError as error:
            if error.errno not in _FULL:
                raise
            # write_atomic removed its temporary file; a request folder made for it alone goes too.
            with contextlib.suppress(OSError):
                path.parent.rmdir()
            name = errno.errorcode[error.errno]
            raise StorageUnavailable(f"disk full: {name} storing {key} ({error.strerror})") from error

    def open(self, key: str) -> StoredFile | None:
        if not keys.is_valid(key):
            return None
        folder, name = key.split("/")
        try:
            fd = _open_in_root(self.root, folder, name)
        except OSError as error:
            # Missing, a symlink (ELOOP, or ENOTDIR for a linked folder), not a folder: all simply absent.
            if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
                return None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        return StoredFile(os.fdopen(fd, "rb"), info.st_size, keys.content_type(key))

    def delete(self, keys: Iterable[str]) -> None:
        folders: set[Path] = set()
        for key in keys:
            try:
                path = self._path(key)
            except ValueError:  # not a key: nothing of ours is named by it
                continue
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        # Drop each request's folder once its last file is gone (another file may still be in it).
        for folder in folders:
            with contextlib.suppress(OSError):
                folder.rmdir()

    def check(self) -> None:
        # Its folder is there and writable: a full disk is not checked here (the next put says so, and
        # the worker holds the request), a folder removed or made read-only under us is.
        if not os.access(self.root, os.W_OK | os.X_OK) or not self.root.is_dir():
            # Not naming the folder: /health shows this to anyone who asks.
            raise StorageUnavailable("the files folder is missing or not writable")

    def presigned_url(self, key: str, expires_in: float) -> str | None:
        return None  # files here are served by kontextd itself, under /files/

    def close(self) -> None:
        pass


def _open_in_root(root: Path, folder: str, name: str) -> int:
    """Open `root/folder/name` for reading without following a symlink at `folder` or `name`."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _NO_FOLLOW, dir_fd=root_fd)
    finally:
        os.close(root_fd)
    try:
        # O_NONBLOCK: a FIFO planted in the root would otherwise block the open forever; the caller refuses
        # anything that is not a regular file, for which the flag changes nothing.
        return os.open(name, os.O_RDONLY | _NO_FOLLOW | os.O_NONBLOCK, dir_fd=folder_fd)
    finally:
        os.close(folder_fd)
