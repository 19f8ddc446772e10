"""The unmodified fal-client (sync and async) against kontextd over TLS, configured only by the lines the
server prints for the user to export.

fal_client reads FAL_RUN_HOST / FAL_QUEUE_RUN_HOST / FAL_KEY when it is imported, so every scenario runs as
its own Python process (tests/fal_scripts/*.py) and prints its findings as one JSON line.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, WebhookReceiver, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PIL import Image

from kontextd.config import Settings
from kontextd.server import client_environment, client_instructions
from kontextd.webhooks.signing import verify_webhook

KEY = "test-key-1"
# The owner id webhooks carry for KEY: "key-" and the first 16 hex digits of sha256(KEY). Written out, so a
# change to how ids are made (which would change every user's id) fails here.
KEY_OWNER = "key-1255558df586ae27"
SCRIPTS = Path(__file__).parent / "fal_scripts"
TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    instance = KontextdServer(
        tmp_path_factory.mktemp("kontextd-tls"),
        args=["--tiny-step-seconds", "0.02", "--api-key", KEY, "--webhook-backoff", "0.3,0.3,0.3"],
        tls=True,
    ).start()
    yield instance
    instance.stop()


def run_script(server: KontextdServer, name: str, *args: str, key: str = KEY, timeout: float = 120) -> Any:
    # Exactly what the server told the user to export (plus loopback kept off any proxy).
    env = {**os.environ, **server.fal_env(key), "NO_PROXY": "127.0.0.1,localhost,::1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, f"{name} failed:\n{completed.stdout}\n{completed.stderr}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


def assert_stored_images(server: KontextdServer, output: dict[str, Any], count: int, fmt: str) -> None:
    """The output's images are served by kontextd over TLS, without a key, in the announced format."""
    assert len(output["images"]) == count
    assert output["has_nsfw_concepts"] == [False] * count
    assert isinstance(output["seed"], int)
    assert output["timings"]["inference"] > 0
    with httpx.Client(verify=ssl.create_default_context(cafile=server.ca_file), timeout=30) as http:
        for image in output["images"]:
            assert image["url"].startswith(f"{server.base_url}/files/")
            assert image["content_type"] == f"image/{fmt}"
            response = http.get(image["url"])
            assert response.status_code == 200
            decoded = Image.open(io.BytesIO(response.content))
            assert decoded.format == fmt.upper()
            assert decoded.size == (image["width"], image["height"])


def step_messages(logs: list[dict[str, Any]] | None) -> list[str]:
    return [line["message"] for line in logs or [] if "step" in line["message"]]


def test_exported_environment(tls_server: KontextdServer) -> None:
    lines = [line.strip() for line in tls_server.output if line.strip().startswith("export ")]
    exported = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    assert set(exported) == {"SSL_CERT_FILE", "FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST", "FAL_KEY"}
    assert Path(exported["SSL_CERT_FILE"]) == tls_server.ca_file.resolve()
    assert exported["FAL_RUN_HOST"] == f"127.0.0.1:{tls_server.port}/run"
    assert exported["FAL_QUEUE_RUN_HOST"] == f"127.0.0.1:{tls_server.port}"
    assert KEY not in exported["FAL_KEY"]  # a placeholder: the server never echoes a configured key
    assert all(KEY not in line for line in tls_server.output)


@pytest.mark.parametrize(
    ("settings", "ca_file", "expected"),
    [
        (
            Settings(public_url="https://kontext.example.com/fal/", api_keys=("k",)),
            None,
            [
                "export FAL_RUN_HOST=kontext.example.com/fal/run",
                "export FAL_QUEUE_RUN_HOST=kontext.example.com/fal",
                "export FAL_KEY=<one of your --api-key values>",
            ],
        ),
        (
            Settings(host="::1", port=8443, tls_self_signed=True),
            "/data/tls/ca.pem",
            [
                "export SSL_CERT_FILE=/data/tls/ca.pem",
                "export FAL_RUN_HOST=[::1]:8443/run",
                "export FAL_QUEUE_RUN_HOST=[::1]:8443",
                "export FAL_KEY=local",
            ],
        ),
    ],
    ids=["public-url-with-path", "ipv6-self-signed"],
)
def test_client_environment_lines(settings: Settings, ca_file: str | None, expected: list[str]) -> None:
    # A --public-url behind a reverse proxy keeps its path prefix: fal-client hosts may carry one.
    assert client_environment(settings, ca_file) == expected


