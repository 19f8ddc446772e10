"""A fake Black Forest Labs API on loopback, for the bfl backend's tests.

It follows the documented API (submit, poll the returned polling_url, download result.sample), records
every request it receives, and misbehaves on purpose when a test asks: 429 bursts and an active-task
limit, 402, 5xx, moderation, Error / Task not found, slow polls, expired sample URLs, and polling URLs on a
second "regional" host (127.0.0.2: Linux routes all of 127/8 to lo) that the first host does not serve.
"""

import base64
import binascii
import http.server
import io
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

MODELS = ("flux-kontext-pro", "flux-kontext-max")
# Kontext's output size for each aspect ratio (about one megapixel, sides multiples of 16).
SIZES = {
    "21:9": (1568, 672),
    "16:9": (1392, 752),
    "4:3": (1184, 880),
    "3:2": (1248, 832),
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:4": (880, 1184),
    "9:16": (752, 1392),
    "9:21": (672, 1568),
}
FIELDS = {"prompt", "input_image", "seed", "aspect_ratio", "output_format", "prompt_upsampling"}
FIELDS |= {"safety_tolerance", "webhook_url", "webhook_secret"}
IMAGE_FIELDS = (
    "input_image",
    "input_image_2",
    "input_image_3",
    "input_image_4",
)  # BFL's multi-reference names
FIELDS |= set(IMAGE_FIELDS)


def seed_colour(seed: int) -> tuple[int, int, int]:
    return (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)


def render(seed: int, size: tuple[int, int], output_format: str) -> bytes:
    """The sample for a seed: a solid colour derived from it, so a test can tell the images apart."""
    buffer = io.BytesIO()
    Image.new("RGB", size, seed_colour(seed)).save(
        buffer, format="JPEG" if output_format == "jpeg" else "PNG"
    )
    return buffer.getvalue()


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # the parsed JSON, or None
    at: float  # time.monotonic()
    host: str  # "main" or "regional"


@dataclass
class FakeTask:
    id: str
    model: str
    body: dict[str, Any]
    size: tuple[int, int]
    poll_host: str
    polls: int = 0
    done: bool = False
    tokens: list[str] = field(default_factory=list)  # sample URL tokens, oldest first

    @property
    def seed(self) -> int:
        return self.body.get("seed", 0)

    @property
    def output_format(self) -> str:
        return self.body.get("output_format", "png")


