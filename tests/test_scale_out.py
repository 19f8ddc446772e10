"""Scale-out, end to end with real processes: API nodes (`serve --workers 0`) and `kontextd worker`s on one
PostgreSQL and one S3 server (SeaweedFS). What one node accepts every node serves; a worker or an API node
killed with -9, PostgreSQL restarted, S3 down for a while: nothing accepted is lost or done twice."""

import collections
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from conftest import KontextdServer, LoopbackServer, WebhookReceiver, free_port, wait_for

from kontextd.webhooks.signing import verify_webhook

APP_ID = "fal-ai/flux-kontext/dev"
QUEUE_PREFIX = "fal-ai/flux-kontext"
STEPS = 20  # at 0.1 s a step: about 2 s a request, long enough to act on one while it runs
LEASE_SECONDS = 3.0  # short, so a killed worker's request is taken over quickly; renewed every second
COMMON = [
    "--lease-seconds",
    str(LEASE_SECONDS),
    "--tiny-step-seconds",
    "0.1",
    "--webhook-backoff",
    "0.5,0.5,0.5",
]
REQUEUED_LEASE = "The worker running this request stopped; it was queued again"
REQUEUED_STORAGE = "Its images could not be stored (disk full or storage unavailable); it was queued again"


@dataclass
class Deployment:
    dsn: str
    api: list[KontextdServer]
    workers: list[KontextdServer]

    def database(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)

    def running_on(self, request_id: str) -> KontextdServer | None:
        """The worker process holding the request's lease, by the pid in its worker id."""
        with self.database() as connection:
            row = connection.execute(
                "SELECT worker_id FROM kontextd_jobs WHERE request_id = %s AND state = 'IN_PROGRESS'",
                (request_id,),
            ).fetchone()
        if row is None or row[0] is None:
            return None
        for worker in self.workers:
            assert worker.process is not None
            if f"-{worker.process.pid}-" in row[0]:
                return worker
        return None


