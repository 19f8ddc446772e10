"""The URLs clients are given for stored files, rendered per response from the keys results hold.

A result keeps each image's storage key (`file_key`), never a URL: a URL frozen at completion would name
one host (a client that called another host name would get another origin, which the AI SDK refuses to
download), would break when `--public-url` changes, and a presigned URL would expire inside the result.
So every response (result, sync run, webhook) renders them now, in one of three ways (`--file-urls`):

* `proxy` (the default): `<base>/files/<key>`, streamed by kontextd from its storage, so a private bucket
  works; `<base>` is `--public-url`, else the base URL the client itself called.
* `presigned`: a URL straight to the object store, signed for PRESIGNED_SECONDS from this response.
* a base URL (a CDN or a public bucket): `<base>/<key>`.
"""

from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, urlsplit

from kontextd.storage import keys
from kontextd.storage.base import Storage

KEY_FIELD = "file_key"  # in a stored result's image entries, in place of "url"
PRESIGNED_SECONDS = 3600.0  # rendered fresh per response: an hour covers any client's download
MODES = ("proxy", "presigned")
# Any valid key: asks a storage whether it can presign at all (a local computation, no request made).
_PROBE_KEY = keys.output_key("00000000-0000-4000-8000-000000000000", 0, "png")


def _http_base(url: str) -> SplitResult | None:
    """`url`'s parts when it is an http(s) URL with a host and neither query nor fragment: a base that
    keys or paths are appended to."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        return None
    return parts


def check_mode(file_urls: str) -> None:
    """Refuse a `--file-urls` value that is neither a mode nor an http(s) base URL, saying why."""
    if file_urls in MODES:
        return
    if _http_base(file_urls) is None:
        raise ValueError(
            f"--file-urls {file_urls!r}: expected proxy, presigned, or an http(s) base URL like "
            "https://cdn.example.com/outputs"
        )


def check_presign_endpoint(file_urls: str, endpoint: str | None) -> None:
    """Refuse a `--presign-endpoint` that is not an http(s) origin, or is given without presigned URLs."""
    if endpoint is None:
        return
    if file_urls != "presigned":
        raise ValueError("--presign-endpoint is for --file-urls presigned only")
    parts = _http_base(endpoint)
    # An origin: no user info (and not echoed: it would print a secret), no path.
    if parts is None or not parts.hostname or "@" in parts.netloc or parts.path not in ("", "/"):
        raise ValueError("--presign-endpoint: expected an http(s) origin like https://s3.example.com")


class FileUrls:
    def __init__(self, file_urls: str, storage: Storage, public_url: str | None) -> None:
        check_mode(file_urls)
        self._mode = file_urls
        self._storage = storage
        self._public_url = public_url.rstrip("/") if public_url else None
        if file_urls == "presigned" and storage.presigned_url(_PROBE_KEY, 1) is None:
            raise ValueError("--file-urls presigned needs object storage (--storage s3://...)")

    def base(self, request_base: str) -> str:
        """The base of our own URLs in a response to a client that called `request_base`."""
        return self._public_url or request_base.rstrip("/")

    def url(self, key: str, request_base: str) -> str:
        if self._mode == "proxy":
            return f"{self.base(request_base)}/files/{key}"
        if self._mode == "presigned":
            url = self._storage.presigned_url(key, PRESIGNED_SECONDS)
            assert url is not None  # checked at construction
            return url
        return f"{self._mode.rstrip('/')}/{key}"

    def own_url(self, key: str, request_base: str) -> str:
        """`<base>/files/<key>` whatever `--file-urls` says: what an upload's URL is. It is given back as an
        input, so it must never expire (a presigned URL would) and key_of() must know it as ours."""
        return f"{self.base(request_base)}/files/{key}"

    def key_of(self, url: str, request_base: str) -> str | None:
        """The key when `url` names a file of ours (one of our outputs or uploads given back as an input),
        else None: such files are read from storage, never fetched. Only the grammar of keys is accepted."""
        prefixes = [f"{self.base(request_base)}/files/"]
        if self._mode not in MODES:
            prefixes.append(self._mode.rstrip("/") + "/")
        for prefix in prefixes:
            if url.startswith(prefix):
                key = url.removeprefix(prefix)
                return key if keys.is_valid(key) else ""  # ours, but not a name we make: refused
        return None

    def render(self, body: dict[str, Any], request_base: str) -> dict[str, Any]:
        """A stored result body with each image's key replaced by its URL (other bodies unchanged)."""
        return render_images(body, lambda key: self.url(key, request_base))


def render_images(body: dict[str, Any], url_of: Callable[[str], str]) -> dict[str, Any]:
    images = body.get("images")
    if not isinstance(images, list) or not any(isinstance(i, dict) and KEY_FIELD in i for i in images):
        return body  # an error, a data-URI result, or one stored before keys were kept
    rendered = []
    for image in images:
        if isinstance(image, dict) and KEY_FIELD in image:
            fields = {name: value for name, value in image.items() if name != KEY_FIELD}
            image = {"url": url_of(image[KEY_FIELD]), **fields}
        rendered.append(image)
    return {**body, "images": rendered}
