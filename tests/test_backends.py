"""Backend choice and loading: the diffusers path on saved weights, auto, errors, OOM isolation."""

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import KontextdServer, wait_completed, wait_for
from diffusers import FluxKontextPipeline

from kontextd.backends import BackendUnavailable, load_backend, model_is_local, plan_backend
from kontextd.backends.pipeline import KontextPipelineBackend
from kontextd.backends.tiny import build_tiny_pipeline
from kontextd.backends.weights import compute_dtype, load_pretrained
from kontextd.jobs.model import NewJob, State
from kontextd.jobs.sqlite import SQLiteJobStore
from kontextd.storage.local import LocalStorage
from kontextd.worker.runner import Worker

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny weights saved as a diffusers pipeline directory: what a downloaded model looks like on disk."""
    directory = tmp_path_factory.mktemp("tiny-kontext")
    build_tiny_pipeline().save_pretrained(directory)
    return directory


# -- choosing a backend --------------------------------------------------------------------------------


@pytest.mark.skipif(not NO_CUDA, reason="checks the fallbacks of a machine without CUDA")
def test_auto_without_cuda_falls_back_to_tiny_and_says_why() -> None:
    plan = plan_backend("auto", "black-forest-labs/FLUX.1-Kontext-dev", "auto")
    assert (plan.kind, plan.device) == ("tiny", "cpu")
    assert "no CUDA device" in plan.reason


@pytest.mark.skipif(not NO_CUDA, reason="checks the fallbacks of a machine without CUDA")
def test_diffusers_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailable, match=r"no CUDA device.*--device cpu.*--backend tiny"):
        plan_backend("diffusers", "black-forest-labs/FLUX.1-Kontext-dev", "auto")
    with pytest.raises(BackendUnavailable, match="--device cuda:1: no CUDA device"):
        plan_backend("diffusers", "black-forest-labs/FLUX.1-Kontext-dev", "cuda:1")


def test_diffusers_on_cpu_when_asked(saved_pipeline: Path) -> None:
    plan = plan_backend("diffusers", str(saved_pipeline), "cpu")
    assert (plan.kind, plan.device, plan.model, plan.reason) == (
        "diffusers",
        "cpu",
        str(saved_pipeline),
        "--backend diffusers",
    )
    assert [slot.memory.offload for slot in plan.slots] == ["none"]
    assert not plan.compile  # auto: off on the CPU


def test_tiny_and_unknown_backends(tmp_path: Path) -> None:
    assert plan_backend("tiny", "ignored", "auto").kind == "tiny"
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        plan_backend("onnx", "x", "auto")
    with pytest.raises(BackendUnavailable, match="no such file"):
        plan_backend("diffusers", str(tmp_path / "missing.safetensors"), "cpu")


def test_model_is_local(saved_pipeline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing was ever downloaded
    assert model_is_local(str(saved_pipeline))
    assert not model_is_local("black-forest-labs/FLUX.1-Kontext-dev")
    assert not model_is_local("not a repo id !")


# -- loading -------------------------------------------------------------------------------------------


def test_missing_weights_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackendUnavailable, match="no such directory, file or Hugging Face repo id") as caught:
        load_pretrained(str(tmp_path / "no-such-model"), compute_dtype("cpu"))
    assert "Traceback" not in str(caught.value)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # offline and never downloaded
    with pytest.raises(
        BackendUnavailable, match=r"could not load black-forest-labs/FLUX\.1-Kontext-dev: .*--model"
    ) as caught:
        load_pretrained("black-forest-labs/FLUX.1-Kontext-dev", compute_dtype("cpu"))
    assert "\n" not in str(caught.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackendUnavailable, match=f"could not load {empty}"):
        load_pretrained(str(empty), compute_dtype("cpu"))


def test_saved_weights_load_through_the_diffusers_path(saved_pipeline: Path) -> None:
    plan = plan_backend("diffusers", str(saved_pipeline), "cpu")
    backend = load_backend(plan, plan.slots[0])
    assert backend.name == "diffusers"
    assert isinstance(backend, KontextPipelineBackend)
    assert backend.output_size((1024, 1024)) == (1024, 1024)  # the real table, not shrunk like tiny


def test_server_serves_saved_weights_with_the_diffusers_backend(
    saved_pipeline: Path, tmp_path: Path, image_host: Any
) -> None:
    server = KontextdServer(
        tmp_path / "data", args=["--backend", "diffusers", "--device", "cpu", "--model", str(saved_pipeline)]
    ).start()
    try:
        assert any("backend diffusers on cpu" in line for line in server.output)
        with server.client() as client:
            assert client.get("/health").json() | {"workers": 1} == {
                "status": "ready",
                "backend": "diffusers",
                "reason": None,
                "workers": 1,
                "backends": {"local": "ready"},
                "store": "ok",
                "storage": "ok",
            }
            body = {
                "prompt": "make it blue",
                "image_url": f"{image_host.url}/wide.png",
                "num_inference_steps": 10,
            }
            envelope = client.post("/fal-ai/flux-kontext/dev", json=body).json()
            status = wait_completed(client, envelope["status_url"], timeout=120)
            assert "error" not in status, status
            image = client.get(envelope["response_url"]).json()["images"][0]
            assert (image["width"], image["height"]) == (1392, 752)  # full-size table entry nearest 16:9
    finally:
        server.stop()


def test_server_reports_a_failed_load_on_health(tmp_path: Path) -> None:
    server = KontextdServer(
        tmp_path / "data",
        args=["--backend", "diffusers", "--device", "cpu", "--model", str(tmp_path / "nowhere")],
        env={"HF_HUB_OFFLINE": "1"},
    ).start(until="failed")
    try:
        with server.client() as client:
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "failed"
            assert "nowhere" in health.json()["reason"]
            # The API still takes requests; they wait for a working backend instead of being lost.
            assert (
                client.post("/fal-ai/flux-pro/kontext/text-to-image", json={"prompt": "x"}).status_code == 200
            )
    finally:
        server.stop()


# -- out of memory -------------------------------------------------------------------------------------


class RunsOutOfMemoryOnce:
    """The real tiny pipeline, except that its first call fails the way CUDA does when memory runs out."""

    def __init__(self, pipeline: FluxKontextPipeline) -> None:
        self._pipeline = pipeline
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def __call__(self, **arguments: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self._pipeline(**arguments)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    opened = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield opened
    opened.close()


def test_out_of_memory_fails_that_request_only(store: SQLiteJobStore, tmp_path: Path) -> None:
    pipeline = RunsOutOfMemoryOnce(build_tiny_pipeline())
    backend = KontextPipelineBackend(
        pipeline,  # type: ignore[arg-type]
        name="tiny",
        served_by="tiny",
        resolution_divisor=8,
    )
    worker = Worker(
        worker_id="w",
        store=store,
        backend=backend,
        storage=LocalStorage(tmp_path / "files"),
        load_image=lambda url: pytest.fail("no image expected"),
        notify=lambda request_id: None,
    )
    ids = [str(uuid.uuid4()) for _ in range(2)]
    for request_id in ids:
        store.submit(
            NewJob(
                request_id,
                str(uuid.uuid4()),
                "fal-ai/flux-pro/kontext/text-to-image",
                "me",
                {"prompt": "x", "num_images": 4},
            )
        )
    for _ in ids:
        job = store.claim("w", 60, time.time())
        assert job is not None
        worker.run(job)

    first, second = (store.get(request_id) for request_id in ids)
    assert first is not None and second is not None
    assert first.state == second.state == State.COMPLETED
    assert first.outcome is not None and first.outcome.status_code == 500
    assert first.outcome.error == "Out of memory generating 4 image(s) at 128x128; try fewer images"
    assert second.outcome is not None and second.outcome.ok and len(second.outcome.body["images"]) == 4
    assert wait_for(lambda: any("Out of memory" in line.message for line in store.logs(ids[0])))


def test_out_of_memory_while_warming_up_is_a_clear_error() -> None:
    pipeline = RunsOutOfMemoryOnce(build_tiny_pipeline())
    backend = KontextPipelineBackend(
        pipeline,  # type: ignore[arg-type]
        name="tiny",
        served_by="tiny",
        resolution_divisor=8,
    )
    with pytest.raises(
        BackendUnavailable,
        match=r"out of memory warming up one 128x128 image on cpu\. Try --offload model or --weights fp8",
    ):
        backend.warm_up()
    backend.warm_up()  # nothing was left behind