class FakeBfl:
    """Start with `start()`; every knob below is reset by `reset()` (call it between tests)."""

    def __init__(self, key: str = "bfl-test-key-0123456789") -> None:
        self.key = key
        self.lock = threading.Lock()
        self.reset()
        self._servers: list[http.server.ThreadingHTTPServer] = []
        self.url = self.regional_url = ""

    def reset(self) -> None:
        with self.lock:
            self.pending_polls = 1  # Pending answers before the final status
            self.pending_polls_by_seed: dict[int, int] = {}  # the same, for the task of one seed
            self.hold_until_accepted = 0  # every poll answers Pending until this many tasks were accepted
            self.final_status: Callable[[int], str] = lambda seed: "Ready"  # by seed
            self.busy_submits = 0  # the first N submits answer 429
            self.retry_after: str | None = None  # Retry-After on those 429s
            self.max_active: int | None = None  # 429 when this many tasks are already active
            self.max_active_per_model: dict[str, int] = {}
            self.out_of_credits = False
            self.submit_errors = 0  # the first N submits answer 500
            self.poll_errors = 0  # the first N polls answer 503
            self.poll_delay = 0.0  # seconds each poll takes to answer
            self.regional = False  # polling URLs on the regional host, which alone serves them
            self.expired_samples = 0  # the first N sample URLs of each task answer 403 (expired)
            self.requests: list[Recorded] = []
            self.tasks: dict[str, FakeTask] = {}
            self.active: dict[str, int] = dict.fromkeys(MODELS, 0)
            self.max_seen_total = 0
            self.max_seen: dict[str, int] = dict.fromkeys(MODELS, 0)
            self.busy_answers = 0  # 429s sent

    # -- lifetime ---------------------------------------------------------------------------------------

    def start(self) -> "FakeBfl":
        main = self._serve("127.0.0.1", "main")
        regional = self._serve("127.0.0.2", "regional")
        self.url = f"http://127.0.0.1:{main.server_port}"
        self.regional_url = f"http://127.0.0.2:{regional.server_port}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _serve(self, address: str, role: str) -> http.server.ThreadingHTTPServer:
        handler = type("Handler", (_Handler,), {"fake": self, "role": role})
        server = http.server.ThreadingHTTPServer((address, 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._servers.append(server)
        return server

    # -- what tests read --------------------------------------------------------------------------------

    def submits(self, model: str | None = None) -> list[Recorded]:
        return [
            r for r in self.requests if r.method == "POST" and (model is None or r.path == f"/v1/{model}")
        ]

    def accepted(self) -> list[FakeTask]:
        """Tasks created, in submit order."""
        with self.lock:
            return list(self.tasks.values())

    def polls(self, task_id: str | None = None) -> list[Recorded]:
        return [
            r
            for r in self.requests
            if r.path == "/v1/get_result" and (task_id is None or r.query.get("id") == task_id)
        ]

    def downloads(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/delivery/")]

    def sample_bytes(self, task: FakeTask) -> bytes:
        return render(task.seed, task.size, task.output_format)

    def all_text(self) -> str:
        """Everything the fake received except the x-key header: to check where the key went."""
        return "".join(
            json.dumps([r.path, r.query, r.body, {k: v for k, v in r.headers.items() if k != "x-key"}])
            for r in self.requests
        )

    # -- behaviour ---------------------------------------------------------------------------------------

    def submit(self, model: str, body: Any, base_url: str) -> tuple[int, dict[str, str], Any]:
        errors = _validate(body)
        if errors:
            return 422, {}, {"detail": errors}
        with self.lock:
            if self.out_of_credits:
                return 402, {}, {"detail": "Insufficient credits"}
            if self.submit_errors > 0:
                self.submit_errors -= 1
                return 500, {}, {"detail": "Internal Server Error"}
            if self.busy_submits > 0 or self._at_limit(model):
                self.busy_submits = max(0, self.busy_submits - 1)
                self.busy_answers += 1
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                return 429, headers, {"detail": "Too many active tasks"}
            task = FakeTask(
                uuid.uuid4().hex, model, body, _size(body), "regional" if self.regional else "main"
            )
            self.tasks[task.id] = task
            self.active[model] += 1
            self.max_seen[model] = max(self.max_seen[model], self.active[model])
            self.max_seen_total = max(self.max_seen_total, sum(self.active.values()))
        poll_base = self.regional_url if self.regional else base_url
        return 200, {}, {"id": task.id, "polling_url": f"{poll_base}/v1/get_result?id={task.id}"}

    def _at_limit(self, model: str) -> bool:
        limit = self.max_active_per_model.get(model)
        if limit is not None and self.active[model] >= limit:
            return True
        return self.max_active is not None and sum(self.active.values()) >= self.max_active

    def poll(self, task_id: str, role: str, base_url: str) -> tuple[int, dict[str, str], Any]:
        if self.poll_delay:
            time.sleep(self.poll_delay)
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None or task.poll_host != role:
                return 200, {}, {"id": task_id, "status": "Task not found", "result": None, "progress": None}
            if self.poll_errors > 0:
                self.poll_errors -= 1
                return 503, {}, {"detail": "Service Unavailable"}
            task.polls += 1
            pending = self.pending_polls_by_seed.get(task.seed, self.pending_polls)
            held = len(self.tasks) < self.hold_until_accepted
            if (task.polls <= pending or held) and not task.done:
                progress = round(min(task.polls, pending) / (pending + 1), 2)
                return 200, {}, {"id": task_id, "status": "Pending", "result": None, "progress": progress}
            status = self.final_status(task.seed)
            if not task.done:
                task.done = True
                self.active[task.model] -= 1
            if status != "Ready":
                details = {"reason": "fake says so"} if status == "Error" else None
                return 200, {}, {"id": task_id, "status": status, "result": None, "details": details}
            task.tokens.append(uuid.uuid4().hex)
            extension = "jpg" if task.output_format == "jpeg" else "png"
            sample = f"{base_url}/delivery/{task.id}/{task.tokens[-1]}.{extension}"
            result = {"sample": sample, "prompt": task.body.get("prompt"), "seed": task.seed}
            return 200, {}, {"id": task_id, "status": "Ready", "result": result, "progress": None}

    def sample(self, path: str) -> tuple[int, str, bytes]:
        parts = path.split("/")  # "", "delivery", task id, "token.ext"
        with self.lock:
            task = self.tasks.get(parts[2]) if len(parts) == 4 else None
            token = parts[3].split(".")[0] if task else ""
            if task is None or token not in task.tokens:
                return 404, "text/plain", b"no such sample"
            if task.tokens.index(token) < self.expired_samples:
                return 403, "application/xml", b"<Error><Code>AuthenticationFailed</Code></Error>"
        content_type = "image/jpeg" if task.output_format == "jpeg" else "image/png"
        return 200, content_type, self.sample_bytes(task)


class _Handler(http.server.BaseHTTPRequestHandler):
    fake: FakeBfl
    role: str

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        self._record(body)
        path = urlsplit(self.path).path
        model = path.removeprefix("/v1/")
        if self.role != "main" or not path.startswith("/v1/") or model not in MODELS:
            return self._json(404, {}, {"detail": "Not Found"})
        if self.headers.get("x-key") != self.fake.key:
            return self._json(401, {}, {"detail": "Invalid or missing API key"})
        self._json(*self.fake.submit(model, body, self._base_url()))

    def do_GET(self) -> None:
        self._record(None)
        parts = urlsplit(self.path)
        if parts.path == "/v1/get_result":
            if self.headers.get("x-key") != self.fake.key:
                return self._json(401, {}, {"detail": "Invalid or missing API key"})
            task_id = parse_qs(parts.query).get("id", [""])[0]
            return self._json(*self.fake.poll(task_id, self.role, self._base_url()))
        if parts.path.startswith("/delivery/"):
            code, content_type, data = self.fake.sample(parts.path)
            return self._send(code, content_type, data, {})
        self._json(404, {}, {"detail": "Not Found"})

    def _base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _record(self, body: Any) -> None:
        parts = urlsplit(self.path)
        query = {name: values[0] for name, values in parse_qs(parts.query).items()}
        headers = {name.lower(): value for name, value in self.headers.items()}
        with self.fake.lock:
            self.fake.requests.append(
                Recorded(self.command, parts.path, query, headers, body, time.monotonic(), self.role)
            )

    def _json(self, code: int, headers: dict[str, str], body: Any) -> None:
        self._send(code, "application/json", json.dumps(body).encode(), headers)

    def _send(self, code: int, content_type: str, data: bytes, headers: dict[str, str]) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    def log_message(self, *args: object) -> None:
        pass


def _validate(body: Any) -> list[dict[str, Any]]:
    """FastAPI-shaped errors for a submit body, as strict as BFL documents it."""
    if not isinstance(body, dict):
        return [_error([], "Input should be a valid dictionary", "dict_type", body)]
    errors = [
        _error([name], "Extra inputs are not permitted", "extra_forbidden", None)
        for name in body
        if name not in FIELDS
    ]
    if not isinstance(body.get("prompt"), str):
        errors.append(_error(["prompt"], "Field required", "missing", None))
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "Input should be a valid integer"),
        ("aspect_ratio", lambda v: v in SIZES, "Input should be one of " + ", ".join(SIZES)),
        ("output_format", lambda v: v in ("jpeg", "png"), "Input should be 'jpeg' or 'png'"),
        ("prompt_upsampling", lambda v: isinstance(v, bool), "Input should be a valid boolean"),
        (
            "safety_tolerance",
            _valid_tolerance(body),
            "Input should be 0..6 (2 at most to edit)",
        ),
        *(
            (name, _valid_image, "Input should be an http(s) URL or base64 image data")
            for name in IMAGE_FIELDS
        ),
    ]
    for name, valid, message in checks:
        if name in body and not valid(body[name]):
            errors.append(_error([name], message, "value_error", body[name]))
    return errors


def _valid_tolerance(body: dict[str, Any]) -> Callable[[Any], bool]:
    highest = 2 if "input_image" in body else 6
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= highest


def _valid_image(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    return value.startswith(("https://", "http://")) or _decode_image(value) is not None


def _decode_image(value: str) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
        image.load()
        return image
    except (binascii.Error, ValueError, OSError):
        return None


def _size(body: dict[str, Any]) -> tuple[int, int]:
    """The aspect ratio's size; without one, the size nearest the inline input image's shape."""
    if "aspect_ratio" in body:
        return SIZES[body["aspect_ratio"]]
    image = _decode_image(body["input_image"]) if "input_image" in body else None
    if image is None:
        return SIZES["1:1"]
    ratio = image.width / image.height
    return min(SIZES.values(), key=lambda size: abs(size[0] / size[1] - ratio))


def _error(loc: list[str], msg: str, kind: str, value: Any) -> dict[str, Any]:
    shown = value if not isinstance(value, str) or len(value) < 80 else value[:80] + "…"
    return {"loc": ["body", *loc], "msg": msg, "type": kind, "input": shown}
