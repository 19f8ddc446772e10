"""A disk that really fills up (a small tmpfs): writes are refused as unavailable (a JSON 503 clients retry)
with nothing half-written, a request whose images cannot be stored runs again once space returns (or ends
with a clear storage_error), and the server serves on throughout."""

import base64
import io
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import KontextdServer, fill_disk, png_bytes, small_disk, wait_completed, wait_for
from PIL import Image

from kontextd.jobs.lifecycle import MAX_STORAGE_FAILURES
from kontextd.jobs.model import NewJob, State
from kontextd.jobs.sqlite import SQLiteJobStore
from kontextd.jobs.store import StoreUnavailable

APP_ID = "fal-ai/flux-kontext/dev"
PREFIX = "fal-ai/flux-kontext"
STORAGE_REQUEUED = "Its images could not be stored (disk full or storage unavailable); it was queued again"
PNG = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()


def new_job(request_id: str, prompt: str = "a cat") -> NewJob:
    return NewJob(request_id, str(uuid.uuid4()), APP_ID, "alice", {"prompt": prompt, "image_url": PNG})


def submit(client: httpx.Client, seed: int, steps: int = 10) -> httpx.Response:
    body = {
        "prompt": f"a red square, take {seed}",
        "image_url": PNG,
        "seed": seed,
        "num_inference_steps": steps,
    }
    return client.post(f"/{APP_ID}", json=body)


def status_path(request_id: str) -> str:
    return f"/{PREFIX}/requests/{request_id}/status"


def messages(client: httpx.Client, request_id: str) -> list[str]:
    body = client.get(status_path(request_id), params={"logs": "1"}).json()
    return [line["message"] for line in body["logs"] or []]


def assert_unavailable(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["Retry-After"]) > 0
    body = response.json()
    assert body["error_type"] == "service_unavailable" and "disk is full" in body["detail"], body
    return body


# -- the store -------------------------------------------------------------------------------------


def test_the_store_refuses_writes_on_a_full_disk_with_nothing_half_written(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "8m") as disk:
        store = SQLiteJobStore(disk / "jobs.sqlite3")
        try:
            now = time.time()
            store.submit(new_job("a"))
            store.submit(new_job("b"))
            store.append_log("a", "kept", "INFO", now)
            filler = fill_disk(disk)
            writes = {
                "submit": lambda: store.submit(new_job("c", prompt="x" * 100_000)),
                "small submit": lambda: store.submit(new_job("d")),
                "append_log": lambda: store.append_log("a", "lost", "INFO", now),
                "cancel": lambda: store.cancel("b", "alice", now),
                "claim": lambda: store.claim("worker", 60.0, now),
            }
            for name, write in writes.items():
                with pytest.raises(StoreUnavailable, match="disk is full") as refused:
                    write()
                assert isinstance(refused.value.__cause__, sqlite3.Error), name
            # Nothing of the refused writes is there; everything before them is, and reads go on.
            assert store.get("c") is None and store.get("d") is None
            assert [store.queue_position(name) for name in ("a", "b")] == [0, 1]
            assert [line.message for line in store.logs("a")] == ["kept"]
            job = store.get("b")
            assert job is not None and job.state is State.IN_QUEUE and not job.cancel_requested

            filler.unlink()
            assert store.submit(new_job("c", prompt="x" * 100_000)) == 2
            store.append_log("a", "back", "INFO", now)
            assert [line.message for line in store.logs("a")] == ["kept", "back"]
            claimed = store.claim("worker", 60.0, now)
            assert claimed is not None and claimed.request_id == "a"
        finally:
            store.close()


# -- over HTTP -------------------------------------------------------------------------------------


