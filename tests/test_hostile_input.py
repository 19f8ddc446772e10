"""Hostile input over HTTP: paths, headers and bodies an attacker would send.

One server of its own (its log is read at the end), and every answer is checked for three things: no 500,
nothing outside storage served, nothing from the request echoed or logged beyond a bounded summary.
"""

import base64
import json
import os
import re
import select
import socket
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, WebhookReceiver, png_bytes, raw_get, wait_completed, wait_for

from kontextd.datadir import DataDir

TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
DEV = "fal-ai/flux-kontext/dev"
JSON = {"Content-Type": "application/json"}
# Markers planted in refused bodies: none may ever show up in the server's log.
PROMPT_MARKER = "SECRET-PROMPT-7f3a"
IMAGE_MARKER = base64.b64encode(b"\x89PNG-IMAGE-BYTES-MARKER" * 40).decode()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    instance = KontextdServer(tmp_path_factory.mktemp("hostile"), args=["--webhook-backoff", "0.2"]).start()
    yield instance
    instance.stop()


@pytest.fixture
def client(hostile: KontextdServer) -> Iterator[httpx.Client]:
    with hostile.client() as http_client:
        yield http_client


def secrets_of(server: KontextdServer) -> dict[str, bytes]:
    """Contents that must never be served: the signing key, the database, a system file."""
    data = server.data_dir
    return {
        "webhook key": (data / "webhook-ed25519.pem").read_bytes(),
        "database": (data / "jobs.sqlite3").read_bytes()[:16],  # "SQLite format 3\0"
        "system file": Path("/etc/hostname").read_bytes() if Path("/etc/hostname").exists() else b"",
    }


def a_stored_output(client: httpx.Client) -> str:
    """The /files/ path of a real output: the control that proves the route serves what it should."""
    envelope = client.post(f"/{TEXT_TO_IMAGE}", json={"prompt": "control", "seed": 1}).json()
    wait_completed(client, envelope["status_url"])
    url = client.get(envelope["response_url"]).json()["images"][0]["url"]
    return httpx.URL(url).path


# -- 1. files outside storage ------------------------------------------------------------------------

TRAVERSALS = [
    b"/files//etc/passwd",
    b"/files//etc/hostname",
    b"/files/%2fetc%2fpasswd",
    b"/files/%2Fetc%2Fpasswd",
    b"/files/..%2fwebhook-ed25519.pem",
    b"/files/..%2Fjobs.sqlite3",
    b"/files/%2e%2e/webhook-ed25519.pem",
    b"/files/%2e%2e%2fjobs.sqlite3",
    b"/files/%252fetc%252fpasswd",
    b"/files/..%5cwebhook-ed25519.pem",
    b"/files/..\\webhook-ed25519.pem",
    b"/files/x/../../webhook-ed25519.pem",
    b"/files/%00/etc/passwd",
    b"/files/0.png%00.png",
    b"/files/../jobs.sqlite3",
    b"/files/.%2e/jobs.sqlite3",
    b"/files/%c0%ae%c0%ae/jobs.sqlite3",  # overlong UTF-8 dots
    b"/files/jobs.sqlite3",
    b"/files/webhook-ed25519.pem",
    b"/files/",
    b"/files/%2e",
]


def test_no_file_outside_storage_is_served(hostile: KontextdServer, client: httpx.Client) -> None:
    control = a_stored_output(client)
    code, body = raw_get(hostile, control.encode())
    assert code == 200 and body.startswith(b"\xff\xd8")  # the route does serve our own JPEG

    secrets = secrets_of(hostile)
    for target in TRAVERSALS:
        code, body = raw_get(hostile, target)
        assert code in (400, 404), (target, code)
        for name, secret in secrets.items():
            assert not secret or secret not in body, (target, name)
        if code == 404:  # "/files/" alone matches no route at all
            assert json.loads(body) in ({"detail": "File not found"}, {"detail": "Not Found"}), target


