"""GuardedFetcher end to end against loopback servers, plus image decoding and data URIs.

Only loopback is ever contacted. Refusals of other addresses are exercised through an injected resolver,
with the HTTP client's send replaced by a tripwire so a connection attempt would fail the test.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import ipaddress
import socket
import ssl
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from kontextd.fetch import (
    AllowList,
    FetchError,
    FetchLimits,
    GuardedFetcher,
    decode_image,
    load_image,
    parse_data_uri,
)
from kontextd.fetch.addresses import IPAddress


def _png(size: tuple[int, int] = (8, 6), mode: str = "RGB", color: Any = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()
SLOW_SECONDS = 5.0  # how long /slow and /trickle take to send a whole answer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    server: _LoopbackServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def _record(self, body: bytes = b"") -> None:
        self.server.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body))

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._record()
        path, _, query = self.path.partition("?")
        if path == "/image.png":
            self._reply(200, PNG, {"Content-Type": "image/png"})
        elif path == "/host":
            self._reply(200, self.headers["Host"].encode())
        elif path == "/redirect":
            self._reply(302, headers={"Location": query.removeprefix("to=")})
        elif path == "/no-location":
            self._reply(302)
        elif path.startswith("/chain/"):
            left = int(path.removeprefix("/chain/"))
            if left:
                self._reply(302, headers={"Location": f"/chain/{left - 1}"})
            else:
                self._reply(200, b"done")
        elif path.startswith("/bytes/"):
            self._reply(200, b"x" * int(path.removeprefix("/bytes/")))
        elif path.startswith("/stream/"):
            # HTTP/1.0 close-delimited body: no Content-Length for an early check to catch.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * int(path.removeprefix("/stream/")))
        elif path == "/slow":
            time.sleep(SLOW_SECONDS)
            self._reply(200, b"late")
        elif path == "/trickle":
            # Every byte arrives promptly; only a bound on the whole fetch stops this.
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(SLOW_SECONDS / 40)
            except (BrokenPipeError, ConnectionResetError):  # the fetcher gave up, as it should
                pass
        else:
            self._reply(404, b"not here")

    def do_POST(self) -> None:
        self._record(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        if self.path == "/hook":
            self._reply(204)
        elif self.path == "/hook-redirect":
            self._reply(307, headers={"Location": "/hook"})
        else:
            self._reply(500)


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.requests: list[Recorded] = []
        super().__init__((host, 0), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str | None = None, scheme: str = "http") -> str:
        host = host or self.server_address[0]
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}{path}"


@pytest.fixture
def make_server() -> Iterator[Callable[..., _LoopbackServer]]:
    started: list[_LoopbackServer] = []

    def start(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> _LoopbackServer:
        server = _LoopbackServer(host)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server(make_server: Callable[..., _LoopbackServer]) -> _LoopbackServer:
    return make_server()


def _fake_resolver(
    table: dict[str, list[str]], calls: list[tuple[str, int]]
) -> Callable[[str, int], Awaitable[list[IPAddress]]]:
    """Resolves only the made-up names in ``table``; anything else fails like an unknown name."""

    async def resolve(host: str, port: int) -> list[IPAddress]:
        calls.append((host, port))
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


def _fetch(url: str, allow: str = "", **kwargs: Any) -> bytes:
    async def go() -> bytes:
        async with GuardedFetcher(AllowList.parse(allow), **kwargs) as fetcher:
            return await fetcher.get(url)

    return asyncio.run(go())


def _fetch_error(url: str, allow: str = "", **kwargs: Any) -> FetchError:
    with pytest.raises(FetchError) as info:
        _fetch(url, allow, **kwargs)
    return info.value


def _post(url: str, allow: str = "", content: bytes = b"{}", headers: dict[str, str] | None = None) -> int:
    async def go() -> int:
        async with GuardedFetcher(AllowList.parse(allow)) as fetcher:
            return await fetcher.post(url, content, headers or {})

    return asyncio.run(go())


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the guard lets any request reach the HTTP client."""

    async def tripwire(*args: Any, **kwargs: Any) -> httpx.Response:
        raise AssertionError("the guard attempted a connection")

    monkeypatch.setattr(httpx.AsyncClient, "send", tripwire)


