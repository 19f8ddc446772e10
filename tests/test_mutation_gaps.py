"""Tests for bugs the mutation check (bench/mutation_check.py) planted and the suite did not catch.

Each section names the mutants it kills. The tests pin behaviour the rest of the suite left open: the key
grammar and what LocalStorage.open refuses, the proxy header's routing, what a failed input image echoes
back, webhook redirects, the housekeeping sweep, and how many crashes an innocent request survives.
"""

import asyncio
import base64
import contextlib
import http.server
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, dispatching, png_bytes, raw_get, wait_completed, wait_for

from kontextd.api.middleware import TargetUrl
from kontextd.jobs import outcomes
from kontextd.jobs.model import NewJob, State
from kontextd.jobs.sqlite import SQLiteJobStore
from kontextd.storage import keys
from kontextd.storage.local import LocalStorage
from kontextd.worker.housekeeping import sweep_once

DEV = "fal-ai/flux-kontext/dev"
REQUEST_ID = "0b6f2a51-9c1e-4d3a-8f7b-2e5d4c3b2a19"


# -- storage: the key grammar and what open() refuses (storage-key-prefix-match, -path-check-loosened,
#    -serves-non-regular-files) -------------------------------------------------------------------------


@pytest.mark.parametrize("key", [f"{REQUEST_ID}/0.png", f"{REQUEST_ID}/3.jpeg", f"{REQUEST_ID}/99.webp"])
def test_keys_of_the_grammar_are_valid(key: str) -> None:
    assert keys.is_valid(key)


@pytest.mark.parametrize(
    "key",
    [
        f"{REQUEST_ID}/0.png\n",
        f"{REQUEST_ID}/0.png.png",
        f"{REQUEST_ID}/0.pngx",
        f"{REQUEST_ID}/0.png/x",
        f"{REQUEST_ID}/0.png\x00",
        f"{REQUEST_ID}/0.png/../../jobs.sqlite3",
        f"{REQUEST_ID}//etc/passwd",
        f"{REQUEST_ID}/../0.png",
        f"/{REQUEST_ID}/0.png",
        f"{REQUEST_ID.upper()}/0.png",
        f"{REQUEST_ID}/00.png",
        f"{REQUEST_ID}/100.png",
        f"{REQUEST_ID}/0.gif",
        f"{REQUEST_ID}/0",
        "",
    ],
)
def test_anything_else_is_not_a_key(key: str) -> None:
    """Exactly the grammar: a valid key followed by anything at all is no key either."""
    assert not keys.is_valid(key)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    storage = LocalStorage(tmp_path / "files")
    storage.put(f"{REQUEST_ID}/0.png", png_bytes(4, 4), "image/png")
    return storage


def test_open_reads_only_files_the_grammar_names(storage: LocalStorage, tmp_path: Path) -> None:
    stored = storage.open(f"{REQUEST_ID}/0.png")
    assert stored is not None and stored.content_type == "image/png"
    stored.stream.close()
    # A secret outside the root with an extension outputs have: named absolutely after a real request's
    # folder, or by climbing out of it, it must stay unreadable.
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    for key in (
        f"{REQUEST_ID}/{secret}",
        f"{REQUEST_ID}/0.png/../../secret.png",
        f"{REQUEST_ID}/../secret.png",
        str(secret),
    ):
        assert storage.open(key) is None, key


def test_a_directory_where_an_output_would_be_is_absent(storage: LocalStorage) -> None:
    (storage.root / REQUEST_ID / "1.png").mkdir()
    assert storage.open(f"{REQUEST_ID}/1.png") is None


def test_files_after_a_real_request_folder_stay_inside_storage(server: KontextdServer) -> None:
    """The traversals of test_hostile_input, behind the folder of a request that exists: only the grammar
    (not the folder's absence) may be what refuses them."""
    request_id = str(uuid.uuid4())
    folder = server.data_dir / "files" / request_id
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(png_bytes(4, 4))
    assert raw_get(server, f"/files/{request_id}/0.png".encode())[0] == 200
    secret = (server.data_dir / "webhook-ed25519.pem").resolve()
    for target in (
        f"/files/{request_id}/{secret}",
        f"/files/{request_id}/%2F{str(secret).lstrip('/')}",
        f"/files/{request_id}/0.png/../../../webhook-ed25519.pem",
        f"/files/{request_id}/..%2F..%2Fwebhook-ed25519.pem",
        f"/files/{request_id}/0.png%00",
        f"/files/{request_id}/0.png.png",
    ):
        code, body = raw_get(server, target.encode())
        assert code == 404, (target, code, body[:200])
        assert secret.read_bytes() not in body


# -- api: the proxy header routes by the target's host (api-proxy-target-host-inverted) --------------------


def routed(target: str) -> tuple[str, bytes, bytes]:
    """(path, raw_path, query_string) the app sees for a proxied call with `x-fal-target-url: target`."""
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)

    scope = {
        "type": "http",
        "path": "/proxy",
        "raw_path": b"/proxy",
        "query_string": b"",
        "headers": [(b"x-fal-target-url", target.encode())],
    }
    asyncio.run(TargetUrl(app, run_prefix="/run")(scope, None, None))
    (got,) = seen
    return got["path"], got["raw_path"], got["query_string"]


