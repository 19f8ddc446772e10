"""One contract for every storage: files in the data directory (LocalStorage) and an S3-compatible bucket
(S3Storage, on a SeaweedFS server on loopback). No mocks: real files, a real S3 server, real outages.

For S3, every HTTP request the storage sends is recorded (a botocore `before-send` hook), so "no request
is made" for a hostile key is proven, not assumed.
"""

import contextlib
import errno
import io
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import fill_disk, small_disk
from PIL import Image

from kontextd.config import Settings
from kontextd.storage import keys
from kontextd.storage.base import Storage, StorageConfigError, StorageUnavailable
from kontextd.storage.factory import open_storage, parse_s3_url
from kontextd.storage.local import LocalStorage
from kontextd.storage.s3 import DELETE_BATCH, S3Storage
from tests.s3_fixtures import SeaweedS3

OUTAGE_BOUND_SECONDS = 20  # a write to a store that is down fails within this, never hangs


def new_key(index: int = 0, extension: str = "png", request_id: str | None = None) -> str:
    return keys.output_key(request_id or str(uuid.uuid4()), index, extension)


def image(extension: str = "png", size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 64).convert("RGB").save(buffer, format=extension.upper())
    return buffer.getvalue()


def read(storage: Storage, key: str) -> bytes | None:
    stored = storage.open(key)
    if stored is None:
        return None
    with stored.stream:
        return stored.stream.read()


@dataclass
class Subject:
    """A storage under test, and (for S3) the requests it has sent: (`METHOD url`, body)."""

    kind: str
    storage: Storage
    sent: list[tuple[str, bytes]] = field(default_factory=list)


def _record_requests(storage: S3Storage, subject: Subject) -> None:
    def record(request: Any, **_: Any) -> None:
        body = request.body if isinstance(request.body, bytes) else b""
        subject.sent.append((f"{request.method} {request.url}", body))

    storage.client.meta.events.register("before-send.s3", record)


@pytest.fixture(params=["local", "s3"])
def subject(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Subject]:
    if request.param == "local":
        storage = open_storage(None, tmp_path / "files")
        assert isinstance(storage, LocalStorage)
        yield Subject("local", storage)
        storage.close()
        return
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    server.use(monkeypatch)  # the standard AWS variables, as a deployment sets them
    storage = open_storage(request.getfixturevalue("s3_bucket_url"), tmp_path / "unused")
    assert isinstance(storage, S3Storage)
    found = Subject("s3", storage)
    _record_requests(storage, found)
    yield found
    storage.close()


# -- the contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", keys.EXTENSIONS)
def test_what_is_put_is_opened_whole_with_its_size_and_type(subject: Subject, extension: str) -> None:
    key, data = new_key(extension=extension), image(extension)
    assert subject.storage.put(key, data, keys.content_type(key)) is None
    stored = subject.storage.open(key)
    assert stored is not None
    with stored.stream:
        assert stored.stream.read() == data
    assert stored.size == len(data)
    assert stored.content_type == keys.content_type(key) == f"image/{extension}"


def test_a_put_overwrites(subject: Subject) -> None:
    key = new_key()
    subject.storage.put(key, b"first, and longer than the second", "image/png")
    subject.storage.put(key, b"second", "image/png")
    stored = subject.storage.open(key)
    assert stored is not None and stored.size == len(b"second")
    with stored.stream:
        assert stored.stream.read() == b"second"


def test_a_missing_key_is_none(subject: Subject) -> None:
    request_id = str(uuid.uuid4())
    subject.storage.put(new_key(0, request_id=request_id), b"zero", "image/png")
    assert subject.storage.open(new_key()) is None  # no such request
    assert subject.storage.open(new_key(1, request_id=request_id)) is None  # its request, not this image
    assert subject.storage.open(new_key(0, "jpeg", request_id=request_id)) is None  # another extension


def test_check_passes_on_a_working_storage(subject: Subject) -> None:
    subject.storage.check()  # raises StorageUnavailable otherwise; an outage is tested below


