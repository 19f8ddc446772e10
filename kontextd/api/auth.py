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
    def __init__(self, keys: tuple[str, ...], admin_keys: tuple[str, ...] = ()) -> None:
        # An admin key is an API key too; it also reads every key's usage (GET /v1/usage).
        self._keys = [(key.encode(), owner_id(key)) for key in dict.fromkeys(keys + admin_keys)]
        self._admins = frozenset(owner_id(key) for key in admin_keys)

    def is_admin(self, owner: str) -> bool:
        """Whether `owner` may read every key's usage: an admin key's, or anyone on a server with no keys
        (one user: everything is theirs)."""
        return owner in self._admins or owner == ANONYMOUS

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
