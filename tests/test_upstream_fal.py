"""The fal upstream backend against a fake of fal's queue on loopback: directly, then through a server.

Nothing here may reach past loopback: an autouse guard refuses any other address, and the kontextd
processes get only loopback URLs (conftest strips upstream variables from their environment).
"""

import base64
import dataclasses
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, LoopbackServer, png_bytes, wait_completed, wait_for
from fake_fal import APP_IDS, OUTPUT_SIZE, Behaviour, FakeFal, output_bytes, running_fake
from PIL import Image

from kontextd.backends.base import (
    EncodedImage,
    Generated,
    GenerationCancelled,
    GenerationJob,
    GenerationRefused,
    ImageInput,
)
from kontextd.backends.upstream.fal import FalBackend
from kontextd.routing import Secret, UpstreamConfig

KEY = "fal-test-key-7f3a9c2e-do-not-leak"
OWN_BASE_URL = "http://127.0.0.1:1"
TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
PRO_EDIT = "fal-ai/flux-pro/kontext"
MAX_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/max/text-to-image"
MAX_EDIT = "fal-ai/flux-pro/kontext/max"
DEV = "fal-ai/flux-kontext/dev"
MULTI = "fal-ai/flux-pro/kontext/multi"
MAX_MULTI = "fal-ai/flux-pro/kontext/max/multi"

PRO_T2I_FIELDS = {
    "prompt",
    "seed",
    "num_images",
    "sync_mode",
    "guidance_scale",
    "safety_tolerance",
    "output_format",
    "enhance_prompt",
    "aspect_ratio",
}
EXPECTED_FIELDS = {
    TEXT_TO_IMAGE: PRO_T2I_FIELDS,
    MAX_TEXT_TO_IMAGE: PRO_T2I_FIELDS,
    PRO_EDIT: PRO_T2I_FIELDS - {"aspect_ratio"} | {"image_url"},  # aspect_ratio None: follow the image
    MAX_EDIT: PRO_T2I_FIELDS - {"aspect_ratio"} | {"image_url"},
    MULTI: PRO_T2I_FIELDS - {"aspect_ratio"} | {"image_urls"},
    MAX_MULTI: PRO_T2I_FIELDS - {"aspect_ratio"} | {"image_urls"},
    DEV: {
        "prompt",
        "seed",
        "num_images",
        "sync_mode",
        "image_url",
        "num_inference_steps",
        "guidance_scale",
        "output_format",
        "acceleration",
        "enable_safety_checker",
    },
}
EDITS = (PRO_EDIT, MAX_EDIT, DEV, MULTI, MAX_MULTI)
GUIDANCE_422 = {
    "detail": [
        {
            "loc": ["body", "guidance_scale"],
            "msg": "Input should be less than or equal to 20",
            "type": "less_than_equal",
            "ctx": {"le": 20},
            "input": 21,
        }
    ]
}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse any connection from this process to an address other than loopback."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(str(address[0])):
            raise AssertionError(f"test tried to reach {address[0]}, which is not loopback")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeFal]:
    with running_fake(KEY) as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeFal) -> FakeFal:
    fake_server.reset()
    return fake_server


