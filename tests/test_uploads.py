"""fal's storage upload API (kontextd.api.uploads): the unmodified fal-client (both repositories) and
@fal-ai/client (proxy mode) store files in kontextd's storage and use them as inputs, read from storage and
never fetched; and everything a hostile client can send is refused in fal's shape.

One server for the module: TLS (fal-client speaks only HTTPS), two API keys (uploads are their owner's),
and a fetch allow-list that refuses loopback, so an input that were fetched rather than read from
storage would fail.
"""

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import KontextdServer, png_bytes, wait_completed, wait_for

from kontextd.api import uploads
from kontextd.api.upload_signing import SECRET_NAME, UPLOAD_URL_SECONDS, UploadSigner
from kontextd.jobs.postgres import PostgresJobStore
from kontextd.jobs.sqlite import SQLiteJobStore
from kontextd.storage import keys
from kontextd.storage.local import LocalStorage
from kontextd.worker.housekeeping import sweep_once

KEY_A, KEY_B = "upload-key-a", "upload-key-b"
MAX_EDIT = "fal-ai/flux-pro/kontext/max"
LIMIT = 20 * 1024 * 1024  # Settings.fetch_max_bytes: an upload is at most what a fetched image may be
SCRIPTS = Path(__file__).parent / "fal_scripts"
JS_DIR = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    instance = KontextdServer(
        tmp_path_factory.mktemp("kontextd-uploads"),
        # The later --fetch-allow wins over the fixture's loopback one: nothing on 127.0.0.1 may be fetched.
        args=["--tiny-step-seconds", "0.01", "--api-key", KEY_A, "--api-key", KEY_B, "--fetch-allow", ""],
        tls=True,
    ).start()
    yield instance
    instance.stop()


@pytest.fixture
def wide_png(tmp_path: Path) -> Path:
    path = tmp_path / "wide photo.png"
    path.write_bytes(png_bytes(320, 180, (30, 140, 200)))
    return path


def client(server: KontextdServer, key: str | None = KEY_A) -> httpx.Client:
    return server.client(key)


