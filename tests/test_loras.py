"""LoRAs: the files (fetched once, cached by content, capped), and the LoRA endpoints end to end on a real
server whose tiny pipeline loads LoRAs made here with peft."""

import http.server
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import KontextdServer, LoopbackServer, wait_completed
from lora_maker import make_lora
from safetensors.torch import save_file

from kontextd.backends.base import InputUnusable
from kontextd.backends.lora_files import LoraFiles, looks_like_safetensors
from kontextd.catalogue.endpoints import affinity
from kontextd.catalogue.schemas import LoraEditInput

DEV = "fal-ai/flux-kontext/dev"
LORA_EDIT = "fal-ai/flux-kontext-lora"
LORA_T2I = "fal-ai/flux-kontext-lora/text-to-image"
LORA_INPAINT = "fal-ai/flux-kontext-lora/inpaint"
HUB_REPO = "kontextd-tests/style"  # in a Hugging Face cache the test writes; nothing is downloaded
FIELD = ("loras", 0, "path")


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tensors.safetensors"
        save_file(tensors, str(path))
        return path.read_bytes()


# -- the files --------------------------------------------------------------------------------------------


def fake_safetensors(fill: bytes, size: int = 64) -> bytes:
    header = b'{"__metadata__":{}}'
    return struct.pack("<Q", len(header)) + header + fill * (size - len(header) - 8)


class Fetches:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.urls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        return self.files[url]


def test_a_url_is_fetched_once_and_kept_by_its_content(tmp_path: Path) -> None:
    data = fake_safetensors(b"a")
    fetch = Fetches({"http://127.0.0.1:9/a.safetensors": data, "http://127.0.0.1:9/same.safetensors": data})
    files = LoraFiles(tmp_path / "cache", fetch=fetch, cache_bytes=10**6)
    first = files.resolve("http://127.0.0.1:9/a.safetensors", FIELD)
    again = files.resolve("http://127.0.0.1:9/a.safetensors", FIELD)
    other_url = files.resolve("http://127.0.0.1:9/same.safetensors", FIELD)
    assert fetch.urls == ["http://127.0.0.1:9/a.safetensors", "http://127.0.0.1:9/same.safetensors"]
    assert first == again and other_url.digest == first.digest  # one file, whichever URL named it
    assert first.path.read_bytes() == data
    # A second process (or a restart) on the same cache downloads nothing either.
    restarted = LoraFiles(tmp_path / "cache", fetch=Fetches({}), cache_bytes=10**6)
    assert restarted.resolve("http://127.0.0.1:9/a.safetensors", FIELD) == first


def test_the_least_recently_used_file_is_evicted_beyond_the_cap(tmp_path: Path) -> None:
    urls = {name: f"http://127.0.0.1:9/{name}.safetensors" for name in "abc"}
    fetch = Fetches({url: fake_safetensors(name.encode(), 100) for name, url in urls.items()})
    files = LoraFiles(tmp_path, fetch=fetch, cache_bytes=250)  # room for two files of 100 bytes
    a = files.resolve(urls["a"], FIELD)
    os.utime(a.path, (1, 1))  # long ago
    b = files.resolve(urls["b"], FIELD)
    os.utime(b.path, (2, 2))
    files.resolve(urls["a"], FIELD)  # used again: now the most recent
    files.resolve(urls["c"], FIELD)  # over the cap: b goes, the least recently used
    assert a.path.exists() and not b.path.exists()
    files.resolve(urls["b"], FIELD)
    assert fetch.urls.count(urls["b"]) == 2 and fetch.urls.count(urls["a"]) == 1


def test_a_file_that_is_no_safetensors_is_refused_naming_the_field(tmp_path: Path) -> None:
    fetch = Fetches({"http://127.0.0.1:9/x": b"<html>not a LoRA</html>"})
    files = LoraFiles(tmp_path, fetch=fetch, cache_bytes=10**6)
    with pytest.raises(InputUnusable) as refused:
        files.resolve("http://127.0.0.1:9/x", ("loras", 2, "path"))
    assert (refused.value.field, refused.value.error_type) == (("loras", 2, "path"), "lora_load_error")
    assert "safetensors" in refused.value.message
    assert not list(tmp_path.glob("*.safetensors"))  # nothing kept
    assert not looks_like_safetensors(b"\xff" * 8 + b"{") and looks_like_safetensors(fake_safetensors(b"x"))


