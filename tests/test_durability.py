"""kill -9 and restart on the same data dir: nothing accepted is lost, nothing runs or notifies twice."""

import collections
import contextlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import KontextdServer, LoopbackServer, WebhookReceiver, wait_completed, wait_for
from PIL import Image

APP_ID = "fal-ai/flux-kontext/dev"
QUEUE_PREFIX = "fal-ai/flux-kontext"  # status, result and cancel URLs use the app id's first two segments
STEPS = 30  # at 0.05 s a step: about 1.5 s a request
ARGS = ["--tiny-step-seconds", "0.05", "--webhook-backoff", "1.0,1.0"]
REQUEUED = "queued again"
DUPLICATE_GRACE_SECONDS = 1.5  # more than one webhook poll (1 s): a duplicate would have arrived by then


@pytest.fixture
def servers() -> Iterator[list[KontextdServer]]:
    """Every server a test starts is stopped at the end, even when the test fails half-way."""
    started: list[KontextdServer] = []
    yield started
    for server in started:
        server.stop()


def start(servers: list[KontextdServer], data_dir: Path) -> KontextdServer:
    server = KontextdServer(data_dir, args=ARGS)
    servers.append(server)
    return server.start()


def status_path(request_id: str) -> str:
    # Built from the id, not taken from the envelope: envelope URLs name the port of the server that is gone.
    return f"/{QUEUE_PREFIX}/requests/{request_id}/status"


def result_path(request_id: str) -> str:
    return f"/{QUEUE_PREFIX}/requests/{request_id}"


def submit(client: httpx.Client, image_host: LoopbackServer, hook: str, seed: int, steps: int = STEPS) -> str:
    response = client.post(
        f"/{APP_ID}",
        params={"fal_webhook": hook},
        json={
            "prompt": f"a red square, take {seed}",
            "image_url": f"{image_host.url}/square.png",
            "num_inference_steps": steps,
            "seed": seed,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def messages(client: httpx.Client, request_id: str) -> list[str]:
    body = client.get(status_path(request_id), params={"logs": "1"}).json()
    return [line["message"] for line in body["logs"] or []]


def download_image(client: httpx.Client, url: str) -> Image.Image:
    # Fetch by path from the server now running: the URL's authority may name an earlier process.
    response = client.get(urlsplit(url).path)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def server_log_entries(server: KontextdServer) -> list[dict[str, Any]]:
    entries = []
    for line in list(server.output):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
    return entries


def header(headers: dict[str, str], name: str) -> str | None:
    return next((value for key, value in headers.items() if key.lower() == name.lower()), None)


def test_kill9_with_requests_queued_and_one_running_loses_and_duplicates_nothing(
    tmp_path: Path,
    servers: list[KontextdServer],
    image_host: LoopbackServer,
    webhook_receiver: WebhookReceiver,
) -> None:
    data_dir = tmp_path / "data"
    hook = f"{webhook_receiver.url}/hook"
    first = start(servers, data_dir)
    with first.client() as client:
        request_ids = [submit(client, image_host, hook, seed) for seed in range(5)]
        interrupted = request_ids[0]

        def running_a_step() -> bool:
            body = client.get(status_path(interrupted), params={"logs": "1"}).json()
            steps = [line for line in body["logs"] or [] if line["message"].startswith("step ")]
            return body["status"] == "IN_PROGRESS" and bool(steps)

        wait_for(running_a_step, timeout=60)
        first.kill9()
    assert webhook_receiver.received == []

    second = start(servers, data_dir)
    with second.client() as client:
        results: dict[str, dict[str, Any]] = {}
        for request_id in request_ids:
            status = wait_completed(client, status_path(request_id), timeout=90)
            assert "error" not in status, status
            response = client.get(result_path(request_id))
            assert response.status_code == 200, response.text
            results[request_id] = response.json()
            images = results[request_id]["images"]
            assert len(images) == 1
            image = download_image(client, images[0]["url"])
            assert image.size == (images[0]["width"], images[0]["height"])

        # The interrupted request ran again from the start, after the store said why.
        lines = messages(client, interrupted)
        requeued = [index for index, message in enumerate(lines) if REQUEUED in message]
        assert len(requeued) == 1, lines
        before, after = lines[: requeued[0]], lines[requeued[0] + 1 :]
        assert "step 1/30" in before, lines
        assert f"step {STEPS}/{STEPS}" not in before, lines
        assert after.count("step 1/30") == 1 and after.count(f"step {STEPS}/{STEPS}") == 1, lines
        body = client.get(status_path(interrupted), params={"logs": "1"}).json()
        warn = [line for line in body["logs"] if REQUEUED in line["message"]]
        assert warn[0]["level"] == "WARN"
        # The others ran exactly once.
        for request_id in request_ids[1:]:
            lines = messages(client, request_id)
            assert not any(REQUEUED in message for message in lines), lines
            assert lines.count("step 1/30") == 1 and lines.count(f"step {STEPS}/{STEPS}") == 1, lines

        # Each request's webhook arrives exactly once, carrying the result the result URL serves.
        wait_for(lambda: len(webhook_receiver.bodies("/hook")) >= len(request_ids), timeout=30)
        time.sleep(DUPLICATE_GRACE_SECONDS)
        bodies = webhook_receiver.bodies("/hook")
        assert collections.Counter(body["request_id"] for body in bodies) == dict.fromkeys(request_ids, 1)
        assert len(webhook_receiver.received) == len(request_ids)
        for body in bodies:
            assert body["status"] == "OK", body
            assert body["payload"] == results[body["request_id"]]


def test_a_webhook_retry_survives_a_kill9(
    tmp_path: Path,
    servers: list[KontextdServer],
    image_host: LoopbackServer,
    webhook_receiver: WebhookReceiver,
) -> None:
    data_dir = tmp_path / "data"
    hook = f"{webhook_receiver.url}/retried"
    webhook_receiver.failures_left[0] = 1  # the receiver is down for the first try
    first = start(servers, data_dir)
    with first.client() as client:
        request_id = submit(client, image_host, hook, seed=7, steps=10)
        wait_completed(client, status_path(request_id), timeout=60)
        result = client.get(result_path(request_id)).json()

    def first_try_recorded() -> bool:
        # Logged once the failed try and its retry time are stored: killing now must not lose the retry.
        return any(
            entry.get("message") == "webhook attempt"
            and entry.get("request_id") == request_id
            and entry.get("delivered") is False
            for entry in server_log_entries(first)
        )

    wait_for(first_try_recorded, timeout=30, interval=0.01)
    first.kill9()  # the retry was due a second later
    assert len(webhook_receiver.received) == 1
    assert webhook_receiver.failures_left[0] == 0

    start(servers, data_dir)
    wait_for(lambda: len(webhook_receiver.received) >= 2, timeout=30)
    time.sleep(DUPLICATE_GRACE_SECONDS)
    assert len(webhook_receiver.received) == 2
    (path_1, _, body_1), (path_2, headers_2, body_2) = webhook_receiver.received
    assert path_1 == path_2 == "/retried"
    assert body_2 == body_1
    message = json.loads(body_2)
    assert message["request_id"] == request_id
    assert message["status"] == "OK"
    assert message["payload"] == result
    assert header(headers_2, "X-Fal-Webhook-Request-Id") == request_id
    assert header(headers_2, "X-Fal-Webhook-Signature")
