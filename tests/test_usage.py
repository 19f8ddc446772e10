"""GET /v1/usage end to end: what each key used, counted by the worker, read back per key and by an admin."""

import datetime
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, LoopbackServer, wait_completed, wait_for

from kontextd.api.auth import owner_id

TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
PRO_EDIT = "fal-ai/flux-pro/kontext"
ALICE, BOB, ADMIN = "alice-key", "bob-key", "admin-key"
TINY_SQUARE_MEGAPIXELS = 128 * 128 / 1_000_000


@pytest.fixture(scope="module")
def usage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    args = ["--api-key", ALICE, "--api-key", BOB, "--admin-key", ADMIN]
    server = KontextdServer(tmp_path_factory.mktemp("usage"), args=args).start()
    yield server
    server.stop()


def run(server: KontextdServer, key: str, app_id: str, body: dict[str, Any]) -> dict[str, Any]:
    with server.client(key) as client:
        envelope = client.post(f"/{app_id}", json=body).json()
        return wait_completed(client, envelope["status_url"])


def usage(server: KontextdServer, key: str | None, **params: str) -> httpx.Response:
    with server.client(key) as client:
        return client.get("/v1/usage", params=params)


def test_each_key_reads_its_own_usage_and_an_admin_every_keys(
    usage_server: KontextdServer, image_host: LoopbackServer
) -> None:
    assert "error" not in run(usage_server, ALICE, TEXT_TO_IMAGE, {"prompt": "two", "num_images": 2})
    assert "error" not in run(usage_server, BOB, TEXT_TO_IMAGE, {"prompt": "one", "aspect_ratio": "1:1"})
    failed = run(
        usage_server, ALICE, PRO_EDIT, {"prompt": "x", "image_url": f"{image_host.url}/not-an-image"}
    )
    assert failed["error_type"] == "image_load_error"  # a failed request is not usage

    def counted() -> dict[str, Any] | None:
        report = usage(usage_server, ADMIN).json()
        return report if report["totals"]["requests"] == 2 else None

    everyone = wait_for(counted)  # counted right after the end is recorded
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    assert everyone["admin"] is True and everyone["until"] == today
    rows = {row["owner"]: row for row in everyone["usage"]}
    assert set(rows) == {owner_id(ALICE), owner_id(BOB)}  # owner ids: never the keys
    alice = rows[owner_id(ALICE)]
    assert (alice["day"], alice["app_id"], alice["requests"], alice["images"]) == (today, TEXT_TO_IMAGE, 1, 2)
    assert alice["megapixels"] == pytest.approx(2 * TINY_SQUARE_MEGAPIXELS)
    assert alice["gpu_seconds"] > 0  # the local model's inference time
    assert ALICE not in usage(usage_server, ADMIN).text

    mine = usage(usage_server, ALICE).json()
    assert (mine["owner"], mine["admin"]) == (owner_id(ALICE), False)
    assert [row["owner"] for row in mine["usage"]] == [owner_id(ALICE)]
    assert mine["totals"] == {
        "requests": 1,
        "images": 2,
        "megapixels": pytest.approx(2 * TINY_SQUARE_MEGAPIXELS),
        "gpu_seconds": pytest.approx(alice["gpu_seconds"], abs=0.002),
    }
    only_bob = usage(usage_server, ADMIN, owner=owner_id(BOB)).json()
    assert [row["owner"] for row in only_bob["usage"]] == [owner_id(BOB)]
    assert usage(usage_server, ALICE, owner=owner_id(ALICE)).json()["totals"]["requests"] == 1  # one's own
    assert usage(usage_server, ALICE, owner=owner_id(BOB)).json()["usage"] == []  # another's: none at all
    assert usage(usage_server, ALICE, since="2000-01-01", until="2000-01-31").json()["usage"] == []


@pytest.mark.parametrize(
    ("key", "params", "status"),
    [
        (None, {}, 401),
        ("wrong-key", {}, 401),
        (ALICE, {"since": "2026-12-02", "until": "2026-12-01"}, 422),
        (ALICE, {"since": "2025-01-01", "until": "2026-12-01"}, 422),  # more than 366 days
        (ALICE, {"since": "yesterday"}, 422),
        (ALICE, {"until": "0"}, 422),  # not a unix time: a day
        (ALICE, {"since": "2026-02-30"}, 422),
        (ADMIN, {"owner": "x" * 65}, 422),
    ],
)
def test_usage_refuses_what_it_cannot_answer(
    usage_server: KontextdServer, key: str | None, params: dict[str, str], status: int
) -> None:
    response = usage(usage_server, key, **params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
