"""Local workers as the server runs them: one pipeline each, warmed up before /health says ready, and
--gpus checked before the server binds."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import STARTUP_SECONDS, KontextdServer, LoopbackServer, free_port, wait_completed, wait_for
from PIL import Image

from kontextd.cli import parse

TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
DEV = "fal-ai/flux-kontext/dev"


def log_messages(server: KontextdServer) -> list[str]:
    return [json.loads(line)["message"] for line in server.output if line.startswith("{")]


def pixels(client: httpx.Client, envelope: dict[str, Any]) -> bytes:
    status = wait_completed(client, envelope["status_url"])
    assert "error" not in status, status
    image = client.get(envelope["response_url"]).json()["images"][0]
    return Image.open(io.BytesIO(client.get(image["url"]).content)).tobytes()


def test_two_workers_own_their_pipelines_and_warm_up_before_ready(
    tmp_path: Path, image_host: LoopbackServer
) -> None:
    server = KontextdServer(tmp_path / "data", args=["--workers", "2", "--tiny-step-seconds", "0.1"])
    server.start(until="loading")
    try:
        with server.client() as client:
            seen = []

            def ready() -> bool:
                seen.append(client.get("/health").json()["status"])
                return seen[-1] == "ready"

            wait_for(ready, STARTUP_SECONDS)
            assert seen[0] == "loading"  # loading, then warming up: seconds of it
            assert client.get("/health").json()["workers"] == 2
            messages = log_messages(server)
            assert messages.count("warmed up") == 2  # each pipeline, before the server said ready
            assert messages.index("ready") > len(messages) - 1 - messages[::-1].index("warmed up")

            requests = [
                (TEXT_TO_IMAGE, {"prompt": "a red fox", "seed": 5, "output_format": "png"}),
                (
                    DEV,
                    {
                        "prompt": "make it blue",
                        "image_url": f"{image_host.url}/wide.png",
                        "seed": 6,
                        "num_inference_steps": 20,
                        "acceleration": "high",
                        "output_format": "png",
                    },
                ),
            ]
            # At once: each worker runs one, side by side, on its own pipeline.
            envelopes = [client.post(f"/{app_id}", json=body).json() for app_id, body in requests]

            def both_running() -> bool:
                states = [client.get(envelope["status_url"]).json()["status"] for envelope in envelopes]
                return states == ["IN_PROGRESS", "IN_PROGRESS"]

            wait_for(both_running)
            together = [pixels(client, envelope) for envelope in envelopes]
            # One after the other: the very same images.
            alone = [pixels(client, client.post(f"/{app_id}", json=body).json()) for app_id, body in requests]
            assert together == alone
    finally:
        server.stop()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_gpus_without_cuda_stop_the_server_before_it_binds(tmp_path: Path) -> None:
    port = free_port()
    completed = subprocess.run(
        [sys.executable, "-m", "kontextd", "serve", "--port", str(port), "--data-dir", str(tmp_path)],
        env={**os.environ, "KONTEXTD_GPUS": "0,1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1
    assert "kontextd: --gpus 0,1: no CUDA device is available" in completed.stderr
    assert "serving on" not in completed.stdout


def test_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = parse(["serve"])[1]
    assert (defaults.gpus, defaults.offload, defaults.weights, defaults.compile) == (
        None,
        "auto",
        "bf16",
        "auto",
    )
    for name, value in {"GPUS": "0,1", "OFFLOAD": "model", "WEIGHTS": "fp8", "COMPILE": "off"}.items():
        monkeypatch.setenv(f"KONTEXTD_{name}", value)
    settings = parse(["serve"])[1]
    assert (settings.gpus, settings.offload, settings.weights, settings.compile) == (
        "0,1",
        "model",
        "fp8",
        "off",
    )
    flagged = parse(["serve", "--gpus", "all", "--offload", "sequential", "--compile", "on"])[1]
    assert (flagged.gpus, flagged.offload, flagged.compile) == ("all", "sequential", "on")