def test_names_are_looked_up_in_the_lora_directory_only(tmp_path: Path) -> None:
    lora_dir, outside = tmp_path / "loras", tmp_path / "secret.safetensors"
    lora_dir.mkdir()
    (lora_dir / "style.safetensors").write_bytes(fake_safetensors(b"s"))
    (lora_dir / "plain").write_bytes(fake_safetensors(b"p"))
    outside.write_bytes(fake_safetensors(b"o"))
    (lora_dir / "escape.safetensors").symlink_to(outside)
    files = LoraFiles(tmp_path / "cache", fetch=Fetches({}), lora_dir=lora_dir, cache_bytes=0)
    assert files.resolve("style", FIELD).path == (lora_dir / "style.safetensors").resolve()
    assert files.resolve("style.safetensors", FIELD) == files.resolve("style", FIELD)
    assert files.resolve("plain", FIELD).path.name == "plain"
    for name in ("escape", "missing"):
        with pytest.raises(InputUnusable, match="no LoRA named"):
            files.resolve(name, FIELD)
    without = LoraFiles(tmp_path / "cache", fetch=Fetches({}), cache_bytes=0)
    with pytest.raises(InputUnusable, match="no --lora-dir"):
        without.resolve("style", FIELD)


# -- end to end --------------------------------------------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    routes: dict[str, bytes] = {}
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = self.routes.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def loras() -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    style, other = make_lora(1), make_lora(2)
    routes = {
        "/style.safetensors": style,
        "/other.safetensors": other,
        "/junk.safetensors": b"\x00" * 64,
        # safetensors, with LoRA-shaped names, but the shapes of another model: it does not fit.
        "/wrong.safetensors": safetensors_bytes(
            {
                name: torch.zeros(3, 7)
                for name in ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight",)
            }
        ),
    }
    handler = type("Loras", (_Files,), {"routes": routes, "hits": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", routes, handler.hits
    httpd.shutdown()


@pytest.fixture(scope="module")
def lora_server(
    tmp_path_factory: pytest.TempPathFactory, loras: tuple[str, dict[str, bytes], list[str]]
) -> Iterator[KontextdServer]:
    _, routes, _ = loras
    root = tmp_path_factory.mktemp("lora-server")
    lora_dir = root / "operator-loras"
    lora_dir.mkdir()
    (lora_dir / "house-style.safetensors").write_bytes(routes["/other.safetensors"])
    # A Hugging Face cache as huggingface_hub lays it out, holding the style LoRA: read offline.
    snapshot = root / "hf" / "hub" / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_lora_weights.safetensors").write_bytes(routes["/style.safetensors"])
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    server = KontextdServer(
        root / "data", args=["--lora-dir", str(lora_dir)], env={"HF_HOME": str(root / "hf")}
    ).start()
    yield server
    server.stop()


@pytest.fixture
def api(lora_server: KontextdServer) -> Iterator[httpx.Client]:
    with lora_server.client() as client:
        yield client


def run(api: httpx.Client, app_id: str, body: dict[str, Any]) -> httpx.Response:
    return api.post(f"/run/{app_id}", json=body, timeout=120)


def image_bytes(api: httpx.Client, response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    return api.get(image["url"]).content


def edit(
    image_host: LoopbackServer, loras: list[dict[str, Any]] | None = None, **fields: Any
) -> dict[str, Any]:
    body = {
        "prompt": "in the style",
        "image_url": f"{image_host.url}/wide.png",
        "seed": 0,
        "num_inference_steps": 10,
    }
    return body | ({"loras": loras} if loras is not None else {}) | fields


def test_a_lora_changes_the_image_reproducibly_and_leaves_no_trace(
    api: httpx.Client, image_host: LoopbackServer, loras: tuple[str, dict[str, bytes], list[str]]
) -> None:
    base_url, _, hits = loras
    style = {"path": f"{base_url}/style.safetensors"}
    plain_dev = image_bytes(api, run(api, DEV, edit(image_host, output_format="png")))
    before = image_bytes(api, run(api, LORA_EDIT, edit(image_host)))
    styled = image_bytes(api, run(api, LORA_EDIT, edit(image_host, [style])))
    styled_again = image_bytes(api, run(api, LORA_EDIT, edit(image_host, [style])))
    after = image_bytes(api, run(api, LORA_EDIT, edit(image_host)))
    assert before == plain_dev  # no LoRA: exactly the dev endpoint (both PNG here)
    assert styled != before  # the LoRA is applied
    assert styled_again == styled  # the same LoRA and seed give the same bytes
    assert after == before  # and it does not leak into a request that names none
    assert hits.count("/style.safetensors") == 1  # fetched once
    # Its scale counts; at 0 it is the base model.
    half = image_bytes(api, run(api, LORA_EDIT, edit(image_host, [style | {"scale": 0.5}])))
    assert half not in (styled, before)
    assert image_bytes(api, run(api, LORA_EDIT, edit(image_host, [style | {"scale": 0}]))) == before


def test_loras_combine_and_every_source_names_the_same_file(
    api: httpx.Client, image_host: LoopbackServer, loras: tuple[str, dict[str, bytes], list[str]]
) -> None:
    base_url, _, _ = loras
    by_url = {"path": f"{base_url}/style.safetensors"}
    other = {"path": f"{base_url}/other.safetensors"}
    styled = image_bytes(api, run(api, LORA_EDIT, edit(image_host, [by_url])))
    assert (
        image_bytes(api, run(api, LORA_EDIT, edit(image_host, [{"path": HUB_REPO}]))) == styled
    )  # the hub cache
    alone = image_bytes(api, run(api, LORA_EDIT, edit(image_host, [other])))
    assert (
        image_bytes(api, run(api, LORA_EDIT, edit(image_host, [{"path": "house-style"}]))) == alone
    )  # --lora-dir
    both = image_bytes(api, run(api, LORA_EDIT, edit(image_host, [by_url, other])))
    assert both not in (styled, alone)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/junk.safetensors", "not in the safetensors format"),
        ("/wrong.safetensors", "not a LoRA for this model"),
        ("/missing.safetensors", "HTTP 404"),
        ("no-such-name", "no LoRA named 'no-such-name'"),
        ("kontextd-tests/absent", "not in this server's Hugging Face cache"),
    ],
)
def test_a_lora_that_cannot_be_used_is_a_422_naming_it_and_the_worker_goes_on(
    api: httpx.Client,
    image_host: LoopbackServer,
    loras: tuple[str, dict[str, bytes], list[str]],
    path: str,
    message: str,
) -> None:
    base_url, _, _ = loras
    named = f"{base_url}{path}" if path.startswith("/") else path
    response = run(
        api, LORA_EDIT, edit(image_host, [{"path": f"{base_url}/style.safetensors"}, {"path": named}])
    )
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "loras", 1, "path"] and detail["input"] == named
    assert message in detail["msg"], detail
    assert run(api, LORA_EDIT, edit(image_host)).status_code == 200  # the next request is served


