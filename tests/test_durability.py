"""kill -9, SIGTERM and restart on the same data dir: nothing accepted is lost, nothing runs or notifies
twice, and a crash is not held against the request it interrupted. Leases are renewed for as long as a
request runs."""

import collections
import contextlib
import io
import json
import signal
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import KontextdServer, LoopbackServer, WebhookReceiver, wait_completed, wait_for
from PIL import Image

from kontextd.cli import parse

APP_ID = "fal-ai/flux-kontext/dev"
QUEUE_PREFIX = "fal-ai/flux-kontext"  # status, result and cancel URLs use the app id's first two segments
STEPS = 30  # at 0.05 s a step: about 1.5 s a request
# A lease far longer than anything here takes: a request re-run before it could lapse was re-queued by
# start-up recovery, not found later by the lease sweep.
LEASE_SECONDS = 300.0
ARGS = ["--tiny-step-seconds", "0.05", "--webhook-backoff", "1.0,1.0", "--lease-seconds", str(LEASE_SECONDS)]
REQUEUED = "queued again"
RESTARTED = "The server stopped while this request ran; it was queued again"
SHUTDOWN = "The server is shutting down; this request was queued again and runs again from the start"


def start(servers: list[KontextdServer], data_dir: Path) -> KontextdServer:
    server = KontextdServer(data_dir, args=ARGS)
    servers.append(server)
    return server.start()


def status_path(request_id: str) -> str:
    # Built from the id, not taken from the envelope: envelope URLs name the port of the server that is gone.
    return f"/{QUEUE_PREFIX}/requests/{request_id}/status"


def result_path(request_id: str) -> str:
    return f"/{QUEUE_PREFIX}/requests/{request_id}"


