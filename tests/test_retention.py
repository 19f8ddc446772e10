"""Finished requests do not pile up: when a request's outputs expire its logs and bodies go, leaving a
small tombstone (status still answers, the result says 410), and the tombstone goes after
--record-retention."""

import base64
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import KontextdServer, png_bytes, wait_completed, wait_for

from kontextd.cli import parse

APP_ID = "fal-ai/flux-kontext/dev"
PREFIX = "fal-ai/flux-kontext"
OUTPUT_TTL = 1  # seconds, asked per request
RETENTION = 4.0  # seconds a tombstone outlives the outputs


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KontextdServer]:
    instance = KontextdServer(
        tmp_path / "data", args=["--tiny-step-seconds", "0.02", "--record-retention", str(RETENTION)]
    ).start()
    yield instance
    instance.stop()


def stored(server: KontextdServer, request_id: str) -> tuple[int, str | None, str | None]:
    """(log rows, input body, result body) of the request in the server's database, read-only."""
    database = server.data_dir.resolve() / "jobs.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        logs = connection.execute("SELECT count(*) FROM job_logs WHERE request_id = ?", (request_id,))
        row = connection.execute(
            "SELECT input_json, result_json FROM jobs WHERE request_id = ?", (request_id,)
        ).fetchone()
        return logs.fetchone()[0], *(row or (None, None))


def test_an_expired_request_leaves_a_tombstone_and_then_nothing(server: KontextdServer) -> None:
    image = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()
    with server.client() as client:
        response = client.post(
            f"/{APP_ID}",
            json={"prompt": "a red square", "image_url": image, "num_inference_steps": 10},
            headers={
                "X-Fal-Object-Lifecycle-Preference": json.dumps({"expiration_duration_seconds": OUTPUT_TTL})
            },
        )
        assert response.status_code == 200, response.text
        request_id = response.json()["request_id"]
        status_path = f"/{PREFIX}/requests/{request_id}/status"
        result_path = f"/{PREFIX}/requests/{request_id}"
        wait_completed(client, status_path, timeout=60)
        result = client.get(result_path)
        assert result.status_code == 200, result.text
        file_path = urlsplit(result.json()["images"][0]["url"]).path

        # Outputs expired: the tombstone answers, with nothing but how the request ended.
        def expired_or_gone() -> int | None:
            code = client.get(result_path).status_code
            return code if code in (404, 410) else None

        assert wait_for(expired_or_gone, timeout=30) == 410  # a tombstone first, not nothing at once
        expired_seen = time.time()
        status = client.get(status_path, params={"logs": "1"})
        assert status.status_code == 200 and status.json()["status"] == "COMPLETED", status.text
        assert status.json()["logs"] == [] and "error" not in status.json()
        assert client.get(file_path).status_code == 404
        assert stored(server, request_id) == (0, "{}", "{}")

        # After the retention the request is unknown; until then its tombstone stayed.
        last_seen = [expired_seen]

        def gone() -> bool:
            code = client.get(status_path).status_code
            if code == 200:
                last_seen[0] = time.time()
            return code == 404

        wait_for(gone, timeout=60, interval=0.1)
        assert last_seen[0] - expired_seen >= RETENTION / 2, (last_seen[0] - expired_seen, RETENTION)
        assert client.get(result_path).status_code == 404
        assert stored(server, request_id) == (0, None, None)


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_the_record_retention_must_be_zero_or_more_seconds(value: str) -> None:
    settings = parse(["serve", "--record-retention", value])[1]
    with pytest.raises(ValueError, match="--record-retention"):
        settings.check()


def test_the_record_retention_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(["serve"])[1].record_retention == 7 * 24 * 3600
    monkeypatch.setenv("KONTEXTD_RECORD_RETENTION", "0")
    zero = parse(["serve"])[1]
    assert zero.record_retention == 0.0
    zero.check()  # 0: a tombstone goes as soon as its outputs have
    assert parse(["serve", "--record-retention", "60"])[1].record_retention == 60.0
