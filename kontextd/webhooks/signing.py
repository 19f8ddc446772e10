"""Ed25519 webhook signing compatible with fal.ai's scheme.

fal signs `"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(body)}"` with Ed25519, sends the hex
signature in `X-Fal-Webhook-Signature`, and publishes the public keys as a JWKS. Receivers written
against fal's docs can therefore point at kontextd's `/.well-known/jwks.json` unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import pathlib
import time
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kontextd.atomic import write_atomic

REQUEST_ID_HEADER = "X-Fal-Webhook-Request-Id"
USER_ID_HEADER = "X-Fal-Webhook-User-Id"
TIMESTAMP_HEADER = "X-Fal-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Fal-Webhook-Signature"

DEFAULT_TOLERANCE_SECONDS = 300


def _signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())).encode("utf-8")


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    # JWK values are base64url without padding; the stdlib decoder insists on it.
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class WebhookSigner:
    """Holds the server's Ed25519 signing key and produces fal-style webhook headers."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @staticmethod
    def generate_pem() -> bytes:
        """A new Ed25519 private key as unencrypted PKCS8 PEM."""
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_pem(cls, pem: bytes, source: str = "the key") -> WebhookSigner:
        loaded = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{source} is not an Ed25519 private key")
        return cls(loaded)

    @classmethod
    def load_or_create(cls, path: pathlib.Path) -> WebhookSigner:
        """Load the PKCS8 PEM key at `path`, creating it first if missing, so receivers' cached JWKS
        stays valid across restarts."""
        if not path.exists():
            write_atomic(path, cls.generate_pem())
        return cls.from_pem(path.read_bytes(), str(path))

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self._public_raw).hexdigest()[:16]

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": _b64url_encode(self._public_raw),
                    "kid": self.key_id,
                    "use": "sig",
                    "alg": "EdDSA",
                }
            ]
        }

    def sign_headers(
        self, request_id: str, user_id: str, body: bytes, timestamp: int | None = None
    ) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        signature = self._private_key.sign(_signed_message(request_id, user_id, ts, body))
        return {
            REQUEST_ID_HEADER: request_id,
            USER_ID_HEADER: user_id,
            TIMESTAMP_HEADER: ts,
            SIGNATURE_HEADER: signature.hex(),
        }


def verify_webhook(
    jwks: Mapping[str, Any],
    headers: Mapping[str, str],
    body: bytes,
    now: float | None = None,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
) -> bool:
    """Check a received webhook the way fal documents it; returns False rather than raising.

    `jwks` is the parsed JSON of the sender's JWKS endpoint, `body` the raw request body (re-serialised
    JSON will not match).
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    request_id = lowered.get(REQUEST_ID_HEADER.lower())
    user_id = lowered.get(USER_ID_HEADER.lower())
    timestamp = lowered.get(TIMESTAMP_HEADER.lower())
    signature_hex = lowered.get(SIGNATURE_HEADER.lower())
    if request_id is None or user_id is None or timestamp is None or signature_hex is None:
        return False

    try:
        sent_at = int(timestamp)
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        return False
    # The timestamp is covered by the signature, so this bounds how long a captured webhook can be replayed.
    if abs((time.time() if now is None else now) - sent_at) > tolerance_seconds:
        return False

    # Sign over the header text as received, as fal's reference receiver does.
    message = _signed_message(request_id, user_id, timestamp, body)
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        return False
    for jwk in keys:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        x = jwk.get("x")
        if not isinstance(x, str):
            continue
        try:
            public_key = Ed25519PublicKey.from_public_bytes(_b64url_decode(x))
            public_key.verify(signature, message)
        except (ValueError, InvalidSignature):
            # Malformed or non-matching key: fal rotates keys, so keep trying the rest of the set.
            continue
        return True
    return False