def hostile_keys(real: str) -> list[str]:
    """Names that are not keys, many of them close to `real`, a key that exists."""
    request_id, name = real.split("/")
    fullwidth_slash, division_slash, cyrillic_a = "\uff0f", "\u2215", "\u0430"
    return [
        "../x",
        "a/../../etc/passwd",
        f"{request_id}/../{real}",
        f"../{real}",
        f"./{real}",
        f"{real}/",
        f"{real}/.",
        f"/{real}",
        f"//{real}",
        "/etc/passwd",
        f"{request_id}%2f{name}",
        f"{request_id}%2F{name}",
        f"{request_id}\\{name}",
        f"{real}\x00",
        f"{real}\x00.png",
        f"{real}\n",
        f"{request_id}{fullwidth_slash}{name}",
        f"{request_id}{division_slash}{name}",
        real.replace("a", cyrillic_a, 1) if "a" in request_id else real.replace("0", "\u0660", 1),
        f"{request_id}/\u0660.png",  # an Arabic-Indic zero
        f"{request_id}/0\uff0epng",  # a fullwidth full stop
        real.upper(),
        f"{request_id}/100.png",  # too many digits
        f"{request_id}/00.png",
        f"{request_id}/01.png",
        f"{request_id}/0.PNG",
        f"{request_id}/0.gif",
        f"{request_id}/0",
        request_id,
        f"{request_id}/{name}/{name}",
        f" {real}",
        "",
    ]


@pytest.mark.parametrize("form", ["output", "upload"])
def test_anything_but_a_key_is_refused_without_a_request(subject: Subject, form: str) -> None:
    real = new_key() if form == "output" else keys.upload_key("png")
    subject.storage.put(real, b"real", "image/png")
    subject.sent.clear()
    for key in hostile_keys(real):
        assert not keys.is_valid(key), key
        assert subject.storage.open(key) is None, key
        with pytest.raises(ValueError):
            subject.storage.put(key, b"hostile", "image/png")
        if subject.kind == "s3":
            with pytest.raises(ValueError):
                subject.storage.presigned_url(key, 60)
    subject.storage.delete(hostile_keys(real))
    assert subject.sent == [], "a hostile key reached the object store"
    assert read(subject.storage, real) == b"real"  # and nothing it names was touched


@pytest.mark.parametrize("extension", keys.UPLOAD_EXTENSIONS)
def test_an_upload_is_stored_under_a_key_of_its_own(subject: Subject, extension: str) -> None:
    key, data = keys.upload_key(extension), image(extension)
    assert keys.is_valid(key) and keys.is_upload(key) and not keys.is_upload(new_key())
    subject.storage.put(key, data, keys.content_type(key))
    stored = subject.storage.open(key)
    assert stored is not None and stored.size == len(data)
    assert stored.content_type == keys.content_type(key) == f"image/{extension}"
    stored.stream.close()
    if isinstance(subject.storage, LocalStorage):
        assert (subject.storage.root / key).is_file()  # under the uploads folder, named by the key alone
    subject.storage.delete([key])
    assert subject.storage.open(key) is None
    if isinstance(subject.storage, LocalStorage):
        assert os.listdir(subject.storage.root) == []


def test_upload_keys_are_random_and_strict() -> None:
    real = keys.upload_key("png")
    _, name = real.split("/")
    uuid_part = name.removesuffix(".png")
    assert keys.upload_key("png") != real
    for key in [
        f"uploads/{uuid_part}.svg",
        f"uploads/{uuid_part}.html",
        f"uploads/{uuid_part}.jpg",
        f"uploads/{uuid_part}.PNG",
        f"Uploads/{name}",
        f"uploads/{uuid_part.upper()}.png",
        f"uploads/{uuid_part}/0.png",
        f"uploads//{name}",
        f"uploads/../{name}",
        f"uploads/{name}/",
        f"uploads\\{name}",
        f"uploads%2f{name}",
        f"uploads/{name}\x00",
        f"uploads/{uuid_part}",
        "uploads/photo.png",
        f"{uuid_part}/0.gif",  # an output is never a GIF
        f"files/{name}",
    ]:
        assert not keys.is_valid(key), key
    with pytest.raises(ValueError):
        keys.upload_key("svg")


def test_delete_removes_many_keys_and_ignores_missing_and_invalid_ones(subject: Subject) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    gone = [new_key(0, request_id=first), new_key(1, "jpeg", request_id=first), new_key(0, request_id=second)]
    kept = new_key(2, request_id=first)
    for key in [*gone, kept]:
        subject.storage.put(key, key.encode(), keys.content_type(key))
    subject.storage.delete([*gone, gone[0], new_key(), "../x", f"{first}/9.png"])
    assert [subject.storage.open(key) for key in gone] == [None, None, None]
    assert read(subject.storage, kept) == kept.encode()
    if isinstance(subject.storage, LocalStorage):  # a folder goes with its last file, and only then
        assert not (subject.storage.root / second).exists()
        assert sorted(os.listdir(subject.storage.root / first)) == ["2.png"]
    subject.storage.delete([kept])
    subject.storage.delete([])
    assert subject.storage.open(kept) is None
    if isinstance(subject.storage, LocalStorage):
        assert os.listdir(subject.storage.root) == []


