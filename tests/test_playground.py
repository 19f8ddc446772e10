"""The web playground (GET /) end to end in a real browser: Debian's Chromium driven by Playwright, against
the session's kontextd (the tiny model on CPU).

Each test opens the page in a fresh browser context (its own localStorage) of one browser for the module,
and checks that the page logged no console error and asked nothing of any host but loopback.

Chromium is installed by the test setup (.ci/run: Debian's `chromium` package), never downloaded by
Playwright. Set KONTEXTD_PLAYGROUND_SCREENSHOTS=docs to refresh the README's screenshots.
"""

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import KontextdServer, png_bytes

from kontextd.catalogue.endpoints import ENDPOINTS

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_DIR = os.environ.get("KONTEXTD_PLAYGROUND_SCREENSHOTS")
SCREENSHOT_MAX_BYTES = 200_000
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
EDIT = "fal-ai/flux-pro/kontext"
RUN_SECONDS = 60_000  # Playwright timeouts are in milliseconds


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: these tests drive Debian's Chromium. Install it with "
            "`apt-get install chromium` (.ci/run does so before the tests); Playwright's own browser "
            "download is not used."
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: install the test extras (pip install -e '.[test]')")
    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()
    finally:
        playwright.stop()


@dataclass
class Playground:
    page: object
    server: KontextdServer
    console: list[str] = field(default_factory=list)
    requests: list = field(default_factory=list)  # every playwright Request the page made

    def open(self) -> None:
        self.page.goto(self.server.base_url + "/")
        # The endpoints are listed once /v1/endpoints and /openapi.json have answered.
        self.page.wait_for_function(
            f"() => document.querySelectorAll('#endpoint option').length === {len(ENDPOINTS)}"
        )

    def choose(self, app_id: str) -> None:
        self.page.get_by_label("Endpoint").select_option(app_id)

    def generate(self, prompt: str) -> None:
        self.page.get_by_label("Prompt", exact=True).fill(prompt)
        self.page.get_by_role("button", name="Generate").click()

    def wait_completed(self) -> str:
        status = self.page.locator("#status")
        status.filter(has_text="Completed:").wait_for(timeout=RUN_SECONDS)
        return status.inner_text()

    def posted(self, path: str) -> list[dict]:
        return [
            json.loads(request.post_data or "{}")
            for request in self.requests
            if request.method == "POST" and urlsplit(request.url).path == path
        ]

    def urls(self, method: str | None = None) -> list[str]:
        return [request.url for request in self.requests if method in (None, request.method)]

    def assert_clean(self, allowed: tuple[str, ...] = ()) -> None:
        errors = [line for line in self.console if not any(text in line for text in allowed)]
        assert errors == [], f"console errors: {errors}"
        hosts = {urlsplit(url).hostname for url in self.urls() if url.startswith(("http:", "https:"))}
        assert hosts <= LOOPBACK, f"requests off loopback: {hosts - LOOPBACK}"
        schemes = {urlsplit(url).scheme for url in self.urls()}
        assert schemes <= {"http", "data", "blob"}, schemes

    def screenshot(self, name: str, tmp_path: Path) -> None:
        """A screenshot, commit-sized; copied to docs/ when KONTEXTD_PLAYGROUND_SCREENSHOTS says so."""
        path = tmp_path / f"playground-{name}.png"
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=str(path))
        if SCREENSHOT_DIR:
            shutil.copyfile(path, Path(SCREENSHOT_DIR) / path.name)
        size = path.stat().st_size
        assert size < SCREENSHOT_MAX_BYTES, f"{path.name} is {size} bytes"


@pytest.fixture
def playground(browser, server: KontextdServer) -> Iterator[Playground]:
    context = browser.new_context(viewport={"width": 1180, "height": 860}, color_scheme="light")
    context.set_default_timeout(15_000)
    page = context.new_page()
    watched = Playground(page, server)
    page.on(
        "console",
        lambda message: (
            watched.console.append(f"{message.type}: {message.text}") if message.type == "error" else None
        ),
    )
    page.on("pageerror", lambda error: watched.console.append(f"pageerror: {error}"))
    page.on("request", lambda request: watched.requests.append(request))
    watched.open()
    yield watched
    context.close()


def natural_widths(page) -> list[int]:
    gallery = page.locator("#gallery img")
    gallery.first.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery img')].every((img) => img.complete)"
    )
    return gallery.evaluate_all("(images) => images.map((img) => img.naturalWidth)")


def test_page_is_served_with_a_strict_policy(server: KontextdServer) -> None:
    with server.client() as client:
        page = client.get("/")
        script = client.get("/playground/app.js")
        style = client.get("/playground/style.css")
        missing = client.get("/playground/nothing.js")
        schema = client.get("/openapi.json").json()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'self'", "img-src 'self' data: blob:", "connect-src 'self'"):
        assert directive in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404
    assert "/" not in schema["paths"] and not any(path.startswith("/playground") for path in schema["paths"])
    # Nothing the page loads comes from elsewhere: no absolute URL in its markup, script or style.
    for text in (page.text, script.text, style.text):
        assert "http://" not in text and "https://" not in text.replace("https://…", "")


