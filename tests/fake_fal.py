"""A fake of fal's hosted queue (queue.fal.run) on 127.0.0.1, for testing the fal upstream backend.

It follows the documented queue protocol for the five Kontext app ids: submit, status (with logs),
result, cancel, and serves the output files itself. Every request is recorded. Tests script
misbehaviour through `FakeFal.behaviour` (copied into each request at submit) and `FakeFal.fail(...)`
(the next answers of one kind of call).
"""

import copy
import http.server
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

APP_IDS = (
    "fal-ai/flux-pro/kontext/text-to-image",
    "fal-ai/flux-pro/kontext",
    "fal-ai/flux-pro/kontext/max/text-to-image",
    "fal-ai/flux-pro/kontext/max",
    "fal-ai/flux-kontext/dev",
    "fal-ai/flux-pro/kontext/multi",
    "fal-ai/flux-pro/kontext/max/multi",
)
REQUEST_PATH = re.compile(r"^/([^/]+)/([^/]+)/requests/([^/]+)(/status|/cancel)?/?$")
FILE_PATH = re.compile(r"^/files/([^/]+)/(\d+)\.(png|jpeg)$")
OUTPUT_SIZE = (48, 32)


@dataclass
class Behaviour:
    """How the fake treats a request; copied at submit, so a test may change it for the next one."""

    queued_polls: int = 2  # polls answered IN_QUEUE, the position counting down to 0
    progress_polls: int = 2  # polls then answered IN_PROGRESS, one more log line each
    never_complete: bool = False  # stays IN_PROGRESS for ever (timeouts, cancellation)
    status_delay: float = 0.0  # seconds each status poll takes to answer
    result_error: tuple[int, Any, str | None] | None = None  # (status code, body, X-Fal-Error-Type)
    nsfw: frozenset[int] = frozenset()  # indexes of images flagged as NSFW
    expiring_outputs: bool = False  # each output file can be downloaded once, then 404
    seed: int = 1234  # the seed reported when the input had none


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)  # when the fake received it, before answering


@dataclass
class FakeRequest:
    request_id: str
    app_id: str
    input: dict[str, Any]
    behaviour: Behaviour
    polls: int = 0
    cancelled: bool = False
    files: dict[int, bytes] = field(default_factory=dict)