def test_delete_takes_more_keys_than_one_s3_request_may_name(subject: Subject) -> None:
    many = [new_key() for _ in range(2 * DELETE_BATCH + 1)]
    stored = [many[0], many[DELETE_BATCH], many[-1]]  # one in each batch of 1000
    for key in stored:
        subject.storage.put(key, b"x", "image/png")
    subject.sent.clear()
    subject.storage.delete(many)
    assert [subject.storage.open(key) for key in stored] == [None, None, None]
    if subject.kind == "s3":
        deletes = [body for line, body in subject.sent if line.startswith("POST") and "?delete" in line]
        assert [body.count(b"<Key>") for body in deletes] == [DELETE_BATCH, DELETE_BATCH, 1]


def test_the_stream_reads_in_chunks_and_closes(subject: Subject) -> None:
    key, data = new_key(), os.urandom(300_000)
    subject.storage.put(key, data, "image/png")
    stored = subject.storage.open(key)
    assert stored is not None and stored.size == len(data)
    chunks = []
    while chunk := stored.stream.read(64 * 1024):
        assert len(chunk) <= 64 * 1024
        chunks.append(chunk)
    assert len(chunks) >= 5 and b"".join(chunks) == data
    stored.stream.close()
    if subject.kind == "local":
        assert stored.stream.closed
    # Closed early, half read: nothing is left open to block the next read.
    for _ in range(3):
        half = subject.storage.open(key)
        assert half is not None and half.stream.read(1000) == data[:1000]
        half.stream.close()
    assert read(subject.storage, key) == data


def test_presigned_urls_read_the_object_until_they_expire(subject: Subject) -> None:
    key, data = new_key(), image()
    subject.storage.put(key, data, "image/png")
    # 3 s, not 1: X-Amz-Date is whole seconds, so a 1 s URL signed late in a second was already expired
    # for a fetch a few milliseconds later (a flaky 403); 3 s leaves at least 2 s for the first fetch.
    url = subject.storage.presigned_url(key, 3)
    if subject.kind == "local":
        assert url is None  # served by kontextd under /files/ instead
        return
    assert url is not None and urlsplit(url).hostname == "127.0.0.1"
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200 and fetched.content == data
    # Signed at X-Amz-Date (whole seconds) for X-Amz-Expires seconds: wait until that has passed (and a
    # second more: the server compares whole seconds), then the same URL is refused.
    query = parse_qs(urlsplit(url).query)
    signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    expires = signed + int(query["X-Amz-Expires"][0])
    assert expires - time.time() <= 3
    while time.time() <= expires + 1:
        time.sleep(0.05)
    assert httpx.get(url, timeout=10).status_code == 403


# -- S3 only ---------------------------------------------------------------------------------------