# --- refusals and allow-list -------------------------------------------------------------------------


def test_loopback_refused_when_not_allowed(server: _LoopbackServer) -> None:
    url = server.url("/image.png")
    error = _fetch_error(url)
    assert error.error_type == "file_download_error"
    assert error.message == f"Refused to fetch {url}: 127.0.0.1 is a loopback address"
    assert error.ctx == {}
    assert server.requests == []


def test_other_loopback_address_refused_when_only_one_allowed(server: _LoopbackServer) -> None:
    error = _fetch_error(server.url("/image.png", host="127.0.0.2"), allow="127.0.0.1")
    assert "127.0.0.2 is a loopback address" in error.message
    assert server.requests == []


@pytest.mark.parametrize("allow", ["127.0.0.1", "127.0.0.0/8", " 10.0.0.0/8 , 127.0.0.1/32 "])
def test_fetched_when_allowed_by_address(server: _LoopbackServer, allow: str) -> None:
    assert _fetch(server.url("/image.png"), allow) == PNG
    assert [r.path for r in server.requests] == ["/image.png"]


def test_fetched_when_allowed_by_localhost_name(server: _LoopbackServer) -> None:
    # The system resolver is used for `localhost` only, which never leaves the machine.
    assert _fetch(server.url("/host", host="localhost"), "localhost") == f"localhost:{server.port}".encode()


def test_ipv6_literal_url(make_server: Callable[..., _LoopbackServer]) -> None:
    try:
        server = make_server("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    url = server.url("/host")
    assert url == f"http://[::1]:{server.port}/host"
    assert _fetch(url, "::1") == f"[::1]:{server.port}".encode()
    assert "::1 is a loopback address" in _fetch_error(url, "127.0.0.1").message


def test_host_header_keeps_ip_literal_and_port(server: _LoopbackServer) -> None:
    assert _fetch(server.url("/host"), "127.0.0.1") == f"127.0.0.1:{server.port}".encode()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "data:text/plain,hi",
        "//127.0.0.1/x",
    ],
)
def test_non_http_schemes_refused(url: str, no_connections: None) -> None:
    error = _fetch_error(url, "127.0.0.1")
    assert error.error_type == "file_download_error"
    assert "only http and https" in error.message or "Invalid URL" in error.message
    assert error.refused is True  # no later try could pass


def test_credentials_not_echoed(server: _LoopbackServer) -> None:
    error = _fetch_error(f"http://user:s3cret@127.0.0.1:{server.port}/image.png")
    assert "s3cret" not in error.message
    assert f"http://127.0.0.1:{server.port}/image.png" in error.message


# --- injected resolver -------------------------------------------------------------------------------


def test_resolved_documentation_address_refused_without_connecting(no_connections: None) -> None:
    calls: list[tuple[str, int]] = []
    resolver = _fake_resolver({"images.test": ["203.0.113.5"]}, calls)
    error = _fetch_error("http://images.test/cat.png", "127.0.0.1", resolver=resolver)
    assert error.message == (
        "Refused to fetch http://images.test/cat.png: 203.0.113.5 is a documentation address"
    )
    assert calls == [("images.test", 80)]
    assert error.refused is True


def test_one_bad_answer_refuses_all(no_connections: None) -> None:
    resolver = _fake_resolver({"images.test": ["127.0.0.1", "169.254.169.254"]}, [])
    error = _fetch_error("https://images.test/cat.png", "127.0.0.1", resolver=resolver)
    assert "169.254.169.254 is a metadata address" in error.message


def test_unresolvable_name(no_connections: None) -> None:
    error = _fetch_error("http://missing.test/x", resolver=_fake_resolver({}, []))
    assert error.message == "Failed to fetch http://missing.test/x: could not resolve missing.test"
    assert error.refused is False  # a name may resolve later


def test_ip_literal_is_not_resolved(server: _LoopbackServer) -> None:
    calls: list[tuple[str, int]] = []
    assert _fetch(server.url("/image.png"), "127.0.0.1", resolver=_fake_resolver({}, calls)) == PNG
    assert calls == []


