"""Where a request's LoRA file comes from: fetched once, kept by content hash, capped in size.

A LoRA `path` is one of three things (its grammar is the catalogue's, kontextd.catalogue.schemas):

* an http(s) URL: fetched through the fetch guard like an image, with its own size cap
  (`--lora-max-bytes`), and kept under `<cache>/<sha256>.safetensors` with a small index file from the
  URL to that hash, so a URL is downloaded once however many requests (or worker processes sharing the
  data directory) name it. The cache is capped (`--lora-cache-bytes`): the least recently used files go.
* a Hugging Face repo id ("owner/name"): the repo's one .safetensors file through huggingface_hub, which
  reads its local cache only when offline (`HF_HUB_OFFLINE=1`): the hub's cache is the hub library's to
  manage, so such files are used where they lie.
* a name: a file in the operator's `--lora-dir` (`name` or `name.safetensors`), used where it lies. The
  name's grammar has no separator, and the resolved path is checked to be inside the directory anyway.

Every file is identified by the hash of its content, so the adapter a worker keeps loaded is the same
whichever path named it, and a file replaced under the same name is a new adapter.
"""

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kontextd.atomic import write_atomic
from kontextd.backends.base import Field, InputUnusable
from kontextd.catalogue.schemas import HF_REPO_PATTERN
from kontextd.fetch.guard import FetchError

log = logging.getLogger("kontextd.loras")

ERROR_TYPE = "lora_load_error"
# A safetensors file starts with its header's length (8 bytes, little endian) and a JSON header.
_HEADER_MAX = 100 * 1024 * 1024
_HF_REPO = re.compile(HF_REPO_PATTERN)
_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoraFile:
    digest: str  # sha256 of the content: the adapter's identity
    path: Path


def looks_like_safetensors(head: bytes) -> bool:
    """Whether `head` (a file's first bytes) starts like a safetensors file: a sane header length and a
    JSON object after it. Cheap, so a file that is no LoRA at all is refused before torch reads it."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= _HEADER_MAX and head[8:9] == b"{"


def _digest_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class LoraFiles:
    """Turns a request's LoRA `path` into a local file, fetching and caching what needs fetching.

    Thread-safe: a worker's threads share one; several processes may share the cache directory (every
    write is atomic, and the worst a race costs is one download twice).
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        fetch: Callable[[str], bytes],
        lora_dir: Path | None = None,
        cache_bytes: int,
        hub_download: Callable[[str], Path] | None = None,
    ) -> None:
        self._cache_dir = cache_dir
        self._fetch = fetch  # through the fetch guard, with the LoRA size cap; raises FetchError
        self._lora_dir = lora_dir.resolve() if lora_dir is not None else None
        self._cache_bytes = cache_bytes
        self._hub_download = hub_download or _hub_file
        self._lock = threading.Lock()
        # (path, size, mtime) -> digest, for files used in place: hashing a large file once, not per request
        self._known: dict[tuple[str, int, int], str] = {}

    def resolve(self, path: str, field: Field) -> LoraFile:
        """The local file `path` names; raises InputUnusable (for `field`) when it cannot be had."""
        try:
            if path.startswith(("https://", "http://")):
                return self._fetched(path)
            if _HF_REPO.fullmatch(path):
                return self._in_place(self._hub_download(path))
            return self._in_place(self._named(path))
        except FetchError as error:
            raise InputUnusable(field, path, error.error_type, error.message, error.ctx) from None
        except _Unusable as error:
            raise InputUnusable(field, path, ERROR_TYPE, str(error)) from None

    # -- the three sources ------------------------------------------------------------------------------

    def _fetched(self, url: str) -> LoraFile:
        index = self._cache_dir / "urls" / hashlib.sha256(url.encode()).hexdigest()
        with self._lock:
            cached = self._cached(index)
        if cached is not None:
            return cached
        data = self._fetch(url)
        if not looks_like_safetensors(data[:9]):
            raise _Unusable("the file is not in the safetensors format")
        digest = hashlib.sha256(data).hexdigest()
        file = self._cache_dir / f"{digest}{_SUFFIX}"
        with self._lock:
            if not file.exists():
                write_atomic(file, data, 0o644)
            write_atomic(index, digest.encode(), 0o644)
            self._evict(keep=file)
        log.info("lora fetched", extra={"digest": digest[:16], "bytes": len(data)})
        return LoraFile(digest, file)

    def _cached(self, index: Path) -> LoraFile | None:
        try:
            digest = index.read_text().strip()
        except FileNotFoundError:
            return None
        file = self._cache_dir / f"{digest}{_SUFFIX}"
        try:
            os.utime(file)  # most recently used: the last to be evicted
        except FileNotFoundError:
            return None  # evicted since: fetched again
        return LoraFile(digest, file)

    def _named(self, name: str) -> Path:
        if self._lora_dir is None:
            raise _Unusable(f"no LoRA named {name!r}: this server has no --lora-dir")
        for candidate in (self._lora_dir / name, self._lora_dir / f"{name}{_SUFFIX}"):
            resolved = candidate.resolve()
            # The grammar already keeps names inside the directory; a symlink pointing out does not count.
            if resolved.parent == self._lora_dir and resolved.is_file():
                return resolved
        raise _Unusable(f"no LoRA named {name!r} in the server's LoRA directory")

    def _in_place(self, path: Path) -> LoraFile:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            digest = self._known.get(key)
        if digest is None:
            with path.open("rb") as stream:
                if not looks_like_safetensors(stream.read(9)):
                    raise _Unusable("the file is not in the safetensors format")
            digest = _digest_of(path)
            with self._lock:
                self._known[key] = digest
        return LoraFile(digest, path)

    # -- the cache's size cap ---------------------------------------------------------------------------

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used cached files until the cache fits its cap (never `keep`)."""
        files = []
        for file in self._cache_dir.glob(f"*{_SUFFIX}"):
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, file))
        total = sum(size for _, size, _ in files)
        for _, size, file in sorted(files, key=lambda entry: entry[0]):
            if total <= self._cache_bytes:
                break
            if file == keep:
                continue
            file.unlink(missing_ok=True)
            total -= size
            log.info("lora evicted", extra={"digest": file.stem[:16], "bytes": size})


class _Unusable(Exception):
    """Why a LoRA path cannot be used, as the client reads it."""


def _hub_file(repo_id: str) -> Path:
    """The one .safetensors file of a Hugging Face repo (offline: from the local cache only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[f"*{_SUFFIX}"]))
    except LocalEntryNotFoundError:
        raise _Unusable(f"{repo_id} is not in this server's Hugging Face cache (it is offline)") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise _Unusable(f"no Hugging Face repo {repo_id}") from None
    except OSError as error:
        raise _Unusable(f"could not download {repo_id} from Hugging Face: {type(error).__name__}") from None
    files = sorted(folder.rglob(f"*{_SUFFIX}"))
    preferred = [file for file in files if file.name == "pytorch_lora_weights.safetensors"]
    if len(preferred) == 1:
        return preferred[0]
    if len(files) != 1:
        found = "no .safetensors file" if not files else f"{len(files)} .safetensors files"
        raise _Unusable(f"{repo_id} has {found}: name the file by its URL")
    return files[0]