def test_a_missing_bucket_is_created_at_start_up(
    s3_server: SeaweedS3, s3_bucket_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_side = s3_server.client()
    bucket, _ = parse_s3_url(s3_bucket_url)
    assert bucket not in [entry["Name"] for entry in server_side.list_buckets()["Buckets"]]
    s3_server.use(monkeypatch)
    with contextlib.closing(open_storage(s3_bucket_url, tmp_path)) as storage:
        key = new_key()
        storage.put(key, b"made", "image/png")
        server_side.head_bucket(Bucket=bucket)
        stored = server_side.head_object(Bucket=bucket, Key=key)
        assert stored["ContentType"] == "image/png" and stored["ContentLength"] == 4
    # An existing bucket is simply used.
    with contextlib.closing(open_storage(s3_bucket_url, tmp_path)) as again:
        assert read(again, key) == b"made"


def test_presigned_urls_are_signed_for_the_endpoint_clients_reach(
    s3_server: SeaweedS3, s3_bucket_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kontextd reaches the store at 127.0.0.1, clients at `localhost` (another name for the same server,
    standing in for a public host): the host is signed, so a URL must be signed for the one clients use."""
    s3_server.use(monkeypatch)
    port = urlsplit(s3_server.endpoint_url).port
    key, data = new_key(), image()
    with contextlib.closing(open_storage(s3_bucket_url, tmp_path)) as inside:
        inside.put(key, data, "image/png")
        signed_inside = inside.presigned_url(key, 60)
    assert signed_inside is not None
    moved = signed_inside.replace("//127.0.0.1:", "//localhost:", 1)
    assert httpx.get(moved, timeout=10).status_code == 403  # why: its signature names the other host
    with contextlib.closing(open_storage(s3_bucket_url, tmp_path, f"http://localhost:{port}")) as storage:
        url = storage.presigned_url(key, 60)
        assert url is not None and urlsplit(url).netloc == f"localhost:{port}"
        fetched = httpx.get(url, timeout=10)
        assert fetched.status_code == 200 and fetched.content == data
        assert read(storage, key) == data  # kontextd's own requests still go to AWS_ENDPOINT_URL


@pytest.mark.parametrize(
    ("file_urls", "endpoint", "refusal"),
    [
        ("proxy", "https://s3.example.com", "for --file-urls presigned only"),
        ("presigned", "s3.example.com", "expected an http(s) origin"),
        ("presigned", "ftp://s3.example.com", "expected an http(s) origin"),
        ("presigned", "https://key:secret@s3.example.com", "expected an http(s) origin"),
        ("presigned", "https://s3.example.com/bucket", "expected an http(s) origin"),
        ("presigned", "https://s3.example.com?x=1", "expected an http(s) origin"),
    ],
)
def test_a_presign_endpoint_is_an_origin_used_with_presigned_urls_only(
    file_urls: str, endpoint: str, refusal: str
) -> None:
    settings = Settings(file_urls=file_urls, presign_endpoint=endpoint)
    with pytest.raises(ValueError, match=re.escape(refusal)) as refused:
        settings.check()
    assert "secret" not in str(refused.value)
    Settings(file_urls="presigned", presign_endpoint="https://s3.example.com/").check()


def test_a_presign_endpoint_needs_object_storage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs object storage"):
        open_storage(None, tmp_path, "https://s3.example.com")


def test_a_prefix_keeps_objects_under_it(
    s3_server: SeaweedS3, s3_bucket_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_server.use(monkeypatch)
    bucket, _ = parse_s3_url(s3_bucket_url)
    key = new_key()
    with contextlib.closing(open_storage(f"{s3_bucket_url}/tenant-a/images/", tmp_path)) as prefixed:
        prefixed.put(key, b"under", "image/png")
        assert read(prefixed, key) == b"under"
        url = prefixed.presigned_url(key, 60)
        assert url is not None and httpx.get(url, timeout=10).content == b"under"
        listed = s3_server.client().list_objects_v2(Bucket=bucket)
        assert [entry["Key"] for entry in listed["Contents"]] == [f"tenant-a/images/{key}"]
        with contextlib.closing(open_storage(s3_bucket_url, tmp_path)) as bare:
            assert bare.open(key) is None  # the bucket's root is another storage
            bare.delete([key])
        with contextlib.closing(open_storage(f"{s3_bucket_url}/tenant-b", tmp_path)) as other:
            assert other.open(key) is None
        assert read(prefixed, key) == b"under"
        prefixed.delete([key])
        assert "Contents" not in s3_server.client().list_objects_v2(Bucket=bucket)


def test_a_bucket_that_cannot_be_used_stops_start_up_saying_why(
    s3_server: SeaweedS3, s3_bucket_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_server.use(monkeypatch)
    bucket, _ = parse_s3_url(s3_bucket_url)
    port = unused_port()
    started = time.monotonic()
    with pytest.raises(StorageConfigError) as unreachable:
        S3Storage(bucket, endpoint_url=f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < OUTAGE_BOUND_SECONDS
    message = str(unreachable.value)
    assert bucket in message and f"127.0.0.1:{port}" in message and "cannot reach" in message
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-key")
    with pytest.raises(StorageConfigError) as refused:
        S3Storage(bucket)
    message = str(refused.value)
    assert bucket in message and s3_server.endpoint_url in message and "access denied" in message
    assert "not-the-secret-key" not in message and "kontextd-test-secret" not in message
    s3_server.use(monkeypatch)
    with pytest.raises(StorageConfigError, match="does not exist"):
        S3Storage(bucket, endpoint_url=s3_server.endpoint_url, create_bucket=False)


def test_an_outage_fails_fast_and_the_same_storage_works_again_after_it(
    s3_private_server: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_private_server.use(monkeypatch)
    with contextlib.closing(open_storage("s3://kontextd-outage", tmp_path)) as storage:
        before, during = new_key(), new_key()
        storage.put(before, b"before", "image/png")
        s3_private_server.stop()
        attempts = {
            "put": lambda: storage.put(during, b"during", "image/png"),
            "open": lambda: storage.open(before),
            "delete": lambda: storage.delete([before]),
            "check": storage.check,
        }
        for name, attempt in attempts.items():
            started = time.monotonic()
            with pytest.raises(StorageUnavailable) as unavailable:
                attempt()
            assert time.monotonic() - started < OUTAGE_BOUND_SECONDS, name
            assert unavailable.value.__cause__ is not None, name  # the botocore error, chained
            assert "kontextd-outage" in str(unavailable.value), name
        s3_private_server.start()
        storage.check()
        storage.put(during, b"during", "image/png")
        assert read(storage, during) == b"during"
        assert read(storage, before) == b"before"  # the failed delete deleted nothing


# -- local only ------------------------------------------------------------------------------------


def test_a_full_disk_is_unavailable_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        storage = LocalStorage(disk / "files")
        kept = new_key()
        storage.put(kept, b"kept", "image/png")
        filler = fill_disk(disk)
        key = new_key()
        with pytest.raises(StorageUnavailable, match=r"^disk full: ENOSPC") as full:
            storage.put(key, os.urandom(200_000), "image/png")
        assert isinstance(full.value.__cause__, OSError) and full.value.__cause__.errno == errno.ENOSPC
        assert sorted(os.listdir(storage.root)) == [kept.split("/")[0]]  # no temporary file, no new folder
        assert storage.open(key) is None and read(storage, kept) == b"kept"
        filler.unlink()
        storage.put(key, b"now there is room", "image/png")
        assert read(storage, key) == b"now there is room"


def test_check_says_when_the_files_folder_was_removed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    storage.root.rmdir()
    with pytest.raises(StorageUnavailable, match="missing or not writable"):
        storage.check()
    storage.root.mkdir()
    storage.check()


def test_other_write_errors_are_not_taken_for_a_full_disk(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    key = new_key()
    (storage.root / key.split("/")[0]).write_bytes(b"a file where the request's folder would be")
    with pytest.raises(OSError) as failed:
        storage.put(key, b"x", "image/png")
    assert not isinstance(failed.value, StorageUnavailable)


# -- the storage URL -------------------------------------------------------------------------------


def test_the_storage_url_names_local_files_or_a_bucket(tmp_path: Path) -> None:
    for nothing in (None, ""):
        assert isinstance(open_storage(nothing, tmp_path / "files"), LocalStorage)
    assert parse_s3_url("s3://kontextd-images") == ("kontextd-images", "")
    assert parse_s3_url("s3://my.bucket-1/") == ("my.bucket-1", "")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_url("s3://bucket//images") == ("bucket", "images")


@pytest.mark.parametrize(
    "url",
    [
        "file:///var/lib/kontextd",
        "/var/lib/kontextd",
        "http://127.0.0.1:9000/bucket",
        "gs://bucket",
        "s3:/bucket",
        "s3://",
        "s3:///prefix",
        "s3://ab",
        "s3://" + "a" * 64,
        "s3://Bucket",
        "s3://bucket_name",
        "s3://-bucket",
        "s3://bucket-",
        "s3://my..bucket",
        "s3://192.168.1.1",
        "s3://xn--bucket",
        "s3://bucket-s3alias",
        "s3://key:secret@bucket",
        "s3://bucket:9000",
        "s3://bucket?region=x",
        "s3://bucket/../other",
        "s3://bucket/a/../b",
        "s3://bucket/a//b",
        "s3://bucket/./a",
        "s3://bucket/a\\b",
        "s3://bucket/a b",
        "s3://bucket/a%2fb",
        "s3://bucket/\u0430",
        "s3://bucket/a\x00",
        "s3://bucket/" + "a" * 600,
    ],
)
def test_any_other_storage_url_is_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="s3://bucket"):
        open_storage(url, tmp_path)


def unused_port() -> int:
    """A loopback port nothing listens on (chosen free, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