def test_over_plain_http_the_server_says_fal_client_needs_https(server: KontextdServer) -> None:
    # fal-client builds https:// URLs whatever its hosts say: export lines would fail (WRONG_VERSION_NUMBER).
    printed = "".join(line for line in server.output if line.startswith("kontextd:") or line.startswith("  "))
    assert "fal-client speaks only HTTPS" in printed
    assert "--tls-self-signed" in printed
    assert "export FAL_RUN_HOST" not in printed
    # Behind an HTTPS proxy (--public-url https://...) the lines are printed, since they will work.
    lines = client_instructions(Settings(public_url="https://kontext.example.com", api_keys=("k",)), None)
    assert lines[0] == "kontextd: point fal-client at this server with:"
    assert lines[1:] == [
        "  export FAL_RUN_HOST=kontext.example.com/run",
        "  export FAL_QUEUE_RUN_HOST=kontext.example.com",
        "  export FAL_KEY=<one of your --api-key values>",
    ]


def test_subscribe_with_logs(tls_server: KontextdServer) -> None:
    found = run_script(tls_server, "subscribe.py")
    events, result = found["events"], found["result"]
    assert len(found["request_ids"]) == 1
    assert events[-1]["type"] == "Completed"
    assert events[-1]["error"] is None and events[-1]["metrics"]["inference_time"] > 0
    in_progress = [event for event in events if event["type"] == "InProgress"]
    assert any(step_messages(event["logs"]) for event in in_progress), events
    line = next(line for event in in_progress for line in event["logs"] or [] if "step" in line["message"])
    assert line["source"] == "USER" and line["level"] in ("INFO", "STDOUT", "STDERR", "DEBUG")
    assert "T" in line["timestamp"]
    assert step_messages(events[-1]["logs"])[-1] == "step 28/28"
    assert result["prompt"] == "a red fox in the snow" and result["seed"] == 7
    assert_stored_images(tls_server, result, 1, "jpeg")


def test_sync_submit_status_result(tls_server: KontextdServer) -> None:
    found = run_script(tls_server, "submit_sync.py")
    request_id = found["request_id"]
    base = f"{tls_server.base_url}/fal-ai/flux-pro/requests/{request_id}"
    assert found["urls"] == [base, f"{base}/status", f"{base}/cancel"]
    statuses = found["statuses"]
    assert statuses[-1]["type"] == "Completed" and statuses[-1]["error"] is None
    assert {status["type"] for status in statuses} <= {"Queued", "InProgress", "Completed"}
    assert step_messages(statuses[-1]["logs"])
    result = found["result"]
    assert found["result_by_id"] == result
    assert found["status_by_id"]["type"] == "Completed"
    assert found["status_by_id"]["logs"] == statuses[-1]["logs"]
    assert_stored_images(tls_server, result, 1, "jpeg")
    image = result["images"][0]
    assert image["width"] > image["height"]  # 16:9


def test_async_submit_status_result(tls_server: KontextdServer) -> None:
    found = run_script(tls_server, "submit_async.py")
    statuses = found["statuses"]
    assert statuses[-1]["type"] == "Completed" and statuses[-1]["error"] is None
    assert step_messages(statuses[-1]["logs"])
    assert found["status_by_id"]["type"] == "Completed" and found["status_by_id"]["logs"] is None
    assert_stored_images(tls_server, found["result"], 2, "jpeg")


def test_run_returns_output(tls_server: KontextdServer) -> None:
    result = run_script(tls_server, "run_sync.py")["result"]
    assert set(result) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    assert result["seed"] == 1234 and result["prompt"] == "a paper boat"
    assert_stored_images(tls_server, result, 1, "png")


def test_stream_yields_progress_then_the_output_last(tls_server: KontextdServer) -> None:
    found = run_script(tls_server, "stream.py")
    events = found["events"]
    *progress, output = events
    # Progress first, in order, each a status the queue API would answer; then the output, alone, last.
    states = [event["status"] for event in progress]
    assert states[-1] == "COMPLETED" and states.count("COMPLETED") == 1
    order = {"IN_QUEUE": 0, "IN_PROGRESS": 1, "COMPLETED": 2}
    assert [order[state] for state in states] == sorted(order[state] for state in states)
    steps = [step_messages(event["logs"]) for event in progress if event["status"] == "IN_PROGRESS"]
    assert len(steps) >= 2 and steps == sorted(steps, key=len)  # live: the log grows event by event
    assert step_messages(progress[-1]["logs"])[-1] == "step 28/28"
    assert found["spread_seconds"] > 0  # events arrived over time, not all at the end
    assert len({event["request_id"] for event in progress}) == 1
    assert set(output) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    assert output["seed"] == 0 and output["prompt"] == "a kite"  # seed 0 is a seed
    assert_stored_images(tls_server, output, 2, "jpeg")
    # A request the worker could not run ends with its error, in fal's validation shape.
    *_, error = found["failed"]
    [detail] = error["detail"]
    assert detail["loc"] == ["body", "image_url"] and detail["type"] == "file_download_error"
    assert found["failed"][-2]["status"] == "COMPLETED"
    # An invalid input is answered at once as JSON, before anything is queued or streamed: fal-client
    # reports that it got no event stream; the answer itself is fal's 422.
    assert found["refused"]["raised"] == "SSEError" and "application/json" in found["refused"]["message"]
    with tls_server.client(key=KEY) as client:
        refused = client.post("/run/fal-ai/flux-kontext/dev/stream", json={"prompt": "no image"})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "image_url"]


