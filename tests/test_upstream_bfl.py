"""The bfl upstream backend against a fake Black Forest Labs API on loopback.

First BflBackend called directly (field mapping, polling, retries, limits, moderation, failures, timeouts,
cancellation), then end to end through a real kontextd process routed to the fake. Only loopback addresses
are ever contacted; the one public-looking URL below is checked as a string, never fetched.
"""

import base64
import dataclasses
import io
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, LoopbackServer, WebhookReceiver, png_bytes, wait_completed, wait_for
from fake_bfl import FakeBfl, seed_colour
from PIL import Image

from kontextd.backends.base import (
    EncodedImage,
    Generated,
    GenerationCancelled,
    GenerationJob,
    GenerationRefused,
    ImageInput,
)
from kontextd.backends.upstream import upstream_can_fetch
from kontextd.backends.upstream.bfl import BflBackend, Timing, bfl_input
from kontextd.backends.upstream.common import image_reference
from kontextd.routing import Secret, UpstreamConfig

KEY = "bfl-test-key-0123456789"
OWN = "http://127.0.0.1:9"  # our own server's base URL in the unit tests: never contacted
FAST = Timing(
    poll_first=0.02, poll_growth=1.5, poll_max=0.1, retry_base=0.02, retry_cap=0.1, retries=3, downloads=3
)

TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
PRO_EDIT = "fal-ai/flux-pro/kontext"
MAX_IDS = ("fal-ai/flux-pro/kontext/max/text-to-image", "fal-ai/flux-pro/kontext/max")
DEV = "fal-ai/flux-kontext/dev"
MULTI = "fal-ai/flux-pro/kontext/multi"


class RecordingProgress:
    """Keeps log lines and checkpoints; a later run given the same one resumes from its checkpoints, as a
    re-run of the request does. `stopping` cancels as a shutdown does (handing the request back)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.cancel = threading.Event()
        self.stopping = threading.Event()
        self.kept: dict[str, str] = {}
        self._lock = threading.Lock()

    def step(self, step: int, total: int) -> None:
        pass

    def log(self, message: str) -> None:
        with self._lock:
            self.lines.append(message)

    def cancelled(self) -> bool:
        return self.cancel.is_set() or self.stopping.is_set()

    def handing_back(self) -> bool:
        return self.stopping.is_set()

    def checkpoint(self, name: str, value: str) -> None:
        with self._lock:
            self.kept[name] = value

    def resumed(self, name: str) -> str | None:
        with self._lock:
            return self.kept.get(name)

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeBfl]:
    fake = FakeBfl(KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(fake_server: FakeBfl) -> FakeBfl:
    fake_server.reset()
    return fake_server


def config(fake: FakeBfl, **changes: Any) -> UpstreamConfig:
    base = UpstreamConfig(
        kind="bfl",
        base_url=fake.url,
        key=Secret(KEY, "test"),
        max_active=24,
        max_active_per_model={"flux-kontext-max": 6},
        request_timeout=5.0,
        task_timeout=20.0,
        workers=4,
    )
    return dataclasses.replace(base, **changes)


def task_threads() -> list[threading.Thread]:
    """The threads BflBackend runs its tasks on (its executor names them)."""
    return [thread for thread in threading.enumerate() if thread.name.startswith("bfl-task")]


@pytest.fixture
def make_backend(fake: FakeBfl) -> Iterator[Callable[..., BflBackend]]:
    made: list[BflBackend] = []

    def make(**changes: Any) -> BflBackend:
        made.append(BflBackend(config(fake, **changes), OWN, timing=FAST))
        return made[-1]

    yield make
    for backend in made:
        backend.close()
    # Tasks abandoned by a failure stop at their next wait: none may reach the fake during the next test.
    for thread in task_threads():
        thread.join(30)
    assert not task_threads(), "a BFL task thread outlived its test"


@pytest.fixture
def backend(make_backend: Callable[..., BflBackend]) -> BflBackend:
    return make_backend()


def job(**changes: Any) -> GenerationJob:
    base = GenerationJob(
        prompt="a red fox in the snow",
        images=(),
        aspect_ratio="1:1",
        num_images=1,
        seed=7,
        guidance_scale=3.5,
        num_inference_steps=28,
        output_format="png",
        safety_tolerance=2,
        enhance_prompt=False,
        model="flux-kontext-pro",
    )
    return dataclasses.replace(base, **changes)


def data_uri_input(width: int = 320, height: int = 180) -> ImageInput:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(width, height)).decode()
    return ImageInput(uri, lambda url: Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def refused(backend: BflBackend, generation: GenerationJob, progress: RecordingProgress) -> GenerationRefused:
    with pytest.raises(GenerationRefused) as caught:
        backend.generate(generation, progress)
    assert KEY not in caught.value.message and KEY not in progress.text()
    return caught.value


def colour_of(image: EncodedImage) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(image.data)) as decoded:
        return decoded.convert("RGB").getpixel((0, 0))


# -- field mapping -----------------------------------------------------------------------------------------


def test_text_to_image_maps_every_field(fake: FakeBfl, backend: BflBackend) -> None:
    progress = RecordingProgress()
    generation = job(aspect_ratio="16:9", seed=42, enhance_prompt=True, safety_tolerance=5)
    generated = backend.generate(generation, progress)

    [submit] = fake.submits()
    assert submit.path == "/v1/flux-kontext-pro" and submit.headers["x-key"] == KEY
    assert submit.body == {
        "prompt": "a red fox in the snow",
        "seed": 42,
        "aspect_ratio": "16:9",
        "output_format": "png",
        "prompt_upsampling": True,
        "safety_tolerance": 5,  # an integer, not fal's string, and not capped without an input image
    }
    [task] = fake.accepted()
    [image] = generated.images
    assert isinstance(image, EncodedImage)
    assert (image.width, image.height, image.content_type) == (1392, 752, "image/png")
    assert image.data == fake.sample_bytes(task)
    assert generated.has_nsfw_concepts == [False]
    assert generated.served_by == "flux-kontext-pro" and generated.inference_seconds > 0
    assert all("x-key" not in download.headers for download in fake.downloads())  # the key stays with BFL
    assert f"BFL task 1/1 submitted (id {task.id})" in progress.lines
    assert any(re.fullmatch(r"BFL task 1/1: Pending \d+%", line) for line in progress.lines)


def test_jpeg_and_the_max_model(fake: FakeBfl, backend: BflBackend) -> None:
    generated = backend.generate(job(output_format="jpeg", model="flux-kontext-max"), RecordingProgress())
    [submit] = fake.submits()
    assert submit.path == "/v1/flux-kontext-max" and submit.body["output_format"] == "jpeg"
    assert generated.images[0].content_type == "image/jpeg" and generated.served_by == "flux-kontext-max"


def test_an_edit_sends_a_data_uri_inline_caps_safety_and_follows_the_input(
    fake: FakeBfl, backend: BflBackend
) -> None:
    progress = RecordingProgress()
    edit = job(images=(data_uri_input(),), aspect_ratio=None, safety_tolerance=5)
    generated = backend.generate(edit, progress)

    [submit] = fake.submits()
    assert "aspect_ratio" not in submit.body  # BFL follows the input image
    assert submit.body["safety_tolerance"] == 2
    assert "safety_tolerance 5 capped at 2" in progress.text()
    sent = Image.open(io.BytesIO(base64.b64decode(submit.body["input_image"], validate=True)))
    assert (sent.format, sent.size) == ("PNG", (320, 180))
    assert (generated.images[0].width, generated.images[0].height) == (1392, 752)  # nearest to 16:9


def test_an_edit_of_a_loopback_url_is_sent_inline(
    fake: FakeBfl, backend: BflBackend, image_host: LoopbackServer
) -> None:
    url = f"{image_host.url}/tall.png"
    image = ImageInput(url, lambda u: Image.open(io.BytesIO(httpx.get(u).content)).convert("RGB"))
    backend.generate(job(images=(image,), safety_tolerance=1), RecordingProgress())
    [submit] = fake.submits()
    assert submit.body["input_image"] != url and submit.body["safety_tolerance"] == 1
    sent = Image.open(io.BytesIO(base64.b64decode(submit.body["input_image"], validate=True)))
    assert sent.size == (90, 160)


def test_a_public_url_is_passed_through_and_private_ones_are_not() -> None:
    """String checks only: nothing here is fetched."""

    def never(url: str) -> Image.Image:
        raise AssertionError("a URL BFL can fetch must not be downloaded here")

    public = "https://images.example.com/cat.png"
    assert image_reference(ImageInput(public, never), OWN) == (public, None)
    assert upstream_can_fetch(public, OWN)
    for private in (f"{OWN}/files/a/0.png", "http://127.0.0.1:8000/x.png", "http://10.1.2.3/x.png"):
        assert not upstream_can_fetch(private, OWN)
    assert not upstream_can_fetch("data:image/png;base64,AAAA", OWN)

    body = bfl_input(job(images=(ImageInput(public, never),)), OWN, RecordingProgress())
    assert body["input_image"] == public


def test_a_multi_image_edit_sends_each_image_under_bfls_names() -> None:
    def never(url: str) -> Image.Image:
        raise AssertionError("a URL BFL can fetch must not be downloaded here")

    public = "https://images.example.com/cat.png"  # text only: nothing connects to it
    images = (ImageInput(public, never), data_uri_input(90, 160), ImageInput(public + "?2", never))
    body = bfl_input(job(images=images, safety_tolerance=4), OWN, RecordingProgress())
    assert (body["input_image"], body["input_image_3"]) == (public, public + "?2")
    sent = Image.open(io.BytesIO(base64.b64decode(body["input_image_2"], validate=True)))
    assert sent.size == (90, 160)
    assert "input_image_4" not in body
    assert body["safety_tolerance"] == 2  # an edit, however many images


def test_each_image_is_its_own_task_with_consecutive_seeds_run_at_once(
    fake: FakeBfl, backend: BflBackend
) -> None:
    fake.hold_until_accepted = 4  # no task is Ready before all four were submitted: run one by one, none is
    progress = RecordingProgress()
    generated = backend.generate(job(num_images=4, seed=10), progress)

    assert sorted(submit.body["seed"] for submit in fake.submits()) == [10, 11, 12, 13]
    assert fake.max_seen_total == 4  # all four active at BFL at the same time
    assert [colour_of(image) for image in generated.images] == [seed_colour(s) for s in range(10, 14)]
    assert generated.has_nsfw_concepts == [False] * 4
    for index in range(1, 5):
        assert any(line.startswith(f"BFL task {index}/4 submitted") for line in progress.lines)


# -- the conversation with BFL -----------------------------------------------------------------------------


def test_polls_exactly_the_returned_url_even_on_another_host(fake: FakeBfl, backend: BflBackend) -> None:
    fake.regional = True
    fake.pending_polls = 2
    generated = backend.generate(job(num_images=2), RecordingProgress())
    assert len(generated.images) == 2
    polls = fake.polls()
    assert polls and all(poll.host == "regional" for poll in polls)
    assert all(poll.headers["x-key"] == KEY for poll in polls)


def test_a_burst_of_429_is_retried(fake: FakeBfl, backend: BflBackend) -> None:
    fake.busy_submits = 3
    progress = RecordingProgress()
    generated = backend.generate(job(), progress)
    assert len(generated.images) == 1 and len(fake.submits()) == 4
    assert "HTTP 429" in progress.text()


def test_retry_after_is_honoured(fake: FakeBfl, backend: BflBackend) -> None:
    fake.busy_submits, fake.retry_after = 1, "0.4"
    backend.generate(job(), RecordingProgress())
    first, second = fake.submits()
    assert second.at - first.at >= 0.4


def generate_together(backend: BflBackend, jobs: list[GenerationJob]) -> list[Generated]:
    results: list[Any] = [None] * len(jobs)

    def run(index: int) -> None:
        results[index] = backend.generate(jobs[index], RecordingProgress())

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(isinstance(result, Generated) for result in results)
    return results


def test_active_tasks_never_exceed_the_configured_limit(
    fake: FakeBfl, make_backend: Callable[..., BflBackend]
) -> None:
    fake.max_active, fake.pending_polls = 2, 2  # the fake answers 429 beyond 2
    backend = make_backend(max_active=2)
    generate_together(backend, [job(num_images=3, seed=0), job(num_images=3, seed=100)])
    assert len(fake.accepted()) == 6
    assert fake.max_seen_total == 2 and fake.busy_answers == 0


def test_the_max_limit_is_separate(fake: FakeBfl, make_backend: Callable[..., BflBackend]) -> None:
    fake.max_active_per_model, fake.pending_polls = {"flux-kontext-max": 1}, 5
    backend = make_backend(max_active=4, max_active_per_model={"flux-kontext-max": 1})
    generate_together(
        backend, [job(num_images=3, model="flux-kontext-max"), job(num_images=3, model="flux-kontext-pro")]
    )
    assert fake.max_seen["flux-kontext-max"] == 1  # [max] one at a time ...
    assert fake.max_seen["flux-kontext-pro"] >= 2  # ... while [pro] was not held back by it
    assert fake.max_seen_total <= 4 and fake.busy_answers == 0


def test_out_of_credits_names_credits_and_not_the_key(fake: FakeBfl, backend: BflBackend) -> None:
    fake.out_of_credits = True
    error = refused(backend, job(num_images=2), RecordingProgress())
    assert (error.status_code, error.error_type) == (402, "upstream_out_of_credits")
    assert "credits" in error.message and "HTTP 402" in error.message
    seeds = [submit.body["seed"] for submit in fake.submits()]
    assert 1 <= len(seeds) <= 2 and len(set(seeds)) == len(seeds)  # each task sent once: not retried


def test_a_422_from_bfl_carries_its_message(fake: FakeBfl, backend: BflBackend) -> None:
    error = refused(backend, job(aspect_ratio="5:4"), RecordingProgress())  # not one of BFL's ratios
    assert (error.status_code, error.error_type) == (422, "upstream_invalid_input")
    assert "aspect_ratio" in error.message and "Input should be one of" in error.message


def test_a_rejected_key_is_said_plainly(fake: FakeBfl) -> None:
    wrong = "wrong-key-abcdef"
    backend = BflBackend(dataclasses.replace(config(fake), key=Secret(wrong, "test")), OWN, timing=FAST)
    try:
        error = refused(backend, job(), RecordingProgress())
    finally:
        backend.close()
    assert error.status_code == 502 and error.error_type == "upstream_auth_error"
    assert "rejected the configured API key (HTTP 401)" in error.message and wrong not in error.message


# -- moderation and failures -------------------------------------------------------------------------------


def test_one_moderated_image_in_four_is_flagged_and_blacked_out(fake: FakeBfl, backend: BflBackend) -> None:
    fake.final_status = lambda seed: "Content Moderated" if seed % 4 == 3 else "Ready"
    generated = backend.generate(job(num_images=4, seed=0, aspect_ratio="3:2"), RecordingProgress())
    assert generated.has_nsfw_concepts == [False, False, False, True]
    assert [colour_of(image) for image in generated.images[:3]] == [seed_colour(s) for s in range(3)]
    placeholder = generated.images[3]
    assert isinstance(placeholder, EncodedImage) and placeholder.content_type == "image/png"
    assert (placeholder.width, placeholder.height) == (1248, 832) and colour_of(placeholder) == (0, 0, 0)


@pytest.mark.parametrize("status", ["Content Moderated", "Request Moderated"])
def test_all_moderated_is_a_content_policy_violation(fake: FakeBfl, backend: BflBackend, status: str) -> None:
    fake.final_status = lambda seed: status
    error = refused(backend, job(num_images=2), RecordingProgress())
    assert (error.status_code, error.error_type) == (422, "content_policy_violation")
    assert status in error.message


@pytest.mark.parametrize("status", ["Error", "Task not found"])
def test_error_statuses_end_the_request(fake: FakeBfl, backend: BflBackend, status: str) -> None:
    fake.final_status = lambda seed: status
    error = refused(backend, job(), RecordingProgress())
    assert (error.status_code, error.error_type) == (502, "upstream_error")
    assert f"status {status!r}" in error.message


def test_server_errors_are_retried(fake: FakeBfl, backend: BflBackend) -> None:
    fake.submit_errors, fake.poll_errors = 2, 2
    progress = RecordingProgress()
    generated = backend.generate(job(), progress)
    assert len(generated.images) == 1
    assert "HTTP 500" in progress.text() and "HTTP 503" in progress.text()


def test_persistent_server_errors_give_up(fake: FakeBfl, backend: BflBackend) -> None:
    fake.submit_errors = 100
    error = refused(backend, job(), RecordingProgress())
    assert (error.status_code, error.error_type) == (502, "upstream_error")
    assert len(fake.submits()) == 4 and "HTTP 500" in error.message  # retries=3: a try, 3 more, stop


def test_an_expired_sample_url_is_polled_again(fake: FakeBfl, backend: BflBackend) -> None:
    fake.expired_samples = 1
    progress = RecordingProgress()
    generated = backend.generate(job(), progress)
    [task] = fake.accepted()
    assert generated.images[0].data == fake.sample_bytes(task)
    assert len(fake.downloads()) == 2 and len(task.tokens) == 2
    assert "expired?" in progress.text()


def test_a_sample_that_stays_expired_fails_after_bounded_attempts(fake: FakeBfl, backend: BflBackend) -> None:
    fake.expired_samples = 100
    error = refused(backend, job(), RecordingProgress())
    assert error.error_type == "upstream_error" and "could not download" in error.message
    assert len(fake.downloads()) == 3  # downloads=3: exactly three tries, then stop


# -- time limits and cancellation ------------------------------------------------------------------------


def run_in_thread(backend: BflBackend, generation: GenerationJob, progress: RecordingProgress):
    """Start generate on a thread of its own; the thread and a list that receives what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            backend.generate(generation, progress)
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def test_a_slow_poll_is_bounded_by_the_request_timeout(
    fake: FakeBfl, make_backend: Callable[..., BflBackend]
) -> None:
    fake.poll_delay, fake.pending_polls = 2.0, 0  # each poll would be answered (Ready) after 2 s
    backend = make_backend(request_timeout=0.2, task_timeout=10.0)
    error = refused(backend, job(), RecordingProgress())
    assert error.status_code == 502 and "ReadTimeout" in error.message
    polls = fake.polls()
    assert len(polls) == 4  # retries=3: the poll and three more, each given up on, then stop
    # Each poll was sent before the last one could have been answered: none was waited for to the end.
    assert all(later.at - earlier.at < fake.poll_delay for earlier, later in itertools.pairwise(polls))


def test_a_task_that_never_finishes_times_out(fake: FakeBfl, make_backend: Callable[..., BflBackend]) -> None:
    fake.pending_polls = 10**6
    backend = make_backend(task_timeout=0.6)
    progress = RecordingProgress()
    started = time.monotonic()
    thread, raised = run_in_thread(backend, job(), progress)
    thread.join(30)  # the bound is the mechanism's: without the deadline it would poll for ever
    assert not thread.is_alive(), "the task timeout did not end the task"
    # Not given up before its time either: at most one poll interval early (a wait that would end past
    # the deadline is not begun).
    assert time.monotonic() - started >= 0.6 - FAST.poll_max
    [error] = raised
    assert isinstance(error, GenerationRefused)
    assert (error.status_code, error.error_type) == (504, "upstream_timeout")
    assert "0.6 s" in error.message and KEY not in error.message
    [submit] = fake.submits()
    assert all(poll.at > submit.at for poll in fake.polls()) and len(fake.polls()) >= 2


def test_cancelling_stops_every_task_polling(fake: FakeBfl, backend: BflBackend) -> None:
    fake.pending_polls = 10**6
    progress = RecordingProgress()
    thread, raised = run_in_thread(backend, job(num_images=3), progress)
    wait_for(
        lambda: len(tasks := fake.accepted()) == 3 and all(len(fake.polls(task.id)) >= 2 for task in tasks),
        timeout=10,
    )
    running = task_threads()
    assert len(running) == 3  # one thread per task, every one of them polling now
    progress.cancel.set()
    thread.join(10)  # the task timeout is 20 s: only the cancel can end it sooner
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], GenerationCancelled)
    # The barrier: every task's thread has returned, so no poll can follow, and every poll it sent has
    # been recorded (the fake records a request before it answers it). A task that went on polling after
    # the cancel would keep its thread, polling every 0.1 s until the 20 s task timeout.
    for task_thread in running:
        task_thread.join(10)
        assert not task_thread.is_alive(), "a task kept running after the request was cancelled"
    seen = len(fake.polls())
    assert seen >= 6 and not task_threads()


def test_a_re_run_resumes_the_tasks_it_had_submitted(fake: FakeBfl, backend: BflBackend) -> None:
    fake.pending_polls = 10**6
    progress = RecordingProgress()
    thread, raised = run_in_thread(backend, job(num_images=2, seed=0), progress)
    wait_for(lambda: len(progress.kept) == 2, timeout=10)  # both accepted, both polling URLs kept
    progress.stopping.set()  # the server stops: the request is handed back
    thread.join(10)
    assert not thread.is_alive() and isinstance(raised[0], GenerationCancelled)
    assert "the BFL tasks go on, for the re-run to resume" in progress.text()
    first = sorted(fake.accepted(), key=lambda task: task.seed)  # submitted at once, in either order
    assert [task.seed for task in first] == [0, 1]
    assert sorted(progress.kept.values()) == sorted(f"{fake.url}/v1/get_result?id={t.id}" for t in first)
    for thread_left in task_threads():
        thread_left.join(10)

    fake.pending_polls = 0
    progress.stopping.clear()
    generated = backend.generate(job(num_images=2, seed=0), progress)  # the re-run, with the same checkpoints
    assert len(fake.submits()) == 2  # nothing submitted again: BFL bills each task once
    assert [image.data for image in generated.images] == [fake.sample_bytes(task) for task in first]
    assert progress.text().count("resuming the task an earlier run submitted") == 2


def test_a_task_bfl_no_longer_knows_is_submitted_again(fake: FakeBfl, backend: BflBackend) -> None:
    progress = RecordingProgress()
    progress.kept["bfl task 1"] = f"{fake.url}/v1/get_result?id=gone"  # an earlier run's, expired at BFL
    generated = backend.generate(job(seed=4), progress)
    [task] = fake.accepted()
    assert task.seed == 4 and len(fake.submits()) == 1 and len(fake.polls("gone")) == 1
    assert generated.images[0].data == fake.sample_bytes(task)
    assert "gone at BFL; submitting it again" in progress.text()
    assert progress.kept["bfl task 1"] == f"{fake.url}/v1/get_result?id={task.id}"


# -- end to end through a kontextd process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bfl_server(fake_server: FakeBfl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    data_dir = tmp_path_factory.mktemp("kontextd-bfl")
    settings = data_dir / "kontextd.toml"
    settings.write_text("[bfl]\nrequest_timeout = 5\ntask_timeout = 30\nmax_active = 8\nworkers = 4\n")
    server = KontextdServer(
        data_dir,
        args=["--config", str(settings), "--webhook-backoff", "0.3,0.3,0.3"],
        env={"BFL_API_KEY": KEY, "KONTEXTD_BFL_BASE_URL": fake_server.url},
    ).start()
    yield server
    server.stop()


@pytest.fixture
def api(bfl_server: KontextdServer, fake: FakeBfl) -> Iterator[httpx.Client]:
    with bfl_server.client(event_hooks={"response": [_no_key_in]}) as client:
        yield client


def _no_key_in(response: httpx.Response) -> None:
    response.read()
    assert KEY not in response.text and KEY not in str(response.headers)


def submit(api: httpx.Client, app_id: str, body: dict[str, Any], **params: str) -> dict[str, Any]:
    response = api.post(f"/{app_id}", json=body, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def data_uri(width: int = 320, height: int = 180) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height)).decode()


def test_e2e_text_to_image_is_rehosted_on_our_server(
    api: httpx.Client, fake: FakeBfl, bfl_server: KontextdServer
) -> None:
    envelope = submit(api, TEXT_TO_IMAGE, {"prompt": "a lighthouse", "seed": 5, "aspect_ratio": "4:3"})
    status = wait_completed(api, envelope["status_url"], timeout=30)
    assert "error" not in status or status["error"] is None, status
    result = api.get(envelope["response_url"])
    assert result.status_code == 200
    assert result.headers["x-kontextd-backend"] == "bfl"
    assert result.headers["x-kontextd-model"] == "flux-kontext-pro"
    [task] = fake.accepted()
    assert (
        task.body["seed"] == 5 and task.body["aspect_ratio"] == "4:3" and task.body["output_format"] == "jpeg"
    )
    [image] = result.json()["images"]
    assert image["url"].startswith(f"{bfl_server.base_url}/files/")
    assert (image["width"], image["height"], image["content_type"]) == (1184, 880, "image/jpeg")
    assert api.get(image["url"]).content == fake.sample_bytes(task)
    assert KEY not in fake.all_text()  # the key went only in x-key headers
    assert all(r.headers.get("x-key") == KEY for r in fake.requests if r.path.startswith("/v1/"))


def test_e2e_seed_zero_is_sent_as_zero(api: httpx.Client, fake: FakeBfl) -> None:
    envelope = submit(api, TEXT_TO_IMAGE, {"prompt": "zero", "seed": 0, "num_images": 2})
    wait_completed(api, envelope["status_url"], timeout=30)
    assert api.get(envelope["response_url"]).json()["seed"] == 0
    assert sorted(task.body["seed"] for task in fake.accepted()) == [0, 1]  # 0 is a seed, not "none"


def test_e2e_an_edit_sends_the_data_uri_inline(api: httpx.Client, fake: FakeBfl) -> None:
    body = {"prompt": "make it night", "image_url": data_uri(), "safety_tolerance": "5", "num_images": 2}
    envelope = submit(api, PRO_EDIT, body)
    wait_completed(api, envelope["status_url"], timeout=30)
    result = api.get(envelope["response_url"])
    assert result.status_code == 200, result.text
    assert (result.headers["x-kontextd-backend"], result.headers["x-kontextd-model"]) == (
        "bfl",
        "flux-kontext-pro",
    )
    tasks = fake.accepted()
    assert len(tasks) == 2 and len(result.json()["images"]) == 2
    for task in tasks:
        assert "aspect_ratio" not in task.body and task.body["safety_tolerance"] == 2
        sent = Image.open(io.BytesIO(base64.b64decode(task.body["input_image"])))
        assert sent.size == (320, 180)


def test_e2e_a_multi_image_edit_reaches_bfl_with_every_image(api: httpx.Client, fake: FakeBfl) -> None:
    body = {"prompt": "put them together", "image_urls": [data_uri(90, 160), data_uri(320, 180)]}
    envelope = submit(api, MULTI, body)
    wait_completed(api, envelope["status_url"], timeout=30)
    result = api.get(envelope["response_url"])
    assert result.status_code == 200, result.text
    [task] = fake.accepted()
    sizes = [
        Image.open(io.BytesIO(base64.b64decode(task.body[name]))).size
        for name in ("input_image", "input_image_2")
    ]
    assert sizes == [(90, 160), (320, 180)]  # in the client's order
    assert (result.json()["images"][0]["width"], result.json()["images"][0]["height"]) == (752, 1392)


def test_e2e_dev_stays_on_the_local_model(api: httpx.Client, fake: FakeBfl) -> None:
    body = {"prompt": "a hat", "image_url": data_uri(64, 64), "num_inference_steps": 10}
    envelope = submit(api, DEV, body)
    wait_completed(api, envelope["status_url"], timeout=60)
    result = api.get(envelope["response_url"])
    assert result.status_code == 200 and result.headers["x-kontextd-backend"] == "local"
    assert fake.requests == []


def test_e2e_endpoints_list_pro_and_max_on_bfl(api: httpx.Client) -> None:
    listed = {entry["app_id"]: entry for entry in api.get("/v1/endpoints").json()["endpoints"]}
    for app_id in (TEXT_TO_IMAGE, PRO_EDIT):
        assert (listed[app_id]["backend"], listed[app_id]["model"]) == ("bfl", "flux-kontext-pro")
    for app_id in MAX_IDS:
        assert (listed[app_id]["backend"], listed[app_id]["model"]) == ("bfl", "flux-kontext-max")
    assert all(listed[app_id]["status"] == "ready" for app_id in (TEXT_TO_IMAGE, PRO_EDIT, *MAX_IDS))
    assert listed[DEV]["backend"] == "local"


def test_e2e_out_of_credits_completes_with_an_error_and_a_webhook(
    api: httpx.Client, fake: FakeBfl, webhook_receiver: WebhookReceiver
) -> None:
    fake.out_of_credits = True
    envelope = submit(api, TEXT_TO_IMAGE, {"prompt": "no money"}, fal_webhook=f"{webhook_receiver.url}/hook")
    status = wait_completed(api, envelope["status_url"], timeout=30)
    assert status["error_type"] == "upstream_out_of_credits" and "credits" in status["error"]
    result = api.get(envelope["response_url"])
    assert result.status_code == 402 and "credits" in result.json()["detail"][0]["msg"]

    [hook] = wait_for(lambda: webhook_receiver.bodies("/hook"), timeout=15)
    assert hook["request_id"] == envelope["request_id"] and hook["status"] == "ERROR"
    assert "credits" in hook["payload"]["detail"][0]["msg"]
    assert all(KEY.encode() not in body for _, _, body in webhook_receiver.received)


def test_e2e_cancelling_a_running_request_stops_upstream_polls(api: httpx.Client, fake: FakeBfl) -> None:
    fake.pending_polls_by_seed = {1: 10**6, 2: 3}  # seed 1 never finishes; seed 2 after four polls
    envelope = submit(api, TEXT_TO_IMAGE, {"prompt": "forever", "seed": 1})
    wait_for(lambda: fake.polls(), timeout=15)
    [cancelled] = fake.accepted()
    assert api.put(envelope["cancel_url"]).status_code == 202
    status = wait_completed(api, envelope["status_url"], timeout=15)
    assert status["error_type"] == "client_cancelled"

    # The barrier: a later task through the same server. The server polls every task on the same schedule
    # (0.5 s, growing 1.5x, at most 3 s apart), so from the later task's first poll to its fourth
    # (0.75 + 1.125 + 1.69 s) any poll loop still alive would have polled at least once.
    later = submit(api, TEXT_TO_IMAGE, {"prompt": "later", "seed": 2})
    later_status = wait_completed(api, later["status_url"], timeout=30)
    assert "error" not in later_status, later_status
    [_, second] = fake.accepted()
    later_polls = fake.polls(second.id)
    assert len(later_polls) == 4
    stray = [poll.at - later_polls[0].at for poll in fake.polls(cancelled.id) if poll.at > later_polls[0].at]
    assert stray == [], f"the cancelled task was still polled {stray} s after the later task's first poll"


def test_e2e_a_request_interrupted_twice_is_submitted_to_bfl_once(fake: FakeBfl, tmp_path: Path) -> None:
    """A graceful stop, then a crash, while BFL works on the request's two tasks: each re-run polls the
    tasks the first run submitted, so BFL is asked (and bills) for two images, not six."""
    fake.pending_polls = 10**6  # BFL keeps both tasks pending until the test lets them finish
    settings = tmp_path / "kontextd.toml"
    settings.write_text("[bfl]\nrequest_timeout = 5\ntask_timeout = 60\nworkers = 1\n")
    server = KontextdServer(
        tmp_path / "data",
        args=["--config", str(settings)],
        env={"BFL_API_KEY": KEY, "KONTEXTD_BFL_BASE_URL": fake.url},
    ).start()
    try:
        with server.client() as api:
            envelope = submit(api, TEXT_TO_IMAGE, {"prompt": "twice stopped", "seed": 0, "num_images": 2})

            def logged(text: str) -> int:
                logs = api.get(envelope["status_url"], params={"logs": 1}).json()["logs"] or []
                return sum(text in line["message"] for line in logs)

            # The barrier: a task's "submitted" line is written after its polling URL is kept.
            wait_for(lambda: logged("submitted (id") == 2, timeout=20)
        server.stop()  # SIGTERM: the request is handed back
        server.start()
        with server.client() as api:
            wait_for(lambda: logged("resuming the task an earlier run submitted") == 2, timeout=20)
        server.kill9()  # no shutdown code runs: found running at the next start-up
        server.start()
        with server.client() as api:
            wait_for(lambda: logged("resuming the task an earlier run submitted") == 4, timeout=20)
            fake.pending_polls = 0
            status = wait_completed(api, envelope["status_url"], timeout=30)
            assert status.get("error") is None, status
            assert len(fake.submits()) == 2
            tasks = sorted(fake.accepted(), key=lambda task: task.seed)
            assert [task.seed for task in tasks] == [0, 1]
            images = api.get(envelope["response_url"]).json()["images"]
            assert [api.get(image["url"]).content for image in images] == [
                fake.sample_bytes(task) for task in tasks
            ]
    finally:
        server.stop()


def test_e2e_the_key_never_appears_in_the_server_output(
    api: httpx.Client, bfl_server: KontextdServer, fake: FakeBfl
) -> None:
    """Its own requests, through every path that logs (retries of a 429 and a 503, a success, a 402), so it
    does not depend on what other tests ran before it."""
    fake.busy_submits, fake.retry_after, fake.poll_errors = 1, "0", 1
    retried = submit(api, TEXT_TO_IMAGE, {"prompt": "retried", "seed": 0})
    assert "error" not in wait_completed(api, retried["status_url"], timeout=30)
    assert fake.busy_answers == 1 and fake.poll_errors == 0  # both misbehaviours were met
    fake.out_of_credits = True
    broke = submit(api, TEXT_TO_IMAGE, {"prompt": "no money"})
    assert wait_completed(api, broke["status_url"], timeout=30)["error_type"] == "upstream_out_of_credits"
    # The access log line of this last call comes after every line the requests above made.
    marker = f"{broke['request_id']}/status HTTP/1.1"
    wait_for(lambda: any(marker in line for line in bfl_server.output), timeout=15)
    output = "".join(bfl_server.output)
    assert "bfl retry" in output and "HTTP 503" in output  # the retries were logged, naming the upstream ...
    assert KEY not in output  # ... but never its key
