from __future__ import annotations

import http.server
import pathlib
import socket
import ssl
import stat
import threading
from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kontextd import tls
from kontextd.tls import TlsFiles, ensure_self_signed

HOSTS = ["localhost", "127.0.0.1", "::1"]


class _OkHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean


@pytest.fixture
def files(tmp_path: pathlib.Path) -> TlsFiles:
    return ensure_self_signed(tmp_path / "tls", HOSTS)


@pytest.fixture
def port(files: TlsFiles) -> Iterator[int]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.cert, files.key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OkHandler)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _strict_client_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    # Python 3.13 turns this on by default; it rejects certificates without proper AKI/SKI/extensions.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    assert ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


@pytest.mark.parametrize("server_hostname", HOSTS)
def test_strict_handshake(files: TlsFiles, port: int, server_hostname: str) -> None:
    # Always dial 127.0.0.1: the hostname check runs against server_hostname, so "::1" is exercised
    # without needing IPv6 on the test machine.
    ctx = _strict_client_context(files)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as conn,
    ):
        assert conn.version() in {"TLSv1.2", "TLSv1.3"}
        conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        assert conn.recv(64).startswith(b"HTTP/1.0 200")


def test_uncovered_hostname_is_rejected(files: TlsFiles, port: int) -> None:
    ctx = _strict_client_context(files)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="example.com")


def test_httpx_get(files: TlsFiles, port: int) -> None:
    # trust_env=False: no proxy from the environment may carry this off loopback.
    response = httpx.get(f"https://localhost:{port}/", verify=_strict_client_context(files), trust_env=False)
    assert response.status_code == 200
    assert response.text == "ok"


def test_certificate_contents(files: TlsFiles) -> None:
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
    leaf.verify_directly_issued_by(ca)

    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca and ca_bc.value.path_length == 0
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_ku.key_cert_sign and ca_ku.crl_sign and not ca_ku.digital_signature

    leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not leaf_bc.ca
    leaf_ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert leaf_ku.digital_signature and leaf_ku.key_encipherment and not leaf_ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]

    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}

    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 824 <= lifetime.days <= 826


def test_file_modes(files: TlsFiles) -> None:
    assert files.ca_cert.name == "ca.pem"
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert sorted(p.name for p in files.key.parent.iterdir()) == ["ca.pem", "server.key", "server.pem"]


def _snapshot(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    return files.ca_cert.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()


def test_reused_when_still_valid(files: TlsFiles) -> None:
    before = _snapshot(files)
    # Same hosts in another spelling/order, and a subset, are both already covered.
    again = ensure_self_signed(files.cert.parent, ["[::1]", "LOCALHOST", "127.0.0.1"])
    subset = ensure_self_signed(files.cert.parent, ["localhost"])
    assert again == subset == files
    assert _snapshot(files) == before


def test_new_host_regenerates(files: TlsFiles) -> None:
    before = _snapshot(files)
    ensure_self_signed(files.cert.parent, [*HOSTS, "kontextd.local"])
    after = _snapshot(files)
    assert all(old != new for old, new in zip(before, after, strict=True))
    leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["kontextd.local", "localhost"]


def test_expiring_soon_regenerates(files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(files)
    monkeypatch.setattr(tls, "RENEW_BEFORE", tls.VALIDITY)
    ensure_self_signed(files.cert.parent, HOSTS)
    assert _snapshot(files)[1] != before[1]


def test_mismatched_key_regenerates(files: TlsFiles, tmp_path: pathlib.Path) -> None:
    # Simulates a crash between the writes: a key that does not belong to the certificate.
    other = ensure_self_signed(tmp_path / "other", HOSTS)
    files.key.write_bytes(other.key.read_bytes())
    ensure_self_signed(files.cert.parent, HOSTS)
    leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    assert key.public_key() == leaf.public_key()


def test_requires_hosts(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        ensure_self_signed(tmp_path, [])