def test_endpoints_and_their_fields_from_the_schema(playground: Playground) -> None:
    page = playground.page
    listed = page.locator("#endpoint option").evaluate_all("(options) => options.map((o) => o.value)")
    assert listed == [endpoint.app_id for endpoint in ENDPOINTS]
    playground.choose(TEXT_TO_IMAGE)
    assert page.get_by_label("Num Images").input_value() == "1"
    assert page.get_by_label("Guidance Scale").input_value() == "3.5"
    output_format = page.get_by_label("Output Format")
    assert output_format.locator("option").all_inner_texts() == ["jpeg", "png"]
    assert output_format.evaluate("(select) => select.selectedOptions[0].textContent") == "jpeg"
    assert page.get_by_label("Seed", exact=True).input_value() == ""
    assert page.locator("input[type=file]").count() == 0  # text to image: no input image
    playground.choose(EDIT)
    assert page.get_by_label("Image", exact=True).get_attribute("type") == "file"
    playground.choose("fal-ai/flux-pro/kontext/multi")
    assert page.get_by_label("Images", exact=True).get_attribute("multiple") is not None
    playground.choose("fal-ai/flux-kontext-lora/inpaint")
    assert page.get_by_label("Output Format").evaluate("(s) => s.selectedOptions[0].textContent") == "png"
    assert page.get_by_label("Mask", exact=True).count() == 1
    assert page.get_by_label("Loras").input_value() == "[]"
    playground.assert_clean()


def test_text_to_image_shows_progress_then_the_image(playground: Playground, tmp_path: Path) -> None:
    page = playground.page
    playground.choose(TEXT_TO_IMAGE)
    playground.generate("A lighthouse on a cliff at dusk, oil painting")
    # The step bar moves while it runs, from the status stream's log lines.
    page.wait_for_function("() => document.getElementById('progress').value > 0", timeout=RUN_SECONDS)
    # A live preview from the stream (asked with ?previews=1) while it runs: the 16x16 latent grid.
    page.wait_for_function(
        "() => { const p = document.getElementById('preview');"
        " return !p.hidden && p.src.startsWith('data:image/jpeg') && p.naturalWidth === 16; }",
        timeout=RUN_SECONDS,
    )
    assert "Completed: 1 image" in playground.wait_completed()
    assert natural_widths(page) == [128]
    assert page.locator("#progress").evaluate("(bar) => bar.value === bar.max && bar.max === 28")
    assert page.locator("#logs li").filter(has_text="step 28/28").count() == 1
    figure = page.locator("#gallery figure").first
    assert figure.get_by_role("link", name="Download").get_attribute("download").endswith(".jpg")
    url = figure.locator("img").get_attribute("src")
    assert httpx.get(url).headers["content-type"] == "image/jpeg"
    page.get_by_text("Logs", exact=True).click()  # the log lines, shown in the screenshot
    playground.screenshot("text-to-image", tmp_path)
    # Reuse seed: the seed the server chose goes into the Seed field.
    seed = page.evaluate("JSON.parse(localStorage.getItem('kontextd.playground.history'))[0].seed")
    assert isinstance(seed, int)
    figure.get_by_role("button", name="Reuse seed").click()
    assert page.get_by_label("Seed", exact=True).input_value() == str(seed)
    assert page.evaluate("document.activeElement.id") == "field-seed"
    # The one request sent said what was asked, leaving defaults to the server.
    assert playground.posted(f"/{TEXT_TO_IMAGE}") == [
        {"prompt": "A lighthouse on a cliff at dusk, oil painting"}
    ]
    playground.assert_clean()


def test_edit_with_an_uploaded_file(playground: Playground, tmp_path: Path) -> None:
    page = playground.page
    playground.choose(EDIT)
    upload = {"name": "red.png", "mimeType": "image/png", "buffer": png_bytes(96, 96)}
    page.get_by_label("Image", exact=True).set_input_files(upload)
    assert page.get_by_role("button", name="Remove red.png").is_visible()  # a local preview of the file
    playground.generate("Make the square blue")
    playground.wait_completed()
    assert natural_widths(page) == [128]
    # Uploaded through fal's storage API, then given as the image_url.
    initiated = playground.posted("/storage/upload/initiate")
    assert initiated == [{"content_type": "image/png", "file_name": "red.png"}]
    puts = playground.urls("PUT")
    assert len(puts) == 1 and urlsplit(puts[0]).path.startswith("/files/uploads/")
    [submitted] = playground.posted(f"/{EDIT}")
    assert urlsplit(submitted["image_url"]).path == urlsplit(puts[0]).path
    assert httpx.get(submitted["image_url"]).content == upload["buffer"]
    playground.screenshot("edit", tmp_path)
    playground.assert_clean()


