"""API keys: `Authorization: Key <k>` (fal clients) or `Bearer <k>` (curl, the seeds).

Keys are compared in constant time and never logged."""

import hashlib
import hmac

from fastapi.security import APIKeyHeader

ANONYMOUS = "anonymous"

authorization_header = APIKeyHeader(
    name="Authorization",
    auto_error=False,
    description="`Key <your key>` or `Bearer <your key>` (needed only when the server has API keys).",
)


def owner_id(key: str) -> str:
    """A stable, non-secret id for a key: requests are visible only to the key that made them."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [(key.encode(), owner_id(key)) for key in keys]

    def owner_for(self, authorization: str | None) -> str | None:
        """The owner id for a header value, None when it carries no valid key."""
        if not self._keys:
            return ANONYMOUS
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() not in ("key", "bearer") or not presented:
            return None
        candidate = presented.strip().encode()
        owner = None
        for key, key_owner in self._keys:  # look at every key so timing says nothing about which matched
            if hmac.compare_digest(candidate, key):
                owner = key_owner
        return owner