def test_submit_on_a_full_disk_answers_503_json_and_the_server_serves_on(
    tmp_path: Path, servers: list[KontextdServer]
) -> None:
    with small_disk(tmp_path / "data", "16m") as data_dir:
        server = KontextdServer(data_dir, args=["--workers", "0"])
        servers.append(server)
        with server.start().client() as client:
            accepted = submit(client, seed=1)
            assert accepted.status_code == 200, accepted.text
            request_id = accepted.json()["request_id"]
            filler = fill_disk(data_dir)

            assert_unavailable(submit(client, seed=2))
            assert_unavailable(client.put(f"/{PREFIX}/requests/{request_id}/cancel"))
            # Reads need no space: the server answers as before, the earlier request is still queued.
            assert client.get("/health").status_code == 200
            status = client.get(status_path(request_id))
            assert status.status_code == 202 and status.json()["queue_position"] == 0, status.text

            filler.unlink()
            again = submit(client, seed=2)
            assert again.status_code == 200, again.text
            assert again.json()["queue_position"] == 1
            assert client.put(f"/{PREFIX}/requests/{request_id}/cancel").status_code == 202
            assert client.get(status_path(request_id)).json()["status"] == "COMPLETED"
        assert server.process is not None and server.process.poll() is None


def download(client: httpx.Client, url: str) -> Image.Image:
    response = client.get(urlsplit(url).path)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_images_that_cannot_be_stored_run_again_once_space_returns_or_end_with_storage_error(
    tmp_path: Path, servers: list[KontextdServer]
) -> None:
    data_dir = tmp_path / "data"
    with small_disk(data_dir / "files", "4m") as files:  # the images' disk only: the database has room
        server = KontextdServer(data_dir, args=["--tiny-step-seconds", "0.02"])
        servers.append(server)
        with server.start().client() as client:
            filler = fill_disk(files)
            retried = submit(client, seed=1).json()["request_id"]

            def queued_again_or_ended() -> str | None:
                body = client.get(status_path(retried), params={"logs": "1"}).json()
                if any(line["message"] == STORAGE_REQUEUED for line in body["logs"] or []):
                    return "queued again"
                return f"ended: {body.get('error')}" if body["status"] == "COMPLETED" else None

            assert wait_for(queued_again_or_ended, timeout=60) == "queued again"  # not failed for good
            filler.unlink()
            status = wait_completed(client, status_path(retried), timeout=60)
            assert "error" not in status, status
            result = client.get(f"/{PREFIX}/requests/{retried}")
            assert result.status_code == 200, result.text
            (image,) = result.json()["images"]
            assert download(client, image["url"]).size == (image["width"], image["height"])

            # Still no space after every try: a clear storage_error, and nothing left half-stored.
            filler = fill_disk(files)
            given_up = submit(client, seed=2).json()["request_id"]
            ended = wait_completed(client, status_path(given_up), timeout=120)
            assert (
                ended["error_type"] == "storage_error" and "storage is full or unavailable" in ended["error"]
            ), ended
            result = client.get(f"/{PREFIX}/requests/{given_up}")
            assert result.status_code == 503 and result.headers["X-Fal-Error-Type"] == "storage_error"
            assert messages(client, given_up).count(STORAGE_REQUEUED) == MAX_STORAGE_FAILURES - 1
            assert not list(files.glob(f"{given_up}/*"))
            filler.unlink()


def test_a_request_running_when_the_disk_fills_completes_once_space_returns(
    tmp_path: Path, servers: list[KontextdServer]
) -> None:
    """Its log lines, its images and its end cannot be written for a while: the worker must survive that."""
    with small_disk(tmp_path / "data", "32m") as data_dir:
        server = KontextdServer(data_dir, args=["--tiny-step-seconds", "0.05"])
        servers.append(server)
        with server.start().client() as client:
            request_id = submit(client, seed=3, steps=40).json()["request_id"]
            wait_for(lambda: "step 1/40" in messages(client, request_id), timeout=60)
            filler = fill_disk(data_dir)
            wait_for(lambda: any("request log lines are being dropped" in line for line in server.output), 60)
            assert client.get(status_path(request_id)).status_code == 202  # status still answers
            filler.unlink()
            status = wait_completed(client, status_path(request_id), timeout=90)
            assert "error" not in status, status
            result = client.get(f"/{PREFIX}/requests/{request_id}")
            assert result.status_code == 200, result.text
            # The same worker goes on serving.
            after = submit(client, seed=4).json()["request_id"]
            assert "error" not in wait_completed(client, status_path(after), timeout=60)