class Recorder:
    """A Progress that keeps every log line and checkpoint, and cancels on demand: `cancel` as the client
    does, `stopping` as a shutdown does (handing the request back). A later run given the same one resumes
    from its checkpoints, as a re-run of the request does."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.cancel = threading.Event()
        self.stopping = threading.Event()
        self.kept: dict[str, str] = {}

    def step(self, step: int, total: int) -> None:
        pass

    def log(self, message: str) -> None:
        self.lines.append(message)

    def cancelled(self) -> bool:
        return self.cancel.is_set() or self.stopping.is_set()

    def handing_back(self) -> bool:
        return self.stopping.is_set()

    def checkpoint(self, name: str, value: str) -> None:
        self.kept[name] = value

    def resumed(self, name: str) -> str | None:
        return self.kept.get(name)


@pytest.fixture
def backends() -> Iterator[list[FalBackend]]:
    made: list[FalBackend] = []
    yield made
    for backend in made:
        backend.close()


@pytest.fixture
def make_backend(fake: FakeFal, backends: list[FalBackend]):
    def make(key: str = KEY, max_retries: int = 3, **config: Any) -> FalBackend:
        settings = {
            "base_url": fake.url,
            "max_active": 4,
            "max_active_per_model": {},
            "request_timeout": 2.0,
            "task_timeout": 10.0,
            "workers": 2,
        } | config
        upstream = UpstreamConfig(kind="fal", key=Secret(key, "test"), **settings)
        backend = FalBackend(
            upstream, OWN_BASE_URL, poll_first=0.01, poll_max=0.03, retry_base=0.02, max_retries=max_retries
        )
        backends.append(backend)
        return backend

    return make


def red_image(url: str) -> Image.Image:
    return Image.new("RGB", (40, 30), (220, 20, 20))


def make_job(app_id: str, image: ImageInput | None = None, **changes: Any) -> GenerationJob:
    job = GenerationJob(
        prompt="a red fox in the snow",
        images=(image,) if image is not None else (),
        aspect_ratio=None if app_id in EDITS else "16:9",
        num_images=1,
        seed=42,
        guidance_scale=3.5,
        num_inference_steps=28,
        output_format="png",
        safety_tolerance=None if app_id == DEV else 2,
        model=app_id,
    )
    return dataclasses.replace(job, **changes)


def loopback_image() -> ImageInput:
    return ImageInput("http://127.0.0.1:9/in.png", red_image)


def decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    assert header == "data:image/png;base64"
    return base64.b64decode(payload)


# --- the request fal receives ---


@pytest.mark.parametrize("app_id", APP_IDS)
def test_body_has_only_the_apps_fields(fake: FakeFal, make_backend, app_id: str) -> None:
    image = loopback_image() if app_id in EDITS else None
    make_backend().generate(make_job(app_id, image), Recorder())

    [submit] = fake.submitted()
    assert submit.path == f"/{app_id}"
    assert submit.headers["Authorization"] == f"Key {KEY}"
    assert set(submit.body) == EXPECTED_FIELDS[app_id]
    assert submit.body["sync_mode"] is False  # URLs to re-host, never data URIs
    assert submit.body["prompt"] == "a red fox in the snow" and submit.body["seed"] == 42
    if "safety_tolerance" in submit.body:
        assert submit.body["safety_tolerance"] == "2"  # fal's enum is strings
    if app_id in EDITS:  # a loopback image: fal cannot fetch it, so it travels inline
        sent_url = submit.body["image_urls"][0] if app_id in (MULTI, MAX_MULTI) else submit.body["image_url"]
        with Image.open(io.BytesIO(decode_data_uri(sent_url))) as sent:
            assert sent.size == (40, 30) and sent.convert("RGB").getpixel((0, 0)) == (220, 20, 20)


def test_dev_values_and_fixed_aspect_ratio(fake: FakeFal, make_backend) -> None:
    job = make_job(
        DEV,
        loopback_image(),
        aspect_ratio="4:3",
        num_inference_steps=12,
        acceleration="high",
        enable_safety_checker=False,
    )
    make_backend().generate(job, Recorder())

    body = fake.submitted()[0].body
    assert body["num_inference_steps"] == 12 and body["acceleration"] == "high"
    assert body["enable_safety_checker"] is False  # fal's own checker, as the client asked
    assert body["resolution_mode"] == "4:3"  # [dev]'s name for a fixed aspect ratio


def test_edit_aspect_ratio_sent_when_asked(fake: FakeFal, make_backend) -> None:
    make_backend().generate(make_job(PRO_EDIT, loopback_image(), aspect_ratio="21:9"), Recorder())
    assert fake.submitted()[0].body["aspect_ratio"] == "21:9"


def test_reachable_image_url_passed_as_is(fake: FakeFal, make_backend) -> None:
    def never_load(url: str) -> Image.Image:
        raise AssertionError("a URL fal can fetch itself must not be downloaded here")

    url = "https://images.example.com/cat.png"  # only handed to the fake as text, never connected to
    make_backend().generate(make_job(MAX_EDIT, ImageInput(url, never_load)), Recorder())
    assert fake.submitted()[0].body["image_url"] == url


def test_multi_image_urls_are_sent_in_order(fake: FakeFal, make_backend) -> None:
    def never_load(url: str) -> Image.Image:
        raise AssertionError("a URL fal can fetch itself must not be downloaded here")

    public = ["https://images.example.com/a.png", "https://images.example.com/b.png"]  # text only
    images = (ImageInput(public[0], never_load), loopback_image(), ImageInput(public[1], never_load))
    make_backend().generate(dataclasses.replace(make_job(MAX_MULTI), images=images), Recorder())
    sent = fake.submitted()[0].body["image_urls"]
    assert (sent[0], sent[2]) == (public[0], public[1])
    with Image.open(io.BytesIO(decode_data_uri(sent[1]))) as inline:  # loopback: fal cannot fetch it
        assert inline.size == (40, 30)


def test_data_uri_image_sent_inline(fake: FakeFal, make_backend) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(20, 10)).decode()

    def load(url: str) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB")

    make_backend().generate(make_job(PRO_EDIT, ImageInput(uri, load)), Recorder())
    with Image.open(io.BytesIO(decode_data_uri(fake.submitted()[0].body["image_url"]))) as sent:
        assert sent.size == (20, 10)


def test_app_outside_the_catalogue_gets_common_fields_and_fals_404(fake: FakeFal, make_backend) -> None:
    with pytest.raises(GenerationRefused) as refused:
        make_backend().generate(make_job(TEXT_TO_IMAGE, model="fal-ai/some/other-app"), Recorder())

    assert refused.value.status_code == 404
    assert "fal-ai/some/other-app" in refused.value.message and "not found" in refused.value.message
    assert "num_inference_steps" not in fake.calls("POST")[0].body


# --- waiting: queue position and logs ---


def test_queue_position_and_logs_relayed_once(fake: FakeFal, make_backend) -> None:
    fake.behaviour = Behaviour(queued_polls=2, progress_polls=3)
    progress = Recorder()
    make_backend().generate(make_job(TEXT_TO_IMAGE), progress)

    positions = [line for line in progress.lines if line.startswith("fal queue position")]
    assert positions == ["fal queue position 2", "fal queue position 1", "fal queue position 0"]
    relayed = [line for line in progress.lines if line.startswith("fal: ")]
    assert relayed == ["fal: upstream line 1", "fal: upstream line 2", "fal: upstream line 3"]
    assert all(call.query.get("logs") == ["1"] for call in fake.calls("GET", "/status"))


def test_uses_the_returned_urls(fake: FakeFal, make_backend) -> None:
    make_backend().generate(make_job(MAX_EDIT, loopback_image()), Recorder())

    request_id = next(iter(fake.requests))
    # Status and result URLs carry only the first two segments of the app id, as fal returns them.
    assert {call.path for call in fake.calls("GET", "/status")} == {
        f"/fal-ai/flux-pro/requests/{request_id}/status"
    }
    assert [call.path for call in fake.calls("GET", request_id)] == [
        f"/fal-ai/flux-pro/requests/{request_id}"
    ]


# --- outputs ---


def test_outputs_downloaded_once_and_returned_encoded(fake: FakeFal, make_backend) -> None:
    fake.behaviour = Behaviour(expiring_outputs=True)
    generated = make_backend().generate(
        make_job(TEXT_TO_IMAGE, num_images=2, output_format="jpeg"), Recorder()
    )

    request_id = next(iter(fake.requests))
    assert isinstance(generated, Generated)
    assert generated.served_by == TEXT_TO_IMAGE
    assert generated.has_nsfw_concepts == [False, False]
    assert generated.inference_seconds > 0
    for index, image in enumerate(generated.images):
        assert isinstance(image, EncodedImage)
        assert image.data == output_bytes(request_id, index, "jpeg")
        assert (image.content_type, image.width, image.height) == ("image/jpeg", *OUTPUT_SIZE)
    assert fake.file_downloads == {f"{request_id}/0": 1, f"{request_id}/1": 1}
    # The output host is not fal's queue: the key is not sent there.
    assert all("Authorization" not in call.headers for call in fake.calls("GET") if "/files/" in call.path)


def test_nsfw_flags_passed_through(fake: FakeFal, make_backend) -> None:
    fake.behaviour = Behaviour(nsfw=frozenset({1}))
    generated = make_backend().generate(make_job(TEXT_TO_IMAGE, num_images=3), Recorder())
    assert generated.has_nsfw_concepts == [False, True, False]
    assert len(generated.images) == 3


# --- retries ---


def test_rate_limited_submit_backs_off_then_succeeds(fake: FakeFal, make_backend) -> None:
    fake.fail("submit", 429, 429, retry_after="0.05")
    fake.fail("submit", 429)  # no Retry-After: our own backoff
    progress = Recorder()
    generated = make_backend().generate(make_job(TEXT_TO_IMAGE), progress)

    assert len(generated.images) == 1
    posts = fake.calls("POST")
    assert len(posts) == 4
    # Retry-After honoured each time it was sent, as measured where the submits arrived.
    assert posts[1].at - posts[0].at >= 0.05 and posts[2].at - posts[1].at >= 0.05
    assert sum("rate limiting" in line for line in progress.lines) == 3


def test_server_errors_retried(fake: FakeFal, make_backend) -> None:
    fake.fail("submit", 503)
    fake.fail("status", 500, 502)
    fake.fail("result", 503)
    generated = make_backend().generate(make_job(TEXT_TO_IMAGE), Recorder())

    assert len(generated.images) == 1
    assert len(fake.calls("POST")) == 2
    request_id = next(iter(fake.requests))
    assert len(fake.calls("GET", request_id)) == 2  # the result, once more after its 503


def test_server_errors_bounded(fake: FakeFal, make_backend) -> None:
    fake.fail("status", *[503] * 10)
    with pytest.raises(GenerationRefused) as refused:
        make_backend(max_retries=2).generate(make_job(TEXT_TO_IMAGE), Recorder())

    assert (refused.value.status_code, refused.value.error_type) == (502, "upstream_unavailable")
    assert "HTTP 503" in refused.value.message
    assert len(fake.calls("GET", "/status")) == 3
    assert len(fake.calls("PUT", "/cancel")) == 1  # the abandoned request is cancelled at fal


def test_slow_status_polls_bounded_by_request_timeout(fake: FakeFal, make_backend) -> None:
    fake.behaviour = Behaviour(status_delay=2.0)  # each poll would be answered after 2 s
    with pytest.raises(GenerationRefused) as refused:
        make_backend(max_retries=1, request_timeout=0.1).generate(make_job(TEXT_TO_IMAGE), Recorder())

    assert refused.value.status_code == 502 and "ReadTimeout" in refused.value.message
    first, second = fake.calls("GET", "/status")  # max_retries=1: the poll and one more, then stop
    assert second.at - first.at < 2.0  # the first was given up on, not waited for to its answer


def test_slow_status_polls_within_timeout_succeed(fake: FakeFal, make_backend) -> None:
    fake.behaviour = Behaviour(status_delay=0.05, queued_polls=1, progress_polls=1)
    assert len(make_backend().generate(make_job(TEXT_TO_IMAGE), Recorder()).images) == 1


# --- refusals ---


def test_upstream_validation_error_refused_with_fals_detail(fake: FakeFal, make_backend) -> None:
    fake.behaviour = Behaviour(result_error=(422, GUIDANCE_422, None))
    with pytest.raises(GenerationRefused) as refused:
        make_backend().generate(make_job(TEXT_TO_IMAGE), Recorder())

    assert refused.value.status_code == 422
    assert refused.value.error_type == "less_than_equal"
    assert "guidance_scale: Input should be less than or equal to 20" in refused.value.message


def test_upstream_server_error_result_not_retried(fake: FakeFal, make_backend) -> None:
    body = {"detail": "CUDA out of memory on the worker"}
    fake.behaviour = Behaviour(result_error=(500, body, "internal_server_error"))
    with pytest.raises(GenerationRefused) as refused:
        make_backend().generate(make_job(TEXT_TO_IMAGE), Recorder())

    assert (refused.value.status_code, refused.value.error_type) == (500, "internal_server_error")
    assert "CUDA out of memory on the worker" in refused.value.message
    request_id = next(iter(fake.requests))
    assert len(fake.calls("GET", request_id)) == 1  # a failed request's 5xx is its answer


def test_submit_refusal_error_type_falls_back(fake: FakeFal, make_backend) -> None:
    fake.fail("submit", 400)  # {"detail": "scripted 400"}, no X-Fal-Error-Type
    with pytest.raises(GenerationRefused) as refused:
        make_backend().generate(make_job(TEXT_TO_IMAGE), Recorder())
    assert (refused.value.status_code, refused.value.error_type) == (400, "upstream_error")
    assert "scripted 400" in refused.value.message


def test_rejected_key(fake: FakeFal, make_backend) -> None:
    wrong = "wrong-key-0000"
    with pytest.raises(GenerationRefused) as refused:
        make_backend(key=wrong).generate(make_job(TEXT_TO_IMAGE), Recorder())

    assert "fal rejected the configured key" in refused.value.message
    assert (refused.value.status_code, refused.value.error_type) == (502, "upstream_auth_error")
    assert wrong not in refused.value.message
    assert len(fake.calls("POST")) == 1  # a wrong key is not retried


# --- time limits and cancellation ---


def generate_in_thread(backend: FalBackend, job: GenerationJob, progress: Recorder):
    """Start generate on a thread of its own; the thread and a list that receives what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            backend.generate(job, progress)
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def test_task_timeout(fake: FakeFal, make_backend) -> None:
    fake.behaviour = Behaviour(never_complete=True)
    started = time.monotonic()
    thread, raised = generate_in_thread(make_backend(task_timeout=0.5), make_job(TEXT_TO_IMAGE), Recorder())
    thread.join(timeout=30)  # the mechanism's bound: without the deadline it would poll for ever
    assert not thread.is_alive(), "the task timeout did not end the request"
    assert time.monotonic() - started >= 0.5  # and not before its time

    [refused] = raised
    assert isinstance(refused, GenerationRefused)
    assert (refused.status_code, refused.error_type) == (504, "upstream_timeout")
    assert "0.5 s" in refused.message
    assert len(fake.calls("PUT", "/cancel")) == 1
    assert fake.recorded[-1].method == "PUT"  # the cancel at fal came last: nothing polled after it