@pytest.mark.parametrize("allow", ["images.test", "127.0.0.1"])
def test_resolved_name_fetched_from_checked_address(server: _LoopbackServer, allow: str) -> None:
    calls: list[tuple[str, int]] = []
    resolver = _fake_resolver({"images.test": ["127.0.0.1"]}, calls)
    body = _fetch(f"http://images.test:{server.port}/host", allow, resolver=resolver)
    # The server listens on 127.0.0.1 only, so the request went there, carrying the original Host.
    assert body == f"images.test:{server.port}".encode()
    assert calls == [("images.test", server.port)]


def test_next_checked_address_tried_when_first_refuses_connection(server: _LoopbackServer) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    resolver = _fake_resolver({"images.test": ["127.0.0.3", "127.0.0.1"]}, [])
    assert _fetch(server.url("/image.png", host="images.test"), "127.0.0.0/8", resolver=resolver) == PNG
    error = _fetch_error(f"http://127.0.0.1:{dead}/x", "127.0.0.1")
    assert (
        error.message == f"Failed to fetch http://127.0.0.1:{dead}/x: could not connect to 127.0.0.1:{dead}"
    )


# --- redirects -------------------------------------------------------------------------------------------


def test_relative_redirect_followed(server: _LoopbackServer) -> None:
    assert _fetch(server.url("/redirect?to=/image.png"), "127.0.0.1") == PNG
    assert [r.path for r in server.requests] == ["/redirect?to=/image.png", "/image.png"]


def test_redirect_to_other_loopback_address_refused(server: _LoopbackServer) -> None:
    target = server.url("/image.png", host="127.0.0.2")
    error = _fetch_error(server.url(f"/redirect?to={target}"), "127.0.0.1")
    assert error.message.startswith(f"Refused to fetch {target} (redirected from ")
    assert error.message.endswith("127.0.0.2 is a loopback address")
    assert len(server.requests) == 1


def test_redirect_to_other_host_refused(server: _LoopbackServer) -> None:
    # Allowed by name only: a redirect to the same address spelled as an IP literal is another host.
    resolver = _fake_resolver({"images.test": ["127.0.0.1"]}, [])
    start = server.url(f"/redirect?to={server.url('/image.png')}", host="images.test")
    error = _fetch_error(start, "images.test", resolver=resolver)
    assert "127.0.0.1 is a loopback address" in error.message
    assert len(server.requests) == 1


def test_redirect_to_other_scheme_refused(server: _LoopbackServer) -> None:
    error = _fetch_error(server.url("/redirect?to=file:///etc/passwd"), "127.0.0.1")
    assert "only http and https" in error.message


def test_redirect_chain_limit(server: _LoopbackServer) -> None:
    limits = FetchLimits(max_redirects=3)
    assert _fetch(server.url("/chain/3"), "127.0.0.1", limits=limits) == b"done"
    error = _fetch_error(server.url("/chain/4"), "127.0.0.1", limits=limits)
    assert error.message == f"Failed to fetch {server.url('/chain/4')}: more than 3 redirects"


def test_redirect_without_location(server: _LoopbackServer) -> None:
    assert "HTTP 302 without a Location" in _fetch_error(server.url("/no-location"), "127.0.0.1").message


# --- limits and statuses -----------------------------------------------------------------------------


def test_not_found(server: _LoopbackServer) -> None:
    url = server.url("/nothing")
    error = _fetch_error(url, "127.0.0.1")
    assert (error.error_type, error.message) == ("file_download_error", f"Failed to fetch {url}: HTTP 404")


@pytest.mark.parametrize("path", ["/bytes/1001", "/stream/1001"])
def test_body_over_limit(server: _LoopbackServer, path: str) -> None:
    limits = FetchLimits(max_bytes=1000)
    error = _fetch_error(server.url(path), "127.0.0.1", limits=limits)
    assert error.message == f"Download from {server.url(path)} exceeds 1000 bytes"
    assert _fetch(server.url("/stream/1000"), "127.0.0.1", limits=limits) == b"x" * 1000


def test_limit_stated_in_megabytes(server: _LoopbackServer) -> None:
    error = _fetch_error(
        server.url("/stream/1100000"), "127.0.0.1", limits=FetchLimits(max_bytes=1024 * 1024)
    )
    assert error.message.endswith("exceeds 1 MB")


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_whole_fetch_timeout(server: _LoopbackServer, path: str) -> None:
    started = time.monotonic()
    error = _fetch_error(server.url(path), "127.0.0.1", limits=FetchLimits(timeout_seconds=0.4))
    assert error.message == f"Timed out fetching {server.url(path)} after 0.4 seconds"
    # Given up on at the limit, not when the answer was complete; the bounds the mechanism implies.
    assert 0.4 <= time.monotonic() - started < SLOW_SECONDS