def test_a_proxied_queue_host_goes_to_the_queue_routes_and_a_run_host_to_the_run_routes() -> None:
    target = "https://queue.fal.run/fal-ai/flux-pro/kontext?fal_webhook=https%3A%2F%2Fh.example%2Fx"
    assert routed(target) == (
        "/fal-ai/flux-pro/kontext",
        b"/fal-ai/flux-pro/kontext",
        b"fal_webhook=https%3A%2F%2Fh.example%2Fx",
    )
    assert routed("https://fal.run/fal-ai/flux-pro/kontext") == (
        "/run/fal-ai/flux-pro/kontext",
        b"/run/fal-ai/flux-pro/kontext",
        b"",
    )
    assert routed("https://queue.fal.run/fal-ai/a%20b")[:2] == ("/fal-ai/a b", b"/fal-ai/a%20b")


def test_a_proxied_submit_to_the_queue_host_is_queued(client: httpx.Client) -> None:
    target = "https://queue.fal.run/fal-ai/flux-pro/kontext/text-to-image"
    response = client.post("/proxy", json={"prompt": "proxied"}, headers={"x-fal-target-url": target})
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["status"] == "IN_QUEUE"
    client.put(envelope["cancel_url"])


# -- worker: a failed input image is not echoed back whole (worker-image-error-echoes-data-uri) ----------


def test_an_input_image_that_fails_to_load_is_summarised_in_the_result(client: httpx.Client) -> None:
    marker = base64.b64encode(b"NOT-AN-IMAGE-MARKER" * 400).decode()
    uri = "data:image/png;base64," + marker
    response = client.post(f"/{DEV}", json={"prompt": "edit", "image_url": uri, "num_inference_steps": 10})
    assert response.status_code == 200, response.text
    envelope = response.json()
    status = wait_completed(client, envelope["status_url"])
    assert status["error_type"] == "image_load_error", status
    result = client.get(envelope["response_url"])
    assert result.status_code == 422
    (detail,) = result.json()["detail"]
    assert detail["loc"] == ["body", "image_url"]
    assert detail["input"] == f"data:image/png;base64,… ({len(uri)} characters)"  # as the API shows one
    assert marker[40:80] not in result.text and len(result.content) < 1_000


# -- webhooks: a redirect is not a delivery (webhooks-3xx-delivered) -------------------------------------


class _Statuses(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the next status of `statuses` (then 200), recording what it answered."""

    statuses: list[int] = []
    answered: list[int] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status = self.statuses.pop(0) if self.statuses else 200
        self.answered.append(status)
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def answering(statuses: list[int]) -> Iterator[tuple[str, list[int]]]:
    answered: list[int] = []
    handler = type("Handler", (_Statuses,), {"statuses": list(statuses), "answered": answered})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/hook", answered
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    opened = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield opened
    opened.close()


def new_job(request_id: str, **fields: Any) -> NewJob:
    return NewJob(request_id, "gateway", DEV, "alice", {"prompt": "x"}, **fields)


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_receiver_answering_a_redirect_has_not_received_the_webhook(
    store: SQLiteJobStore, status: int
) -> None:
    """README: a 2xx answer delivers, anything else is tried again. A POST's redirect is not followed (the
    guard would have to vet the new target), so it is a failed try like any other."""
    with answering([status]) as (url, answered):
        store.submit(new_job("hooked", webhook_url=url))
        store.complete("hooked", outcomes.succeeded({"images": []}, 0.1, (), "local/tiny"), time.time())
        with dispatching(store, backoff=(0.05,)):
            wait_for(lambda: store.webhook_deliveries("hooked")[0].state == "delivered")
    (delivery,) = store.webhook_deliveries("hooked")
    assert answered == [status, 200]
    assert (delivery.state, delivery.attempts) == ("delivered", 2)  # the redirect was a try, not the end


# -- housekeeping: the sweep's own chores (housekeeping-no-lease-sweep, -no-start-deadline-sweep) ---------


def test_a_sweep_requeues_a_request_whose_lease_lapsed(store: SQLiteJobStore, storage: LocalStorage) -> None:
    now = time.time()
    store.submit(new_job("hung"))
    assert store.claim("worker-a", 1.0, now) is not None  # its worker then hangs: no renewal
    assert sweep_once(store, storage, now + 0.5)["requeued"] == 0
    assert sweep_once(store, storage, now + 2)["requeued"] == 1
    job = store.get("hung")
    assert job is not None and (job.state, job.failures) == (State.IN_QUEUE, 1)


def test_a_sweep_times_out_a_queued_request_past_its_start_deadline(
    store: SQLiteJobStore, storage: LocalStorage
) -> None:
    """While every worker is busy nothing claims: the sweep alone ends a request that can no longer start."""
    now = time.time()
    store.submit(new_job("late", start_deadline=now + 1))
    assert sweep_once(store, storage, now)["timed_out"] == 0
    assert sweep_once(store, storage, now + 2)["timed_out"] == 1
    job = store.get("late")
    assert job is not None and job.state is State.COMPLETED
    assert job.outcome is not None and job.outcome.error_type == "request_timeout"


# -- jobs: crashes an innocent request survives (jobs-max-interruptions-3) ---------------------------------


def test_a_request_survives_nine_crashes_and_the_tenth_ends_it(store: SQLiteJobStore) -> None:
    """Pinned, not read from the code: a request the server was killed under 3 times must still run (issue 8,
    item 9: kill -9 runs failed innocent requests after 3); only a request that looks like it is what kills
    the server (10 crashes) is ended."""
    now = time.time()
    store.submit(new_job("unlucky"))
    for crash in range(1, 11):
        assert store.claim("worker-a", 3600.0, now + crash) is not None
        assert store.recover_after_restart(now + crash) == 1
        job = store.get("unlucky")
        assert job is not None and job.interruptions == crash and job.failures == 0
        assert job.state is (State.COMPLETED if crash == 10 else State.IN_QUEUE), crash
    assert job.outcome is not None
    assert job.outcome.error == "The server stopped 10 times while this request ran; it is not run again"
