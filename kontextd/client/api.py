"""The queue API over HTTP: submit, stream the status, fetch the result, cancel, upload an input."""

import base64
import json
import mimetypes
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

# The owner/alias prefixes of kontextd's apps: status, result and cancel URLs carry only these two segments.
QUEUE_PREFIXES = ("fal-ai/flux-pro", "fal-ai/flux-kontext", "fal-ai/flux-kontext-lora")
# Checked against the bytes, not the file name: the server refuses a declared type that does not match.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


class ClientError(Exception):
    """A failure to tell the user in a line or a few, with the exit code it ends the command with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def describe_error(response: httpx.Response) -> str:
    """An error response as text: fal's 422 `detail` list as `field: reason` lines, else its detail."""
    try:
        body: Any = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        lines = []
        for item in detail:
            if not isinstance(item, dict):
                lines.append(str(item))
                continue
            loc = [str(part) for part in item.get("loc") or []]
            if loc[:1] == ["body"]:
                loc = loc[1:]
            field = ".".join(loc) or "request"
            lines.append(f"{field}: {item.get('msg', item.get('type', 'invalid'))}")
        return "\n".join(lines)
    if detail is not None:
        return str(detail)
    if isinstance(body, dict) and "status" in body:
        return str(body["status"])
    return f"HTTP {response.status_code}"


def image_type(data: bytes, name: str) -> str:
    for signature, media in _SIGNATURES:
        if data.startswith(signature):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class QueueClient:
    def __init__(self, server: str, key: str | None, timeout: float = 60) -> None:
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Key {key}"} if key else {}
        self._origin = _origin(self.server)
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One call; connection failures and a refused key become ClientErrors (exit 2)."""
        # The key goes only to this server: result image URLs may point at a CDN or a bucket.
        foreign = url.startswith(("http://", "https://")) and _origin(url) != self._origin
        try:
            if foreign:
                response = httpx.request(method, url, timeout=self.http.timeout, **kwargs)
            else:
                response = self.http.request(method, url, **kwargs)
        except httpx.ConnectError as error:
            raise ClientError(f"cannot reach the kontextd server at {self.server}: {error}", 2) from None
        except httpx.TimeoutException:
            raise ClientError(f"the kontextd server at {self.server} did not answer in time", 2) from None
        except httpx.HTTPError as error:
            raise ClientError(f"request to {self.server} failed: {error}", 2) from None
        if response.status_code == 401:
            raise ClientError(f"invalid key ({describe_error(response)}); set FAL_KEY or --key", 2)
        return response

    def submit(self, app_id: str, arguments: dict[str, Any]) -> dict[str, Any]:
        response = self.request("POST", f"/{app_id}", json=arguments)
        if response.status_code == 404:
            raise ClientError(f"unknown endpoint {app_id}", 2)
        if response.status_code != 200:
            raise ClientError(describe_error(response), 2)
        return response.json()

    def upload(self, path: Path) -> str:
        """A local file as a URL the server can read: fal's upload API when the server has one, else a
        data: URI (accepted everywhere, just a bigger request)."""
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ClientError(f"cannot read {path}: {error.strerror}", 2) from None
        media = image_type(data, path.name)
        response = self.request(
            "POST", "/storage/upload/initiate", json={"content_type": media, "file_name": path.name}
        )
        if response.status_code in (404, 405):
            return f"data:{media};base64,{base64.b64encode(data).decode()}"
        if response.status_code != 200:
            raise ClientError(f"{path}: {describe_error(response)}", 2)
        initiated = response.json()
        stored = self.request("PUT", initiated["upload_url"], content=data, headers={"Content-Type": media})
        if stored.status_code not in (200, 201, 204):
            raise ClientError(f"{path}: {describe_error(stored)}", 2)
        return initiated["file_url"]

    def statuses(self, status_url: str) -> Iterator[dict[str, Any]]:
        """The request's status each time it changes, until COMPLETED: the server-sent event stream, and
        polling when the stream breaks off (a proxy's timeout) or is not offered."""
        try:
            with self.http.stream("GET", f"{status_url}/stream", params={"logs": 1}, timeout=None) as stream:
                if stream.status_code == 200:
                    for line in stream.iter_lines():
                        if line.startswith("data:"):
                            status = json.loads(line[5:])
                            yield status
                            if status.get("status") == "COMPLETED":
                                return
        except httpx.HTTPError:
            pass  # polled below
        yield from self._polled(status_url)

    def _polled(self, status_url: str) -> Iterator[dict[str, Any]]:
        while True:
            response = self.request("GET", status_url, params={"logs": 1})
            if response.status_code not in (200, 202):
                raise ClientError(describe_error(response))
            status = response.json()
            yield status
            if status.get("status") == "COMPLETED":
                return
            time.sleep(0.5)

    def download(self, url: str) -> bytes:
        if url.startswith("data:"):
            return base64.b64decode(url.split(",", 1)[1])
        response = self.request("GET", url)
        if response.status_code != 200:
            raise ClientError(f"download failed: {describe_error(response)}")
        return response.content

    def find(self, request_id: str, prefix: str | None) -> tuple[str, httpx.Response]:
        """A request's owner/alias prefix (the one given, else the first known one that has it) and its
        status response."""
        for candidate in (prefix,) if prefix else QUEUE_PREFIXES:
            response = self.request("GET", f"/{candidate}/requests/{request_id}/status", params={"logs": 1})
            if response.status_code != 404:
                return candidate, response
        raise ClientError(f"request {request_id} not found", 1)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc
