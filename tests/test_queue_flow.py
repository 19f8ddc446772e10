"""The fal queue protocol end to end over HTTP: submit, status, stream, result, cancel, run, webhooks.

All tests share the session server (one worker, tiny backend paced at 0.02 s a step). Each test leaves the
queue empty behind it (the `fal` fixture cancels whatever is unfinished), so a test that needs a known
queue starts a long "blocker" request and waits until it runs: from then on only its own requests queue.
"""

import base64
import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, LoopbackServer, WebhookReceiver, png_bytes, wait_completed, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PIL import Image

TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
PRO_EDIT = "fal-ai/flux-pro/kontext"
MAX_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/max/text-to-image"
MAX_EDIT = "fal-ai/flux-pro/kontext/max"
MULTI = "fal-ai/flux-pro/kontext/multi"
MAX_MULTI = "fal-ai/flux-pro/kontext/max/multi"
DEV = "fal-ai/flux-kontext/dev"

ENVELOPE_KEYS = {
    "status",
    "request_id",
    "gateway_request_id",
    "response_url",
    "status_url",
    "cancel_url",
    "queue_position",
    "logs",
    "metrics",
}
OUTPUT_KEYS = {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
LOG_LEVELS = {"STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"}
STEP_LINE = re.compile(r"step (\d+)/(\d+)")

# The Kontext table entry for each aspect ratio, divided by 8 and rounded to multiples of 16 (tiny backend).
TINY_SIZES = {
    "21:9": (192, 80),  # (1568, 672)
    "16:9": (176, 96),  # (1392, 752)
    "4:3": (144, 112),  # (1184, 880)
    "3:2": (160, 96),  # (1248, 832): 104/16 = 6.5 rounds to 6
    "1:1": (128, 128),  # (1024, 1024)
    "2:3": (96, 160),  # (832, 1248)
    "3:4": (112, 144),  # (880, 1184)
    "9:16": (96, 176),  # (752, 1392)
    "9:21": (80, 192),  # (672, 1568)
}


class Fal:
    """A queue client that remembers what it submitted, so every test leaves the queue empty."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.submitted: list[dict[str, Any]] = []

    def submit_response(
        self,
        app_id: str,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        suffix: str = "",
    ) -> httpx.Response:
        response = self.client.post(f"/{app_id}{suffix}", json=body, headers=headers, params=params)
        if response.status_code == 200:
            self.submitted.append(response.json())
        return response

    def submit(self, app_id: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        response = self.submit_response(app_id, body, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def status(self, envelope: dict[str, Any], logs: str | None = None) -> httpx.Response:
        return self.client.get(envelope["status_url"], params={"logs": logs} if logs is not None else None)

    def state(self, envelope: dict[str, Any]) -> str:
        return self.status(envelope).json()["status"]

    def completed(self, envelope: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            body = self.status(envelope, logs="1").json()
            return body if body["status"] == "COMPLETED" else None

        return wait_for(done, timeout)

    def result(self, envelope: dict[str, Any]) -> httpx.Response:
        return self.client.get(envelope["response_url"])

    def output(self, envelope: dict[str, Any]) -> dict[str, Any]:
        status = self.completed(envelope)
        assert "error" not in status, status
        response = self.result(envelope)
        assert response.status_code == 200, response.text
        return response.json()

    def cancel(self, envelope: dict[str, Any]) -> httpx.Response:
        return self.client.put(envelope["cancel_url"])

    def wait_running(self, envelope: dict[str, Any]) -> None:
        # The state that ended the wait is the one checked: a second poll could already see it finished.
        state = wait_for(lambda: (current := self.state(envelope)) != "IN_QUEUE" and current)
        assert state == "IN_PROGRESS"

    def close(self) -> None:
        for envelope in self.submitted:
            self.cancel(envelope)
        for envelope in self.submitted:
            wait_completed(self.client, envelope["status_url"])


@pytest.fixture
def fal(client: httpx.Client) -> Iterator[Fal]:
    queue = Fal(client)
    yield queue
    queue.close()


def blocker_body(image_host: LoopbackServer) -> dict[str, Any]:
    """The longest request there is: 50 steps, a second or more on the paced server. Cancel it when done."""
    return {
        "prompt": "blocker",
        "image_url": f"{image_host.url}/square.png",
        "num_inference_steps": 50,
        "seed": 1,
    }


@contextmanager
def blocking(fal: Fal, image_host: LoopbackServer, queued_behind: int = 0) -> Iterator[list[dict[str, Any]]]:
    """Occupy the worker with a running request (plus `queued_behind` more queued), cancelled on exit."""
    running = fal.submit(DEV, blocker_body(image_host))
    fal.wait_running(running)  # everything submitted before it has ended: the queue is ours now
    blockers = [running] + [fal.submit(DEV, blocker_body(image_host)) for _ in range(queued_behind)]
    try:
        yield blockers
    finally:
        for envelope in reversed(blockers):
            fal.cancel(envelope)


def step_lines(logs: list[dict[str, Any]] | None) -> list[str]:
    return [line["message"] for line in logs or [] if STEP_LINE.fullmatch(line["message"])]


def timestamp(line: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(line["timestamp"])


def header(headers: dict[str, str], name: str) -> str:
    (value,) = [value for key, value in headers.items() if key.lower() == name.lower()]
    return value


def download(client: httpx.Client, url: str) -> tuple[httpx.Response, Image.Image]:
    response = client.get(url)
    assert response.status_code == 200, url
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return response, image


def decode_data_uri(uri: str, content_type: str) -> Image.Image:
    prefix = f"data:{content_type};base64,"
    assert uri.startswith(prefix), uri[:40]
    image = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix(prefix), validate=True)))
    image.load()
    return image


def sizes(output: dict[str, Any]) -> list[tuple[int, int]]:
    return [(image["width"], image["height"]) for image in output["images"]]


# -- submit and status ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app_id", "prefix"),
    [
        (TEXT_TO_IMAGE, "fal-ai/flux-pro"),
        (PRO_EDIT, "fal-ai/flux-pro"),
        (MAX_TEXT_TO_IMAGE, "fal-ai/flux-pro"),
        (MAX_EDIT, "fal-ai/flux-pro"),
        (DEV, "fal-ai/flux-kontext"),
        (MULTI, "fal-ai/flux-pro"),
        (MAX_MULTI, "fal-ai/flux-pro"),
    ],
)
def test_submit_envelope(
    fal: Fal, server: KontextdServer, image_host: LoopbackServer, app_id: str, prefix: str
) -> None:
    body: dict[str, Any] = {"prompt": "envelope"}
    if app_id in (MULTI, MAX_MULTI):
        body["image_urls"] = [f"{image_host.url}/square.png"]
    elif not app_id.endswith("text-to-image"):
        body |= {"image_url": f"{image_host.url}/square.png", "output_format": "jpeg"}
    response = fal.submit_response(app_id, body)
    assert response.status_code == 200, response.text
    envelope = response.json()
    fal.cancel(envelope)  # only the envelope matters here

    assert set(envelope) == ENVELOPE_KEYS
    request_id = envelope["request_id"]
    assert str(uuid.UUID(request_id)) == request_id
    assert str(uuid.UUID(envelope["gateway_request_id"])) == envelope["gateway_request_id"]
    assert envelope["gateway_request_id"] != request_id
    assert envelope["status"] == "IN_QUEUE"
    assert envelope["response_url"] == f"{server.base_url}/{prefix}/requests/{request_id}"
    assert envelope["status_url"] == f"{envelope['response_url']}/status"
    assert envelope["cancel_url"] == f"{envelope['response_url']}/cancel"
    assert isinstance(envelope["queue_position"], int) and envelope["queue_position"] >= 0
    assert envelope["logs"] is None
    assert envelope["metrics"] == {}
    assert response.headers["x-fal-request-id"] == request_id

    status = fal.status(envelope)
    assert status.headers["x-fal-request-id"] == request_id
    for key in ("request_id", "response_url", "status_url", "cancel_url"):
        assert status.json()[key] == envelope[key]
    # The full app id is not a queue path: only its first two segments are.
    assert fal.client.get(f"/{app_id}/requests/{request_id}/status").status_code in (404, 405)


def test_status_codes_logs_and_progress(fal: Fal) -> None:
    envelope = fal.submit(TEXT_TO_IMAGE, {"prompt": "progress", "seed": 3})
    seen: list[tuple[int, dict[str, Any]]] = []

    def poll() -> bool:
        response = fal.status(envelope, logs="1")
        seen.append((response.status_code, response.json()))
        return response.json()["status"] == "COMPLETED"

    wait_for(poll, timeout=60, interval=0.02)

    for code, body in seen:
        assert code == (200 if body["status"] == "COMPLETED" else 202), body
        assert body["request_id"] == envelope["request_id"]
        assert {"response_url", "status_url", "cancel_url", "logs", "metrics"} <= set(body)
        if body["status"] == "IN_QUEUE":
            assert isinstance(body["queue_position"], int)
        for line in body["logs"]:
            assert set(line) == {"message", "level", "source", "timestamp"}
            assert line["source"] == "USER"
            assert line["level"] in LOG_LEVELS
            assert timestamp(line).tzinfo is not None
    states = [body["status"] for _, body in seen]
    assert states == sorted(states, key=["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].index)
    running = [body for _, body in seen if body["status"] == "IN_PROGRESS"]
    # Progress is reported as it happens, not all at the end: some poll saw part of the steps.
    partial = [body for body in running if 0 < len(step_lines(body["logs"])) < 28]
    assert partial, "no step line seen while running"
    assert step_lines(partial[0]["logs"])[0] == "step 1/28"

    final = seen[-1][1]
    assert step_lines(final["logs"]) == [f"step {n}/28" for n in range(1, 29)]
    assert final["metrics"]["inference_time"] > 0
    assert "error" not in final and "error_type" not in final
    stamps = [timestamp(line) for line in final["logs"]]
    assert stamps == sorted(stamps)

    for flag in ("1", "true"):
        assert fal.status(envelope, logs=flag).json()["logs"] == final["logs"]
    for flag in ("0", "false", None):
        response = fal.status(envelope, logs=flag)
        assert response.status_code == 200
        assert response.json()["logs"] is None
    assert fal.status(envelope, logs="yes").status_code == 422


def test_trailing_slashes(fal: Fal) -> None:
    envelope = fal.submit(TEXT_TO_IMAGE, {"prompt": "slashes"}, suffix="/")
    assert fal.client.get(envelope["status_url"] + "/").status_code in (200, 202)
    fal.completed(envelope)
    status = fal.client.get(envelope["status_url"] + "/", params={"logs": "1"})
    assert status.status_code == 200 and status.json()["status"] == "COMPLETED"
    result = fal.client.get(envelope["response_url"] + "/")
    assert result.status_code == 200 and result.json()["images"]
    with fal.client.stream("GET", envelope["status_url"] + "/stream/") as stream:
        assert stream.status_code == 200
        assert '"COMPLETED"' in stream.read().decode()
    cancel = fal.client.put(envelope["cancel_url"] + "/")
    assert (cancel.status_code, cancel.json()) == (400, {"status": "ALREADY_COMPLETED"})

    queued = fal.submit(TEXT_TO_IMAGE, {"prompt": "slashes, cancelled"}, suffix="/")
    cancel = fal.client.put(queued["cancel_url"] + "/")
    assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})


def test_result_before_completion(fal: Fal, image_host: LoopbackServer) -> None:
    with blocking(fal, image_host) as (running,):
        queued = fal.submit(TEXT_TO_IMAGE, {"prompt": "waiting"})
        status = fal.status(queued)
        assert status.status_code == 202
        assert (status.json()["status"], status.json()["queue_position"]) == ("IN_QUEUE", 0)
        running_status = fal.status(running)
        assert running_status.status_code == 202
        assert running_status.json()["status"] == "IN_PROGRESS"
        assert running_status.json()["logs"] is None  # only asked-for logs are sent
        assert isinstance(fal.status(running, logs="true").json()["logs"], list)
        for envelope in (queued, running):
            result = fal.result(envelope)
            assert result.status_code == 400
            assert result.json() == {"detail": "Request is still in progress"}
            assert result.headers["x-fal-request-id"] == envelope["request_id"]


# -- outputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output_format", "content_type", "pillow_format"),
    [("jpeg", "image/jpeg", "JPEG"), ("png", "image/png", "PNG")],
)
def test_output_and_image_files(
    fal: Fal, server: KontextdServer, output_format: str, content_type: str, pillow_format: str
) -> None:
    body = {"prompt": "a lighthouse", "seed": 11}
    if output_format != "jpeg":
        body["output_format"] = output_format  # jpeg is the default
    envelope = fal.submit(TEXT_TO_IMAGE, body)
    status = fal.completed(envelope)
    assert status["metrics"]["inference_time"] > 0
    result = fal.result(envelope)
    assert result.status_code == 200
    assert result.headers["x-fal-request-id"] == envelope["request_id"]
    output = result.json()

    assert set(output) == OUTPUT_KEYS  # the output itself, not wrapped in an envelope
    assert output["prompt"] == "a lighthouse"
    assert output["seed"] == 11
    assert output["has_nsfw_concepts"] == [False]
    assert set(output["timings"]) >= {"inference"} and output["timings"]["inference"] > 0
    (image,) = output["images"]
    assert set(image) == {"url", "width", "height", "content_type"}
    assert (image["width"], image["height"], image["content_type"]) == (128, 128, content_type)
    assert image["url"].startswith(f"{server.base_url}/files/")
    assert image["url"].endswith(f".{output_format}")
    assert [path.name for path in (server.data_dir / "files" / envelope["request_id"]).iterdir()] == [
        f"0.{output_format}"
    ]

    response, decoded = download(fal.client, image["url"])
    assert response.headers["content-type"] == content_type
    assert decoded.format == pillow_format
    assert decoded.size == (128, 128)
    # With no upstream key the [pro] endpoint runs on the local model, and the response says so.
    assert result.headers["x-kontextd-backend"] == "local"
    assert result.headers["x-kontextd-model"] == "kontextd/tiny-random-flux-kontext"


def test_an_output_url_can_be_edited_again(fal: Fal, server: KontextdServer) -> None:
    """Chained edits: our own /files/ URL is read from storage, not fetched (loopback is refused)."""
    first = fal.output(fal.submit(TEXT_TO_IMAGE, {"prompt": "a red door", "aspect_ratio": "16:9"}))
    url = first["images"][0]["url"]
    assert url.startswith(f"{server.base_url}/files/")
    second = fal.output(fal.submit(DEV, {"prompt": "paint it blue", "image_url": url}))
    assert sizes(second) == [TINY_SIZES["16:9"]]  # followed the stored image's shape


def test_endpoints_lists_each_backend_and_its_readiness(fal: Fal) -> None:
    listed = fal.client.get("/v1/endpoints").json()["endpoints"]
    assert [entry["app_id"] for entry in listed] == [
        TEXT_TO_IMAGE,
        PRO_EDIT,
        MAX_TEXT_TO_IMAGE,
        MAX_EDIT,
        MULTI,
        MAX_MULTI,
        DEV,
        "fal-ai/flux-kontext-lora",
        "fal-ai/flux-kontext-lora/text-to-image",
        "fal-ai/flux-kontext-lora/inpaint",
    ]
    for entry in listed:
        assert (entry["backend"], entry["model"]) == ("local", "kontextd/tiny-random-flux-kontext")
        assert (entry["status"], entry["reason"]) == ("ready", None)
        assert entry["title"].startswith("FLUX.1 Kontext")


def test_every_aspect_ratio_on_text_to_image(fal: Fal) -> None:
    envelopes = {
        ratio: fal.submit(TEXT_TO_IMAGE, {"prompt": "ratio", "aspect_ratio": ratio, "seed": 5})
        for ratio in TINY_SIZES
    }
    for ratio, envelope in envelopes.items():
        output = fal.output(envelope)
        assert sizes(output) == [TINY_SIZES[ratio]], ratio
        _, decoded = download(fal.client, output["images"][0]["url"])
        assert decoded.size == TINY_SIZES[ratio], ratio


def test_image_size_is_taken_as_the_nearest_aspect_ratio_when_none_is_given(
    fal: Fal, image_host: LoopbackServer
) -> None:
    """What the AI SDK sends (image_size), as the nearest Kontext shape; an aspect ratio given wins."""
    cases = [
        (TEXT_TO_IMAGE, {"image_size": "landscape_16_9"}, "16:9"),
        (TEXT_TO_IMAGE, {"image_size": "portrait_4_3"}, "3:4"),
        (TEXT_TO_IMAGE, {"image_size": "square_hd"}, "1:1"),
        (TEXT_TO_IMAGE, {"image_size": {"width": 1000, "height": 1500}}, "2:3"),  # exactly 2:3
        (TEXT_TO_IMAGE, {"image_size": {"width": 2000, "height": 800}}, "21:9"),  # 2.5: nearer 21:9 than 16:9
        (TEXT_TO_IMAGE, {"image_size": "portrait_16_9", "aspect_ratio": "1:1"}, "1:1"),
        (PRO_EDIT, {"image_url": f"{image_host.url}/wide.png", "image_size": "portrait_16_9"}, "9:16"),
        (
            DEV,
            {"image_url": f"{image_host.url}/wide.png", "num_inference_steps": 10, "image_size": "square"},
            "1:1",
        ),
        (  # a resolution_mode given wins, as an aspect ratio does
            DEV,
            {
                "image_url": f"{image_host.url}/square.png",
                "num_inference_steps": 10,
                "image_size": "square",
                "resolution_mode": "16:9",
            },
            "16:9",
        ),
    ]
    envelopes = [
        (fal.submit(app, {"prompt": "shape", "seed": 0} | body), ratio) for app, body, ratio in cases
    ]
    for (envelope, ratio), (app, body, _) in zip(envelopes, cases, strict=True):
        assert sizes(fal.output(envelope)) == [TINY_SIZES[ratio]], (app, body)


def test_max_text_to_image_defaults_to_square(fal: Fal) -> None:
    assert sizes(fal.output(fal.submit(MAX_TEXT_TO_IMAGE, {"prompt": "max"}))) == [(128, 128)]


def test_edits_follow_the_input_image(fal: Fal, image_host: LoopbackServer) -> None:
    cases = [
        (PRO_EDIT, {"image_url": f"{image_host.url}/wide.png"}, (176, 96)),  # 320x180 -> landscape 16:9
        (MAX_EDIT, {"image_url": f"{image_host.url}/tall.png", "output_format": "png"}, (96, 176)),  # 90x160
        (DEV, {"image_url": f"{image_host.url}/square.png", "num_inference_steps": 10}, (128, 128)),
        # A named ratio wins over the input image's.
        (PRO_EDIT, {"image_url": f"{image_host.url}/wide.png", "aspect_ratio": "9:16"}, (96, 176)),
        (
            DEV,
            {
                "image_url": f"{image_host.url}/square.png",
                "num_inference_steps": 10,
                "resolution_mode": "21:9",
            },
            (192, 80),
        ),
        # An inline image needs no fetch at all.
        (
            DEV,
            {
                "image_url": "data:image/png;base64," + base64.b64encode(png_bytes(90, 160)).decode(),
                "num_inference_steps": 10,
            },
            (96, 176),
        ),
    ]
    envelopes = [fal.submit(app_id, {"prompt": "edit", "seed": 2, **fields}) for app_id, fields, _ in cases]
    for (app_id, fields, expected), envelope in zip(cases, envelopes, strict=True):
        output = fal.output(envelope)
        assert sizes(output) == [expected], (app_id, fields)
        _, decoded = download(fal.client, output["images"][0]["url"])
        assert decoded.size == expected


def test_multi_image_edits_follow_the_first_image(fal: Fal, image_host: LoopbackServer) -> None:
    wide, tall, square = (f"{image_host.url}/{name}.png" for name in ("wide", "tall", "square"))
    cases = [
        (MULTI, [wide, tall], None, (176, 96)),  # the first is 320x180: landscape 16:9
        (MAX_MULTI, [tall, wide, square, wide], None, (96, 176)),  # four, the first 90x160
        (MULTI, [wide, tall], "1:1", (128, 128)),  # an aspect ratio given wins
    ]
    envelopes = [
        fal.submit(
            app, {"prompt": "combine", "seed": 4, "image_urls": urls} | ({"aspect_ratio": r} if r else {})
        )
        for app, urls, r, _ in cases
    ]
    for (app, urls, _, expected), envelope in zip(cases, envelopes, strict=True):
        output = fal.output(envelope)
        assert sizes(output) == [expected], (app, urls)


def test_every_reference_image_counts_and_one_equals_the_edit_endpoint(
    fal: Fal, image_host: LoopbackServer
) -> None:
    wide, tall, square = (f"{image_host.url}/{name}.png" for name in ("wide", "tall", "square"))
    bodies = {
        "edit": (PRO_EDIT, {"image_url": wide}),
        "one": (MULTI, {"image_urls": [wide]}),
        "two": (MULTI, {"image_urls": [wide, tall]}),
        "other second": (MULTI, {"image_urls": [wide, square]}),
        "two again": (MULTI, {"image_urls": [wide, tall]}),
    }
    envelopes = {
        name: fal.submit(app, {"prompt": "combine", "seed": 0, "output_format": "png"} | body)
        for name, (app, body) in bodies.items()
    }
    made = {
        name: download(fal.client, fal.output(e)["images"][0]["url"])[0].content
        for name, e in envelopes.items()
    }
    assert made["one"] == made["edit"]  # one reference is the single-image edit, byte for byte
    assert made["two"] != made["one"]  # the second image is seen
    assert made["other second"] != made["two"]  # and which one it is matters
    assert made["two again"] == made["two"]  # the same references and seed reproduce the image


def test_a_multi_image_input_that_fails_names_its_index(fal: Fal, image_host: LoopbackServer) -> None:
    urls = [f"{image_host.url}/wide.png", f"{image_host.url}/not-an-image"]
    response = fal.client.post(f"/run/{MULTI}", json={"prompt": "combine", "image_urls": urls})
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["type"] == "image_load_error"
    assert detail["loc"] == ["body", "image_urls", 1]
    assert detail["input"] == urls[1]


def test_num_images(fal: Fal) -> None:
    envelopes = {
        n: fal.submit(TEXT_TO_IMAGE, {"prompt": "several", "num_images": n, "seed": 9}) for n in range(1, 5)
    }
    for n, envelope in envelopes.items():
        output = fal.output(envelope)
        assert sizes(output) == [(128, 128)] * n
        assert output["has_nsfw_concepts"] == [False] * n
        urls = [image["url"] for image in output["images"]]
        assert len(set(urls)) == n
        for url in urls:
            assert download(fal.client, url)[1].size == (128, 128)


def test_seed_reproduces_images(fal: Fal) -> None:
    unseeded = fal.submit(TEXT_TO_IMAGE, {"prompt": "a teapot"})
    seeded = fal.submit(TEXT_TO_IMAGE, {"prompt": "a teapot", "seed": 1234})
    output = fal.output(unseeded)
    assert isinstance(output["seed"], int)  # the seed actually used, though none was given
    again = fal.submit(TEXT_TO_IMAGE, {"prompt": "a teapot", "seed": output["seed"]})

    def image_bytes(envelope: dict[str, Any]) -> bytes:
        return download(fal.client, fal.output(envelope)["images"][0]["url"])[0].content

    # Same seed and inputs: the very same file, byte for byte. Another seed: another image.
    assert fal.output(again)["seed"] == output["seed"]
    assert image_bytes(again) == image_bytes(unseeded)
    assert image_bytes(seeded) != image_bytes(unseeded)


def test_seed_zero_is_a_seed(fal: Fal) -> None:
    """0 is falsy, not absent: it must be used and reported, and reproduce like any other seed."""
    first = fal.output(fal.submit(TEXT_TO_IMAGE, {"prompt": "a teapot", "seed": 0}))
    again = fal.output(fal.submit(TEXT_TO_IMAGE, {"prompt": "a teapot", "seed": 0}))
    other = fal.output(fal.submit(TEXT_TO_IMAGE, {"prompt": "a teapot", "seed": 1}))
    assert first["seed"] == again["seed"] == 0 and other["seed"] == 1

    def image_bytes(output: dict[str, Any]) -> bytes:
        return download(fal.client, output["images"][0]["url"])[0].content

    assert image_bytes(again) == image_bytes(first)
    assert image_bytes(other) != image_bytes(first)


def test_sync_mode_returns_data_uris_and_stores_nothing(fal: Fal, server: KontextdServer) -> None:
    envelope = fal.submit(TEXT_TO_IMAGE, {"prompt": "inline", "sync_mode": True, "num_images": 2, "seed": 4})
    assert envelope["status"] == "IN_QUEUE"  # the queue route keeps its envelope
    fal.output(envelope)
    result = fal.result(envelope)
    assert "/files/" not in result.text
    for image in result.json()["images"]:
        assert image["content_type"] == "image/jpeg"
        decoded = decode_data_uri(image["url"], "image/jpeg")
        assert (decoded.format, decoded.size) == ("JPEG", (128, 128))
    assert not (server.data_dir / "files" / envelope["request_id"]).exists()

    run = fal.client.post(
        f"/run/{TEXT_TO_IMAGE}", json={"prompt": "inline", "sync_mode": True, "output_format": "png"}
    )
    assert run.status_code == 200
    (image,) = run.json()["images"]
    decoded = decode_data_uri(image["url"], "image/png")
    assert (decoded.format, decoded.size) == ("PNG", (128, 128))


# -- cancel --------------------------------------------------------------------------------------------


def test_cancel_a_queued_request(fal: Fal, image_host: LoopbackServer) -> None:
    with blocking(fal, image_host):
        queued = fal.submit(TEXT_TO_IMAGE, {"prompt": "never runs"})
        assert fal.state(queued) == "IN_QUEUE"
        cancel = fal.cancel(queued)
        assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
        # A queued request ends at once; the blocker is still running.
        status = fal.status(queued, logs="1")
        assert status.status_code == 200
        body = status.json()
        assert (body["status"], body["error_type"]) == ("COMPLETED", "client_cancelled")
        assert body["error"]
        assert step_lines(body["logs"]) == []

    result = fal.result(queued)
    assert 400 <= result.status_code < 500
    assert result.headers["X-Fal-Error-Type"] == "client_cancelled"
    assert result.json()["error_type"] == "client_cancelled"
    again = fal.cancel(queued)
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})


def test_cancel_a_running_request(fal: Fal, image_host: LoopbackServer, server: KontextdServer) -> None:
    envelope = fal.submit(DEV, blocker_body(image_host))  # 50 steps
    wait_for(lambda: step_lines(fal.status(envelope, logs="1").json()["logs"]), interval=0.02)
    cancel = fal.cancel(envelope)
    assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})

    status = fal.completed(envelope)
    assert status["error_type"] == "client_cancelled"
    assert 1 <= len(step_lines(status["logs"])) < 50
    result = fal.result(envelope)
    assert 400 <= result.status_code < 500
    assert result.headers["X-Fal-Error-Type"] == "client_cancelled"
    assert not (server.data_dir / "files" / envelope["request_id"]).exists()


def test_cancel_a_finished_request(fal: Fal) -> None:
    envelope = fal.submit(TEXT_TO_IMAGE, {"prompt": "done"})
    fal.output(envelope)
    cancel = fal.cancel(envelope)
    assert (cancel.status_code, cancel.json()) == (400, {"status": "ALREADY_COMPLETED"})
    assert fal.result(envelope).status_code == 200  # and the output is still there


def test_unknown_request_ids(fal: Fal, image_host: LoopbackServer) -> None:
    unknown = str(uuid.uuid4())
    base = f"/fal-ai/flux-pro/requests/{unknown}"
    assert fal.client.get(f"{base}/status").status_code == 404
    assert fal.client.get(f"{base}/status/stream").status_code == 404
    assert fal.client.get(base).status_code == 404
    cancel = fal.client.put(f"{base}/cancel")
    assert (cancel.status_code, cancel.json()) == (404, {"status": "NOT_FOUND"})

    # A real id under another app's prefix is just as unknown.
    envelope = fal.submit(DEV, {"prompt": "x", "image_url": f"{image_host.url}/not-an-image"})
    fal.completed(envelope)
    other = f"/fal-ai/flux-pro/requests/{envelope['request_id']}"
    assert fal.client.get(f"{other}/status").status_code == 404
    assert fal.client.get(other).status_code == 404
    assert fal.client.put(f"{other}/cancel").status_code == 404


# -- queue order, deadlines, positions ----------------------------------------------------------------


def test_normal_priority_runs_before_low(fal: Fal, image_host: LoopbackServer) -> None:
    with blocking(fal, image_host):
        low = fal.submit(TEXT_TO_IMAGE, {"prompt": "low"}, headers={"X-Fal-Queue-Priority": "low"})
        normal = fal.submit(TEXT_TO_IMAGE, {"prompt": "normal"}, headers={"X-Fal-Queue-Priority": "normal"})
        assert low["queue_position"] == 0
        assert normal["queue_position"] == 0  # ahead of the low one
        assert fal.status(low).json()["queue_position"] == 1
        assert fal.status(normal).json()["queue_position"] == 0
    normal_status = fal.completed(normal)
    low_status = fal.completed(low)
    assert "error" not in normal_status and "error" not in low_status
    normal_steps = [line for line in normal_status["logs"] if STEP_LINE.fullmatch(line["message"])]
    low_steps = [line for line in low_status["logs"] if STEP_LINE.fullmatch(line["message"])]
    assert timestamp(normal_steps[-1]) <= timestamp(low_steps[0])


def test_a_runner_hint_goes_first_to_the_worker_that_ran_it(fal: Fal, image_host: LoopbackServer) -> None:
    hint = {"X-Fal-Runner-Hint": f"tenant-{uuid.uuid4().hex[:8]}"}
    assert "error" not in fal.completed(fal.submit(TEXT_TO_IMAGE, {"prompt": "first"}, headers=hint))
    with blocking(fal, image_host):  # the one worker is busy: both queue, the plain one first
        plain = fal.submit(TEXT_TO_IMAGE, {"prompt": "plain"})
        hinted = fal.submit(TEXT_TO_IMAGE, {"prompt": "hinted"}, headers=hint)
        assert (plain["queue_position"], hinted["queue_position"]) == (0, 1)
    hinted_steps = step_lines_with_times(fal.completed(hinted))
    plain_steps = step_lines_with_times(fal.completed(plain))
    assert hinted_steps[-1] <= plain_steps[0]  # the worker that ran the hint took its request first


def step_lines_with_times(status: dict[str, Any]) -> list[datetime]:
    assert "error" not in status, status
    return [timestamp(line) for line in status["logs"] if STEP_LINE.fullmatch(line["message"])]


@pytest.mark.parametrize("hint", ["", "has space", "x" * 257, b"caf\xe9"])
def test_a_runner_hint_must_be_visible_ascii(fal: Fal, hint: str | bytes) -> None:
    response = fal.submit_response(TEXT_TO_IMAGE, {"prompt": "p"}, headers={"X-Fal-Runner-Hint": hint})
    if hint == "":  # an empty header is no hint
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "x-fal-runner-hint"]


def test_request_timeout_is_a_deadline_to_start(fal: Fal, image_host: LoopbackServer) -> None:
    # Three 50-step blockers: at least two seconds before anything behind them can start.
    with blocking(fal, image_host, queued_behind=2):
        submitted = time.monotonic()
        late = fal.submit(TEXT_TO_IMAGE, {"prompt": "late"}, headers={"X-Fal-Request-Timeout": "1.5"})
        patient = fal.submit(TEXT_TO_IMAGE, {"prompt": "patient"}, headers={"X-Fal-Request-Timeout": "600"})
        assert fal.state(late) == "IN_QUEUE"
        status = fal.completed(late, timeout=30)
        assert time.monotonic() - submitted >= 1.5
    assert status["error_type"] == "request_timeout"
    assert status["error"]
    assert step_lines(status["logs"]) == []
    result = fal.result(late)
    assert result.status_code == 504
    assert result.json() == {"detail": "Request timed out", "error_type": "request_timeout"}
    assert result.headers["X-Fal-Error-Type"] == "request_timeout"
    # A deadline that is met does not limit how long the request runs.
    assert fal.output(patient)["images"]


def test_queue_positions_are_exact(fal: Fal, image_host: LoopbackServer) -> None:
    with blocking(fal, image_host):
        queued = [fal.submit(TEXT_TO_IMAGE, {"prompt": f"queued {n}"}) for n in range(4)]
        assert [envelope["queue_position"] for envelope in queued] == [0, 1, 2, 3]
        assert [fal.status(envelope).json()["queue_position"] for envelope in queued] == [0, 1, 2, 3]

        assert fal.cancel(queued[1]).status_code == 202
        bodies = [fal.status(envelope).json() for envelope in queued]
        assert [body["status"] for body in bodies] == ["IN_QUEUE", "COMPLETED", "IN_QUEUE", "IN_QUEUE"]
        assert [body.get("queue_position") for body in bodies] == [0, None, 1, 2]

        low = fal.submit(TEXT_TO_IMAGE, {"prompt": "low"}, headers={"X-Fal-Queue-Priority": "low"})
        assert low["queue_position"] == 3
        last = fal.submit(TEXT_TO_IMAGE, {"prompt": "queued 4"})
        assert last["queue_position"] == 3
        assert fal.status(low).json()["queue_position"] == 4
        for envelope in [*queued, low, last]:
            fal.cancel(envelope)


def test_object_lifecycle_expires_outputs(fal: Fal) -> None:
    envelope = fal.submit(
        TEXT_TO_IMAGE,
        {"prompt": "short-lived"},
        headers={"X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds": 2}'},
    )
    url = fal.output(envelope)["images"][0]["url"]
    assert fal.client.get(url).status_code == 200
    wait_for(lambda: fal.client.get(url).status_code == 404, timeout=20, interval=0.2)
    result = fal.result(envelope)
    assert result.status_code == 410
    assert result.json()["detail"]
    assert fal.status(envelope).json()["status"] == "COMPLETED"


# -- status stream -------------------------------------------------------------------------------------


def read_events(response: httpx.Response, on_event: Any = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line.removeprefix("data: ")))
            if on_event is not None:
                on_event(events[-1])
        else:
            assert line == "" or line.startswith(":"), line
    return events


def test_status_stream(fal: Fal, image_host: LoopbackServer) -> None:
    with blocking(fal, image_host) as (running,):
        envelope = fal.submit(TEXT_TO_IMAGE, {"prompt": "streamed"})

        def release_blocker(event: dict[str, Any]) -> None:
            if event["status"] == "IN_QUEUE":
                fal.cancel(running)

        with fal.client.stream("GET", envelope["status_url"] + "/stream", params={"logs": "1"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-fal-request-id"] == envelope["request_id"]
            events = read_events(response, release_blocker)  # returns only once the server closes the stream

    states = [event["status"] for event in events]
    assert states[0] == "IN_QUEUE" and events[0]["queue_position"] == 0
    assert states[-1] == "COMPLETED" and states.count("COMPLETED") == 1
    assert "IN_PROGRESS" in states
    assert states == sorted(states, key=["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].index)
    assert any(step_lines(event["logs"]) for event in events if event["status"] == "IN_PROGRESS")
    # Each event has the shape of /status: the last one is what /status says now.
    assert events[-1] == fal.status(envelope, logs="1").json()
    assert "error" not in events[-1]

    # A finished request streams its final state once, without logs unless asked, and closes.
    with fal.client.stream("GET", envelope["status_url"] + "/stream") as response:
        events = read_events(response)
    assert [event["status"] for event in events] == ["COMPLETED"]
    assert events[0]["logs"] is None


def test_previews_come_on_the_status_stream_only_when_asked(fal: Fal) -> None:
    body = {
        "prompt": "previewed",
        "image_url": "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode(),
    }
    envelope = fal.submit(DEV, body | {"num_inference_steps": 12, "seed": 3})
    with fal.client.stream("GET", envelope["status_url"] + "/stream", params={"previews": "1"}) as response:
        events = read_events(response)
    previews = [event["preview"] for event in events if "preview" in event]
    # After steps 4 and 8 of 12, not after the last (the image comes then); a stream woken late may see
    # only the later of the two, as with any change it coalesces.
    assert 1 <= len(set(previews)) <= 2
    for preview in previews:
        image = decode_data_uri(preview, "image/jpeg")
        assert image.size == (16, 16)  # the latent grid: 1/8 of the tiny model's 128x128
    assert all(event["status"] == "IN_PROGRESS" for event in events if "preview" in event)
    assert "preview" not in events[-1]  # finished: the output is the image now

    plain = fal.submit(DEV, body | {"num_inference_steps": 12, "seed": 3})
    with fal.client.stream("GET", plain["status_url"] + "/stream", params={"logs": "1"}) as response:
        assert all("preview" not in event for event in read_events(response))  # what fal clients get
    assert "preview" not in fal.status(plain).json()


# -- the run route, input images ----------------------------------------------------------------------


def test_run_route_answers_with_the_output(fal: Fal, server: KontextdServer) -> None:
    response = fal.client.post(f"/run/{TEXT_TO_IMAGE}", json={"prompt": "direct", "seed": 8})
    assert response.status_code == 200, response.text
    output = response.json()
    assert set(output) == OUTPUT_KEYS
    assert sizes(output) == [(128, 128)]
    assert download(fal.client, output["images"][0]["url"])[1].size == (128, 128)
    assert response.headers["x-kontextd-backend"] == "local"
    # It went through the queue like any request: its id answers on the queue routes too.
    request_id = response.headers["x-fal-request-id"]
    assert fal.client.get(f"/fal-ai/flux-pro/requests/{request_id}").json() == output


def test_run_route_with_an_image_that_is_not_one(fal: Fal, image_host: LoopbackServer) -> None:
    response = fal.client.post(
        f"/run/{PRO_EDIT}", json={"prompt": "edit", "image_url": f"{image_host.url}/not-an-image"}
    )
    assert response.status_code == 422
    assert response.headers["X-Fal-Error-Type"] == "image_load_error"
    (detail,) = response.json()["detail"]
    assert detail["type"] == "image_load_error"
    assert detail["loc"] == ["body", "image_url"]
    assert detail["input"] == f"{image_host.url}/not-an-image"


@pytest.mark.parametrize("host", ["127.0.0.2", "[::1]"])
def test_loopback_not_on_the_allow_list_is_refused(fal: Fal, image_host: LoopbackServer, host: str) -> None:
    # The fixture allow-lists 127.0.0.1 only; every other loopback address stays refused.
    port = httpx.URL(image_host.url).port
    url = f"http://{host}:{port}/square.png"
    envelope = fal.submit(PRO_EDIT, {"prompt": "edit", "image_url": url})
    status = fal.completed(envelope)
    assert status["error_type"] == "file_download_error"
    result = fal.result(envelope)
    assert result.status_code == 422
    assert result.headers["X-Fal-Error-Type"] == "file_download_error"
    (detail,) = result.json()["detail"]
    assert detail["type"] == "file_download_error"
    assert detail["loc"] == ["body", "image_url"]
    assert "loopback" in detail["msg"]


# -- webhooks ------------------------------------------------------------------------------------------


def check_signature(fal: Fal, headers: dict[str, str], body: bytes, request_id: str) -> None:
    assert header(headers, "X-Fal-Webhook-Request-Id") == request_id
    user_id = header(headers, "X-Fal-Webhook-User-Id")
    sent_at = header(headers, "X-Fal-Webhook-Timestamp")
    assert abs(int(sent_at) - time.time()) < 300
    message = f"{request_id}\n{user_id}\n{sent_at}\n{hashlib.sha256(body).hexdigest()}".encode()
    (jwk,) = fal.client.get("/.well-known/jwks.json").json()["keys"]
    assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
    key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4)))
    key.verify(bytes.fromhex(header(headers, "X-Fal-Webhook-Signature")), message)  # raises when wrong


def failing_request(fal: Fal, image_host: LoopbackServer, webhook: str) -> dict[str, Any]:
    """A request that ends at once, with a 422, and reports to `webhook`."""
    body = {"prompt": "x", "image_url": f"{image_host.url}/not-an-image"}
    return fal.submit(DEV, body, params={"fal_webhook": webhook})


def test_webhook_delivers_the_result_once(
    fal: Fal, image_host: LoopbackServer, webhook_receiver: WebhookReceiver
) -> None:
    hook = f"{webhook_receiver.url}/hook"
    envelope = fal.submit(TEXT_TO_IMAGE, {"prompt": "hooked"}, params={"fal_webhook": hook})
    output = fal.output(envelope)
    wait_for(lambda: webhook_receiver.bodies("/hook"), timeout=20)
    # A later request's webhook arriving means the dispatcher has had rounds to send duplicates.
    failing_request(fal, image_host, f"{webhook_receiver.url}/later")
    wait_for(lambda: webhook_receiver.bodies("/later"), timeout=20)

    hooks = [(headers, body) for path, headers, body in webhook_receiver.received if path == "/hook"]
    assert len(hooks) == 1
    headers, raw = hooks[0]
    assert header(headers, "Content-Type") == "application/json"
    assert webhook_receiver.bodies("/hook")[0] == {
        "request_id": envelope["request_id"],
        "gateway_request_id": envelope["gateway_request_id"],
        "status": "OK",
        "payload": output,
    }
    check_signature(fal, headers, raw, envelope["request_id"])


def test_webhook_for_a_failed_request(
    fal: Fal, image_host: LoopbackServer, webhook_receiver: WebhookReceiver
) -> None:
    envelope = failing_request(fal, image_host, f"{webhook_receiver.url}/hook")
    fal.completed(envelope)
    (body,) = wait_for(lambda: webhook_receiver.bodies("/hook"), timeout=20)
    assert body["request_id"] == envelope["request_id"]
    assert body["gateway_request_id"] == envelope["gateway_request_id"]
    assert body["status"] == "ERROR"
    assert body["error"] == "Invalid status code: 422"
    assert body["payload"] == fal.result(envelope).json()
    assert body["payload"]["detail"][0]["type"] == "image_load_error"
    ((_, headers, raw),) = webhook_receiver.received
    check_signature(fal, headers, raw, envelope["request_id"])


def test_webhook_retried_until_delivered(
    fal: Fal, image_host: LoopbackServer, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.failures_left[0] = 2  # answer 500 twice, then 200
    envelope = failing_request(fal, image_host, f"{webhook_receiver.url}/hook")
    wait_for(lambda: len(webhook_receiver.bodies("/hook")) >= 3, timeout=30)
    failing_request(fal, image_host, f"{webhook_receiver.url}/later")
    wait_for(lambda: webhook_receiver.bodies("/later"), timeout=20)

    bodies = webhook_receiver.bodies("/hook")
    assert len(bodies) == 3  # the third try succeeded: no fourth
    assert webhook_receiver.failures_left[0] == 0
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["request_id"] == envelope["request_id"]