def test_a_symlink_or_fifo_planted_in_storage_is_not_served(hostile: KontextdServer, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "0.png").write_bytes(png_bytes(4, 4))
    files = hostile.data_dir / "files"
    linked_folder, linked_file = str(uuid.uuid4()), str(uuid.uuid4())
    (files / linked_folder).symlink_to(outside, target_is_directory=True)
    (files / linked_file).mkdir()
    (files / linked_file / "0.png").symlink_to(hostile.data_dir / "webhook-ed25519.pem")
    real = str(uuid.uuid4())
    (files / real).mkdir()
    (files / real / "0.png").write_bytes(png_bytes(4, 4))

    fifo = str(uuid.uuid4())
    (files / fifo).mkdir()
    os.mkfifo(files / fifo / "0.png")  # opening it for reading would block until a writer came

    assert raw_get(hostile, f"/files/{real}/0.png".encode())[0] == 200  # a plain file in the root: served
    for key in (f"{linked_folder}/0.png", f"{linked_file}/0.png", f"{fifo}/0.png"):
        code, body = raw_get(hostile, f"/files/{key}".encode())
        assert (code, json.loads(body)) == (404, {"detail": "File not found"}), key


def edit_error(client: httpx.Client, image_url: str) -> str:
    body = {"prompt": "edit", "image_url": image_url, "num_inference_steps": 10}
    envelope = client.post(f"/{DEV}", json=body).json()
    status = wait_completed(client, envelope["status_url"])
    assert status["error_type"] == "file_download_error", (image_url, status)
    return status["error"]


def test_own_urls_with_traversals_are_never_read_as_inputs(
    hostile: KontextdServer, client: httpx.Client
) -> None:
    """Our own `/files/` URLs are read from storage, not fetched: the key grammar applies there as well; and
    spelt so that they are fetched over HTTP (`/./files/`), they meet the route's check."""
    for prefix in (f"{hostile.base_url}/files/", f"{hostile.base_url}/./files/"):
        answers = {
            suffix: edit_error(client, prefix + suffix)
            for suffix in ("/etc/hostname", "/no/such/file", "../webhook-ed25519.pem", "%2e%2e/jobs.sqlite3")
        }
        # Whether the named file exists changes nothing in the answer (but the URL it quotes).
        shapes = {
            re.sub(r"Failed to fetch \S+", "Failed to fetch <url>", answer) for answer in answers.values()
        }
        assert len(shapes) == 1, answers
        assert shapes <= {"That URL is not a file this server stored", "Failed to fetch <url> HTTP 404"}, (
            shapes
        )