def submit(
    client: httpx.Client,
    image_host: LoopbackServer,
    hook: str | None,
    seed: int,
    steps: int = STEPS,
    headers: dict[str, str] | None = None,
) -> str:
    response = client.post(
        f"/{APP_ID}",
        params={"fal_webhook": hook} if hook else {},
        headers=headers or {},
        json={
            "prompt": f"a red square, take {seed}",
            "image_url": f"{image_host.url}/square.png",
            "num_inference_steps": steps,
            "seed": seed,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def log_lines(client: httpx.Client, request_id: str) -> list[dict[str, Any]]:
    body = client.get(status_path(request_id), params={"logs": "1"}).json()
    return body["logs"] or []


def messages(client: httpx.Client, request_id: str) -> list[str]:
    return [line["message"] for line in log_lines(client, request_id)]


def at(line: dict[str, Any]) -> float:
    """When the server wrote a log line (unix time)."""
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def runs(client: httpx.Client, request_id: str) -> list[list[dict[str, Any]]]:
    """The request's step lines, one list per run: a line saying it was queued again starts the next."""
    split: list[list[dict[str, Any]]] = [[]]
    for line in log_lines(client, request_id):
        if REQUEUED in line["message"]:
            split.append([])
        elif line["message"].startswith("step "):
            split[-1].append(line)
    return split


def running_a_step(client: httpx.Client, request_id: str) -> bool:
    body = client.get(status_path(request_id), params={"logs": "1"}).json()
    steps = [line for line in body["logs"] or [] if line["message"].startswith("step ")]
    return body["status"] == "IN_PROGRESS" and bool(steps)


def counted(data_dir: Path, request_id: str) -> tuple[int, int, int]:
    """(attempts, failures, interruptions) as the store recorded them: read with the server stopped."""
    with contextlib.closing(sqlite3.connect(data_dir / "jobs.sqlite3")) as connection:
        row = connection.execute(
            "SELECT attempts, failures, interruptions FROM jobs WHERE request_id = ?", (request_id,)
        ).fetchone()
    return tuple(row)


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


def webhook_barrier(client: httpx.Client, image_host: LoopbackServer, receiver: WebhookReceiver) -> None:
    """Return once a webhook submitted now has arrived: the dispatcher has gone round after every earlier
    delivery was recorded, so a duplicate of one would have been sent before this one."""
    submit(client, image_host, f"{receiver.url}/barrier", seed=99, steps=10)
    wait_for(lambda: receiver.bodies("/barrier"), timeout=60)


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
        submitted_at = time.time()  # its lease was taken after this: it cannot lapse before + LEASE_SECONDS
        request_ids = [submit(client, image_host, hook, seed) for seed in range(5)]
        interrupted = request_ids[0]
        wait_for(lambda: running_a_step(client, interrupted), timeout=60)
        first.kill9()
    assert webhook_receiver.received == []

    second = start(servers, data_dir)
    with second.client() as client:

        def first_to_run_again() -> str | None:
            for request_id in request_ids:
                since_restart = runs(client, request_id)[1 if request_id == interrupted else 0 :]
                if any(since_restart):
                    return request_id
            return None

        # Start-up recovery puts the interrupted request back at the head of the queue at once: it runs
        # before the ones that were queued behind it, long before its lease could have lapsed.
        assert wait_for(first_to_run_again, timeout=60, interval=0.02) == interrupted
        rerun_started = at(runs(client, interrupted)[1][0])
        assert rerun_started < submitted_at + LEASE_SECONDS / 2
        results: dict[str, dict[str, Any]] = {}
        for request_id in request_ids:
            status = wait_completed(client, status_path(request_id), timeout=60)
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
        assert warn[0]["message"] == RESTARTED
        # The others ran exactly once, all after the interrupted one had started again.
        for request_id in request_ids[1:]:
            lines = messages(client, request_id)
            assert not any(REQUEUED in message for message in lines), lines
            assert lines.count("step 1/30") == 1 and lines.count(f"step {STEPS}/{STEPS}") == 1, lines
            (only_run,) = runs(client, request_id)
            assert at(only_run[0]) > rerun_started

        # Each request's webhook arrives exactly once, carrying the result the result URL serves.
        wait_for(lambda: len(webhook_receiver.bodies("/hook")) >= len(request_ids), timeout=30)
        webhook_barrier(client, image_host, webhook_receiver)
        bodies = webhook_receiver.bodies("/hook")
        assert collections.Counter(body["request_id"] for body in bodies) == dict.fromkeys(request_ids, 1)
        assert len([entry for entry in webhook_receiver.received if entry[0] == "/hook"]) == len(request_ids)
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

    second = start(servers, data_dir)
    wait_for(lambda: len(webhook_receiver.received) >= 2, timeout=30)
    with second.client() as client:
        webhook_barrier(client, image_host, webhook_receiver)
    retried = [entry for entry in webhook_receiver.received if entry[0] == "/retried"]
    assert len(retried) == 2
    (path_1, _, body_1), (path_2, headers_2, body_2) = retried
    assert path_1 == path_2 == "/retried"
    # The same body, its image URLs rendered at each try for the address the server has then (the
    # restarted one listens on another port; with a fixed --public-url the bytes are identical).
    assert first.base_url.encode() in body_1
    assert body_2 == body_1.replace(first.base_url.encode(), second.base_url.encode())
    message = json.loads(body_2)
    assert message["request_id"] == request_id
    assert message["status"] == "OK"
    assert message["payload"] == json.loads(json.dumps(result).replace(first.base_url, second.base_url))
    assert header(headers_2, "X-Fal-Webhook-Request-Id") == request_id
    assert header(headers_2, "X-Fal-Webhook-Signature")


def test_a_request_running_far_longer_than_its_lease_runs_once(
    tmp_path: Path, servers: list[KontextdServer], image_host: LoopbackServer
) -> None:
    """The worker renews the lease while the request runs: the lease sweep (every 0.5 s) never takes it.
    Two requests in a row on the one worker: its heartbeat follows the second as it did the first."""
    lease, steps = 1.0, 32
    server = KontextdServer(
        tmp_path / "data",
        args=["--tiny-step-seconds", "0.1", "--lease-seconds", str(lease), "--workers", "1"],
    )
    servers.append(server)
    with server.start().client() as client:
        request_ids = [submit(client, image_host, None, seed=seed, steps=steps) for seed in (3, 4)]
        for request_id in request_ids:
            status = wait_completed(client, status_path(request_id), timeout=120)
            assert "error" not in status, status
            assert client.get(result_path(request_id)).status_code == 200
            lines = messages(client, request_id)
            assert not any(REQUEUED in message for message in lines), lines
            (only_run,) = runs(client, request_id)
            assert [line["message"] for line in only_run] == [
                f"step {step}/{steps}" for step in range(1, steps + 1)
            ]
            # It really outlasted its lease, several times over.
            assert at(only_run[-1]) - at(only_run[0]) >= 3 * lease
        first, second = (runs(client, request_id)[0] for request_id in request_ids)
        assert at(second[0]) >= at(first[-1])  # one after the other, on the one worker


def test_no_retry_ends_a_request_interrupted_by_a_crash_and_only_that_one(
    tmp_path: Path, servers: list[KontextdServer], image_host: LoopbackServer
) -> None:
    data_dir = tmp_path / "data"
    first = KontextdServer(data_dir, args=[*ARGS, "--workers", "2"])
    servers.append(first)
    with first.start().client() as client:
        no_retry = submit(client, image_host, None, seed=1, headers={"x-fal-no-retry": "1"})
        retried = submit(client, image_host, None, seed=2, headers={"x-fal-no-retry": "0"})  # falsy: retry
        wait_for(lambda: running_a_step(client, no_retry) and running_a_step(client, retried), timeout=60)
        first.kill9()

    second = KontextdServer(data_dir, args=[*ARGS, "--workers", "2"])
    servers.append(second)
    with second.start().client() as client:
        ended = wait_completed(client, status_path(no_retry), timeout=60)
        assert ended.get("error_type") == "internal_server_error", ended  # not run again: failed
        assert "x-fal-no-retry" in ended["error"], ended
        result = client.get(result_path(no_retry))
        assert result.status_code == 500
        assert result.headers["X-Fal-Error-Type"] == "internal_server_error"
        assert not any(REQUEUED in message for message in messages(client, no_retry))
        assert len(runs(client, no_retry)) == 1  # never run again

        status = wait_completed(client, status_path(retried), timeout=60)
        assert "error" not in status, status
        assert client.get(result_path(retried)).status_code == 200
        first_run, rerun = runs(client, retried)
        assert first_run and len(rerun) == STEPS


def test_a_graceful_stop_hands_the_running_request_back_counting_nothing(
    tmp_path: Path, servers: list[KontextdServer], image_host: LoopbackServer
) -> None:
    data_dir = tmp_path / "data"
    first = start(servers, data_dir)
    with first.client() as client:
        request_id = submit(client, image_host, None, seed=5)
        wait_for(lambda: running_a_step(client, request_id), timeout=60)
    first.stop()  # SIGTERM: the worker stops at its next step and hands the request back
    # It exited by itself (uvicorn re-raises the SIGTERM once shut down), not killed for taking too long.
    assert first.process is not None and first.process.returncode in (0, -signal.SIGTERM), first.output

    second = start(servers, data_dir)
    with second.client() as client:
        status = wait_completed(client, status_path(request_id), timeout=60)
        assert "error" not in status, status
        lines = log_lines(client, request_id)
        handed_back = [line for line in lines if REQUEUED in line["message"]]
        assert [(line["message"], line["level"]) for line in handed_back] == [(SHUTDOWN, "WARN")]
        stopped, rerun = runs(client, request_id)
        assert 0 < len(stopped) < STEPS and len(rerun) == STEPS
    second.stop()
    # Started twice; neither a failure of its own nor an interruption by a crash.
    assert counted(data_dir, request_id) == (2, 0, 0)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_the_lease_must_be_a_positive_number_of_seconds(value: str) -> None:
    settings = parse(["serve", "--lease-seconds", value])[1]
    with pytest.raises(ValueError, match="--lease-seconds"):
        settings.check()


def test_the_lease_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(["serve"])[1].lease_seconds == 60.0
    monkeypatch.setenv("KONTEXTD_LEASE_SECONDS", "0.5")
    assert parse(["serve"])[1].lease_seconds == 0.5
    settings = parse(["serve", "--lease-seconds", "7"])[1]
    assert settings.lease_seconds == 7.0
    settings.check()