def test_lora_text_to_image_and_inpainting(api: httpx.Client, image_host: LoopbackServer) -> None:
    made = run(api, LORA_T2I, {"prompt": "a lighthouse", "seed": 0, "num_inference_steps": 10})
    assert made.status_code == 200, made.text
    assert [(i["width"], i["height"]) for i in made.json()["images"]] == [(144, 112)]  # landscape_4_3: 4:3
    assert made.json()["images"][0]["content_type"] == "image/png"  # the LoRA endpoints' default
    square = run(
        api,
        LORA_T2I,
        {"prompt": "a lighthouse", "seed": 0, "num_inference_steps": 10, "image_size": "square_hd"},
    )
    assert [(i["width"], i["height"]) for i in square.json()["images"]] == [(128, 128)]

    def inpaint(**fields: Any) -> httpx.Response:
        body = {
            "prompt": "a hat",
            "image_url": f"{image_host.url}/wide.png",
            # Green (20, 200, 90) is above mid-grey: white to the mask processor, so all is repainted.
            "mask_url": f"{image_host.url}/tall.png",
            "reference_image_url": f"{image_host.url}/square.png",
            "seed": 0,
            "num_inference_steps": 10,
        }
        return run(api, LORA_INPAINT, body | fields)

    painted = inpaint()
    assert [(i["width"], i["height"]) for i in painted.json()["images"]] == [(176, 96)]  # follows the image
    assert image_bytes(api, inpaint(strength=0.3)) != image_bytes(api, painted)


