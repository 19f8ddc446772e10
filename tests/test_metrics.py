"""Prometheus /metrics end to end: a real server's counters move by exactly what its requests did.

Most tests use the session server (one worker, tiny model paced at 0.02 s a step); they read the metrics
before and after their own requests, so what other tests did before does not matter. Counters move just
after a request ends (the end is recorded first), so each test waits for them to arrive, then checks they
moved by exactly as much as they should.
"""

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, LoopbackServer, WebhookReceiver, free_port, wait_completed, wait_for
from prometheus_client.parser import text_string_to_metric_families

TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
PRO_EDIT = "fal-ai/flux-pro/kontext"
DEV = "fal-ai/flux-kontext/dev"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_moved(client: httpx.Client, before: Samples, expected: dict[tuple[str, Any], float]) -> Samples:
    """Scrape until every (name, labels) has moved by at least its amount; returns that scrape."""

    def arrived() -> Samples | None:
        after = scrape(client)
        done = all(
            moved(before, after, name, **dict(labels)) >= amount
            for (name, labels), amount in expected.items()
        )
        return after if done else None

    return wait_for(arrived, timeout=60, interval=0.1)


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


def submit(client: httpx.Client, app_id: str, body: dict[str, Any], **params: str) -> dict[str, Any]:
    response = client.post(f"/{app_id}", json=body, params=params or None)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def client(server: KontextdServer) -> Iterator[httpx.Client]:
    with server.client() as http_client:
        yield http_client


def test_metrics_are_prometheus_text_every_name_prefixed(client: httpx.Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(response.text))
    names = {family.name for family in families}
    assert all(name.startswith("kontextd_") for name in names), names
    for expected in (
        "kontextd_requests",
        "kontextd_queue_depth",
        "kontextd_queue_oldest_wait_seconds",
        "kontextd_queue_wait_seconds",
        "kontextd_run_seconds",
        "kontextd_denoising_step_seconds",
        "kontextd_images",
        "kontextd_webhook_attempts",
        "kontextd_fetch_refusals",
    ):
        assert expected in names
    assert "kontextd_gpu_memory_allocated_bytes" not in names  # CPU: no GPU, no such metric
    samples = parse(response.text)
    assert value(samples, "kontextd_queue_depth", lane="local") >= 0  # every lane, queued or not
    assert key("kontextd_queue_depth", lane="local") in samples
    # The OpenAPI documents it, with its content type.
    operation = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert "text/plain" in operation["responses"]["200"]["content"]


def test_requests_images_steps_and_histograms_move_by_what_ran(
    client: httpx.Client, image_host: LoopbackServer
) -> None:
    marker = f"metrics-prompt-{uuid.uuid4().hex}"
    before = scrape(client)
    ok = submit(
        client,
        DEV,
        {
            "prompt": marker,
            "image_url": f"{image_host.url}/square.png",
            "num_inference_steps": 10,
            "num_images": 2,
        },
    )
    failed = submit(client, PRO_EDIT, {"prompt": marker, "image_url": f"{image_host.url}/not-an-image"})
    assert "error" not in wait_completed(client, ok["status_url"])
    assert wait_completed(client, failed["status_url"])["error"]
    expected = {
        key("kontextd_requests_total", endpoint=DEV, outcome="ok"): 1,
        key("kontextd_requests_total", endpoint=PRO_EDIT, outcome="image_load_error"): 1,
    }
    after = wait_moved(client, before, expected)
    for (name, labels), amount in expected.items():
        assert moved(before, after, name, **dict(labels)) == amount
    assert moved(before, after, "kontextd_images_total", endpoint=DEV) == 2
    assert moved(before, after, "kontextd_images_total", endpoint=PRO_EDIT) == 0
    for endpoint in (DEV, PRO_EDIT):
        assert moved(before, after, "kontextd_queue_wait_seconds_count", endpoint=endpoint) == 1
        assert moved(before, after, "kontextd_run_seconds_count", endpoint=endpoint) == 1
        assert moved(before, after, "kontextd_run_seconds_sum", endpoint=endpoint) > 0
    # Ten steps: nine timed from the one before, each at least the 0.02 s the server paces them to.
    assert moved(before, after, "kontextd_denoising_step_seconds_count", lane="local") == 9
    assert moved(before, after, "kontextd_denoising_step_seconds_sum", lane="local") >= 9 * 0.02
    assert 0 < value(after, "kontextd_denoising_steps_per_second", lane="local") <= 1 / 0.02
    text = client.get("/metrics").text
    assert marker not in text  # no prompt in any label