def test_keyboard_alone(playground: Playground) -> None:
    page = playground.page
    playground.choose(TEXT_TO_IMAGE)
    # Tab order: from the prompt, through the options, to Generate.
    page.get_by_label("Prompt", exact=True).focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "generate":
            break
    else:
        raise AssertionError("Generate is not reached with Tab from the prompt")
    # Ctrl+Enter in the prompt submits.
    page.get_by_label("Prompt", exact=True).focus()
    page.keyboard.type("A paper boat on a pond")
    page.keyboard.press("Control+Enter")
    playground.wait_completed()
    assert playground.posted(f"/{TEXT_TO_IMAGE}") == [{"prompt": "A paper boat on a pond"}]
    # Enter in a one-line field submits too (the form's own submit).
    page.get_by_label("Num Images").fill("2")
    page.get_by_label("Num Images").press("Enter")
    page.wait_for_function(
        "() => document.querySelectorAll('#gallery img').length === 3", timeout=RUN_SECONDS
    )
    assert playground.posted(f"/{TEXT_TO_IMAGE}")[-1] == {"prompt": "A paper boat on a pond", "num_images": 2}
    playground.assert_clean()


def test_a_validation_error_is_shown_on_its_field(playground: Playground, tmp_path: Path) -> None:
    page = playground.page
    playground.choose(TEXT_TO_IMAGE)
    page.get_by_label("Num Images").fill("9")
    playground.generate("Too many")
    error = page.locator("#field-num_images-error")
    error.wait_for()
    assert "less than or equal to 4" in error.inner_text()
    assert page.get_by_label("Num Images").get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "field-num_images"
    assert "num_images: Input should be less than or equal to 4" in page.get_by_role("alert").inner_text()
    # The field names its error to assistive technology.
    described = page.get_by_label("Num Images").get_attribute("aria-describedby").split()
    assert "field-num_images-error" in described
    playground.screenshot("validation", tmp_path)
    # The 422 answer is the one console line (Chromium logs every failed response).
    playground.assert_clean(allowed=("status of 422",))


def test_history_and_key_are_kept_in_the_browser(playground: Playground) -> None:
    page = playground.page
    page.get_by_label("API key").fill("not-needed-here")
    keyed = len(playground.requests)  # every API call from here on sends the key
    playground.choose(TEXT_TO_IMAGE)
    prompt = "History: a red bicycle " + "against a white wall " * 10
    playground.generate(prompt)
    playground.wait_completed()
    page.reload()
    playground.open()
    assert page.get_by_label("API key").input_value() == "not-needed-here"
    assert page.get_by_label("Endpoint").input_value() == TEXT_TO_IMAGE
    entries = page.locator("#history li")
    assert entries.count() == 1
    assert entries.first.locator(".prompt").inner_text() == prompt[:120]
    assert entries.first.locator("img").evaluate("(img) => img.complete && img.naturalWidth") == 128
    # The key went with every API call, the status stream's included (read with fetch, not EventSource).
    api_calls = [
        request
        for request in playground.requests[keyed:]
        if request.resource_type == "fetch" and "/storage/" not in request.url
    ]
    assert {urlsplit(request.url).path.rsplit("/", 1)[-1] for request in api_calls} >= {"stream", "endpoints"}
    for request in api_calls:
        assert request.headers.get("authorization") == "Key not-needed-here", request.url
    entries.first.get_by_role("button").click()  # Reuse: the prompt and the seed again
    assert page.get_by_label("Prompt", exact=True).input_value() == prompt[:120]
    assert page.get_by_label("Seed", exact=True).input_value() != ""
    playground.assert_clean()


def test_a_server_with_api_keys(browser, servers: list[KontextdServer], tmp_path: Path) -> None:
    """The page itself is public; the API behind it asks for the key, which the page sends with every
    call once given, the status stream included (fetch, where EventSource could send no header)."""
    keyed = KontextdServer(tmp_path / "keyed", args=["--api-key", "sekret", "--tiny-step-seconds", "0.02"])
    servers.append(keyed.start())
    context = browser.new_context()
    try:
        page = context.new_page()
        playground = Playground(page, keyed)
        page.on(
            "console",
            lambda message: playground.console.append(message.text) if message.type == "error" else None,
        )
        page.on("pageerror", lambda error: playground.console.append(f"pageerror: {error}"))
        page.on("request", lambda request: playground.requests.append(request))
        page.goto(keyed.base_url + "/")
        page.get_by_role("alert").filter(has_text="needs an API key").wait_for()
        page.get_by_label("API key").fill("sekret")
        page.get_by_label("API key").press("Tab")  # a changed key: the endpoints are asked for again
        page.wait_for_function(
            f"() => document.querySelectorAll('#endpoint option').length === {len(ENDPOINTS)}"
        )
        assert page.get_by_role("alert").is_hidden()
        playground.choose(TEXT_TO_IMAGE)
        playground.generate("A key-guarded teapot")
        playground.wait_completed()
        assert natural_widths(page) == [128]
        [stream] = [request for request in playground.requests if "/status/stream" in request.url]
        assert stream.headers["authorization"] == "Key sekret"
        # The two calls made before the key was given were refused (401), and Chromium logs each.
        playground.assert_clean(allowed=("status of 401",))
    finally:
        context.close()
