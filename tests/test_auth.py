"""API keys: who may call what, how keys are configured, and that they never leak."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, free_port, png_bytes, wait_for

from kontextd.catalogue.endpoints import ENDPOINTS

ALPHA = "alpha-k3y-5f2c9e"
BETA = "beta-k3y-8d41a7"
GAMMA = "gamma-k3y-b07e13"
DELTA = "delta-k3y-64c0f2"
WRONG = "wrong-k3y-0a9b8c"
APP = "fal-ai/flux-pro/kontext/text-to-image"
QUEUE = "/fal-ai/flux-pro/requests"
PROMPT = {"prompt": "a blue teapot"}
DEV = "fal-ai/flux-kontext/dev"
LONG_EDIT = {
    "prompt": "make it night",
    "image_url": "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode(),
    "num_inference_steps": 50,
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    """Plain HTTP, two keys given as flags."""
    instance = KontextdServer(
        tmp_path_factory.mktemp("kontextd-keys"),
        args=["--api-key", ALPHA, "--api-key", BETA, "--tiny-step-seconds", "0.02"],
    ).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def from_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    """Keys from KONTEXTD_API_KEYS, and a public URL other than the bound address (with a trailing slash)."""
    port = free_port()
    instance = KontextdServer(
        tmp_path_factory.mktemp("kontextd-env-keys"),
        port=port,
        args=["--public-url", f"http://localhost:{port}/"],
        env={"KONTEXTD_API_KEYS": f"{GAMMA}, {DELTA}"},
    ).start()
    yield instance
    instance.stop()


def auth(value: str) -> dict[str, str]:
    return {"Authorization": value}


def submit(server: KontextdServer, header: str = f"Key {ALPHA}") -> dict[str, Any]:
    with server.client() as http:
        response = http.post(f"/{APP}", json=PROMPT, headers=auth(header))
    assert response.status_code == 200, response.text
    return response.json()


def completed(server: KontextdServer, request_id: str, header: str = f"Key {ALPHA}") -> dict[str, Any]:
    with server.client() as http:

        def done() -> dict[str, Any] | None:
            body = http.get(f"{QUEUE}/{request_id}/status", headers=auth(header)).json()
            return body if body["status"] == "COMPLETED" else None

        return wait_for(done, timeout=60)


def call(http: httpx.Client, name: str, request_id: str, headers: dict[str, str]) -> httpx.Response:
    """One of the five keyed calls, by name."""
    if name == "submit":
        return http.post(f"/{APP}", json=PROMPT, headers=headers)
    if name == "status":
        return http.get(f"{QUEUE}/{request_id}/status", headers=headers)
    if name == "result":
        return http.get(f"{QUEUE}/{request_id}", headers=headers)
    if name == "cancel":
        return http.put(f"{QUEUE}/{request_id}/cancel", headers=headers)
    if name == "stream":
        return http.get(f"{QUEUE}/{request_id}/status/stream", headers=headers)
    raise ValueError(name)


def stream_events(
    http: httpx.Client, request_id: str, headers: dict[str, str], queue: str = QUEUE
) -> list[dict[str, Any]]:
    events = []
    with http.stream("GET", f"{queue}/{request_id}/status/stream", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line.removeprefix("data:")))
    return events


CALLS = ["submit", "status", "result", "cancel", "stream"]


@pytest.fixture(scope="module")
def alpha_request(keyed: KontextdServer) -> dict[str, Any]:
    """A finished request made with ALPHA."""
    envelope = submit(keyed)
    completed(keyed, envelope["request_id"])
    return envelope


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize(
    "header",
    [None, f"Key {WRONG}", f"Bearer {WRONG}", f"Basic {ALPHA}", ALPHA, "Key"],
    ids=["none", "wrong-key", "wrong-bearer", "basic-scheme", "no-scheme", "scheme-only"],
)
def test_missing_or_wrong_key_is_401(
    keyed: KontextdServer, alpha_request: dict[str, Any], name: str, header: str | None
) -> None:
    headers = {} if header is None else auth(header)
    with keyed.client() as http:
        response = call(http, name, alpha_request["request_id"], headers)
    assert response.status_code == 401, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "key" in detail.lower()
    assert ALPHA not in detail


def test_endpoint_listing_needs_a_key(keyed: KontextdServer) -> None:
    with keyed.client() as http:
        assert http.get("/v1/endpoints").status_code == 401
        listed = http.get("/v1/endpoints", headers=auth(f"Key {ALPHA}"))
        assert listed.status_code == 200 and len(listed.json()["endpoints"]) == len(ENDPOINTS)


def submit_and_cancel(server: KontextdServer, submit_with: str, follow_with: str) -> dict[str, Any]:
    """Submit, look, cancel and see it end, switching between two spellings of a key: cheap proof it works."""
    request_id = submit(server, submit_with)["request_id"]
    with server.client() as http:
        status = http.get(f"{QUEUE}/{request_id}/status", headers=auth(follow_with))
        assert status.status_code in (200, 202) and status.json()["request_id"] == request_id
        cancel = http.put(f"{QUEUE}/{request_id}/cancel", headers=auth(submit_with))
        assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    return completed(server, request_id, follow_with)


@pytest.mark.parametrize(
    ("submit_with", "follow_with"),
    [
        (f"Key {ALPHA}", f"Bearer {ALPHA}"),
        (f"Bearer {ALPHA}", f"Key {ALPHA}"),
        (f"Bearer {BETA}", f"key {BETA}"),
    ],
    ids=["key-then-bearer", "bearer-then-key", "second-key"],
)
def test_key_and_bearer_both_work(keyed: KontextdServer, submit_with: str, follow_with: str) -> None:
    # The owner is the key, not the way it was sent.
    assert submit_and_cancel(keyed, submit_with, follow_with)["error_type"] == "client_cancelled"


@pytest.mark.parametrize("header", [f"Key {ALPHA}", f"Bearer {ALPHA}"], ids=["key", "bearer"])
def test_result_with_either_scheme(keyed: KontextdServer, alpha_request: dict[str, Any], header: str) -> None:
    with keyed.client() as http:
        result = http.get(f"{QUEUE}/{alpha_request['request_id']}", headers=auth(header))
    assert result.status_code == 200
    assert len(result.json()["images"]) == 1


@pytest.mark.parametrize("name", ["status", "result", "cancel", "stream"])
def test_other_keys_request_looks_unknown(
    keyed: KontextdServer, alpha_request: dict[str, Any], name: str
) -> None:
    request_id = alpha_request["request_id"]
    unknown = "00000000-0000-4000-8000-000000000000"
    with keyed.client() as http:
        as_beta = call(http, name, request_id, auth(f"Key {BETA}"))
        unknown_for_beta = call(http, name, unknown, auth(f"Key {BETA}"))
        as_alpha = call(http, name, request_id, auth(f"Key {ALPHA}"))
    assert as_beta.status_code == 404
    assert (as_beta.status_code, as_beta.json()) == (unknown_for_beta.status_code, unknown_for_beta.json())
    assert request_id not in as_beta.text
    expected_for_alpha = {"status": 200, "result": 200, "cancel": 400, "stream": 200}[name]
    assert as_alpha.status_code == expected_for_alpha, as_alpha.text
    if name == "cancel":
        assert as_alpha.json() == {"status": "ALREADY_COMPLETED"}


def test_other_key_cannot_cancel_or_follow_a_running_request(keyed: KontextdServer) -> None:
    # 50 steps at 0.02 s: a second or more of running, and the other key's calls take milliseconds.
    with keyed.client() as http:
        response = http.post(f"/{DEV}", json=LONG_EDIT, headers=auth(f"Key {ALPHA}"))
        assert response.status_code == 200, response.text
        request_id = response.json()["request_id"]
        dev_requests = "/fal-ai/flux-kontext/requests"
        dev_queue = f"{dev_requests}/{request_id}"
        owner = auth(f"Key {ALPHA}")

        def running() -> bool:
            body = http.get(f"{dev_queue}/status", params={"logs": "1"}, headers=owner).json()
            return body["status"] == "IN_PROGRESS" and any(
                line["message"].startswith("step ") for line in body["logs"] or []
            )

        wait_for(running, timeout=60, interval=0.02)  # a step has run: not queued any more
        other = auth(f"Bearer {BETA}")
        refused = http.put(f"{dev_queue}/cancel", headers=other)
        assert refused.status_code == 404 and refused.json() == {"status": "NOT_FOUND"}
        assert http.get(f"{dev_queue}/status", headers=other).status_code == 404
        assert http.get(f"{dev_queue}/status/stream", headers=other).status_code == 404
        assert http.get(dev_queue, headers=other).status_code == 404
        # Still running after all of that: the refusals above were about a running request.
        assert http.get(f"{dev_queue}/status", headers=owner).json()["status"] == "IN_PROGRESS"
        events = stream_events(http, request_id, owner, dev_requests)
        assert events[-1]["status"] == "COMPLETED" and "error" not in events[-1]  # not cancelled by BETA
        assert http.get(dev_queue, headers=owner).status_code == 200


def test_public_routes_need_no_key(keyed: KontextdServer, alpha_request: dict[str, Any]) -> None:
    with keyed.client() as http:
        result = http.get(f"{QUEUE}/{alpha_request['request_id']}", headers=auth(f"Key {ALPHA}")).json()
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ready"
        docs = http.get("/docs")
        assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
        openapi = http.get("/openapi.json")
        assert openapi.status_code == 200 and f"/{APP}" in openapi.json()["paths"]
        jwks = http.get("/.well-known/jwks.json")
        assert jwks.status_code == 200 and jwks.json()["keys"][0]["kty"] == "OKP"
        url = result["images"][0]["url"]
        assert url.startswith(f"{keyed.base_url}/files/")
        image = http.get(url)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg" and image.content[:3] == b"\xff\xd8\xff"


def test_keys_from_environment(from_env: KontextdServer) -> None:
    with from_env.client() as http:
        for key in (GAMMA, DELTA):
            ended = submit_and_cancel(from_env, f"Key {key}", f"Bearer {key}")
            assert ended["error_type"] == "client_cancelled"
        assert http.post(f"/{APP}", json=PROMPT).status_code == 401
        assert http.post(f"/{APP}", json=PROMPT, headers=auth(f"Key {ALPHA}")).status_code == 401
        assert http.post(f"/{APP}", json=PROMPT, headers=auth(f"Key {GAMMA}, {DELTA}")).status_code == 401


def test_public_url_shapes_every_url(from_env: KontextdServer) -> None:
    base = f"http://localhost:{from_env.port}"
    envelope = submit(from_env, f"Key {GAMMA}")
    request_id = envelope["request_id"]
    response_url = f"{base}/fal-ai/flux-pro/requests/{request_id}"
    assert envelope["response_url"] == response_url
    assert envelope["status_url"] == f"{response_url}/status"
    assert envelope["cancel_url"] == f"{response_url}/cancel"
    # The URLs handed out are the ones that work: follow them as given.
    with httpx.Client(headers=auth(f"Key {GAMMA}"), timeout=30, trust_env=False) as http:

        def done() -> dict[str, Any] | None:
            body = http.get(envelope["status_url"]).json()
            return body if body["status"] == "COMPLETED" else None

        status = wait_for(done, timeout=60)
        assert status["response_url"] == response_url and status["status_url"] == envelope["status_url"]
        result = http.get(envelope["response_url"])
        assert result.status_code == 200
        url = result.json()["images"][0]["url"]
        assert url.startswith(f"{base}/files/")
        assert http.get(url).status_code == 200


def test_keys_never_appear_in_output(keyed: KontextdServer, from_env: KontextdServer) -> None:
    with keyed.client() as http:
        for header in (f"Key {WRONG}", f"Bearer {WRONG}", f"Basic {ALPHA}", ALPHA):
            assert http.post(f"/{APP}", json=PROMPT, headers=auth(header)).status_code == 401
    submit_and_cancel(keyed, f"Key {ALPHA}", f"Bearer {ALPHA}")
    last = {id(keyed): submit_and_cancel(keyed, f"Bearer {BETA}", f"Key {BETA}")["request_id"]}
    with from_env.client() as http:
        assert http.get(f"{QUEUE}/nope/status", headers=auth(f"Key {WRONG}")).status_code == 401
    last[id(from_env)] = submit_and_cancel(from_env, f"Bearer {DELTA}", f"Key {DELTA}")["request_id"]
    for server in (keyed, from_env):
        # The access log of the last call has been collected, so everything before it has been too.
        marker = f"{last[id(server)]}/status HTTP/1.1"
        wait_for(lambda server=server, marker=marker: any(marker in line for line in server.output))
        output = "".join(server.output)
        assert '" 401' in output
        for key in (ALPHA, BETA, GAMMA, DELTA, WRONG):
            assert key not in output


def clean_env(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("KONTEXTD_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.parametrize("extra_env", [{}, {"KONTEXTD_API_KEYS": " , "}], ids=["no-key", "blank-keys"])
def test_refuses_public_bind_without_key(tmp_path: Path, extra_env: dict[str, str]) -> None:
    # Never contacted: the process must refuse before it binds anything.
    data_dir = tmp_path / "data"
    # The timeout is the bound: a process that bound and served would never exit by itself.
    completed_process = subprocess.run(
        [
            sys.executable,
            "-m",
            "kontextd",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--data-dir",
            str(data_dir),
        ],
        env=clean_env(**extra_env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed_process.returncode != 0
    message = completed_process.stderr + completed_process.stdout
    assert "--api-key" in message and "--insecure" in message
    assert "Uvicorn running" not in message and "serving on" not in message
    assert not data_dir.exists()  # refused before touching anything


def test_serve_help_lists_every_flag() -> None:
    completed_process = subprocess.run(
        [sys.executable, "-m", "kontextd", "serve", "--help"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed_process.returncode == 0, completed_process.stderr
    for flag in (
        "--host",
        "--port",
        "--data-dir",
        "--public-url",
        "--backend",
        "--api-key",
        "--tls-self-signed",
        "--tls-cert",
        "--tls-key",
        "--insecure",
    ):
        assert flag in completed_process.stdout, flag
    assert "KONTEXTD_API_KEYS" in completed_process.stdout
