"""The unmodified @fal-ai/client (Node) against kontextd, in its proxy mode (x-fal-target-url)."""

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KontextdServer

JS_DIR = Path(__file__).parent / "js"

pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="needs Node.js and npm")


@pytest.fixture(scope="module")
def js_client() -> Path:
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=JS_DIR, check=True, timeout=300
        )
    return JS_DIR


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    instance = KontextdServer(
        tmp_path_factory.mktemp("kontextd-js"), args=["--api-key", "js-key", "--tiny-step-seconds", "0.02"]
    ).start()
    yield instance
    instance.stop()


def node(js_client: Path, script: str, server: KontextdServer, key: str) -> subprocess.CompletedProcess[str]:
    """One of tests/js's scripts, run against the server with the key."""
    return subprocess.run(
        ["node", script, server.base_url, key], cwd=js_client, capture_output=True, text=True, timeout=120
    )


def seen_by(completed: subprocess.CompletedProcess[str]) -> dict:
    """What a script that succeeded printed last: one JSON line."""
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_js_client_subscribe_and_run(js_client: Path, keyed_server: KontextdServer) -> None:
    seen = seen_by(node(js_client, "subscribe.mjs", keyed_server, "js-key"))

    image = seen["data"]["images"][0]
    assert (image["width"], image["height"]) == (176, 96)  # 16:9 from the Kontext table, scaled for tiny
    assert seen["data"]["seed"] == 11
    assert seen["requestId"]
    assert seen["updates"][-1]["status"] == "COMPLETED"
    assert any(message.startswith("step ") for update in seen["updates"] for message in update["logs"])
    assert seen["run"]["images"][0]["content_type"] == "image/jpeg"


def test_js_client_stream_ends_with_the_output(js_client: Path, keyed_server: KontextdServer) -> None:
    seen = seen_by(node(js_client, "stream.mjs", keyed_server, "js-key"))
    *progress, output = seen["events"]
    assert seen["done"] == output  # done() resolves with the last event: the output
    assert [event["status"] for event in progress][-1] == "COMPLETED"
    assert any(line["message"].startswith("step ") for event in progress for line in event["logs"] or [])
    image = output["images"][0]
    assert (image["width"], image["height"]) == (96, 176) and output["seed"] == 21  # 9:16, tiny scale
    assert seen["requestId"] == progress[0]["request_id"]  # from x-fal-request-id


def test_js_client_wrong_key_is_refused(js_client: Path, keyed_server: KontextdServer) -> None:
    completed = node(js_client, "subscribe.mjs", keyed_server, "not-the-key")
    assert completed.returncode != 0
    assert "401" in completed.stderr or "Unauthorized" in completed.stderr or "API key" in completed.stderr
