"""Request validation over HTTP: fal's 422 shape for every rule, headers and query, and the OpenAPI document.

Everything here is refused at submit, before anything is queued, so these tests cost no generation time
except the few that check a valid body is accepted.
"""

import re
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, LoopbackServer, wait_completed

TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
PRO_EDIT = "fal-ai/flux-pro/kontext"
MAX_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/max/text-to-image"
MAX_EDIT = "fal-ai/flux-pro/kontext/max"
DEV = "fal-ai/flux-kontext/dev"
MULTI = "fal-ai/flux-pro/kontext/multi"
MAX_MULTI = "fal-ai/flux-pro/kontext/max/multi"
EDITS = (PRO_EDIT, MAX_EDIT, DEV)
MULTIS = (MULTI, MAX_MULTI)
ALL_APPS = (TEXT_TO_IMAGE, PRO_EDIT, MAX_TEXT_TO_IMAGE, MAX_EDIT, DEV, MULTI, MAX_MULTI)

ASPECT_RATIOS = ["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]
ASPECT_RATIO_CHOICES = "'21:9', '16:9', '4:3', '3:2', '1:1', '2:3', '3:4', '9:16' or '9:21'"
SAFETY_CHOICES = "'1', '2', '3', '4', '5' or '6'"
ACCELERATIONS = "'none', 'regular' or 'high'"
TOO_LOW_1 = {
    "type": "greater_than_equal",
    "msg": "Input should be greater than or equal to 1",
    "ctx": {"ge": 1},
}
TOO_HIGH_20 = {
    "type": "less_than_equal",
    "msg": "Input should be less than or equal to 20",
    "ctx": {"le": 20},
}
SEED_000_RESPONSE_KEYS = {
    "status",
    "request_id",
    "response_url",
    "status_url",
    "cancel_url",
    "queue_position",
}

# Seed 003's example request, byte for byte (CRLF line breaks included): "aspect_ratio" is the placeholder
# "string", which is not one of the enum's values. Its image_url is outside; the body is refused at submit,
# so it is never fetched.
SEED_003_EXAMPLE = (
    '{\r\n "prompt": "Put a donut next to the flour.",\r\n "seed": 0,\r\n "guidance_scale": 3.5,\r\n'
    ' "sync_mode": false,\r\n "num_images": 1,\r\n "safety_tolerance": "2",\r\n "output_format": "jpeg",\r\n'
    ' "aspect_ratio": "string",\r\n'
    ' "image_url": "https://v3.fal.media/files/rabbit/rmgBxhwGYb2d3pl3x9sKf_output.png"\r\n}'
)
SEED_003_IMAGE_URL = "https://v3.fal.media/files/rabbit/rmgBxhwGYb2d3pl3x9sKf_output.png"
# Seed 000 names only the prompt's example; the other fields are the seed's documented defaults.
SEED_000_EXAMPLE = {
    "prompt": "一只猫咪在宇宙飞船里俯瞰地球",
    "sync_mode": False,
    "num_images": 1,
    "safety_tolerance": "2",
    "output_format": "jpeg",
    "aspect_ratio": "1:1",
}
JSON = {"Content-Type": "application/json"}
A_DAY_AT_MOST = {
    "type": "less_than_equal",
    "msg": "Input should be less than or equal to 86400",
    "ctx": {"le": 86400},
}


def image_url(image_host: LoopbackServer) -> str:
    return f"{image_host.url}/square.png"


def valid_body(app_id: str, image_host: LoopbackServer) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a red square"}
    if app_id in EDITS:
        body["image_url"] = image_url(image_host)
    if app_id in MULTIS:
        body["image_urls"] = [image_url(image_host)]
    if app_id == MAX_EDIT:
        body["output_format"] = "jpeg"
    return body


def refused(response: httpx.Response, status: int = 422) -> list[dict[str, Any]]:
    """The `detail` list of a 422 (400 for headers), each entry checked for fal's (FastAPI's) keys."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["detail"]
    assert isinstance(body["detail"], list) and body["detail"]
    for entry in body["detail"]:
        assert {"loc", "msg", "type"} <= set(entry), entry
        assert isinstance(entry["loc"], list) and isinstance(entry["msg"], str) and entry["msg"]
    return body["detail"]


def only_error(response: httpx.Response, status: int = 422) -> dict[str, Any]:
    detail = refused(response, status)
    assert len(detail) == 1, detail
    return detail[0]


def submit(client: httpx.Client, app_id: str, body: Any, **kwargs: Any) -> httpx.Response:
    return client.post(f"/{app_id}", json=body, **kwargs)


def cancel_and_wait(client: httpx.Client, envelope: dict[str, Any]) -> dict[str, Any]:
    assert client.put(envelope["cancel_url"]).status_code in (202, 400)
    return wait_completed(client, envelope["status_url"])


# -- body fields --------------------------------------------------------------------------------------


@pytest.mark.parametrize("app_id", ALL_APPS)
def test_missing_prompt(client: httpx.Client, image_host: LoopbackServer, app_id: str) -> None:
    body = valid_body(app_id, image_host)
    del body["prompt"]
    assert only_error(submit(client, app_id, body)) == {
        "type": "missing",
        "loc": ["body", "prompt"],
        "msg": "Field required",
        "input": body,
    }


def test_empty_body_object_reports_missing_prompt(client: httpx.Client) -> None:
    assert only_error(submit(client, TEXT_TO_IMAGE, {})) == {
        "type": "missing",
        "loc": ["body", "prompt"],
        "msg": "Field required",
        "input": {},
    }


@pytest.mark.parametrize("prompt", [" ", "\t\n ", "\u3000"])  # \u3000: the ideographic space
def test_whitespace_only_prompt(client: httpx.Client, prompt: str) -> None:
    assert only_error(submit(client, TEXT_TO_IMAGE, {"prompt": prompt})) == {
        "type": "string_blank",
        "loc": ["body", "prompt"],
        "msg": "Prompt must contain more than whitespace",
        "input": prompt,
    }


def test_prompt_length_cap(client: httpx.Client) -> None:
    error = only_error(submit(client, TEXT_TO_IMAGE, {"prompt": "x" * 4001}))
    assert (error["type"], error["ctx"]) == ("string_too_long", {"max_length": 4000})
    assert error["msg"] == "String should have at most 4000 characters"
    assert error["input"] == "x" * 200 + "… (4001 characters)"  # never echoed whole
    accepted = submit(client, TEXT_TO_IMAGE, {"prompt": "x" * 4000})
    assert accepted.status_code == 200, accepted.text
    cancel_and_wait(client, accepted.json())


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (
            -1,
            {
                "type": "greater_than_equal",
                "msg": "Input should be greater than or equal to 0",
                "ctx": {"ge": 0},
            },
        ),
        (
            2**32,
            {
                "type": "less_than_equal",
                "msg": "Input should be less than or equal to 4294967295",
                "ctx": {"le": 4294967295},
            },
        ),
        (
            2**64 + 5,
            {
                "type": "less_than_equal",
                "msg": "Input should be less than or equal to 4294967295",
                "ctx": {"le": 4294967295},
            },
        ),
        (
            1.5,
            {
                "type": "int_from_float",
                "msg": "Input should be a valid integer, got a number with a fractional part",
            },
        ),
    ],
)
def test_seed_outside_its_range(client: httpx.Client, seed: int, expected: dict[str, Any]) -> None:
    assert only_error(submit(client, TEXT_TO_IMAGE, {"prompt": "x", "seed": seed})) == {
        **expected,
        "loc": ["body", "seed"],
        "input": seed,
    }


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seed_bounds_are_accepted(client: httpx.Client, seed: int) -> None:
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "x", "seed": seed})
    assert response.status_code == 200, response.text
    cancel_and_wait(client, response.json())


def test_seed_zero_is_a_seed_not_an_absent_one(client: httpx.Client) -> None:
    """0 is falsy: a `seed or random()` slip would run seed 0 with a random seed and report that one."""
    envelopes = [submit(client, TEXT_TO_IMAGE, {"prompt": "zero", "seed": seed}).json() for seed in (0, 0, 1)]
    runs = []
    for envelope in envelopes:
        assert "error" not in wait_completed(client, envelope["status_url"])
        output = client.get(envelope["response_url"]).json()
        runs.append((output["seed"], client.get(output["images"][0]["url"]).content))
    assert [seed for seed, _ in runs] == [0, 0, 1]
    assert runs[0][1] == runs[1][1]  # seed 0 reproduces itself
    assert runs[0][1] != runs[2][1]  # and is not seed 1 either


def test_empty_prompt(client: httpx.Client) -> None:
    assert only_error(submit(client, TEXT_TO_IMAGE, {"prompt": ""})) == {
        "type": "string_too_short",
        "loc": ["body", "prompt"],
        "msg": "String should have at least 1 character",
        "input": "",
        "ctx": {"min_length": 1},
    }


@pytest.mark.parametrize(
    ("app_id", "value", "expected"),
    [
        (TEXT_TO_IMAGE, 0.5, TOO_LOW_1),
        (TEXT_TO_IMAGE, 21, TOO_HIGH_20),
        (MAX_EDIT, 21, TOO_HIGH_20),
        (DEV, 0.5, TOO_LOW_1),
    ],
)
def test_guidance_scale_range(
    client: httpx.Client, image_host: LoopbackServer, app_id: str, value: float, expected: dict[str, Any]
) -> None:
    body = valid_body(app_id, image_host) | {"guidance_scale": value}
    assert only_error(submit(client, app_id, body)) == {
        **expected,
        "loc": ["body", "guidance_scale"],
        "input": value,
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, TOO_LOW_1),
        (5, {"type": "less_than_equal", "msg": "Input should be less than or equal to 4", "ctx": {"le": 4}}),
    ],
)
def test_num_images_range(client: httpx.Client, value: int, expected: dict[str, Any]) -> None:
    body = {"prompt": "x", "num_images": value}
    assert only_error(submit(client, TEXT_TO_IMAGE, body)) == {
        **expected,
        "loc": ["body", "num_images"],
        "input": value,
    }


@pytest.mark.parametrize("value", ["7", "0", 2])
def test_safety_tolerance_is_a_string_enum(client: httpx.Client, value: object) -> None:
    # The seed types it as a string enum: the integer 2 is not "2".
    assert only_error(submit(client, TEXT_TO_IMAGE, {"prompt": "x", "safety_tolerance": value})) == {
        "type": "literal_error",
        "loc": ["body", "safety_tolerance"],
        "msg": f"Input should be {SAFETY_CHOICES}",
        "input": value,
        "ctx": {"expected": SAFETY_CHOICES},
    }


@pytest.mark.parametrize("app_id", ALL_APPS)
def test_output_format_gif(client: httpx.Client, image_host: LoopbackServer, app_id: str) -> None:
    body = valid_body(app_id, image_host) | {"output_format": "gif"}
    assert only_error(submit(client, app_id, body)) == {
        "type": "literal_error",
        "loc": ["body", "output_format"],
        "msg": "Input should be 'jpeg' or 'png'",
        "input": "gif",
        "ctx": {"expected": "'jpeg' or 'png'"},
    }


@pytest.mark.parametrize("app_id", [TEXT_TO_IMAGE, MAX_TEXT_TO_IMAGE, PRO_EDIT, MAX_EDIT, MULTI])
def test_aspect_ratio_outside_the_enum(client: httpx.Client, image_host: LoopbackServer, app_id: str) -> None:
    body = valid_body(app_id, image_host) | {"aspect_ratio": "string"}
    assert only_error(submit(client, app_id, body)) == {
        "type": "literal_error",
        "loc": ["body", "aspect_ratio"],
        "msg": f"Input should be {ASPECT_RATIO_CHOICES}",
        "input": "string",
        "ctx": {"expected": ASPECT_RATIO_CHOICES},
    }


@pytest.mark.parametrize(
    ("image_size", "loc", "kind"),
    [
        (
            "landscape_21_9",
            [
                "body",
                "image_size",
                "literal['square_hd','square','portrait_4_3','portrait_16_9',"
                "'landscape_4_3','landscape_16_9']",
            ],
            "literal_error",
        ),
        (
            {"width": 0, "height": 10},
            ["body", "image_size", "ImageDimensions", "width"],
            "greater_than_equal",
        ),
        (
            {"width": 10, "height": 14143},
            ["body", "image_size", "ImageDimensions", "height"],
            "less_than_equal",
        ),
        ({"width": "10", "height": 10}, ["body", "image_size", "ImageDimensions", "width"], "int_type"),
        ({"width": 10}, ["body", "image_size", "ImageDimensions", "height"], "missing"),
    ],
)
def test_image_size_must_be_a_preset_or_dimensions(
    client: httpx.Client, image_size: object, loc: list[str], kind: str
) -> None:
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "x", "image_size": image_size})
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert all(error["loc"][:2] == ["body", "image_size"] for error in errors), errors
    assert any(error["loc"] == loc and error["type"] == kind for error in errors), errors


def test_seed_003_example_verbatim_is_a_clean_422_on_aspect_ratio(client: httpx.Client) -> None:
    response = client.post(f"/{MAX_EDIT}", content=SEED_003_EXAMPLE.encode(), headers=JSON)
    assert only_error(response) == {
        "type": "literal_error",
        "loc": ["body", "aspect_ratio"],
        "msg": f"Input should be {ASPECT_RATIO_CHOICES}",
        "input": "string",
        "ctx": {"expected": ASPECT_RATIO_CHOICES},
    }


def test_seed_003_example_with_a_valid_aspect_ratio_is_accepted(
    client: httpx.Client, image_host: LoopbackServer
) -> None:
    # The same text with a real aspect ratio, and the outside image swapped for a loopback one so the
    # server never contacts v3.fal.media.
    text = SEED_003_EXAMPLE.replace('"string"', '"16:9"').replace(SEED_003_IMAGE_URL, image_url(image_host))
    assert "v3.fal.media" not in text
    response = client.post(f"/{MAX_EDIT}", content=text.encode(), headers=JSON)
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["status"] == "IN_QUEUE"
    assert envelope["status_url"].endswith(f"/fal-ai/flux-pro/requests/{envelope['request_id']}/status")
    assert response.headers["x-fal-request-id"] == envelope["request_id"]
    # Accepted is all this test is about: do not spend a generation on it.
    assert cancel_and_wait(client, envelope)["status"] == "COMPLETED"


def test_seed_000_example_is_accepted_and_runs(client: httpx.Client) -> None:
    response = submit(client, TEXT_TO_IMAGE, SEED_000_EXAMPLE)
    assert response.status_code == 200, response.text
    envelope = response.json()
    # Seed 000's documented response keys, plus the contract's.
    assert set(envelope) >= SEED_000_RESPONSE_KEYS
    assert envelope["status"] == "IN_QUEUE"
    status = wait_completed(client, envelope["status_url"])
    assert "error" not in status, status
    output = client.get(envelope["response_url"]).json()
    assert output["prompt"] == SEED_000_EXAMPLE["prompt"]
    assert [(image["width"], image["height"]) for image in output["images"]] == [(128, 128)]


def test_max_edit_requires_output_format(client: httpx.Client, image_host: LoopbackServer) -> None:
    body = {"prompt": "x", "image_url": image_url(image_host)}
    assert only_error(submit(client, MAX_EDIT, body)) == {
        "type": "missing",
        "loc": ["body", "output_format"],
        "msg": "Field required",
        "input": body,
    }


@pytest.mark.parametrize("app_id", EDITS)
def test_edits_require_image_url(client: httpx.Client, image_host: LoopbackServer, app_id: str) -> None:
    body = valid_body(app_id, image_host)
    del body["image_url"]
    assert only_error(submit(client, app_id, body)) == {
        "type": "missing",
        "loc": ["body", "image_url"],
        "msg": "Field required",
        "input": body,
    }


@pytest.mark.parametrize("app_id", MULTIS)
@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        (None, {"type": "missing", "loc": ["body", "image_urls"], "msg": "Field required"}),
        ([], {"type": "too_short", "loc": ["body", "image_urls"]}),
        (["u"] * 5, {"type": "too_long", "loc": ["body", "image_urls"]}),
        ("https://a.example/x.png", {"type": "list_type", "loc": ["body", "image_urls"]}),
        (["GOOD", "GOOD", "ftp://x"], {"type": "value_error", "loc": ["body", "image_urls", 2]}),
        (["GOOD", 7], {"type": "string_type", "loc": ["body", "image_urls", 1]}),
    ],
)
def test_image_urls_take_one_to_four_valid_urls(
    client: httpx.Client, image_host: LoopbackServer, app_id: str, urls: Any, expected: dict[str, Any]
) -> None:
    body = valid_body(app_id, image_host)
    if urls is None:
        del body["image_urls"]
    else:
        body["image_urls"] = (
            [image_url(image_host) if u == "GOOD" else u for u in urls] if isinstance(urls, list) else urls
        )
    error = only_error(submit(client, app_id, body))
    assert {name: error[name] for name in expected} == expected, error


def test_four_image_urls_are_accepted(client: httpx.Client, image_host: LoopbackServer) -> None:
    body = valid_body(MULTI, image_host) | {"image_urls": [image_url(image_host)] * 4, "seed": 0}
    response = submit(client, MULTI, body)
    assert response.status_code == 200, response.text
    assert cancel_and_wait(client, response.json())["status"] == "COMPLETED"


@pytest.mark.parametrize("app_id", EDITS)
@pytest.mark.parametrize(
    "bad_url", ["ftp://x", "not a url", "file:///etc/passwd", "data:image/png,abc", "https://"]
)
def test_image_url_must_be_http_or_a_base64_data_uri(
    client: httpx.Client, image_host: LoopbackServer, app_id: str, bad_url: str
) -> None:
    body = valid_body(app_id, image_host) | {"image_url": bad_url}
    error = only_error(submit(client, app_id, body))
    assert "ctx" not in error  # a clean message, no opaque validator context
    assert error["type"] == ("url_parsing" if bad_url == "https://" else "value_error")
    assert error["loc"] == ["body", "image_url"]
    # A data URI is never echoed back, only its header and size.
    assert error["input"] == ("data:image/png,… (18 characters)" if bad_url.startswith("data:") else bad_url)
    assert error["msg"] in (
        "must be an https:// or http:// URL or a data: URI",
        "data URI must be base64-encoded (data:image/...;base64,...)",
        "URL has no valid host",
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            "num_inference_steps",
            9,
            {
                "type": "greater_than_equal",
                "msg": "Input should be greater than or equal to 10",
                "ctx": {"ge": 10},
            },
        ),
        (
            "num_inference_steps",
            51,
            {"type": "less_than_equal", "msg": "Input should be less than or equal to 50", "ctx": {"le": 50}},
        ),
        (
            "acceleration",
            "turbo",
            {
                "type": "literal_error",
                "msg": f"Input should be {ACCELERATIONS}",
                "ctx": {"expected": ACCELERATIONS},
            },
        ),
    ],
)
def test_dev_only_fields(
    client: httpx.Client, image_host: LoopbackServer, field: str, value: object, expected: dict[str, Any]
) -> None:
    body = valid_body(DEV, image_host) | {field: value}
    assert only_error(submit(client, DEV, body)) == {**expected, "loc": ["body", field], "input": value}


def test_dev_resolution_mode_enum(client: httpx.Client, image_host: LoopbackServer) -> None:
    body = valid_body(DEV, image_host) | {"resolution_mode": "7:3"}
    error = only_error(submit(client, DEV, body))
    assert error["type"] == "literal_error"
    assert error["loc"] == ["body", "resolution_mode"]
    assert error["input"] == "7:3"
    for mode in ("auto", "match_input", "4:5", "5:4", "9:21"):
        assert f"'{mode}'" in error["ctx"]["expected"]
    assert error["msg"] == f"Input should be {error['ctx']['expected']}"


def test_every_error_is_reported_at_once(client: httpx.Client) -> None:
    body = {"prompt": "", "guidance_scale": 21, "num_images": 5, "output_format": "gif"}
    detail = refused(submit(client, TEXT_TO_IMAGE, body))
    fields = sorted(entry["loc"][1] for entry in detail)
    assert fields == ["guidance_scale", "num_images", "output_format", "prompt"]


def test_unknown_fields_are_ignored(client: httpx.Client) -> None:
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "x", "not_a_field": 1})
    assert response.status_code == 200, response.text
    cancel_and_wait(client, response.json())


# -- the body as a whole, the app id ------------------------------------------------------------------


def test_invalid_json(client: httpx.Client) -> None:
    error = only_error(client.post(f"/{TEXT_TO_IMAGE}", content=b'{"prompt": "x",', headers=JSON))
    assert error["type"] == "json_invalid"
    assert error["loc"][0] == "body"
    assert error["msg"] == "JSON decode error"


def test_body_that_is_not_an_object(client: httpx.Client) -> None:
    error = only_error(client.post(f"/{TEXT_TO_IMAGE}", content=b"[1]", headers=JSON))
    assert error["loc"] == ["body"]
    assert error["input"] == [1]


@pytest.mark.parametrize(
    "path",
    [
        "/fal-ai/not-a-model",
        "/fal-ai/flux-pro/kontext/ultra",
        "/run/fal-ai/not-a-model",
        "/fal-ai/flux-pro/kontext/dev",
        "/fal-ai",
    ],
)
def test_unknown_app_id_is_404(client: httpx.Client, path: str) -> None:
    response = client.post(path, json={"prompt": "x"})
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


# -- headers and query --------------------------------------------------------------------------------


def test_queue_priority_header_enum(client: httpx.Client) -> None:
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "x"}, headers={"X-Fal-Queue-Priority": "urgent"})
    assert only_error(response, 400) == {
        "type": "literal_error",
        "loc": ["header", "x-fal-queue-priority"],
        "msg": "Input should be 'normal' or 'low'",
        "input": "urgent",
        "ctx": {"expected": "'normal' or 'low'"},
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1", {"type": "greater_than", "msg": "Input should be greater than 0", "ctx": {"gt": 0}}),
        ("0", {"type": "greater_than", "msg": "Input should be greater than 0", "ctx": {"gt": 0}}),
        ("inf", {"type": "finite_number", "msg": "Input should be a finite number"}),
        ("nan", {"type": "finite_number", "msg": "Input should be a finite number"}),
        ("1e308", A_DAY_AT_MOST),
        ("86400.5", A_DAY_AT_MOST),
        (
            "abc",
            {
                "type": "float_parsing",
                "msg": "Input should be a valid number, unable to parse string as a number",
            },
        ),
    ],
)
def test_request_timeout_header(client: httpx.Client, value: str, expected: dict[str, Any]) -> None:
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "x"}, headers={"X-Fal-Request-Timeout": value})
    assert only_error(response, 400) == {
        **expected,
        "loc": ["header", "x-fal-request-timeout"],
        "input": value,
    }


@pytest.mark.parametrize(
    "value",
    [
        "not json",
        "{}",
        '{"expiration_duration_seconds": "soon"}',
        '{"expiration_duration_seconds": 0}',
        '{"expiration_duration_seconds": -5}',
        '{"expiration_duration_seconds": NaN}',
        '{"expiration_duration_seconds": Infinity}',
        '{"expiration_duration_seconds": 1e308}',
        '{"expiration_duration_seconds": 31536001}',
        "[3600]",
        "3600",
        "null",
        '{"expiration_duration_seconds": true}',
    ],
)
def test_object_lifecycle_header(client: httpx.Client, value: str) -> None:
    headers = {"X-Fal-Object-Lifecycle-Preference": value}
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "x"}, headers=headers)
    error = only_error(response, 400)
    assert error["type"] == "value_error"
    assert error["loc"] == ["header", "x-fal-object-lifecycle-preference"]
    assert error["input"] == value


def test_a_lifecycle_integer_too_big_for_a_float_is_refused(client: httpx.Client) -> None:
    # json.loads makes it an int, which no float can hold (math.isfinite raises on it).
    headers = {"X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds": 1' + "0" * 400 + "}"}
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "x"}, headers=headers)
    error = only_error(response, 400)
    assert (error["type"], error["loc"]) == ("value_error", ["header", "x-fal-object-lifecycle-preference"])


@pytest.mark.parametrize("hook", ["ftp://127.0.0.1/hook", "127.0.0.1/hook", "javascript:alert(1)", "http://"])
def test_webhook_must_be_an_http_url(client: httpx.Client, hook: str) -> None:
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "x"}, params={"fal_webhook": hook})
    error = only_error(response)
    assert error["type"] == "value_error"
    assert error["loc"] == ["query", "fal_webhook"]
    assert error["input"] == hook


def test_body_and_header_errors_are_reported_together(client: httpx.Client) -> None:
    # A bad header makes the whole answer a 400, listing the body's errors as well.
    headers = {"X-Fal-Queue-Priority": "x"}
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "x", "num_images": 9}, headers=headers)
    assert sorted(tuple(entry["loc"]) for entry in refused(response, 400)) == [
        ("body", "num_images"),
        ("header", "x-fal-queue-priority"),
    ]


def test_still_serving_after_bad_input(client: httpx.Client) -> None:
    for content in (b"", b"\xff\xfe", b"{" * 10_000, b"null", b'"x"'):
        assert client.post(f"/{TEXT_TO_IMAGE}", content=content, headers=JSON).status_code == 422
    # Nesting deeper than the JSON parser recurses is invalid JSON like any other.
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert client.post(f"/{TEXT_TO_IMAGE}", content=deep, headers=JSON).status_code == 422
    # A form-encoded body (curl -d's default type) is refused, naming the header to send.
    form = client.post(f"/{TEXT_TO_IMAGE}", content=b"prompt=x")
    assert form.status_code == 415
    assert "Content-Type: application/json" in form.json()["detail"]
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ready"
    response = submit(client, TEXT_TO_IMAGE, {"prompt": "still here"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "IN_QUEUE"
    cancel_and_wait(client, response.json())


# -- OpenAPI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi(server: KontextdServer) -> dict[str, Any]:
    with server.client() as http_client:
        response = http_client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def request_schema(openapi: dict[str, Any], app_id: str, prefix: str = "") -> dict[str, Any]:
    operation = openapi["paths"][f"{prefix}/{app_id}"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    name = schema["$ref"].removeprefix("#/components/schemas/")
    return openapi["components"]["schemas"][name]


def enum_of(prop: dict[str, Any]) -> list[str]:
    """The enum of a property, whether plain or `anyOf: [enum, null]` (optional)."""
    if "enum" in prop:
        return prop["enum"]
    (choice,) = [option for option in prop["anyOf"] if option.get("type") != "null"]
    return choice["enum"]


@pytest.mark.parametrize("prefix", ["", "/run"])
def test_openapi_has_every_submit_path(openapi: dict[str, Any], prefix: str) -> None:
    for app_id in ALL_APPS:
        operation = openapi["paths"][f"{prefix}/{app_id}"]["post"]
        assert operation["summary"] and operation["description"]
        assert operation["requestBody"]["required"] is True


@pytest.mark.parametrize("app_id", ALL_APPS)
def test_openapi_request_schemas(openapi: dict[str, Any], app_id: str) -> None:
    schema = request_schema(openapi, app_id)
    assert schema == request_schema(openapi, app_id, "/run")
    props = schema["properties"]
    for name, prop in props.items():
        assert prop.get("description"), f"{app_id}: {name} has no description"

    expected_required = {"prompt"}
    if app_id in EDITS:
        expected_required.add("image_url")
    if app_id in MULTIS:
        expected_required.add("image_urls")
    if app_id == MAX_EDIT:
        expected_required.add("output_format")
    assert set(schema["required"]) == expected_required

    assert props["prompt"]["type"] == "string"
    assert props["prompt"]["minLength"] == 1
    num_images = props["num_images"]
    assert (num_images["type"], num_images["default"], num_images["minimum"], num_images["maximum"]) == (
        "integer",
        1,
        1,
        4,
    )
    guidance = props["guidance_scale"]
    assert (guidance["type"], guidance["minimum"], guidance["maximum"]) == ("number", 1, 20)
    assert guidance["default"] == (2.5 if app_id == DEV else 3.5)
    assert props["sync_mode"]["default"] is False
    assert enum_of(props["output_format"]) == ["jpeg", "png"]
    if app_id == MAX_EDIT:
        assert "default" not in props["output_format"]  # required: no default to fall back on
    else:
        assert props["output_format"]["default"] == "jpeg"
    if app_id in EDITS:
        assert props["image_url"]["type"] == "string"
    if app_id in MULTIS:
        urls = props["image_urls"]
        assert (urls["type"], urls["minItems"], urls["maxItems"]) == ("array", 1, 4)
        assert urls["items"]["type"] == "string" and urls["items"]["pattern"]

    if app_id == DEV:
        steps = props["num_inference_steps"]
        assert (steps["default"], steps["minimum"], steps["maximum"]) == (28, 10, 50)
        assert props["enable_safety_checker"]["default"] is True
        assert enum_of(props["acceleration"]) == ["none", "regular", "high"]
        assert props["acceleration"]["default"] == "none"
        assert props["resolution_mode"]["default"] == "match_input"
        assert set(ASPECT_RATIOS) - {"21:9"} <= set(enum_of(props["resolution_mode"]))
        assert {"auto", "match_input", "4:5", "5:4"} <= set(enum_of(props["resolution_mode"]))
        assert "safety_tolerance" not in props and "aspect_ratio" not in props
    else:
        assert enum_of(props["safety_tolerance"]) == ["1", "2", "3", "4", "5", "6"]
        assert props["safety_tolerance"]["default"] == "2"
        assert enum_of(props["aspect_ratio"]) == ASPECT_RATIOS
        if app_id in EDITS or app_id in MULTIS:
            assert props["aspect_ratio"].get("default") is None  # absent: follow the (first) input image
        else:
            assert props["aspect_ratio"]["default"] == "1:1"


def test_openapi_responses_and_queue_paths(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]

    def success_schema(path: str) -> dict[str, Any]:
        content = openapi["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]
        return schemas[content["schema"]["$ref"].rsplit("/", 1)[1]]

    assert set(success_schema(f"/{TEXT_TO_IMAGE}")["required"]) >= SEED_000_RESPONSE_KEYS
    output = success_schema(f"/run/{TEXT_TO_IMAGE}")
    assert {"images", "timings", "seed", "has_nsfw_concepts", "prompt"} <= set(output["required"])
    for path, method in [
        ("/{app_owner}/{app_alias}/requests/{request_id}/status", "get"),
        ("/{app_owner}/{app_alias}/requests/{request_id}/status/stream", "get"),
        ("/{app_owner}/{app_alias}/requests/{request_id}", "get"),
        ("/{app_owner}/{app_alias}/requests/{request_id}/cancel", "put"),
    ]:
        assert method in openapi["paths"][path]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_work_offline(client: httpx.Client, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "openapi.json" in response.text
    # Every script and stylesheet comes from this server: nothing on a CDN, so the page renders offline.
    assets = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert assets, response.text
    for asset in assets:
        assert asset.startswith("/"), asset
        fetched = client.get(asset)
        assert fetched.status_code == 200, asset
        assert len(fetched.content) > 1000, asset  # the real bundle, not a placeholder


def test_examples_in_the_openapi_document_are_inline(openapi: dict[str, Any]) -> None:
    # Trying an example in /docs must not send the server to the internet.
    for name, schema in openapi["components"]["schemas"].items():
        image = schema.get("properties", {}).get("image_url")
        if image is not None:
            assert all(example.startswith("data:image/") for example in image["examples"]), name