@pytest.mark.parametrize(
    ("asked", "loc", "kind"),
    [
        ([{"path": "a"}] * 5, ["body", "loras"], "too_long"),
        ([{"path": "../etc/passwd"}], ["body", "loras", 0, "path"], "value_error"),
        ([{"path": "a/b/c"}], ["body", "loras", 0, "path"], "value_error"),
        ([{"path": "file:///etc/passwd"}], ["body", "loras", 0, "path"], "value_error"),
        ([{"path": "a", "scale": 4.5}], ["body", "loras", 0, "scale"], "less_than_equal"),
        ([{"path": "a", "scale": -0.1}], ["body", "loras", 0, "scale"], "greater_than_equal"),
        ([{"path": "a", "weight": 1}], ["body", "loras", 0, "weight"], "extra_forbidden"),
        ([{}], ["body", "loras", 0, "path"], "missing"),
    ],
)
def test_lora_fields_are_validated_at_submit(
    api: httpx.Client, image_host: LoopbackServer, asked: list[dict[str, Any]], loc: list[Any], kind: str
) -> None:
    response = api.post(f"/{LORA_EDIT}", json=edit(image_host, asked))
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert (detail["loc"], detail["type"]) == (loc, kind)


@pytest.mark.parametrize(("strength", "accepted"), [(1e-300, True), (0, False), (1, True), (1.01, False)])
def test_any_inpaint_strength_above_0_runs_at_least_one_step(
    api: httpx.Client, image_host: LoopbackServer, strength: float, accepted: bool
) -> None:
    url = f"{image_host.url}/wide.png"
    body = {"prompt": "p", "image_url": url, "mask_url": url, "reference_image_url": url}
    response = api.post(f"/{LORA_INPAINT}", json=body | {"strength": strength, "num_inference_steps": 10})
    if accepted:
        assert response.status_code == 200, response.text
        status = wait_completed(api, response.json()["status_url"], timeout=120)
        assert "error" not in status, status  # a strength rounding to no step still runs one
        return
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "strength"]


def test_four_loras_and_scale_bounds_are_accepted(api: httpx.Client, image_host: LoopbackServer) -> None:
    body = edit(image_host, [{"path": "house-style", "scale": 0}, {"path": "house-style", "scale": 4}] * 2)
    response = api.post(f"/{LORA_EDIT}", json=body)
    assert response.status_code == 200, response.text
    assert "error" not in wait_completed(api, response.json()["status_url"])


def test_an_inpaint_mask_that_is_no_image_names_the_mask(
    api: httpx.Client, image_host: LoopbackServer
) -> None:
    body = {
        "prompt": "a hat",
        "image_url": f"{image_host.url}/wide.png",
        "mask_url": f"{image_host.url}/not-an-image",
        "reference_image_url": f"{image_host.url}/tall.png",
        "num_inference_steps": 10,
    }
    response = run(api, LORA_INPAINT, body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "mask_url"]


def test_the_lora_endpoints_are_listed(api: httpx.Client) -> None:
    listed = {entry["app_id"]: entry for entry in api.get("/v1/endpoints").json()["endpoints"]}
    for app_id in (LORA_EDIT, LORA_T2I, LORA_INPAINT):
        assert (listed[app_id]["backend"], listed[app_id]["status"]) == ("local", "ready")


def test_the_affinity_of_a_request_is_its_hint_else_its_set_of_loras() -> None:
    def edit_with(*paths: str, scale: float = 1) -> LoraEditInput:
        loras = [{"path": path, "scale": scale} for path in paths]
        return LoraEditInput.model_validate(
            {"prompt": "p", "image_url": "http://127.0.0.1:9/a.png", "loras": loras}
        )

    one_order, other_order = edit_with("a/b", "style"), edit_with("style", "a/b", "style", scale=2)
    assert affinity(one_order, None) == affinity(other_order, None)  # a set: order, repeats, scales aside
    assert affinity(one_order, None).startswith("loras:") and affinity(edit_with("style"), None) != affinity(
        one_order, None
    )
    assert affinity(edit_with(), None) is None  # no LoRA, no hint: any worker
    assert affinity(one_order, "tenant-7") == "hint:tenant-7"  # the client's hint wins
    assert affinity(edit_with(), "") is None  # an empty hint is none