def test_cancel_puts_cancel_and_stops_polling(fake: FakeFal, make_backend) -> None:
    fake.behaviour = Behaviour(never_complete=True, queued_polls=0)
    progress = Recorder()
    thread, raised = generate_in_thread(make_backend(), make_job(TEXT_TO_IMAGE), progress)
    wait_for(lambda: len(fake.calls("GET", "/status")) >= 3, timeout=5)
    progress.cancel.set()
    thread.join(timeout=5)  # the task timeout is 10 s: only the cancel ends it sooner

    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], GenerationCancelled)
    [cancel] = fake.calls("PUT", "/cancel")
    assert cancel.headers["Authorization"] == f"Key {KEY}"
    assert next(iter(fake.requests.values())).cancelled
    # The barrier: generate polls on the calling thread, which has returned, and the fake records each
    # call before answering it, so every call it made is here. The cancel is the last: no poll after it.
    assert fake.recorded[-1] == cancel
    assert all(call.at <= cancel.at for call in fake.calls("GET", "/status"))


def test_a_re_run_follows_the_fal_request_it_had_submitted(fake: FakeFal, make_backend) -> None:
    fake.behaviour = Behaviour(never_complete=True, queued_polls=0)
    backend, progress = make_backend(), Recorder()
    thread, raised = generate_in_thread(backend, make_job(TEXT_TO_IMAGE), progress)
    wait_for(lambda: len(fake.calls("GET", "/status")) >= 2, timeout=5)
    progress.stopping.set()  # the server stops: the request is handed back, to run again
    thread.join(timeout=5)
    assert not thread.is_alive() and isinstance(raised[0], GenerationCancelled)
    assert fake.calls("PUT", "/cancel") == []  # left to run at fal: the re-run reads it
    [request] = fake.requests.values()
    assert json.loads(progress.kept["fal request"]) == {
        "request_id": request.request_id,
        **fake.queue_urls(TEXT_TO_IMAGE, request.request_id),
    }

    request.behaviour = Behaviour(queued_polls=0, progress_polls=1)  # fal finishes it meanwhile
    progress.stopping.clear()
    generated = backend.generate(make_job(TEXT_TO_IMAGE), progress)  # the re-run, same checkpoints
    assert len(fake.submitted()) == 1  # one fal request, billed once
    assert generated.images[0].data == output_bytes(request.request_id, 0, "png")
    assert f"Resuming fal request {request.request_id}" in "\n".join(progress.lines)


