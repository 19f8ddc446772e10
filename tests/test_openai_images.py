"""OpenAI's Images API, driven by the unmodified `openai` package against a real kontextd process."""

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import KontextdServer, png_bytes
from PIL import Image

from kontextd.api.wire import queue_prefix


@pytest.fixture(scope="module")
def api(server: KontextdServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def decoded(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generation_answers_base64_png_by_default(api: openai.OpenAI) -> None:
    answer = api.images.generate(prompt="a red square", model="flux-kontext-pro")
    assert answer.data is not None and len(answer.data) == 1
    image = decoded(answer.data[0].b64_json)
    assert image.format == "PNG"
    assert image.size == (128, 128)  # the tiny model's 1:1 (1024x1024 / 8)
    assert answer.size == "128x128" and answer.output_format == "png"
    assert answer.data[0].url is None


def test_n_makes_that_many_images(api: openai.OpenAI) -> None:
    answer = api.images.generate(prompt="two cats", n=2, output_format="jpeg")
    assert answer.data is not None and len(answer.data) == 2
    assert {decoded(each.b64_json).format for each in answer.data} == {"JPEG"}
    assert answer.output_format == "jpeg"


def test_n_above_four_is_refused_naming_n(api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        api.images.generate(prompt="many cats", n=5)
    assert refused.value.status_code == 400
    assert refused.value.param == "n"
    assert refused.value.type == "invalid_request_error"


def test_webp_and_masks_are_refused_clearly(api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        api.images.generate(prompt="a cat", output_format="webp")
    assert refused.value.param == "output_format"
    with pytest.raises(openai.BadRequestError) as refused:
        api.images.edit(image=png_bytes(32, 32), mask=png_bytes(32, 32), prompt="a hat")
    assert refused.value.param == "mask"


def test_size_is_the_nearest_kontext_shape(api: openai.OpenAI) -> None:
    answer = api.images.generate(prompt="a landscape", size="1536x1024")
    assert answer.data is not None
    width, height = decoded(answer.data[0].b64_json).size
    assert width > height
    assert answer.size == f"{width}x{height}" == "160x96"  # 3:2 in the tiny model's table


def test_dev_generation_runs_the_dev_text_to_image(api: openai.OpenAI) -> None:
    raw = api.images.with_raw_response.generate(prompt="a fox", model="flux-kontext-dev", size="1024x1536")
    answer = raw.parse()
    assert answer.data is not None
    width, height = decoded(answer.data[0].b64_json).size
    assert height > width
    assert raw.headers["x-request-id"]


def test_url_response_format_is_downloadable(api: openai.OpenAI) -> None:
    answer = api.images.generate(prompt="a boat", response_format="url")
    assert answer.data is not None and answer.data[0].url and answer.data[0].b64_json is None
    downloaded = httpx.get(answer.data[0].url, timeout=30)
    assert downloaded.status_code == 200
    assert Image.open(io.BytesIO(downloaded.content)).size == (128, 128)


@pytest.mark.parametrize("model", ["flux-kontext-dev", "flux-kontext-pro", "fal-ai/flux-pro/kontext/max"])
def test_edit_of_one_image(api: openai.OpenAI, model: str) -> None:
    answer = api.images.edit(
        image=("wide.png", png_bytes(320, 180), "image/png"), prompt="add a hat", model=model
    )
    assert answer.data is not None and len(answer.data) == 1
    width, height = decoded(answer.data[0].b64_json).size
    assert width > height  # the output follows the input's shape


def test_edit_of_two_images_goes_to_multi(api: openai.OpenAI) -> None:
    raw = api.images.with_raw_response.edit(
        image=[png_bytes(90, 160), png_bytes(64, 64)],
        prompt="put them together",
        model="flux-kontext-max",
        n=2,
    )
    answer = raw.parse()
    assert answer.data is not None and len(answer.data) == 2  # n, sent as form text
    width, height = decoded(answer.data[0].b64_json).size
    assert height > width  # the first image is portrait


def test_dev_refuses_several_images(api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        api.images.edit(image=[png_bytes(32, 32), png_bytes(32, 32)], prompt="x", model="flux-kontext-dev")
    assert refused.value.param == "image"


def test_not_an_image_is_refused(api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        api.images.edit(image=b"hello, not an image", prompt="x")
    assert refused.value.param == "image"


def test_unknown_model_is_not_found(api: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        api.images.generate(prompt="a cat", model="dall-e-3")
    assert refused.value.code == "model_not_found"
    assert refused.value.param == "model"


def test_stream_yields_previews_then_a_completed_event(api: openai.OpenAI) -> None:
    events = list(api.images.generate(prompt="a lighthouse", stream=True, partial_images=2))
    *partials, completed = events
    assert completed.type == "image_generation.completed"
    assert decoded(completed.b64_json).size == (128, 128)
    assert len(partials) <= 2  # live previews, as many as the run made in time (at most the number asked)
    for index, partial in enumerate(partials):
        assert partial.type == "image_generation.partial_image" and partial.partial_image_index == index
        assert decoded(partial.b64_json).format == "JPEG"
    plain = list(api.images.generate(prompt="a lighthouse", stream=True))
    assert [event.type for event in plain] == ["image_generation.completed"]  # no previews unless asked
    edits = list(api.images.edit(image=png_bytes(64, 64), prompt="a hat", stream=True))
    assert [event.type for event in edits] == ["image_edit.completed"]


def test_request_id_is_a_queue_request(api: openai.OpenAI, server: KontextdServer) -> None:
    raw = api.images.with_raw_response.generate(prompt="a tree")
    request_id = raw.headers["x-request-id"]
    assert raw.headers["x-fal-request-id"] == request_id
    prefix = queue_prefix("fal-ai/flux-pro/kontext/text-to-image")
    with server.client() as client:
        status = client.get(f"/{prefix}/requests/{request_id}/status")
        assert status.status_code == 200 and status.json()["status"] == "COMPLETED"
        result = client.get(f"/{prefix}/requests/{request_id}").json()
    assert result["prompt"] == "a tree"


def test_models_lists_short_names_and_app_ids(api: openai.OpenAI) -> None:
    ids = [model.id for model in api.models.list()]
    assert {"flux-kontext-pro", "flux-kontext-max", "flux-kontext-dev"} <= set(ids)
    assert "fal-ai/flux-pro/kontext/multi" in ids


def test_errors_are_in_openai_shape(server: KontextdServer) -> None:
    with server.client() as client:
        answer = client.post("/v1/images/generations", json={"prompt": "   "})
        assert answer.status_code == 400
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
        assert answer.json()["error"]["param"] == "prompt"
        # A multipart form without an Authorization header: what any web page could send cross-site.
        form = client.post("/v1/images/edits", files={"image": png_bytes(8, 8)}, data={"prompt": "x"})
        assert form.status_code == 401 and "error" in form.json()


@pytest.mark.parametrize(
    ("fields", "images", "param"),
    [
        ({"prompt": "x", "n": "three"}, 1, "n"),
        ({"prompt": "x", "n": "9"}, 1, "n"),
        ({"prompt": "x", "stream": "maybe"}, 1, "stream"),
        ({"prompt": "x", "size": "big"}, 1, "size"),
        ({"prompt": ["x", "y"]}, 1, "prompt"),  # a list sent as repeated parts
        ({"prompt": "x"}, 5, "image"),
        ({"prompt": "x"}, 0, "image"),
        ({"prompt": "x", "image": "text, not a file"}, 0, "image"),
    ],
)
def test_invalid_edit_forms_are_refused(
    server: KontextdServer, fields: dict[str, object], images: int, param: str
) -> None:
    files = [("image[]", ("a.png", png_bytes(8, 8), "image/png")) for _ in range(images)]
    files = files or [("notes", ("notes.txt", b"no image here", "text/plain"))]  # multipart all the same
    with server.client() as client:
        answer = client.post(
            "/v1/images/edits", data=fields, files=files, headers={"Authorization": "Bearer x"}
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    instance = KontextdServer(Path(tmp_path_factory.mktemp("openai-keyed")), args=["--api-key", "right"])
    yield instance.start()
    instance.stop()


def test_a_wrong_key_is_refused_in_openai_shape(keyed_server: KontextdServer) -> None:
    wrong = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.images.generate(prompt="a cat")
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key="right", max_retries=0)
    assert next(model.id for model in right.models.list()) == "flux-kontext-pro"