def start_all(processes: list[KontextdServer]) -> None:
    """Start processes side by side (each loads for seconds); raise the first failure."""
    failures: list[BaseException] = []

    def start(process: KontextdServer) -> None:
        try:
            process.start()
        except BaseException as error:  # reported below, after every start has ended
            failures.append(error)

    threads = [threading.Thread(target=start, args=(process,)) for process in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def deploy(
    servers: list[KontextdServer],
    tmp_path: Path,
    dsn: str,
    storage_url: str,
    s3_env: dict[str, str],
    api_nodes: int,
    workers: int,
) -> Deployment:
    shared = ["--store", dsn, "--storage", storage_url, *COMMON]
    api = [
        KontextdServer(tmp_path / f"api-{index}", args=[*shared, "--workers", "0"], env=s3_env)
        for index in range(api_nodes)
    ]
    # Workers name the first API node as the deployment's public URL (a load balancer's, in production):
    # the webhooks they send carry image URLs under it.
    worker_args = [*shared, "--public-url", api[0].base_url]
    crew = [
        KontextdServer(tmp_path / f"worker-{index}", args=worker_args, env=s3_env, command_name="worker")
        for index in range(workers)
    ]
    servers.extend(api + crew)
    start_all(api + crew)
    return Deployment(dsn, api, crew)


def submit(client: httpx.Client, image_host: LoopbackServer, seed: int, hook: str | None = None) -> str:
    response = client.post(
        f"/{APP_ID}",
        params={"fal_webhook": hook} if hook else {},
        json={
            "prompt": f"a red square, take {seed}",
            "image_url": f"{image_host.url}/square.png",
            "num_inference_steps": STEPS,
            "seed": seed,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def status_path(request_id: str) -> str:
    return f"/{QUEUE_PREFIX}/requests/{request_id}/status"


def result_path(request_id: str) -> str:
    return f"/{QUEUE_PREFIX}/requests/{request_id}"


def status(client: httpx.Client, request_id: str, logs: bool = False) -> dict[str, Any]:
    return client.get(status_path(request_id), params={"logs": "1"} if logs else {}).json()


def completed(client: httpx.Client, request_id: str, timeout: float = 90) -> dict[str, Any]:
    return wait_for(lambda: (body := status(client, request_id))["status"] == "COMPLETED" and body, timeout)


def at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def messages(client: httpx.Client, request_id: str) -> list[str]:
    return [line["message"] for line in status(client, request_id, logs=True)["logs"]]


def sse_events(client: httpx.Client, request_id: str) -> Iterator[dict[str, Any]]:
    with client.stream("GET", status_path(request_id) + "/stream", params={"logs": "1"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line.removeprefix("data: "))


@pytest.fixture
def cluster(
    servers: list[KontextdServer],
    tmp_path: Path,
    pg_dsn: str,
    s3_server: Any,
    s3_bucket_url: str,
) -> Deployment:
    return deploy(servers, tmp_path, pg_dsn, s3_bucket_url, s3_server.env, api_nodes=2, workers=2)


def test_what_one_node_accepts_every_node_serves_and_a_kill9_loses_nothing(
    cluster: Deployment, image_host: LoopbackServer, webhook_receiver: WebhookReceiver
) -> None:
    first, second = cluster.api
    hook = f"{webhook_receiver.url}/hook"
    with first.client() as one, second.client() as other:
        # One signing key for the deployment: every node publishes the same JWKS.
        jwks = one.get("/.well-known/jwks.json").json()
        assert other.get("/.well-known/jwks.json").json() == jwks
        # An API node runs no lane: its endpoints are served by the workers elsewhere, and it says so.
        listed = one.get("/v1/endpoints").json()["endpoints"]
        assert listed and {endpoint["status"] for endpoint in listed} == {"remote"}

        # Submitted to the first node, followed on the second: its SSE stream goes from queued or running
        # to completed (woken by the store's notifications), then the result and the file.
        request_id = submit(one, image_host, seed=0, hook=hook)
        events = list(sse_events(other, request_id))
        assert events[-1]["status"] == "COMPLETED" and "error" not in events[-1], events[-1]
        assert {event["status"] for event in events[:-1]} <= {"IN_QUEUE", "IN_PROGRESS"}
        assert any(event["status"] == "IN_PROGRESS" for event in events), events
        result = other.get(result_path(request_id))
        assert result.status_code == 200, result.text
        (image,) = result.json()["images"]
        # The URL is rendered for the node that answered: the origin the client called.
        assert image["url"].startswith(f"{second.base_url}/files/"), image
        served = other.get(image["url"])
        assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
        assert one.get(image["url"].replace(second.base_url, first.base_url)).content == served.content

        # The webhook, sent once by whichever node took it, signed with the deployment's key, its image URL
        # rendered under that node's public address (the first node's, for the workers) and served there.
        wait_for(lambda: webhook_receiver.bodies("/hook"), timeout=30)
        ((_, headers, raw),) = [entry for entry in webhook_receiver.received if entry[0] == "/hook"]
        assert verify_webhook(jwks, headers, raw)
        hooked = json.loads(raw)["payload"]["images"][0]["url"]
        origin = hooked.removesuffix(urlsplit(image["url"]).path)
        assert origin in (first.base_url, second.base_url), hooked
        assert httpx.get(hooked).content == served.content

        # Cancel on the second node a request running on a worker in another process: it stops between
        # steps, well before its last one.
        running = submit(one, image_host, seed=1)
        wait_for(lambda: any(m.startswith("step 2/") for m in messages(other, running)), timeout=60)
        assert other.put(result_path(running) + "/cancel").status_code == 202
        ended = completed(one, running, timeout=30)
        assert ended["error_type"] == "client_cancelled", ended
        assert f"step {STEPS}/{STEPS}" not in messages(one, running)

        # kill -9 the worker running a request: the other worker runs it again from the start once its
        # lease lapses; it completes once and its webhook is sent once.
        victim_request = submit(one, image_host, seed=2, hook=f"{webhook_receiver.url}/killed")
        wait_for(lambda: any(m.startswith("step 3/") for m in messages(one, victim_request)), timeout=60)
        victim = wait_for(lambda: cluster.running_on(victim_request), timeout=10)
        killed_at = time.time()
        victim.kill9()
        survivor = next(worker for worker in cluster.workers if worker is not victim)
        ended = completed(other, victim_request, timeout=60)
        assert "error" not in ended, ended
        lines = messages(other, victim_request)
        assert lines.count(REQUEUED_LEASE) == 1, lines
        assert lines.count(f"step {STEPS}/{STEPS}") == 1, lines
        with cluster.database() as connection:
            row = connection.execute(
                "SELECT attempts, failures FROM kontextd_jobs WHERE request_id = %s", (victim_request,)
            ).fetchone()
        assert row == (2, 1)
        requeued_at = next(
            at(line)
            for line in status(other, victim_request, logs=True)["logs"]
            if line["message"] == REQUEUED_LEASE
        )
        # Taken over once the lease lapsed (renewed every third of it until the kill), not before; and
        # promptly after (a sweep every 0.5 s on some node).
        assert killed_at + LEASE_SECONDS / 2 <= requeued_at <= killed_at + LEASE_SECONDS + 5, (
            requeued_at - killed_at
        )
        assert survivor.process is not None and survivor.process.poll() is None
        wait_for(lambda: webhook_receiver.bodies("/killed"), timeout=30)
        # A barrier: a webhook submitted now arrives after every earlier try was recorded.
        barrier = submit(one, image_host, seed=3, hook=f"{webhook_receiver.url}/barrier")
        wait_for(lambda: webhook_receiver.bodies("/barrier"), timeout=60)
        assert collections.Counter(b["request_id"] for b in webhook_receiver.bodies("/killed")) == {
            victim_request: 1
        }
        assert len(webhook_receiver.bodies("/hook")) == 1
        assert barrier

        # kill -9 the API node a client streams from: the client's next call, to the other node, completes.
        streamed = submit(one, image_host, seed=4)
        seen: list[dict[str, Any]] = []
        with pytest.raises(httpx.TransportError):  # the stream breaks off mid-iteration
            for event in sse_events(one, streamed):
                seen.append(event)
                if len(seen) == 1:
                    first.kill9()
        assert seen and seen[0]["status"] in ("IN_QUEUE", "IN_PROGRESS")
        assert "error" not in completed(other, streamed, timeout=60)
        assert other.get(result_path(streamed)).status_code == 200


@pytest.fixture
def restartable(
    servers: list[KontextdServer],
    tmp_path: Path,
    pg_cluster: Any,
    s3_server: Any,
    s3_bucket_url: str,
) -> tuple[Deployment, Any]:
    deployment = deploy(
        servers, tmp_path, pg_cluster.dsn, s3_bucket_url, s3_server.env, api_nodes=1, workers=1
    )
    return deployment, pg_cluster


def test_postgresql_restarted_mid_run_loses_nothing_and_nodes_answer_503_meanwhile(
    restartable: tuple[Deployment, Any], image_host: LoopbackServer
) -> None:
    deployment, database = restartable
    (node,) = deployment.api
    with node.client() as client:
        request_ids = [submit(client, image_host, seed) for seed in range(3)]
        wait_for(lambda: status(client, request_ids[0])["status"] == "IN_PROGRESS", timeout=60)
        database.stop()
        # While it is down: JSON 503s with Retry-After, promptly (a bounded wait, never a hang).
        for path, method in ((status_path(request_ids[1]), "GET"), (f"/{APP_ID}", "POST")):
            started = time.monotonic()
            body = {"prompt": "a cat", "image_url": f"{image_host.url}/square.png"}
            answer = client.request(method, path, json=body if method == "POST" else None)
            assert time.monotonic() - started < 20
            assert answer.status_code == 503, answer.text
            assert answer.json()["error_type"] == "service_unavailable"
            assert answer.headers["retry-after"]
        # Every process's /health says why it is not ready: the API node's and the worker's alike.
        for process in (node, *deployment.workers):
            with process.client() as probe:
                health = probe.get("/health", timeout=20)
            assert health.status_code == 503, health.text
            assert health.json()["store"].startswith("unavailable: ") and health.json()["storage"] == "ok"
        database.start()
        # Back: every request accepted before the outage completes, once, with its image.
        for request_id in request_ids:
            ended = completed(client, request_id, timeout=90)
            assert "error" not in ended, ended
            # Run once: its worker lived through the outage and kept its lease (log lines written while
            # the database was down are lost: they are best effort).
            assert not any("queued again" in line for line in messages(client, request_id))
            with deployment.database() as connection:
                row = connection.execute(
                    "SELECT attempts, failures FROM kontextd_jobs WHERE request_id = %s", (request_id,)
                ).fetchone()
            assert row == (1, 0), row
            (image,) = client.get(result_path(request_id)).json()["images"]
            assert client.get(image["url"]).status_code == 200
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["store"] == "ok", health.text


def test_s3_down_for_a_while_never_completes_a_request_without_its_images(
    servers: list[KontextdServer],
    tmp_path: Path,
    pg_dsn: str,
    s3_server: Any,
    s3_bucket_url: str,
    image_host: LoopbackServer,
) -> None:
    deployment = deploy(servers, tmp_path, pg_dsn, s3_bucket_url, s3_server.env, api_nodes=1, workers=1)
    (node,) = deployment.api
    with node.client() as client:
        s3_server.stop()
        try:
            request_id = submit(client, image_host, seed=5)
            # Its images cannot be stored: it is handed back to run again, never completed without them.
            wait_for(lambda: REQUEUED_STORAGE in messages(client, request_id), timeout=60)
            assert status(client, request_id)["status"] != "COMPLETED"
            # Reported, but the node stays ready: status polls go on, the request is held and re-run.
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["store"] == "ok", health.text
            assert health.json()["storage"].startswith("unavailable: object store:"), health.text
        finally:
            s3_server.start()
        ended = completed(client, request_id, timeout=90)
        assert "error" not in ended, ended
        # Each try that could not store its images was held before it was handed back, for 1 s, 2 s, …
        # (doubling with the request's own failures), so one short outage cannot use up all its tries.
        lines = status(client, request_id, logs=True)["logs"]
        # Only the hand-backs for storage: on a loaded machine a 3 s lease may also lapse mid-run (a re-run
        # that is no failure to store, and is not held).
        handed_back = [index for index, line in enumerate(lines) if line["message"] == REQUEUED_STORAGE]
        assert handed_back, lines
        for count, index in enumerate(handed_back, start=1):
            last_step = lines[index - 1]
            assert last_step["message"] == f"step {STEPS}/{STEPS}", lines
            held = at(lines[index]) - at(last_step)
            assert held >= 2 ** (count - 1) - 0.2, (count, held)
        (image,) = client.get(result_path(request_id)).json()["images"]
        downloaded = client.get(image["url"])
        assert downloaded.status_code == 200 and downloaded.content[:2] == b"\xff\xd8"  # a JPEG


def test_presigned_image_urls_are_signed_for_the_endpoint_clients_reach(
    servers: list[KontextdServer],
    tmp_path: Path,
    s3_server: Any,
    s3_bucket_url: str,
    image_host: LoopbackServer,
) -> None:
    """The server reaches the store at 127.0.0.1 (AWS_ENDPOINT_URL); clients are told `localhost`, as a
    deployment would name a public host."""
    port = urlsplit(s3_server.endpoint_url).port
    public = f"http://localhost:{port}"
    node = KontextdServer(
        tmp_path / "node",
        args=[*COMMON, "--storage", s3_bucket_url, "--file-urls", "presigned", "--presign-endpoint", public],
        env=s3_server.env,
    )
    servers.append(node)
    node.start()
    with node.client() as client:
        request_id = submit(client, image_host, seed=0)
        assert "error" not in completed(client, request_id)
        (image,) = client.get(result_path(request_id)).json()["images"]
        assert image["url"].startswith(f"{public}/"), image
        downloaded = httpx.get(image["url"], timeout=10)
        assert downloaded.status_code == 200 and downloaded.content[:2] == b"\xff\xd8"


def test_a_worker_refuses_a_store_only_one_process_may_use(tmp_path: Path) -> None:
    worker = KontextdServer(tmp_path / "worker", command_name="worker", port=free_port())
    with pytest.raises(RuntimeError, match="a worker needs the job store the API nodes use"):
        worker.start()
