"""`kontextd generate|status|result|cancel` run as subprocesses against a real server process."""

import io
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import KontextdServer, LoopbackServer, png_bytes, wait_completed, wait_for

KEY = "cli-test-key"
DEV = "fal-ai/flux-kontext/dev"


def kontextd(*args: str, server: KontextdServer | None = None, env: dict[str, str] | None = None, **kw):
    """`python -m kontextd ARGS` to completion; --server from the fixture unless `env` says otherwise."""
    flags = ["--server", server.base_url] if server else []
    environment = {**_clean_env(), **(env or {})}
    options = {"capture_output": True, "text": True, "timeout": 120, **kw}
    return subprocess.run([sys.executable, "-m", "kontextd", *args, *flags], env=environment, **options)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("KONTEXTD_URL", "FAL_KEY")}


def saved(result: subprocess.CompletedProcess[str]) -> list[Path]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return [Path(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    """A server with an API key, paced slowly enough that a Ctrl-C lands while the request runs."""
    instance = KontextdServer(
        tmp_path_factory.mktemp("kontextd-cli"), args=["--api-key", KEY, "--tiny-step-seconds", "0.1"]
    ).start()
    yield instance
    instance.stop()


def test_text_to_image_saves_a_png_of_the_ratio(server: KontextdServer, tmp_path: Path) -> None:
    result = kontextd(
        "generate",
        "a red fox",
        "--format",
        "png",
        "--aspect-ratio",
        "16:9",
        "--output",
        str(tmp_path),
        server=server,
    )
    (path,) = saved(result)
    assert path.parent == tmp_path and path.suffix == ".png"
    uuid.UUID(path.stem.rsplit("-", 1)[0])
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (176, 96))
    assert f"saved {path}" in result.stderr  # stderr is no terminal: plain lines


def test_num_images_and_default_square(server: KontextdServer, tmp_path: Path) -> None:
    paths = saved(kontextd("generate", "two", "--num-images", "2", "--output", str(tmp_path), server=server))
    assert len(paths) == 2 and len(set(paths)) == 2
    for path in paths:
        assert path.suffix == ".jpg"
        with Image.open(path) as image:
            assert (image.format, image.size) == ("JPEG", (128, 128))


def test_seed_zero_is_reproducible(server: KontextdServer, tmp_path: Path) -> None:
    runs = [
        saved(
            kontextd(
                "generate",
                "same",
                "--seed",
                "0",
                "--format",
                "png",
                "--output",
                str(tmp_path / n),
                server=server,
            )
        )
        for n in ("a", "b")
    ]
    (first,), (second,) = runs
    assert first.read_bytes() == second.read_bytes()
    random = saved(kontextd("generate", "same", "--format", "png", "--output", str(tmp_path), server=server))
    assert random[0].read_bytes() != first.read_bytes()


def test_edit_a_local_file_and_a_url(
    server: KontextdServer, image_host: LoopbackServer, tmp_path: Path
) -> None:
    local = tmp_path / "wide input.png"
    local.write_bytes(png_bytes(320, 180))
    out = tmp_path / "out"
    (edited,) = saved(
        kontextd(
            "generate", "edit", "--image", str(local), "--format", "png", "--output", str(out), server=server
        )
    )
    with Image.open(edited) as image:
        assert image.size == (176, 96)  # followed the input's shape: the file reached the server
    (from_url,) = saved(
        kontextd(
            "generate", "edit", "--image", f"{image_host.url}/square.png", "--output", str(out), server=server
        )
    )
    with Image.open(from_url) as image:
        assert image.size == (128, 128)
    both = kontextd(
        "generate",
        "both",
        "--image",
        str(local),
        "--image",
        f"{image_host.url}/square.png",
        "--output",
        str(out),
        server=server,
    )
    assert len(saved(both)) == 1  # two images: the multi endpoint


def test_validation_error_is_field_and_reason(server: KontextdServer, tmp_path: Path) -> None:
    result = kontextd("generate", "many", "--num-images", "9", "--output", str(tmp_path), server=server)
    assert result.returncode == 2
    assert "num_images: " in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == "" and not list(tmp_path.iterdir())


def test_unreachable_server(tmp_path: Path) -> None:
    result = kontextd("generate", "x", env={"KONTEXTD_URL": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert "cannot reach the kontextd server at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_result_cancel(server: KontextdServer, tmp_path: Path) -> None:
    (path,) = saved(kontextd("generate", "done", "--output", str(tmp_path / "a"), server=server))
    request_id = path.stem.rsplit("-", 1)[0]
    status = kontextd("status", request_id, server=server)
    assert (status.returncode, status.stdout.strip()) == (0, "COMPLETED")
    as_json = kontextd("status", request_id, "--json", "--endpoint", "fal-ai/flux-pro", server=server)
    assert '"status": "COMPLETED"' in as_json.stdout
    (again,) = saved(kontextd("result", request_id, "--output", str(tmp_path / "b"), server=server))
    assert again.name == path.name and again.read_bytes() == path.read_bytes()
    cancel = kontextd("cancel", request_id, server=server)
    assert cancel.returncode == 1 and "ALREADY_COMPLETED" in cancel.stderr
    wrong = kontextd("status", request_id, "--endpoint", DEV, server=server)
    assert wrong.returncode == 1 and "not found" in wrong.stderr
    unknown = kontextd("status", str(uuid.uuid4()), server=server)
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    bad = kontextd("result", "../../etc", server=server)
    assert bad.returncode == 2 and "not a request id" in bad.stderr


def test_cancel_a_queued_request(keyed: KontextdServer, image_host: LoopbackServer) -> None:
    env = {"KONTEXTD_URL": keyed.base_url, "FAL_KEY": KEY}
    with keyed.client(KEY) as http:
        body = {"prompt": "blocker", "image_url": f"{image_host.url}/square.png", "num_inference_steps": 50}
        blocker = http.post(f"/{DEV}", json=body).json()
        queued = http.post("/fal-ai/flux-pro/kontext/text-to-image", json={"prompt": "waits"}).json()
        cancel = kontextd("cancel", queued["request_id"], env=env)
        assert cancel.returncode == 0, cancel.stderr
        assert wait_completed(http, queued["status_url"])["error_type"] == "client_cancelled"
        status = kontextd("status", queued["request_id"], env=env)
        assert status.stdout.startswith("COMPLETED client_cancelled")
        http.put(blocker["cancel_url"])
        wait_completed(http, blocker["status_url"])


def test_key_from_env_and_a_wrong_key(keyed: KontextdServer, tmp_path: Path) -> None:
    env = {"KONTEXTD_URL": keyed.base_url, "FAL_KEY": KEY}
    assert len(saved(kontextd("generate", "keyed", "--output", str(tmp_path), env=env))) == 1
    wrong = kontextd("generate", "keyed", env={**env, "FAL_KEY": "nope"})
    assert wrong.returncode == 2 and "invalid key" in wrong.stderr and "Traceback" not in wrong.stderr
    flag_wins = kontextd("generate", "keyed", "--key", "nope", env=env)
    assert flag_wins.returncode == 2 and "invalid key" in flag_wins.stderr


def test_ctrl_c_cancels_the_request(
    keyed: KontextdServer, image_host: LoopbackServer, tmp_path: Path
) -> None:
    env = {**_clean_env(), "KONTEXTD_URL": keyed.base_url, "FAL_KEY": KEY}
    command = [
        sys.executable,
        "-m",
        "kontextd",
        "generate",
        "long",
        "--endpoint",
        DEV,
        "--steps",
        "50",
        "--image",
        f"{image_host.url}/square.png",
        "--output",
        str(tmp_path),
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        assert first.startswith("submitted "), first
        request_id = first.split()[1]
        status_url = f"/fal-ai/flux-kontext/requests/{request_id}/status"
        with keyed.client(KEY) as http:
            wait_for(lambda: http.get(status_url).json()["status"] == "IN_PROGRESS", interval=0.02)
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=30)
            assert process.returncode == 130, stderr
            assert f"cancelled {request_id}" in stderr and "Traceback" not in stderr
            assert stdout == ""
            ended = wait_completed(http, status_url)
            assert ended["error_type"] == "client_cancelled"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not list(tmp_path.iterdir())


def test_progress_bar_on_a_terminal(server: KontextdServer, tmp_path: Path) -> None:
    """stderr a terminal (a pty): the bar is redrawn in place; stdout still only the paths."""
    import pty

    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "kontextd", "generate", "tty", "--output", str(tmp_path)]
    process = subprocess.Popen(
        [*command, "--server", server.base_url], stdout=subprocess.PIPE, stderr=follower, env=_clean_env()
    )
    os.close(follower)
    shown = io.BytesIO()
    try:
        while True:  # read as it comes: a full pty buffer would block the writer
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every writer has closed
                break
            if not chunk:
                break
            shown.write(chunk)
        stdout, _ = process.communicate(timeout=60)
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    text = shown.getvalue().decode()
    assert "\r\x1b[K" in text and "step " in text and "[#" in text
    assert "saved" not in text
    (path,) = [Path(line) for line in stdout.decode().splitlines()]
    assert path.exists()


def test_no_server_stack_imported() -> None:
    """The client starts fast: neither torch nor the web framework is imported for it."""
    code = (
        "import sys\nfrom kontextd.cli import main\n"
        "try:\n    main(['status', 'x', '--server', 'http://127.0.0.1:9'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastapi', 'diffusers', 'numpy'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_upload_falls_back_to_a_data_uri(tmp_path: Path) -> None:
    """A server without fal's upload API (404): the file travels inline as a data: URI."""
    import base64

    import httpx

    from kontextd.client.api import QueueClient

    client = QueueClient("http://kontextd.test", "k")
    client.http = httpx.Client(
        base_url="http://kontextd.test", transport=httpx.MockTransport(lambda request: httpx.Response(404))
    )
    data = png_bytes(8, 8)
    (tmp_path / "in.bin").write_bytes(data)
    assert client.upload(tmp_path / "in.bin") == f"data:image/png;base64,{base64.b64encode(data).decode()}"