# --- https: connect to the checked IP, verify the certificate against the host name -------------------


def _tls_files(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``name``: (ca, cert, key) PEM paths."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("kontextd test CA", ca_key, "kontextd test CA", ca_key, ca=True)
    cert = build(name, key, "kontextd test CA", ca_key, ca=False)
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def _tls_server(make_server: Callable[..., _LoopbackServer], cert: Path, key: Path) -> _LoopbackServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return make_server(tls=context)


def test_https_verifies_certificate_against_host_name(
    tmp_path: Path, make_server: Callable[..., _LoopbackServer]
) -> None:
    ca, cert, key = _tls_files(tmp_path, "images.test")
    server = _tls_server(make_server, cert, key)
    resolver = _fake_resolver({"images.test": ["127.0.0.1"]}, [])
    url = server.url("/host", host="images.test", scheme="https")
    assert (
        _fetch(url, "images.test", resolver=resolver, verify=str(ca)) == f"images.test:{server.port}".encode()
    )


def test_https_wrong_certificate_rejected(
    tmp_path: Path, make_server: Callable[..., _LoopbackServer]
) -> None:
    ca, cert, key = _tls_files(tmp_path, "other.test")
    server = _tls_server(make_server, cert, key)
    resolver = _fake_resolver({"images.test": ["127.0.0.1"]}, [])
    url = server.url("/host", host="images.test", scheme="https")
    error = _fetch_error(url, "images.test", resolver=resolver, verify=ssl.create_default_context(cafile=ca))
    assert (
        error.message
        == f"Failed to fetch {url}: could not verify the TLS certificate of images.test:{server.port}"
    )
    assert server.requests == []


# --- webhooks ----------------------------------------------------------------------------------------


def test_post_delivers(server: _LoopbackServer) -> None:
    status = _post(server.url("/hook"), "127.0.0.1", b'{"ok": true}', {"Content-Type": "application/json"})
    assert status == 204
    [request] = server.requests
    assert (request.method, request.body) == ("POST", b'{"ok": true}')
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Host"] == f"127.0.0.1:{server.port}"


def test_post_does_not_follow_redirects(server: _LoopbackServer) -> None:
    assert _post(server.url("/hook-redirect"), "127.0.0.1") == 307
    assert [r.path for r in server.requests] == ["/hook-redirect"]


def test_post_refused_when_not_allowed(server: _LoopbackServer) -> None:
    with pytest.raises(FetchError, match=r"127\.0\.0\.1 is a loopback address") as info:
        _post(server.url("/hook"))
    assert info.value.error_type == "file_download_error"
    assert info.value.refused is True
    assert server.requests == []


def test_post_connection_error() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    with pytest.raises(FetchError, match="could not connect") as info:
        _post(f"http://127.0.0.1:{dead}/hook", "127.0.0.1")
    assert info.value.refused is False  # the receiver may be back later


# --- images ------------------------------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``x``height`` but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_decode_png() -> None:
    image = decode_image(PNG)
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (8, 6), (200, 10, 10))


def test_decode_rgba_and_palette_become_rgb() -> None:
    assert decode_image(_png(mode="RGBA", color=(1, 2, 3, 4))).mode == "RGB"
    assert decode_image(_png(mode="P", color=3)).mode == "RGB"


def test_decode_jpeg_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 128, 255)).save(buffer, "JPEG", exif=exif)
    image = decode_image(buffer.getvalue())
    assert (image.mode, image.size) == ("RGB", (20, 40))


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not an image", PNG[:40], b"\x89PNG\r\n\x1a\n" + b"\x00" * 30],
    ids=["empty", "garbage", "truncated", "bad-header"],
)
def test_decode_unreadable(data: bytes) -> None:
    with pytest.raises(FetchError) as info:
        decode_image(data)
    assert info.value.error_type == "image_load_error"


