from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import stat
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kontextd.webhooks.signing import WebhookSigner, verify_webhook

BODY = json.dumps({"request_id": "req-1", "status": "OK", "payload": {"images": []}}).encode()


@pytest.fixture
def signer(tmp_path: pathlib.Path) -> WebhookSigner:
    return WebhookSigner.load_or_create(tmp_path / "keys" / "webhook.pem")


def test_sign_then_verify(signer: WebhookSigner) -> None:
    headers = signer.sign_headers("req-1", "user-1", BODY)
    assert verify_webhook(signer.jwks(), headers, BODY)


def test_signed_message_matches_fal_scheme(signer: WebhookSigner) -> None:
    # Verify independently of verify_webhook, building the message exactly as fal's docs do.
    headers = signer.sign_headers("req-1", "user-1", BODY, timestamp=1_700_000_000)
    assert headers["X-Fal-Webhook-Timestamp"] == "1700000000"
    x = signer.jwks()["keys"][0]["x"]
    public_key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=="))
    message = f"req-1\nuser-1\n1700000000\n{hashlib.sha256(BODY).hexdigest()}".encode()
    public_key.verify(bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message)


def test_header_lookup_is_case_insensitive(signer: WebhookSigner) -> None:
    headers = {name.lower(): value for name, value in signer.sign_headers("req-1", "user-1", BODY).items()}
    assert verify_webhook(signer.jwks(), headers, BODY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("X-Fal-Webhook-Request-Id", "req-2"),
        ("X-Fal-Webhook-User-Id", "user-2"),
    ],
)
def test_tampered_header_fails(signer: WebhookSigner, field: str, value: str) -> None:
    headers = signer.sign_headers("req-1", "user-1", BODY)
    headers[field] = value
    assert not verify_webhook(signer.jwks(), headers, BODY)


def test_tampered_body_fails(signer: WebhookSigner) -> None:
    headers = signer.sign_headers("req-1", "user-1", BODY)
    assert not verify_webhook(signer.jwks(), headers, BODY + b" ")


def test_timestamp_tolerance(signer: WebhookSigner) -> None:
    now = time.time()
    jwks = signer.jwks()
    for offset in (-300, 300):
        headers = signer.sign_headers("req-1", "user-1", BODY, timestamp=int(now) + offset)
        assert verify_webhook(jwks, headers, BODY, now=int(now))
    for offset in (-301, 301):
        headers = signer.sign_headers("req-1", "user-1", BODY, timestamp=int(now) + offset)
        assert not verify_webhook(jwks, headers, BODY, now=int(now))


def test_other_key_fails(signer: WebhookSigner, tmp_path: pathlib.Path) -> None:
    other = WebhookSigner.load_or_create(tmp_path / "other.pem")
    headers = other.sign_headers("req-1", "user-1", BODY)
    assert not verify_webhook(signer.jwks(), headers, BODY)


def test_any_key_of_the_set_may_match(signer: WebhookSigner, tmp_path: pathlib.Path) -> None:
    other = WebhookSigner.load_or_create(tmp_path / "other.pem")
    jwks = {"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}, *other.jwks()["keys"], *signer.jwks()["keys"]]}
    assert verify_webhook(jwks, signer.sign_headers("req-1", "user-1", BODY), BODY)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.pop("X-Fal-Webhook-Signature"),
        lambda h: h.pop("X-Fal-Webhook-Timestamp"),
        lambda h: h.pop("X-Fal-Webhook-User-Id"),
        lambda h: h.pop("X-Fal-Webhook-Request-Id"),
        lambda h: h.update({"X-Fal-Webhook-Signature": "not-hex"}),
        lambda h: h.update({"X-Fal-Webhook-Signature": "abcd"}),
        lambda h: h.update({"X-Fal-Webhook-Timestamp": "soon"}),
    ],
)
def test_malformed_headers_return_false(
    signer: WebhookSigner, mutate: Callable[[dict[str, str]], object]
) -> None:
    headers = signer.sign_headers("req-1", "user-1", BODY)
    mutate(headers)
    assert verify_webhook(signer.jwks(), headers, BODY) is False


def test_malformed_jwks_return_false(signer: WebhookSigner) -> None:
    headers = signer.sign_headers("req-1", "user-1", BODY)
    for jwks in (
        {},
        {"keys": None},
        {"keys": ["x"]},
        {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!!"}]},
    ):
        assert verify_webhook(jwks, headers, BODY) is False


def test_key_is_persisted(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nested" / "dir" / "webhook.pem"
    first = WebhookSigner.load_or_create(path)
    second = WebhookSigner.load_or_create(path)
    assert first.jwks() == second.jwks()
    assert first.key_id == second.key_id
    assert verify_webhook(second.jwks(), first.sign_headers("r", "u", BODY), BODY)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["webhook.pem"]  # no temp file left behind


def test_key_file_mode(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "webhook.pem"
    WebhookSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_jwks_shape(signer: WebhookSigner) -> None:
    jwks = signer.jwks()
    assert set(jwks) == {"keys"}
    (key,) = jwks["keys"]
    assert key == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": key["x"],
        "kid": signer.key_id,
        "use": "sig",
        "alg": "EdDSA",
    }
    assert "=" not in key["x"]
    raw = base64.urlsafe_b64decode(key["x"] + "=")
    assert len(raw) == 32
    # The key id, computed here from the published key alone: the first 16 hex digits of its SHA-256.
    assert key["kid"] == hashlib.sha256(raw).hexdigest()[:16]
    json.dumps(jwks)  # must be serialisable as the /.well-known/jwks.json body


def test_rejects_non_ed25519_key(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ValueError):
        WebhookSigner.load_or_create(path)