def test_a_fal_request_fal_no_longer_knows_is_submitted_again(fake: FakeFal, make_backend) -> None:
    progress = Recorder()
    gone = {"request_id": "gone", **fake.queue_urls(TEXT_TO_IMAGE, "gone")}  # an earlier run's, expired
    progress.kept["fal request"] = json.dumps(gone)
    generated = make_backend().generate(make_job(TEXT_TO_IMAGE), progress)
    [request] = fake.requests.values()
    assert len(fake.submitted()) == 1 and request.request_id != "gone"
    assert generated.images[0].data == output_bytes(request.request_id, 0, "png")
    assert "fal no longer knows request gone; submitting again" in progress.lines
    assert json.loads(progress.kept["fal request"])["request_id"] == request.request_id


def test_cancelled_before_submit_sends_nothing(fake: FakeFal, make_backend) -> None:
    progress = Recorder()
    progress.cancel.set()
    with pytest.raises(GenerationCancelled):
        make_backend().generate(make_job(TEXT_TO_IMAGE), progress)
    assert fake.recorded == []


def test_one_slot_per_request(fake: FakeFal, make_backend) -> None:
    """With max_active 1, a second request waits for the first to finish before it is submitted."""
    backend = make_backend(max_active=1)
    threads = [
        threading.Thread(target=backend.generate, args=(make_job(TEXT_TO_IMAGE), Recorder()))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)

    paths = [call.path for call in fake.recorded if call.method == "POST" or "/files/" in call.path]
    assert len(paths) == 4
    assert paths[0] == paths[2] == f"/{TEXT_TO_IMAGE}"  # submit, download, submit, download