def test_decode_refuses_exotic_formats() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PPM")
    with pytest.raises(FetchError) as info:
        decode_image(buffer.getvalue())
    assert info.value.error_type == "image_load_error"


@pytest.mark.parametrize(("width", "height"), [(20000, 10), (10, 20000), (14143, 100)])
def test_decode_refuses_large_dimensions_from_header(width: int, height: int) -> None:
    with pytest.raises(FetchError) as info:
        decode_image(_png_claiming(width, height))
    assert info.value.error_type == "image_too_large"
    assert info.value.message == f"Image dimensions {width}x{height} exceed the maximum 14142x14142"
    assert info.value.ctx == {"max_height": 14142, "max_width": 14142}


def test_decode_side_limit_with_real_pixels() -> None:
    assert decode_image(_png((14142, 1), mode="L", color=0)).size == (14142, 1)
    with pytest.raises(FetchError) as info:
        decode_image(_png((14143, 1), mode="L", color=0))
    assert info.value.error_type == "image_too_large"


# Pillow warns past its pixel ceiling before our check refuses the image: expected here.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (14143, 14143)])
def test_decode_decompression_bomb(width: int, height: int) -> None:
    # Past the documented limit: refused while reading the header, by Pillow's own pixel ceiling (twice
    # 14142 x 14142) or by our check of each side, both naming the limit.
    with pytest.raises(FetchError) as info:
        decode_image(_png_claiming(width, height))
    assert info.value.error_type == "image_too_large"
    assert info.value.message in (
        "Image has too many pixels; the maximum is 14142x14142",
        f"Image dimensions {width}x{height} exceed the maximum 14142x14142",
    )
    assert info.value.ctx == {"max_height": 14142, "max_width": 14142}


def test_decode_within_the_limit_is_no_bomb_to_pillow() -> None:
    # 14000 x 14000 is under the documented 14142 x 14142: Pillow must not refuse it as a bomb (it did, at
    # its default ceiling of 179 megapixels); the header-only image then fails as truncated, not too large.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(FetchError) as info:
            decode_image(_png_claiming(14000, 14000))
    assert info.value.error_type == "image_load_error"


def test_decode_decompression_bomb_warning_as_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(FetchError) as info:
            decode_image(_png_claiming(14143, 14143))
    assert info.value.error_type == "image_too_large"


def test_parse_data_uri() -> None:
    encoded = base64.b64encode(PNG).decode()
    assert parse_data_uri(f"data:image/png;base64,{encoded}") == PNG
    assert parse_data_uri(f"DATA:image/png;BASE64,{encoded.rstrip('=')}") == PNG
    assert parse_data_uri(f"data:image/png;base64,{encoded[:20]}\n{encoded[20:]}") == PNG
    assert parse_data_uri("data:,hello%20world") == b"hello world"


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png;base64",
        "image/png;base64,iVBORw0KGgo=",
        "http://127.0.0.1/x.png",
        "data:image/png;base64,!!!!",
        "data:image/png;base64,iVBORw0KGgoAB",  # one character past a whole quantum
        "data:image/png;base64,iVBORw0KGgo=x",
        "data:image/png;base64,",
        "data:,",
    ],
)
def test_parse_data_uri_malformed(uri: str) -> None:
    with pytest.raises(FetchError) as info:
        parse_data_uri(uri)
    assert info.value.error_type == "image_load_error"


def test_load_image_from_data_uri_and_url(server: _LoopbackServer) -> None:
    async def go() -> tuple[Image.Image, Image.Image]:
        async with GuardedFetcher(AllowList.parse("127.0.0.1")) as fetcher:
            inline = await load_image("data:image/png;base64," + base64.b64encode(PNG).decode(), fetcher)
            fetched = await load_image(server.url("/image.png"), fetcher)
            return inline, fetched

    inline, fetched = asyncio.run(go())
    assert inline.size == fetched.size == (8, 6)
    assert inline.mode == fetched.mode == "RGB"


def test_load_image_refused(server: _LoopbackServer) -> None:
    async def go() -> Image.Image:
        async with GuardedFetcher(AllowList.parse("")) as fetcher:
            return await load_image(server.url("/image.png"), fetcher)

    with pytest.raises(FetchError, match="loopback") as info:
        asyncio.run(go())
    assert info.value.error_type == "file_download_error"
