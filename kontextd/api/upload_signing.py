"""Signatures for fal's storage API: the upload token `POST /storage/auth/token` hands out, and the upload
URL `/storage/upload/initiate` answers with, which the JS client PUTs to directly with no key at all.

Both are HMAC-SHA256 under one deployment-wide secret the job store keeps (JobStore.secret), so any API
node accepts what another one signed. Each signed message starts with what it is for, so a token's
signature never passes for an upload URL's; signatures are compared in constant time, and checked before
anything else about them is said (an expired forgery is "invalid", not "expired").
"""

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from kontextd.storage import keys

SECRET_NAME = "upload-signing-key"  # its name among the store's secrets
TOKEN_SECONDS = 3600  # an upload token's life: fal-client asks for a new one once it has expired
UPLOAD_URL_SECONDS = 600  # a signed upload URL's life: it is PUT to at once

_OWNER = re.compile(r"[a-z0-9-]{1,64}")  # owner ids (kontextd.api.auth.owner_id) and "anonymous"
_EXPIRES = re.compile(r"[1-9][0-9]{0,11}")  # unix seconds
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Refusal:
    """Why a signed URL is refused: the query parameter at fault and what is wrong with it."""

    field: str
    reason: str
    kind: str  # fal-style error type: upload_url_invalid or upload_url_expired


class UploadSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the upload signing secret must be at least 32 bytes")
        self._secret = secret

    @staticmethod
    def generate() -> bytes:
        return secrets.token_bytes(32)

    def _sign(self, purpose: str, *parts: str) -> str:
        message = "\n".join(("kontextd", purpose, *parts)).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    # -- upload tokens: `Authorization: Bearer <token>` on POST /files/upload ---------------------------

    def token(self, owner: str, expires: int) -> str:
        """A token that uploads as `owner` until `expires` (unix seconds): `<owner>.<expires>.<signature>`."""
        if not _OWNER.fullmatch(owner):
            raise ValueError(f"not an owner id: {owner!r}")
        return f"{owner}.{expires}.{self._sign('token', owner, str(expires))}"

    def token_owner(self, token: str, now: float) -> str | None:
        """The owner a token uploads as; None when it is not one we signed or its time is up."""
        if token.count(".") != 2:
            return None
        owner, expires, signature = token.split(".")
        if not (_OWNER.fullmatch(owner) and _EXPIRES.fullmatch(expires) and _SIGNATURE.fullmatch(signature)):
            return None
        if not hmac.compare_digest(signature, self._sign("token", owner, expires)):
            return None
        return owner if int(expires) > now else None

    # -- upload URLs: PUT <base>/files/<key>?expires=…&signature=… -------------------------------------

    def upload_signature(self, key: str, expires: int) -> str:
        """The signature of an upload URL for `key` until `expires`; it covers the content type the key's
        extension names, so the URL stores only that type."""
        return self._sign("upload", key, str(expires), keys.content_type(key))

    def check_upload(
        self, key: str, expires: str | None, signature: str | None, now: float
    ) -> Refusal | None:
        """None when this is an upload URL we signed for `key` and it has not expired, else why not."""
        if not signature:
            return Refusal("signature", "This URL carries no upload signature", "upload_url_invalid")
        if not (
            keys.is_upload(key)
            and expires is not None
            and _EXPIRES.fullmatch(expires)
            and _SIGNATURE.fullmatch(signature)
            and hmac.compare_digest(signature, self.upload_signature(key, int(expires)))
        ):
            return Refusal("signature", "Not an upload URL this server signed", "upload_url_invalid")
        if int(expires) <= now:
            return Refusal(
                "expires", "This upload URL has expired: initiate the upload again", "upload_url_expired"
            )
        return None