def test_queue_depth_and_oldest_wait_per_lane(client: httpx.Client, image_host: LoopbackServer) -> None:
    blocker = submit(
        client,
        DEV,
        {
            "prompt": "blocker",
            "image_url": f"{image_host.url}/square.png",
            "num_inference_steps": 50,
            "seed": 1,
        },
    )
    queued: list[dict[str, Any]] = []
    try:
        wait_for(lambda: client.get(blocker["status_url"]).json()["status"] == "IN_PROGRESS")
        queued = [submit(client, TEXT_TO_IMAGE, {"prompt": f"queued {n}"}) for n in range(2)]
        samples = scrape(client)
        # The blocker runs for a second; the scrape took milliseconds: checked, not assumed.
        assert client.get(blocker["status_url"]).json()["status"] == "IN_PROGRESS"
        assert value(samples, "kontextd_queue_depth", lane="local") == 2
        assert value(samples, "kontextd_queue_oldest_wait_seconds", lane="local") > 0
    finally:
        for envelope in [blocker, *queued]:
            client.put(envelope["cancel_url"])
    for envelope in [blocker, *queued]:
        wait_completed(client, envelope["status_url"])
    assert value(scrape(client), "kontextd_queue_depth", lane="local") == 0


def test_webhook_deliveries_retries_and_failures(
    client: httpx.Client, image_host: LoopbackServer, webhook_receiver: WebhookReceiver
) -> None:
    before = scrape(client)
    body = {"prompt": "hook", "image_url": f"{image_host.url}/square.png", "num_inference_steps": 10}
    submit(client, DEV, body, fal_webhook=f"{webhook_receiver.url}/ok")
    wait_for(lambda: webhook_receiver.bodies("/ok"))
    # Four tries in all (three gaps of 0.3 s): every one answered 500, so given up after the fourth.
    webhook_receiver.failures_left[0] = 4
    submit(client, DEV, body, fal_webhook=f"{webhook_receiver.url}/failing")
    expected = {
        key("kontextd_webhook_attempts_total", outcome="delivered"): 1,
        key("kontextd_webhook_attempts_total", outcome="retry"): 3,
        key("kontextd_webhook_attempts_total", outcome="failed"): 1,
    }
    after = wait_moved(client, before, expected)
    for (name, labels), amount in expected.items():
        assert moved(before, after, name, **dict(labels)) == amount
    assert len(webhook_receiver.bodies("/failing")) == 4


def test_fetch_refusals_are_counted(client: httpx.Client) -> None:
    before = scrape(client)
    # Loopback, but not the allow-listed 127.0.0.1: refused before any connection.
    response = client.post(f"/{PRO_EDIT}", json={"prompt": "x", "image_url": "http://127.0.0.2:9/x.png"})
    if response.status_code == 200:  # refused when the worker fetches it, rather than at submit
        wait_completed(client, response.json()["status_url"])
    after = wait_moved(client, before, {key("kontextd_fetch_refusals_total"): 1})
    assert moved(before, after, "kontextd_fetch_refusals_total") == 1


def test_keys_guard_metrics_and_the_metrics_port_serves_loopback_only(
    servers: list[KontextdServer], tmp_path: Path
) -> None:
    """With API keys, /metrics takes one; --metrics-port serves the same without, on 127.0.0.1. The API
    alone (--workers 0): the request stays queued, which the queue depth shows; no model to load."""
    secret = f"metrics-key-{uuid.uuid4().hex}"
    metrics_port = free_port()
    args = ["--api-key", secret, "--metrics-port", str(metrics_port), "--workers", "0"]
    server = KontextdServer(tmp_path, args=args)
    servers.append(server)
    server.start()
    with server.client() as anonymous:
        refused = anonymous.get("/metrics")
        assert refused.status_code == 401
        assert "detail" in refused.json()
    marker = f"prompt-{uuid.uuid4().hex}"
    with server.client(secret) as keyed:
        submit(keyed, TEXT_TO_IMAGE, {"prompt": marker})
        text = keyed.get("/metrics").text
    assert value(parse(text), "kontextd_queue_depth", lane="local") == 1
    plain = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
    assert plain.status_code == 200
    assert value(parse(plain.text), "kontextd_queue_depth", lane="local") == 1
    for shown in (text, plain.text):
        assert secret not in shown and marker not in shown
        assert "key-" not in shown  # no owner id either


def test_a_worker_process_serves_its_own_metrics_on_its_health_port(
    servers: list[KontextdServer], tmp_path: Path, pg_dsn: str, image_host: LoopbackServer
) -> None:
    """Each process counts what it did: the worker the requests it ran, the API node none of them."""
    shared = ["--store", pg_dsn, "--tiny-step-seconds", "0.01"]
    api = KontextdServer(tmp_path / "api", args=[*shared, "--workers", "0"])
    worker = KontextdServer(tmp_path / "worker", args=shared, command_name="worker")
    servers.extend([api, worker])
    api.start()
    worker.start()  # its --health-port is `port`
    body = {"prompt": "on a worker", "image_url": f"{image_host.url}/square.png", "num_inference_steps": 10}
    with api.client() as client, worker.client() as health:
        envelope = submit(client, DEV, body)
        assert "error" not in wait_completed(client, envelope["status_url"])
        ran = key("kontextd_requests_total", endpoint=DEV, outcome="ok")
        after = wait_moved(health, {}, {ran: 1})
        assert after[ran] == 1
        assert value(after, "kontextd_images_total", endpoint=DEV) == 1
        on_api = scrape(client)
        assert value(on_api, "kontextd_requests_total", endpoint=DEV, outcome="ok") == 0
        assert value(on_api, "kontextd_queue_depth", lane="local") == 0  # the shared store's queue