def test_key_never_logged_or_shown(fake: FakeFal, make_backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    progresses = [Recorder() for _ in range(4)]  # one a request: each is a request of its own
    errors: list[str] = []
    make_backend().generate(make_job(TEXT_TO_IMAGE), progresses[0])
    for behaviour, progress in zip(
        (Behaviour(result_error=(422, GUIDANCE_422, None)), Behaviour(never_complete=True)),
        progresses[1:3],
        strict=True,
    ):
        fake.behaviour = behaviour
        with pytest.raises(GenerationRefused) as refused:
            make_backend(task_timeout=0.3).generate(make_job(TEXT_TO_IMAGE), progress)
        errors += [str(refused.value), repr(refused.value), refused.value.message]
    fake.fail("status", *[500] * 5)
    with pytest.raises(GenerationRefused) as refused:
        make_backend(max_retries=1).generate(make_job(TEXT_TO_IMAGE), progresses[3])
    errors.append(refused.value.message)

    assert caplog.records  # the backend did log
    logged = caplog.text + "".join(repr(vars(record)) for record in caplog.records)
    lines = [line for progress in progresses for line in progress.lines]
    for text in (logged, *errors, *lines, repr(make_backend())):
        assert KEY not in text


# --- end to end: a kontextd process routing to the fake ---


def write_config(directory: Path, fake_url: str, routed: tuple[str, ...]) -> Path:
    routes = "\n".join(f'"{app_id}" = "fal"' for app_id in routed)
    config = directory / "kontextd.toml"
    config.write_text(
        f"[routes]\n{routes}\n\n"
        f'[fal]\nbase_url = "{fake_url}"\nrequest_timeout = 5\ntask_timeout = 15\nworkers = 2\n'
    )
    return config


@pytest.fixture(scope="module")
def fal_server(fake_server: FakeFal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    """Every endpoint routed to fal, so no local model loads and the server is ready at once."""
    config = write_config(tmp_path_factory.mktemp("config"), fake_server.url, APP_IDS)
    server = KontextdServer(
        tmp_path_factory.mktemp("kontextd-fal"), args=["--config", str(config)], env={"KONTEXTD_FAL_KEY": KEY}
    ).start()
    yield server
    server.stop()
    assert KEY not in "".join(server.output)


@pytest.fixture
def api(fal_server: KontextdServer, fake: FakeFal) -> Iterator[httpx.Client]:
    fake.behaviour = Behaviour(queued_polls=1, progress_polls=2)
    with fal_server.client() as client:
        yield client


def run_request(client: httpx.Client, app_id: str, body: dict[str, Any]) -> tuple[dict, httpx.Response]:
    submitted = client.post(f"/{app_id}", json=body)
    assert submitted.status_code == 200, submitted.text
    envelope = submitted.json()
    wait_completed(client, envelope["status_url"], timeout=30)
    status = client.get(envelope["status_url"], params={"logs": "1"}).json()
    return status, client.get(envelope["response_url"])


def test_e2e_text_to_image_rehosted(fal_server: KontextdServer, fake: FakeFal, api: httpx.Client) -> None:
    status, result = run_request(api, TEXT_TO_IMAGE, {"prompt": "a lighthouse", "output_format": "png"})

    assert result.status_code == 200, result.text
    assert result.headers["x-kontextd-backend"] == "fal"
    assert result.headers["x-kontextd-model"] == TEXT_TO_IMAGE
    request_id = next(iter(fake.requests))
    [image] = result.json()["images"]
    assert image["url"].startswith(fal_server.base_url + "/")
    assert api.get(image["url"]).content == output_bytes(request_id, 0, "png")
    messages = [line["message"] for line in status["logs"]]
    assert "fal: upstream line 1" in messages and "fal: upstream line 2" in messages
    assert "fal queue position 1" in messages
    assert KEY not in json.dumps(status) + result.text


def test_e2e_edit_with_loopback_image(
    fal_server: KontextdServer, fake: FakeFal, api: httpx.Client, image_host: LoopbackServer
) -> None:
    fake.behaviour = Behaviour(queued_polls=0, progress_polls=1, expiring_outputs=True)
    body = {"prompt": "make it blue", "image_url": f"{image_host.url}/wide.png", "output_format": "jpeg"}
    _, result = run_request(api, MAX_EDIT, body)

    assert result.status_code == 200, result.text
    assert result.headers["x-kontextd-model"] == MAX_EDIT
    submitted = fake.submitted()[0].body
    assert submitted["image_url"].startswith("data:image/png;base64,")  # loopback: fal could not fetch it
    request_id = next(iter(fake.requests))
    [image] = result.json()["images"]
    assert api.get(image["url"]).content == output_bytes(request_id, 0, "jpeg")  # ours, though fal's expired
    assert fake.file_downloads[f"{request_id}/0"] == 1


def test_e2e_upstream_error_ends_completed_with_error(fake: FakeFal, api: httpx.Client) -> None:
    fake.behaviour = Behaviour(queued_polls=0, progress_polls=1, result_error=(422, GUIDANCE_422, None))
    status, result = run_request(
        api, PRO_EDIT, {"prompt": "x", "image_url": "https://images.example.com/a.png"}
    )

    assert status["status"] == "COMPLETED"
    assert "Input should be less than or equal to 20" in status["error"]
    assert result.status_code == 422
    assert result.headers["x-fal-error-type"] == "less_than_equal"
    assert "guidance_scale: Input should be less than or equal to 20" in result.json()["detail"][0]["msg"]
    assert fake.submitted()[0].body["image_url"] == "https://images.example.com/a.png"


def test_e2e_endpoints_list_fal(api: httpx.Client) -> None:
    listed = {entry["app_id"]: entry for entry in api.get("/v1/endpoints").json()["endpoints"]}
    for app_id in APP_IDS:
        assert (listed[app_id]["backend"], listed[app_id]["model"]) == ("fal", app_id)
        assert listed[app_id]["status"] == "ready"


def test_plain_fal_key_routes_nothing_to_fal(tmp_path: Path) -> None:
    """FAL_KEY is the client's variable: without a config asking for fal, every endpoint stays local."""
    server = KontextdServer(tmp_path, args=["--workers", "0"], env={"FAL_KEY": KEY}).start()
    try:
        with server.client() as client:
            listed = client.get("/v1/endpoints").json()["endpoints"]
    finally:
        server.stop()
    assert {entry["backend"] for entry in listed} == {"local"}
    assert KEY not in "".join(server.output)