def files_on_disk(server: KontextdServer) -> list[str]:
    root = server.data_dir / "files"
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def initiate(http: httpx.Client, content_type: str = "image/png", **headers: str) -> dict[str, str]:
    answer = http.post(
        "/storage/upload/initiate",
        params={"storage_type": "gcs"},
        json={"file_name": "x.png", "content_type": content_type},
        headers=headers,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def put(
    server: KontextdServer, upload_url: str, data: bytes, content_type: str = "image/png"
) -> httpx.Response:
    with client(server, key=None) as http:  # no key: the URL is its own credential
        return http.put(upload_url, content=data, headers={"Content-Type": content_type})


def edit(http: httpx.Client, image_url: str) -> httpx.Response:
    return http.post(
        f"/{MAX_EDIT}", json={"prompt": "recolour", "image_url": image_url, "output_format": "png"}
    )


def assert_fal_error(response: httpx.Response, status: int, loc: list[str], kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == loc and detail["type"] == kind and detail["msg"], detail
    return detail


def edited_from_storage(server: KontextdServer, image_url: str, key: str = KEY_A) -> dict[str, Any]:
    """An edit of `image_url` that completed; the server fetches nothing from loopback, so it was read."""
    with client(server, key) as http:
        submitted = edit(http, image_url)
        assert submitted.status_code == 200, submitted.text
        status = wait_completed(http, submitted.json()["status_url"])
        assert "error" not in status, status
        return http.get(submitted.json()["response_url"]).json()


# -- the reference clients ----------------------------------------------------------------------------


def test_fal_client_uploads_in_both_repositories_and_edits_the_upload(
    upload_server: KontextdServer, wide_png: Path
) -> None:
    env = {**os.environ, **upload_server.fal_env(KEY_A), "NO_PROXY": "127.0.0.1,localhost,::1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPTS / "upload.py"), str(wide_png)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    with client(upload_server, key=None) as http:  # file URLs need no key, like outputs
        for name, expected in [("v3_url", wide_png.read_bytes()), ("fal_url", wide_png.read_bytes())]:
            assert seen[name].startswith(f"{upload_server.base_url}/files/uploads/"), seen[name]
            assert seen[name].endswith(".png") and "wide" not in seen[name]  # never named after the file
            got = http.get(seen[name])
            assert got.status_code == 200 and got.content == expected
            assert got.headers["content-type"] == "image/png"
        assert http.get(seen["image_url"]).headers["content-type"] == "image/png"
    assert seen["v3_url"] != seen["fal_url"]
    image = seen["edited"]["images"][0]
    assert image["width"] > image["height"]  # follows the 16:9 upload it was read from
    # Only images: fal_v3's 415 falls back to repository fal, whose 422 is what fal-client raises.
    refused = seen["refused"]
    assert refused["status_code"] == 422
    assert refused["detail"][0]["loc"] == ["body", "content_type"]
    assert refused["detail"][0]["type"] == "unsupported_media_type"


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs Node.js and npm")
def test_js_client_storage_upload_and_blob_inputs_through_the_proxy(
    upload_server: KontextdServer, wide_png: Path
) -> None:
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=JS_DIR, check=True, timeout=300
        )
    completed = subprocess.run(
        ["node", "upload.mjs", upload_server.base_url, KEY_A, str(wide_png)],
        cwd=JS_DIR,
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(upload_server.ca_file)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    assert seen["url"].startswith(f"{upload_server.base_url}/files/uploads/") and seen["url"].endswith(".png")
    with client(upload_server, key=None) as http:
        assert http.get(seen["url"]).content == wide_png.read_bytes()
    for result in (seen["uploaded"], seen["blob"]):
        image = result["images"][0]
        assert image["width"] > image["height"], result
    assert seen["refused"]["status"] == 422
    assert seen["refused"]["body"]["detail"][0]["loc"] == ["body", "content_type"]


def test_a_rest_target_in_proxy_mode_reaches_the_storage_routes(upload_server: KontextdServer) -> None:
    with client(upload_server) as http:
        answer = http.post(
            "/",
            json={"content_type": "image/png", "file_name": "a.png"},
            headers={
                "x-fal-target-url": "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3"
            },
        )
        assert answer.status_code == 200, answer.text
        assert set(answer.json()) == {"upload_url", "file_url"}
        token = http.post(
            "/", json={}, headers={"x-fal-target-url": "https://rest.fal.ai/storage/auth/token"}
        )
        assert token.status_code == 200 and token.json()["token_type"] == "Bearer"


# -- the wire, as fal's clients read it ---------------------------------------------------------------


def test_the_token_uploads_as_its_key_and_expires_at_carries_an_offset(upload_server: KontextdServer) -> None:
    with client(upload_server) as http:
        token = http.post("/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}).json()
    assert token["base_url"] == upload_server.base_url and token["token_type"] == "Bearer"
    assert token["expires_at"].endswith("+00:00")
    assert KEY_A not in token["token"]
    with client(upload_server, key=None) as http:
        headers = {"Authorization": f"Bearer {token['token']}", "Content-Type": "image/png"}
        stored = http.post("/files/upload", content=png_bytes(40, 30), headers=headers)
        assert stored.status_code == 200, stored.text
        url = stored.json()["access_url"]
        forged = {**headers, "Authorization": f"Bearer {token['token'][:-1]}0"}
        assert http.post("/files/upload", content=png_bytes(40, 30), headers=forged).status_code == 401
        assert (
            http.post(
                "/files/upload", content=png_bytes(40, 30), headers={"Content-Type": "image/png"}
            ).status_code
            == 401
        )
    with client(upload_server, KEY_B) as http:
        assert_fal_error(edit(http, url), 422, ["body", "image_url"], "file_download_error")
    assert edited_from_storage(upload_server, url)["images"][0]["width"] > 0  # its own key's input


def test_an_upload_by_one_key_is_no_input_for_another(upload_server: KontextdServer) -> None:
    with client(upload_server, KEY_A) as http:
        url = initiate(http)["file_url"]
        upload_url = initiate(http)["upload_url"]
    assert put(upload_server, upload_url, png_bytes(64, 64)).status_code == 200
    stored_url = upload_url.split("?")[0]
    with client(upload_server, KEY_B) as http:
        for image_url in (stored_url, url):  # stored, and initiated without bytes: alike
            detail = assert_fal_error(
                edit(http, image_url), 422, ["body", "image_url"], "file_download_error"
            )
            assert detail["input"] == image_url
        never = f"{upload_server.base_url}/files/{keys.upload_key('png')}"
        assert edit(http, never).json()["detail"][0]["msg"] == detail["msg"]  # unknown: the same refusal
    edited_from_storage(upload_server, stored_url, KEY_A)


def test_a_url_naming_this_server_another_way_is_still_read_from_storage(
    upload_server: KontextdServer,
) -> None:
    # A client that reached the server as localhost (not the 127.0.0.1 it is bound to) gets URLs naming
    # localhost; the worker, which never saw that request, must still know them as ours.
    as_localhost = {"Host": f"localhost:{upload_server.port}"}
    with client(upload_server) as http:
        started = initiate(http, **as_localhost)
        assert started["file_url"].startswith(f"https://localhost:{upload_server.port}/files/uploads/")
        assert (
            put(
                upload_server, started["upload_url"].replace("localhost", "127.0.0.1"), png_bytes(90, 160)
            ).status_code
            == 200
        )
        submitted = http.post(
            f"/{MAX_EDIT}",
            json={"prompt": "recolour", "image_url": started["file_url"], "output_format": "png"},
            headers=as_localhost,
        )
        status = wait_completed(http, submitted.json()["status_url"].replace("localhost", "127.0.0.1"))
        assert "error" not in status, status
        image = http.get(submitted.json()["response_url"].replace("localhost", "127.0.0.1")).json()["images"][
            0
        ]
        assert image["height"] > image["width"]
        # The control: from a request that named 127.0.0.1, that localhost URL is someone else's host, and
        # fetching it is refused (the allow-list admits no loopback): the file above was read, not fetched.
        fetched = edit(http, started["file_url"])
        status = wait_completed(http, fetched.json()["status_url"])
        assert status["error"] and status["error_type"] != "internal_server_error", status
        detail = http.get(fetched.json()["response_url"]).json()["detail"]
        assert detail[0]["type"] == "file_download_error", detail


# -- hostile input --------------------------------------------------------------------------------------


def test_forged_and_expired_upload_urls_are_403_in_fals_shape(upload_server: KontextdServer) -> None:
    with client(upload_server) as http:
        real = initiate(http)["upload_url"]
        other = initiate(http)["upload_url"]
        short = initiate(http, **{"X-Fal-Object-Lifecycle": json.dumps({"expiration_duration_seconds": 1})})
    base, query = real.split("?")
    fields = {name: values[0] for name, values in parse_qs(query).items()}
    other_base, other_query = other.split("?")
    flipped = fields["signature"][:-1] + ("0" if fields["signature"][-1] != "0" else "1")
    forged = [
        f"{base}?expires={fields['expires']}&signature={flipped}",  # one digit changed
        f"{base}?expires={int(fields['expires']) + 3600}&signature={fields['signature']}",  # longer life
        f"{other_base}?{query}",  # another upload's signature
        f"{base[:-4]}.jpeg?{query}",  # another type
        f"{base}?expires={fields['expires']}",  # none
        f"{base}?signature={fields['signature']}",
        f"{base}?expires=-1&signature={fields['signature']}",
        f"{base}?expires={fields['expires']}&signature={fields['signature'].upper()}",
        f"{upload_server.base_url}/files/uploads/..jobs.sqlite3?{query}",
    ]
    for url in forged:
        response = put(upload_server, url, png_bytes(8, 8), "image/jpeg" if ".jpeg?" in url else "image/png")
        assert response.status_code == 403, (url, response.text)
        [detail] = response.json()["detail"]
        assert detail["loc"][0] == "query" and detail["type"] == "upload_url_invalid", detail
    # No other /files/ path takes a PUT at all, whatever it carries.
    before = files_on_disk(upload_server)
    for path in [
        "uploads/..%2F..%2Fjobs.sqlite3",
        keys.output_key(base.split("/")[-1][:-4], 0, "png"),
        "upload",
    ]:
        response = put(upload_server, f"{upload_server.base_url}/files/{path}?{query}", png_bytes(8, 8))
        assert response.status_code == 405, (path, response.text)
    assert files_on_disk(upload_server) == before
    time.sleep(max(0.0, int(parse_qs(short["upload_url"].split("?")[1])["expires"][0]) - time.time()) + 0.2)
    expired = put(upload_server, short["upload_url"], png_bytes(8, 8))
    assert_fal_error(expired, 403, ["query", "expires"], "upload_url_expired")
    assert put(upload_server, real, png_bytes(8, 8)).status_code == 200  # the genuine one still works
    assert put(upload_server, other_base + "?" + other_query, png_bytes(8, 8)).status_code == 200


def test_oversize_uploads_are_413(upload_server: KontextdServer) -> None:
    too_big = b"\x89PNG\r\n\x1a\n" + b"\0" * (LIMIT - 7)
    with client(upload_server) as http:
        declared = http.post("/files/upload", content=too_big, headers={"Content-Type": "image/png"})
        detail = assert_fal_error(declared, 413, ["body"], "file_too_large")
        assert detail["ctx"] == {"max_bytes": LIMIT}

        def chunked() -> Iterator[bytes]:  # no Content-Length: refused once the bytes pass the limit
            for start in range(0, len(too_big), 1 << 20):
                yield too_big[start : start + (1 << 20)]

        streamed = http.post("/files/upload", content=chunked(), headers={"Content-Type": "image/png"})
        assert_fal_error(streamed, 413, ["body"], "file_too_large")
        upload_url = initiate(http)["upload_url"]
        for path in ("/files/upload/multipart", "/storage/upload/initiate-multipart"):
            assert_fal_error(http.post(path, json={}), 413, ["body"], "file_too_large")
    assert_fal_error(put(upload_server, upload_url, too_big), 413, ["body"], "file_too_large")
    assert put(upload_server, upload_url, too_big[:LIMIT]).status_code == 200  # at the limit: taken


@pytest.mark.parametrize(
    "content_type",
    ["text/html", "image/svg+xml", "application/octet-stream", "text/plain", "", "image/png/x", "IMAGE"],
)
def test_only_images_are_accepted(upload_server: KontextdServer, content_type: str) -> None:
    page = b"<html><script>alert(document.cookie)</script></html>"
    with client(upload_server) as http:
        headers = {"Content-Type": content_type} if content_type else {}
        raw = http.post("/files/upload", content=page, headers=headers)
        assert_fal_error(raw, 415, ["header", "content-type"], "unsupported_media_type")
        started = http.post("/storage/upload/initiate", json={"content_type": content_type, "file_name": "a"})
        assert_fal_error(started, 422, ["body", "content_type"], "unsupported_media_type")


def test_the_bytes_must_be_the_image_type_declared(upload_server: KontextdServer) -> None:
    page = b"<html><script>alert(document.cookie)</script></html>"
    jpeg = png_bytes(8, 8)  # a PNG, declared as something else
    with client(upload_server) as http:
        for data, content_type in [(page, "image/png"), (jpeg, "image/jpeg"), (b"", "image/gif")]:
            refused = http.post("/files/upload", content=data, headers={"Content-Type": content_type})
            assert_fal_error(refused, 415, ["body"], "unsupported_media_type")
        upload_url = initiate(http)["upload_url"]
        # Case, parameters and the common alias are the same types.
        accepted = http.post("/files/upload", content=jpeg, headers={"Content-Type": "IMAGE/PNG; q=1"})
        assert accepted.status_code == 200 and accepted.json()["access_url"].endswith(".png")
        jpeg_url = initiate(http, content_type="image/JPG")["file_url"]
        assert jpeg_url.endswith(".jpeg")
    assert_fal_error(put(upload_server, upload_url, page), 415, ["body"], "unsupported_media_type")
    other_type = put(upload_server, upload_url, jpeg, "image/webp")  # signed for PNG
    assert_fal_error(other_type, 415, ["header", "content-type"], "unsupported_media_type")


def test_file_names_never_reach_a_path(upload_server: KontextdServer) -> None:
    before = set(files_on_disk(upload_server))
    hostile = [
        "../../../../tmp/kontextd-escape.png",
        "/etc/passwd",
        "..\\..\\x.png",
        "a/../../b.png",
        "%2e%2e%2fx",
    ]
    made = []
    with client(upload_server) as http:
        for name in hostile:
            stored = http.post(
                "/files/upload",
                content=png_bytes(8, 8),
                headers={"Content-Type": "image/png", "X-Fal-File-Name": name},
            )
            assert stored.status_code == 200, stored.text
            made.append(stored.json()["access_url"])
            started = http.post(
                "/storage/upload/initiate", json={"content_type": "image/png", "file_name": name}
            )
            assert put(upload_server, started.json()["upload_url"], png_bytes(8, 8)).status_code == 200
            made.append(started.json()["file_url"])
    added = set(files_on_disk(upload_server)) - before
    assert len(added) == len(made) == 2 * len(hostile)
    assert all(keys.is_upload(path) for path in added), added  # only uploads/<uuid>.png
    assert {urlsplit(url).path.removeprefix("/files/") for url in made} == added
    assert not Path("/tmp/kontextd-escape.png").exists()


def test_uploads_expire_with_their_lifetime_and_are_swept(upload_server: KontextdServer) -> None:
    lifetime = json.dumps({"expiration_duration_seconds": 1})
    with client(upload_server) as http:
        stored = http.post(
            "/files/upload",
            content=png_bytes(8, 8),
            headers={"Content-Type": "image/png", "X-Fal-Object-Lifecycle-Preference": lifetime},
        )
        url = stored.json()["access_url"]
        kept = http.post("/files/upload", content=png_bytes(8, 8), headers={"Content-Type": "image/png"})
        assert http.get(url).status_code == 200
        key = urlsplit(url).path.removeprefix("/files/")
        assert key in files_on_disk(upload_server)
        wait_for(lambda: http.get(url).status_code == 404, timeout=15)  # swept every 0.5 s after a second
        assert key not in files_on_disk(upload_server)
        assert_fal_error(edit(http, url), 422, ["body", "image_url"], "file_download_error")
        assert http.get(kept.json()["access_url"]).status_code == 200  # as outputs: a week by default
        for bad in [
            "{",
            "[]",
            "{}",
            '{"expiration_duration_seconds": 0}',
            '{"expiration_duration_seconds": "1"}',
            '{"expiration_duration_seconds": 1' + "0" * 400 + "}",  # an int no float holds
        ]:
            refused = http.post(
                "/files/upload",
                content=png_bytes(8, 8),
                headers={"Content-Type": "image/png", "X-Fal-Object-Lifecycle-Preference": bad},
            )
            assert_fal_error(refused, 400, ["header", "x-fal-object-lifecycle-preference"], "value_error")
        # The other spelling is checked as well, even when the preference that wins is valid.
        both = {"X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds": 60}'}
        refused = http.post(
            "/files/upload",
            content=png_bytes(8, 8),
            headers={"Content-Type": "image/png", "X-Fal-Object-Lifecycle": "not json"} | both,
        )
        assert_fal_error(refused, 400, ["header", "x-fal-object-lifecycle"], "value_error")


def test_the_signed_put_answers_a_browsers_preflight(upload_server: KontextdServer) -> None:
    with client(upload_server) as http:
        upload_url = initiate(http)["upload_url"]
    with client(upload_server, key=None) as http:
        preflight = http.options(
            upload_url,
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PUT"},
        )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert preflight.headers["access-control-allow-methods"] == "PUT"
    stored = put(upload_server, upload_url, png_bytes(8, 8))
    assert stored.headers["access-control-allow-origin"] == "*"


# -- the parts, on their own --------------------------------------------------------------------------


def test_tokens_and_upload_urls_are_signed_apart_and_expire() -> None:
    signer, stranger = UploadSigner(UploadSigner.generate()), UploadSigner(UploadSigner.generate())
    now = time.time()
    token = signer.token("key-0123456789abcdef", int(now) + 60)
    assert signer.token_owner(token, now) == "key-0123456789abcdef"
    assert signer.token_owner(token, now + 61) is None  # expired
    assert stranger.token_owner(token, now) is None  # another deployment's
    owner, expires, signature = token.split(".")
    for forged in [
        f"anonymous.{expires}.{signature}",
        f"{owner}.{int(expires) + 1}.{signature}",
        token + ".x",
        "",
    ]:
        assert signer.token_owner(forged, now) is None, forged
    key = keys.upload_key("png")
    upload_signature = signer.upload_signature(key, int(expires))
    assert signer.check_upload(key, expires, upload_signature, now) is None
    assert signer.check_upload(key, expires, signature, now) is not None  # a token's signature is no URL's
    refusal = signer.check_upload(key, expires, upload_signature, int(expires))
    assert refusal is not None and refusal.kind == "upload_url_expired"
    forged_late = stranger.upload_signature(key, int(now) - 10)
    refusal = signer.check_upload(key, str(int(now) - 10), forged_late, now)
    assert refusal is not None and refusal.kind == "upload_url_invalid"  # a forgery is never "expired"
    with pytest.raises(ValueError):
        UploadSigner(b"short")


def test_every_node_on_one_database_accepts_what_another_signed(pg_dsn: str) -> None:
    # The secret is the deployment's (JobStore.secret): an upload URL one API node made is valid on any.
    first, second = PostgresJobStore(pg_dsn), PostgresJobStore(pg_dsn)
    try:
        one, other = (
            UploadSigner(node.secret(SECRET_NAME, UploadSigner.generate)) for node in (first, second)
        )
        key, expires = keys.upload_key("webp"), int(time.time()) + 60
        assert other.check_upload(key, str(expires), one.upload_signature(key, expires), time.time()) is None
        assert other.token_owner(one.token("anonymous", expires), time.time()) == "anonymous"
        first.add_upload(key, "key-a", expires)
        assert second.upload_owner(key, time.time()) == "key-a"
    finally:
        first.close()
        second.close()


def test_the_sweep_deletes_expired_uploads_and_their_records(tmp_path: Path) -> None:
    store, storage = SQLiteJobStore(tmp_path / "jobs.sqlite3"), LocalStorage(tmp_path / "files")
    try:
        now = time.time()
        gone, kept, never_stored = keys.upload_key("png"), keys.upload_key("gif"), keys.upload_key("webp")
        for key, lifetime in [(gone, 1.0), (kept, 100.0), (never_stored, 1.0)]:
            store.add_upload(key, "key-a", now + lifetime)
        storage.put(gone, b"gone", "image/png")
        storage.put(kept, b"kept", "image/gif")
        counts = sweep_once(store, storage, now + 2)
        assert counts["uploads_expired"] == 2
        assert storage.open(gone) is None and store.expired_uploads(now + 2, 10) == []
        assert store.upload_owner(kept, now + 2) == "key-a" and storage.open(kept) is not None
        assert sweep_once(store, storage, now + 2)["uploads_expired"] == 0
    finally:
        store.close()


def test_bytes_put_after_their_record_was_swept_are_not_kept(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    key = keys.upload_key("png")
    store = mock.Mock()
    store.upload_owner.side_effect = ["key-a", None]  # swept while the bytes were written
    services = SimpleNamespace(store=store, storage=storage)
    assert uploads._store_signed(services, key, b"late") is None
    assert storage.open(key) is None
    store.upload_owner.side_effect = [None]  # already gone: nothing is written at all
    assert uploads._store_signed(services, key, b"late") is None
    assert os.listdir(storage.root) == []
    assert UPLOAD_URL_SECONDS <= 600  # upload URLs are short-lived


def test_lifecycle_headers_as_fal_clients_send_them() -> None:
    services = SimpleNamespace(settings=SimpleNamespace(output_ttl=604800.0))
    ttl = uploads.upload_ttl
    assert ttl(services, None, None) == 604800.0
    both = json.dumps({"expiration_duration_seconds": 3600, "initial_acl": {"default": "allow"}})
    assert ttl(services, both, both) == 3600.0
    assert ttl(services, None, '{"expiration_duration_seconds": 60}') == 60.0
    assert ttl(services, '{"initial_acl": {"default": "hide"}}', None) == 604800.0


def test_a_traversal_in_a_raw_put_target_touches_nothing(upload_server: KontextdServer) -> None:
    # Sent byte for byte (HTTP clients would normalise the dot segments away).
    context = ssl.create_default_context(cafile=upload_server.ca_file)
    body = png_bytes(8, 8)
    request = (
        b"PUT /files/uploads/../../jobs.sqlite3?expires=9999999999&signature=" + b"0" * 64 + b" HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\nContent-Type: image/png\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    database = upload_server.data_dir / "jobs.sqlite3"
    before = database.read_bytes()[:100]
    with (
        socket.create_connection(("127.0.0.1", upload_server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.split(b" ", 2)[1] == b"405", response[:300]  # no PUT route there
    assert database.read_bytes()[:100] == before  # still the database
