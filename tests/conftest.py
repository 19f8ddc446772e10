"""Shared fixtures: kontextd as a real process on loopback, and small loopback servers tests talk to."""

import asyncio
import contextlib
import errno
import http.server
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from kontextd.fetch.addresses import AllowList
from kontextd.fetch.guard import GuardedFetcher
from kontextd.jobs.sqlite import SQLiteJobStore
from kontextd.webhooks.delivery import WebhookDispatcher
from kontextd.webhooks.signing import WebhookSigner
from tests.pg_fixtures import *  # noqa: F403 - fixtures: PostgreSQL databases and a private cluster
from tests.s3_fixtures import *  # noqa: F403 - fixtures: a SeaweedFS S3 server on loopback

STARTUP_SECONDS = 90
UPSTREAM_VARIABLES = frozenset(
    {
        "BFL_API_KEY",
        "KONTEXTD_BFL_API_KEY",
        "BFL_API_KEY_FILE",
        "KONTEXTD_BFL_BASE_URL",
        "KONTEXTD_FAL_KEY",
        "KONTEXTD_FAL_KEY_FILE",
        "KONTEXTD_FAL_BASE_URL",
        "KONTEXTD_CONFIG",
    }
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class KontextdServer:
    """One `python -m kontextd serve` process (or `worker`, with /health on `port`). Start, stop, kill -9
    and restart on the same data dir."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    tls: bool = False
    command_name: str = "serve"
    process: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    def command(self) -> list[str]:
        tls = ["--tls-self-signed"] if self.tls else []
        port = "--health-port" if self.command_name == "worker" else "--port"
        return [
            sys.executable,
            "-m",
            "kontextd",
            self.command_name,
            port,
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--fetch-allow",
            "127.0.0.1",
            "--sweep-interval",
            "0.5",
            *tls,
            *self.args,
        ]

    def start(self, until: str = "ready") -> "KontextdServer":
        """Start and wait until /health says `until` ("ready", or "failed" for tests of a failed load)."""
        # Upstream keys from the machine must never route a test's requests off loopback.
        inherited = {name: value for name, value in os.environ.items() if name not in UPSTREAM_VARIABLES}
        env = {**inherited, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **self.env}
        self.output = []
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        threading.Thread(target=self._collect, args=(self.process,), daemon=True).start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("kontextd exited during start-up:\n" + "".join(self.output))
            try:
                if self.client().get("/health", timeout=1).json()["status"] == until:
                    return self
            except (httpx.TransportError, FileNotFoundError):  # not listening, or TLS files not written yet
                pass
            time.sleep(0.2)
        raise RuntimeError("kontextd did not become healthy:\n" + "".join(self.output))

    def _collect(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.output.append(line)

    def client(self, key: str | None = None, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Key {key}"} if key else {}
        verify = ssl.create_default_context(cafile=self.ca_file) if self.tls else True
        return httpx.Client(base_url=self.base_url, headers=headers, verify=verify, timeout=30, **kwargs)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no shutdown code runs
        self.process.wait()

    def fal_env(self, key: str = "local") -> dict[str, str]:
        """The environment `--tls-self-signed` tells users to export, read from the server's own output."""
        exported = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in self.output
            if line.strip().startswith("export ")
        )
        exported["FAL_KEY"] = key
        return exported


def raw_get(server: KontextdServer, target: bytes) -> tuple[int, bytes]:
    """GET with the request target byte for byte: HTTP clients would normalise `..` and `//` away."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def wait_for(condition, timeout: float = 30, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def wait_completed(client: httpx.Client, status_url: str, timeout: float = 60) -> dict:
    def completed() -> dict | None:
        body = client.get(status_url).json()
        return body if body["status"] == "COMPLETED" else None

    return wait_for(completed, timeout)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    """A plain-HTTP server shared by the API tests; steps are paced so progress and cancel are observable."""
    instance = KontextdServer(
        tmp_path_factory.mktemp("kontextd"),
        args=["--tiny-step-seconds", "0.02", "--webhook-backoff", "0.3,0.3,0.3"],
    ).start()
    yield instance
    instance.stop()


@pytest.fixture
def servers() -> Iterator[list[KontextdServer]]:
    """Every server a test starts is stopped at the end, even when the test fails half-way."""
    started: list[KontextdServer] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def client(server: KontextdServer) -> Iterator[httpx.Client]:
    with server.client() as http_client:
        yield http_client


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


class _Files(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes]] = {}

    def do_GET(self) -> None:
        code, content_type, body = self.routes.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class LoopbackServer:
    url: str
    routes: dict[str, tuple[int, str, bytes]]
    received: list[tuple[str, dict[str, str], bytes]]


@pytest.fixture(scope="session")
def image_host() -> Iterator[LoopbackServer]:
    """Serves test images on 127.0.0.1 (the kontextd fixture allow-lists 127.0.0.1)."""
    routes = {
        "/square.png": (200, "image/png", png_bytes(64, 64)),
        "/wide.png": (200, "image/png", png_bytes(320, 180, (20, 120, 220))),
        "/tall.png": (200, "image/png", png_bytes(90, 160, (20, 200, 90))),
        "/not-an-image": (200, "text/plain", b"hello"),
    }
    handler = type("Files", (_Files,), {"routes": routes})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield LoopbackServer(f"http://127.0.0.1:{httpd.server_port}", routes, [])
    httpd.shutdown()


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]] = []
    failures_left: list[int] = [0]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append((self.path, dict(self.headers), body))
        if self.failures_left[0] > 0:
            self.failures_left[0] -= 1
            self.send_response(500)
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class WebhookReceiver:
    url: str
    received: list[tuple[str, dict[str, str], bytes]]
    failures_left: list[int]

    def bodies(self, path: str) -> list[dict]:
        return [json.loads(body) for got_path, _, body in self.received if got_path == path]


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A loopback endpoint recording every webhook POST; failures_left[0] = N answers 500 N times first."""
    received: list[tuple[str, dict[str, str], bytes]] = []
    failures = [0]
    handler = type("Receiver", (_Receiver,), {"received": received, "failures_left": failures})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield WebhookReceiver(f"http://127.0.0.1:{httpd.server_port}", received, failures)
    httpd.shutdown()


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "16m") mounted at `path`: a disk that really fills up. Mounting needs root;
    where it is not permitted the test is skipped, saying why."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(directory: Path) -> Path:
    """Write a file in `directory` until its file system has no byte left (ENOSPC); delete the file to free
    the space again."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def dispatching(store: SQLiteJobStore, **options: Any) -> Iterator[WebhookDispatcher]:
    """A dispatcher polling every 50 ms on a thread of its own, stopped (and waited for) on exit."""
    started = threading.Event()
    running: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        async with GuardedFetcher(AllowList.parse("127.0.0.1")) as fetcher:
            signer = WebhookSigner(Ed25519PrivateKey.generate())
            dispatcher = WebhookDispatcher(store, signer, fetcher, options.pop("backoff", (0.05,)), **options)
            running.update(loop=asyncio.get_running_loop(), stop=stop, dispatcher=dispatcher)
            started.set()
            await dispatcher.run(stop, poll_seconds=0.05)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield running["dispatcher"]
    finally:
        running["loop"].call_soon_threadsafe(running["stop"].set)
        thread.join(30)
        assert not thread.is_alive(), "the dispatcher did not stop"