def output_bytes(request_id: str, index: int, output_format: str) -> bytes:
    """A deterministic image for output `index` of a request: its colour comes from both."""
    shade = sum(request_id.encode()) % 200
    image = Image.new("RGB", OUTPUT_SIZE, (shade, 40 + 50 * index, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if output_format == "png" else "JPEG")
    return buffer.getvalue()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up on a slow answer (a timeout test) is expected, not news


class FakeFal:
    def __init__(self, key: str) -> None:
        self.key = key
        self.behaviour = Behaviour()
        self.requests: dict[str, FakeRequest] = {}
        self.recorded: list[Recorded] = []
        self.file_downloads: dict[str, int] = {}
        self._failures: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self._lock = threading.Lock()
        handler = type("FalHandler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"

    def start(self) -> "FakeFal":
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail(self, call: str, *codes: int, retry_after: str | None = None) -> None:
        """Answer the next calls of kind `call` ("submit", "status", "result") with these status codes."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self._lock:
            self._failures.setdefault(call, []).extend((code, headers) for code in codes)

    def next_failure(self, call: str) -> tuple[int, dict[str, str]] | None:
        with self._lock:
            pending = self._failures.get(call)
            return pending.pop(0) if pending else None

    def reset(self) -> None:
        with self._lock:
            self.behaviour = Behaviour()
            self._failures.clear()
            self.recorded.clear()
            self.requests.clear()
            self.file_downloads.clear()

    def calls(self, method: str, suffix: str = "") -> list[Recorded]:
        """Recorded calls with this method whose path ends with `suffix` (e.g. "/status")."""
        with self._lock:
            return [call for call in self.recorded if call.method == method and call.path.endswith(suffix)]

    def submitted(self) -> list[Recorded]:
        return [call for call in self.calls("POST") if call.path.lstrip("/") in APP_IDS]

    def queue_urls(self, app_id: str, request_id: str) -> dict[str, str]:
        base = f"{self.url}/{'/'.join(app_id.split('/')[:2])}/requests/{request_id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    def record(self, call: Recorded) -> None:
        with self._lock:
            self.recorded.append(call)


@contextmanager
def running_fake(key: str) -> Iterator[FakeFal]:
    fake = FakeFal(key).start()
    try:
        yield fake
    finally:
        fake.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    fake: FakeFal
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    # --- plumbing ---

    def _record(self, body: Any) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        self.fake.record(Recorded(self.command, parts.path, query, dict(self.headers), body))
        return parts.path, query

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode(errors="replace")

    def _send(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._send_bytes(code, "application/json", data, headers)

    def _send_bytes(
        self, code: int, content_type: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Key {self.fake.key}":
            return True
        self._send(401, {"detail": "No user found for Key ID and Secret"})
        return False

    def _scripted(self, call: str) -> bool:
        failure = self.fake.next_failure(call)
        if failure is None:
            return False
        code, headers = failure
        self._send(code, {"detail": f"scripted {code}"}, headers)
        return True

    def _find(self, request_id: str) -> FakeRequest | None:
        found = self.fake.requests.get(request_id)
        if found is None:
            self._send(404, {"status": "NOT_FOUND"})
        return found

    # --- the queue API ---

    def do_POST(self) -> None:
        body = self._read_json()
        path, _ = self._record(body)
        app_id = path.strip("/")
        if not self._authorised() or self._scripted("submit"):
            return
        if app_id not in APP_IDS:
            self._send(404, {"detail": f"Application '{app_id}' not found"})
            return
        request_id = str(uuid.uuid4())
        request = FakeRequest(request_id, app_id, body, copy.copy(self.fake.behaviour))
        self.fake.requests[request_id] = request
        envelope = {
            "status": "IN_QUEUE",
            "request_id": request_id,
            "gateway_request_id": request_id,
            **self.fake.queue_urls(app_id, request_id),
            "queue_position": request.behaviour.queued_polls,
            "logs": None,
            "metrics": {},
        }
        self._send(200, envelope, {"x-fal-request-id": request_id})

    def do_GET(self) -> None:
        path, query = self._record(None)
        if file := FILE_PATH.match(path):
            self._serve_file(file.group(1), int(file.group(2)), file.group(3))
            return
        match = REQUEST_PATH.match(path)
        if match is None:
            self._send(404, {"detail": "Not found"})
            return
        if not self._authorised():
            return
        request_id, suffix = match.group(3), match.group(4)
        if suffix == "/status":
            self._status(request_id, query.get("logs", ["0"])[0] in ("1", "true"))
        elif suffix is None:
            self._result(request_id)
        else:
            self._send(405, {"detail": "Method not allowed"})

    def do_PUT(self) -> None:
        path, _ = self._record(self._read_json())
        match = REQUEST_PATH.match(path)
        if match is None or match.group(4) != "/cancel":
            self._send(404, {"detail": "Not found"})
            return
        if not self._authorised() or (request := self._find(match.group(3))) is None:
            return
        if self._state(request) == "COMPLETED" and not request.cancelled:
            self._send(400, {"status": "ALREADY_COMPLETED"})
            return
        request.cancelled = True
        self._send(202, {"status": "CANCELLATION_REQUESTED"})

    # --- the request's life ---

    def _state(self, request: FakeRequest) -> str:
        """The state after `request.polls` status polls: queued, then running, then completed."""
        behaviour = request.behaviour
        if request.cancelled:
            return "COMPLETED"
        if request.polls <= behaviour.queued_polls:
            return "IN_QUEUE"
        if behaviour.never_complete or request.polls <= behaviour.queued_polls + behaviour.progress_polls:
            return "IN_PROGRESS"
        return "COMPLETED"

    def _logs(self, request: FakeRequest) -> list[dict[str, str]]:
        """One more line per poll while running; fal sends them all on every poll."""
        behaviour = request.behaviour
        count = max(request.polls - behaviour.queued_polls, 0)
        count = min(count, 1000 if behaviour.never_complete else behaviour.progress_polls)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        return [
            {"message": f"upstream line {n}", "level": "INFO", "source": "USER", "timestamp": stamp}
            for n in range(1, count + 1)
        ]

    def _status(self, request_id: str, with_logs: bool) -> None:
        if self._scripted("status") or (request := self._find(request_id)) is None:
            return
        time.sleep(request.behaviour.status_delay)
        request.polls += 1
        state = self._state(request)
        body: dict[str, Any] = {
            "status": state,
            "request_id": request_id,
            **self.fake.queue_urls(request.app_id, request_id),
        }
        if state == "IN_QUEUE":
            body["queue_position"] = request.behaviour.queued_polls - request.polls
        else:
            body["logs"] = self._logs(request) if with_logs else None
        if state == "COMPLETED":
            body["metrics"] = {"inference_time": 0.5}
            if error := self._error(request):
                body["error"], body["error_type"] = error
        self._send(200 if state == "COMPLETED" else 202, body, {"x-fal-request-id": request_id})

    def _error(self, request: FakeRequest) -> tuple[str, str] | None:
        if request.cancelled:
            return "Request was cancelled", "client_cancelled"
        if request.behaviour.result_error is not None:
            code, _, error_type = request.behaviour.result_error
            return f"Request failed with status {code}", error_type or "internal_server_error"
        return None

    def _result(self, request_id: str) -> None:
        if self._scripted("result") or (request := self._find(request_id)) is None:
            return
        if self._state(request) != "COMPLETED":
            self._send(400, {"detail": "Request is still in progress"})
            return
        if request.cancelled:
            self._send(400, {"detail": "Request was cancelled"}, {"X-Fal-Error-Type": "client_cancelled"})
            return
        if request.behaviour.result_error is not None:
            code, body, error_type = request.behaviour.result_error
            self._send(code, body, {"X-Fal-Error-Type": error_type} if error_type else {})
            return
        self._send(200, self._output(request), {"x-fal-request-id": request_id})

    def _output(self, request: FakeRequest) -> dict[str, Any]:
        output_format = request.input.get("output_format", "jpeg")
        count = request.input.get("num_images", 1)
        images = []
        for index in range(count):
            request.files[index] = output_bytes(request.request_id, index, output_format)
            images.append(
                {
                    "url": f"{self.fake.url}/files/{request.request_id}/{index}.{output_format}",
                    "width": OUTPUT_SIZE[0],
                    "height": OUTPUT_SIZE[1],
                    "content_type": f"image/{output_format}",
                }
            )
        return {
            "images": images,
            "timings": {"inference": 0.5},
            "seed": request.input.get("seed", request.behaviour.seed),
            "has_nsfw_concepts": [index in request.behaviour.nsfw for index in range(count)],
            "prompt": request.input.get("prompt", ""),
        }

    def _serve_file(self, request_id: str, index: int, extension: str) -> None:
        request = self.fake.requests.get(request_id)
        key = f"{request_id}/{index}"
        downloads = self.fake.file_downloads.get(key, 0)
        self.fake.file_downloads[key] = downloads + 1
        data = request.files.get(index) if request is not None else None
        if data is None or (request.behaviour.expiring_outputs and downloads > 0):
            self._send(404, {"detail": "File not found or expired"})
            return
        self._send_bytes(200, f"image/{extension}", data)