def test_secrets_are_private_and_outside_storage(hostile: KontextdServer) -> None:
    data = hostile.data_dir
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm", "webhook-ed25519.pem", "jobs.lock"):
        path = data / name
        assert path.exists(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        assert not path.resolve().is_relative_to((data / "files").resolve())


def test_secrets_an_older_release_left_readable_are_made_private(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    data.root.mkdir()
    for path in (data.database, data.webhook_key, data.database.with_name("jobs.sqlite3-wal")):
        path.write_bytes(b"x")
        os.chmod(path, 0o644)
    data.prepare()
    for path in (data.database, data.webhook_key, data.database.with_name("jobs.sqlite3-wal")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_storage_root_that_would_hold_the_secrets_is_refused(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    data.root.mkdir()
    data.files.symlink_to(data.root, target_is_directory=True)  # files/ pointing at the data dir itself
    with pytest.raises(ValueError, match="under the storage root"):
        data.prepare()


# -- 2. bodies ---------------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("NaN seed", b'{"prompt": "x", "seed": NaN}', 422),
    ("Infinity guidance", b'{"prompt": "x", "guidance_scale": Infinity}', 422),
    ("-Infinity guidance", b'{"prompt": "x", "guidance_scale": -Infinity}', 422),
    ("1e400 guidance", b'{"prompt": "x", "guidance_scale": 1e400}', 422),
    ("1e400 seed", b'{"prompt": "x", "seed": 1e400}', 422),
    ("NaN in a missing-field error", b'{"seed": NaN, "x": [Infinity]}', 422),
    ("lone surrogate prompt", b'{"prompt": "a\\ud800b"}', 422),
    ("lone low surrogate", b'{"prompt": "\\udc00"}', 422),
    ("lone surrogate key", b'{"prompt": "x", "\\ud800": 1}', 422),
    ("surrogate as raw bytes", b'{"prompt": "\xed\xa0\x80"}', 422),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 422),
    ("BOM", b'\xef\xbb\xbf{"prompt": "x"}', 422),
    ("huge integer", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 422),
    ("deep nesting", b'{"prompt": "x", "extra": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 422),
    ("not an object", b"[]", 422),
    ("a string", b'"hello"', 422),
    ("null", b"null", 422),
    ("empty", b"", 422),
    ("truncated", b'{"prompt": "x"', 422),
    ("prompt of a number", b'{"prompt": 7}', 422),
    ("prompt of an object", b'{"prompt": {"a": 1}}', 422),
    ("2 MB prompt", json.dumps({"prompt": PROMPT_MARKER * 120_000}).encode(), 422),
]


@pytest.mark.parametrize(("case", "content", "expected"), BAD_BODIES, ids=[case for case, _, _ in BAD_BODIES])
def test_bad_bodies_are_a_clean_refusal(
    client: httpx.Client, case: str, content: bytes, expected: int
) -> None:
    for path in (f"/{TEXT_TO_IMAGE}", f"/run/{TEXT_TO_IMAGE}"):
        response = client.post(path, content=content, headers=JSON)
        assert response.status_code == expected, (case, response.text[:500])
        detail = response.json()["detail"]
        assert isinstance(detail, list) and detail, case
        assert len(response.content) < 8_000, case  # bounded, whatever the body's size
        assert (
            response.text.count(PROMPT_MARKER) <= 200 // len(PROMPT_MARKER) + 1
        )  # at most a 200-character cut


def test_a_data_uri_in_an_error_is_summarised(client: httpx.Client) -> None:
    uri = "data:image/png;base64," + IMAGE_MARKER
    response = client.post(f"/{DEV}", json={"prompt": "x", "image_url": uri, "num_inference_steps": 5})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "num_inference_steps"]
    # The missing-field kind of error echoes the whole body: its image must not come back.
    body = client.post(f"/{DEV}", json={"image_url": uri}).json()
    (missing,) = body["detail"]
    assert missing["input"]["image_url"] == f"data:image/png;base64,… ({len(uri)} characters)"
    assert IMAGE_MARKER[:40] not in json.dumps(body)


def test_non_finite_numbers_name_their_field(client: httpx.Client) -> None:
    response = client.post(
        f"/{TEXT_TO_IMAGE}", content=b'{"prompt": "x", "guidance_scale": NaN}', headers=JSON
    )
    (error,) = response.json()["detail"]
    assert error == {
        "loc": ["body", "guidance_scale"],
        "msg": "Input should be a finite number",
        "type": "finite_number",
        "input": "NaN",
    }


@pytest.mark.parametrize(
    ("headers", "shown"),
    [
        ({}, "it was missing"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, "application/x-www-form-urlencoded"),
        ({"Content-Type": "text/plain;charset=UTF-8"}, "text/plain"),
        ({"Content-Type": "multipart/form-data; boundary=x"}, "multipart/form-data"),
    ],
)
def test_a_body_not_declared_as_json_is_refused_naming_the_header(
    client: httpx.Client, headers: dict[str, str], shown: str
) -> None:
    response = client.post(f"/{TEXT_TO_IMAGE}", content=b'{"prompt": "x"}', headers=headers)
    assert response.status_code == 415
    message = response.json()["detail"]
    assert "Content-Type: application/json" in message and shown in message


def test_json_with_a_charset_or_a_json_subtype_is_accepted(client: httpx.Client) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json", "Application/JSON"):
        response = client.post(
            f"/{TEXT_TO_IMAGE}", content=b'{"prompt": "x"}', headers={"Content-Type": content_type}
        )
        assert response.status_code == 200, (content_type, response.text)
        client.put(response.json()["cancel_url"])


def rows(server: KontextdServer) -> int:
    with sqlite3.connect(f"file:{server.data_dir / 'jobs.sqlite3'}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT count(*) FROM jobs").fetchone()[0]


def chunked_post(server: KontextdServer, path: str, megabytes: int) -> tuple[int, bytes, int]:
    """POST `megabytes` of body with chunked transfer encoding (no Content-Length), stopping as soon as the
    server answers. Returns the status, the response body and how many body bytes were sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        chunk = b"1" * (1024 * 1024)
        for _ in range(megabytes):
            if select.select([sock], [], [], 0)[0]:  # the server has answered: stop sending
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        response = b""
        try:
            while data := sock.recv(65536):
                response += data
                if b"\r\n\r\n" in response and response.endswith(b"}"):
                    break
        except ConnectionResetError:
            pass
    head_bytes, _, body = response.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), body, sent


def test_an_undeclared_chunked_body_over_the_cap_is_refused_and_nothing_is_queued(
    hostile: KontextdServer, client: httpx.Client
) -> None:
    before = rows(hostile)
    code, body, sent = chunked_post(hostile, f"/{TEXT_TO_IMAGE}", megabytes=100)
    assert code == 413
    assert json.loads(body) == {"detail": "Request body too large: at most 64 MB"}
    assert sent < 100 * 1024 * 1024  # it answered before the whole body arrived
    assert rows(hostile) == before
    assert client.get("/health").json()["status"] == "ready"


def test_a_chunked_body_under_the_cap_is_read_whole(hostile: KontextdServer, client: httpx.Client) -> None:
    chunks = [b'{"prompt": "chunked", ', b'"seed": 0}']
    response = client.post(f"/{TEXT_TO_IMAGE}", content=iter(chunks), headers=JSON)
    assert response.status_code == 200, response.text
    client.put(response.json()["cancel_url"])


def test_a_declared_length_over_the_cap_is_refused_before_reading(hostile: KontextdServer) -> None:
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=30) as sock:
        head = f"POST /{TEXT_TO_IMAGE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + f"Content-Length: {65 * 1024 * 1024}\r\n\r\n".encode() + b"{}")
        response = b""  # answered with only two bytes of the body sent
        while not response.endswith(b"}") and (data := sock.recv(65536)):
            response += data
    assert response.startswith(b"HTTP/1.1 413 ")
    assert json.loads(response.partition(b"\r\n\r\n")[2]) == {
        "detail": "Request body too large: at most 64 MB"
    }


# -- 3 to 6. headers and query ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["http://[::1", "http://[fe80::1%25eth0/x", "http://[not-v6]/", "https://queue.fal.run:x[/a"]
)
def test_a_malformed_proxy_target_is_a_400(client: httpx.Client, target: str) -> None:
    response = client.post("/proxy", json={"prompt": "x"}, headers={"x-fal-target-url": target})
    assert response.status_code == 400, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["header", "x-fal-target-url"]
    assert error["msg"].startswith("not a URL")


@pytest.mark.parametrize(
    "target", ["http://a:b:c/x", "http://[::1]:99999999/x", "https://queue.fal.run/%00/../x"]
)
def test_an_odd_proxy_target_that_parses_routes_nowhere(client: httpx.Client, target: str) -> None:
    response = client.post("/proxy", json={"prompt": "x"}, headers={"x-fal-target-url": target})
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Fal-Queue-Priority", "urgent"),
        ("X-Fal-Request-Timeout", "inf"),
        ("X-Fal-Request-Timeout", "-0"),
        ("X-Fal-Request-Timeout", "1e308"),
        ("X-Fal-Object-Lifecycle-Preference", '{"expiration_duration_seconds": 1e308}'),
        ("X-Fal-Object-Lifecycle-Preference", "[" * 10_000),
        ("X-Fal-No-Retry", "perhaps"),
    ],
)
def test_bad_header_values_are_400s(client: httpx.Client, name: str, value: str) -> None:
    response = client.post(f"/{TEXT_TO_IMAGE}", json={"prompt": "x"}, headers={name: value})
    assert response.status_code == 400, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["header", name.lower()]


def test_an_empty_lifecycle_header_means_the_default(client: httpx.Client) -> None:
    headers = {"X-Fal-Object-Lifecycle-Preference": ""}
    response = client.post(f"/{TEXT_TO_IMAGE}", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 200, response.text
    client.put(response.json()["cancel_url"])


@pytest.mark.parametrize("name", ["X-Fal-Queue-Priority", "X-Fal-Request-Timeout", "X-Fal-No-Retry"])
def test_other_empty_headers_are_a_400_as_the_contract_documents(client: httpx.Client, name: str) -> None:
    response = client.post(f"/{TEXT_TO_IMAGE}", json={"prompt": "x"}, headers={name: ""})
    assert response.status_code == 400, response.text
    (error,) = response.json()["detail"]
    assert (error["loc"], error["input"]) == (["header", name.lower()], "")


@pytest.mark.parametrize("authorization", ["Key", "Key \x7f\xff", "Bearer " + "k" * 10_000, "Basic Og=="])
def test_odd_authorization_headers_are_harmless(client: httpx.Client, authorization: str) -> None:
    # This server has no keys: the header is ignored, whatever it holds.
    response = client.post(
        f"/{TEXT_TO_IMAGE}", json={"prompt": "x"}, headers={"Authorization": authorization.encode("latin-1")}
    )
    assert response.status_code == 200, response.text
    client.put(response.json()["cancel_url"])


def test_an_empty_webhook_means_no_webhook(client: httpx.Client, webhook_receiver: WebhookReceiver) -> None:
    response = client.post(f"/{TEXT_TO_IMAGE}", params={"fal_webhook": ""}, json={"prompt": "x"})
    assert response.status_code == 200, response.text
    envelope = response.json()
    wait_completed(client, envelope["status_url"])
    # A later request with a real webhook is the barrier: once it arrives, nothing else was sent.
    hook = f"{webhook_receiver.url}/later"
    later = client.post(f"/{TEXT_TO_IMAGE}", params={"fal_webhook": hook}, json={"prompt": "x"}).json()
    wait_for(lambda: webhook_receiver.bodies("/later"), timeout=30)
    assert [body["request_id"] for body in webhook_receiver.bodies("/later")] == [later["request_id"]]
    assert [path for path, _, _ in webhook_receiver.received] == ["/later"]


@pytest.mark.parametrize(
    ("hook", "reason"),
    [
        ("http://127.0.0.2:9/hook", "loopback"),  # the fixture allow-lists 127.0.0.1 only
        ("http://[::1]:9/hook", "loopback"),
        ("http://0.0.0.0:9/hook", "unspecified"),
        ("http://[::ffff:127.0.0.2]:9/hook", "loopback"),
        ("http://[::1/hook", "must be an https:// or http:// URL"),
    ],
)
def test_a_webhook_the_guard_refuses_is_refused_at_submit(
    client: httpx.Client, hook: str, reason: str
) -> None:
    response = client.post(f"/{TEXT_TO_IMAGE}", params={"fal_webhook": hook}, json={"prompt": "x"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "fal_webhook"]
    assert reason in error["msg"]


# -- the log --------------------------------------------------------------------------------------------


def refusals_logged(server: KontextdServer) -> int:
    return sum('"message": "request refused"' in line for line in list(server.output))


def test_nothing_from_a_body_reaches_the_log(hostile: KontextdServer, client: httpx.Client) -> None:
    uri = "data:image/png;base64," + IMAGE_MARKER
    bodies: list[Any] = [
        {"prompt": PROMPT_MARKER, "seed": float("nan")},
        {"prompt": PROMPT_MARKER + "\ud800"},
        {"image_url": uri},
        {"prompt": PROMPT_MARKER, "image_url": uri, "num_inference_steps": 1},
    ]
    logged_before = refusals_logged(hostile)
    for body in bodies:
        content = json.dumps(body).encode()  # json.dumps writes NaN and escapes the surrogate
        for app_id in (DEV, f"run/{DEV}"):
            assert client.post(f"/{app_id}", content=content, headers=JSON).status_code == 422
    # The log is read from another process: each refusal logs one line, so once all 8 are in, so is
    # anything logged while refusing them.
    wait_for(lambda: refusals_logged(hostile) >= logged_before + 2 * len(bodies), timeout=30)
    log = "".join(hostile.output)
    assert PROMPT_MARKER not in log
    assert IMAGE_MARKER[:40] not in log
    assert "Traceback" not in log and "Exception in ASGI application" not in log