def test_cancel_queued_and_running(tls_server: KontextdServer) -> None:
    found = run_script(tls_server, "cancel.py")
    queued, running = found["queued"], found["running"]

    assert queued["before"]["type"] == "Queued" and queued["before"]["position"] >= 0
    assert queued["after"]["type"] == "Completed"
    assert queued["after"]["error_type"] == "client_cancelled" and queued["after"]["error"]
    assert not step_messages(queued["after"]["logs"])  # never ran
    assert queued["get"]["raised"] and queued["get"]["status_code"] == 400
    assert queued["get"]["error_type"] == "client_cancelled"
    assert queued["cancel_again"]["raised"] and queued["cancel_again"]["status_code"] == 400

    assert running["seen"]["type"] == "InProgress"
    assert running["after"]["type"] == "Completed"
    assert running["after"]["error_type"] == "client_cancelled"
    assert running["get"]["raised"] and running["get"]["status_code"] == 400
    assert running["get"]["error_type"] == "client_cancelled"
    # Stopped between denoising steps, long before the 50th.
    assert 1 <= len(running["steps_logged"]) < 50, running["steps_logged"]
    assert "step 50/50" not in running["steps_logged"]


def test_max_edit_with_data_uri(tls_server: KontextdServer) -> None:
    found = run_script(tls_server, "edit_max.py")
    result = found["result"]
    assert result["prompt"] == "add a rainbow"
    assert_stored_images(tls_server, result, 1, "png")
    image = result["images"][0]
    assert image["width"] > image["height"]  # follows the 16:9 input when no aspect_ratio is given
    rejected = found["without_output_format"]
    assert rejected["status_code"] == 422
    assert any(error["loc"] == ["body", "output_format"] for error in rejected["detail"])


def test_webhook_is_signed(tls_server: KontextdServer, webhook_receiver: WebhookReceiver) -> None:
    target = f"{webhook_receiver.url}/hooks/fal"
    found = run_script(tls_server, "webhook.py", target)
    request_id = found["request_id"]
    path, headers, body = wait_for(lambda: next(iter(webhook_receiver.received), None), timeout=30)
    assert path == "/hooks/fal"
    message = json.loads(body)
    assert message["request_id"] == request_id and message["status"] == "OK"
    assert message["payload"] == found["result"]
    assert message["gateway_request_id"]

    with tls_server.client() as http:  # over TLS, no key needed
        jwks = http.get("/.well-known/jwks.json").json()
    assert verify_webhook(jwks, headers, body)
    assert not verify_webhook(jwks, headers, body + b" ")

    lowered = {name.lower(): value for name, value in headers.items()}
    assert lowered["x-fal-webhook-request-id"] == request_id
    user_id = lowered["x-fal-webhook-user-id"]
    assert user_id == KEY_OWNER and KEY not in user_id
    timestamp = lowered["x-fal-webhook-timestamp"]
    assert abs(time.time() - int(timestamp)) < 300

    # Independently of kontextd's helper: Ed25519 over fal's documented message, key from the JWKS.
    (jwk,) = jwks["keys"]
    assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
    raw_key = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    public_key = Ed25519PublicKey.from_public_bytes(raw_key)
    signed = f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()
    public_key.verify(bytes.fromhex(lowered["x-fal-webhook-signature"]), signed)  # raises if wrong


def test_wrong_key_raises_401(tls_server: KontextdServer) -> None:
    with tls_server.client(KEY) as http:
        existing = http.post(f"/{TEXT_TO_IMAGE}", json={"prompt": "mine"}).json()["request_id"]
    found = run_script(tls_server, "wrong_key.py", existing, key="not-the-key")
    for call in ("submit", "run", "status", "result", "cancel"):
        assert found[call]["raised"], call
        assert found[call]["status_code"] == 401, found[call]
    with tls_server.client(KEY) as http:
        final = wait_for(
            lambda: (
                (body := http.get(f"/fal-ai/flux-pro/requests/{existing}/status").json())["status"]
                == "COMPLETED"
                and body
            )
        )
    assert "error" not in final  # the rejected cancel did not touch it
