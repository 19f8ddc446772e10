"""Small ASGI layers in front of the routes."""

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024 * 1024  # a 20 MB image as a data URI, with room to spare


class TrailingSlash:
    """Accept `/path/` as `/path` on every route, as fal does, without a redirect a POST would not follow."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope["path"]) > 1 and scope["path"].endswith("/"):
            scope = dict(scope, path=scope["path"].rstrip("/") or "/")
            scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse oversized bodies by their declared length before reading them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                body = b'{"detail":"Request body too large (at most 64 MB)"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class TargetUrl:
    """`@fal-ai/client` in proxy mode sends every call to one proxy URL with the real target in
    `x-fal-target-url`. Route such a request by the target's path (its host is not followed): a target on a
    run host (not `queue.…`) goes to the /run routes."""

    def __init__(self, app: ASGIApp, run_prefix: str) -> None:
        self.app = app
        self.run_prefix = run_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = dict(scope["headers"]).get(b"x-fal-target-url")
            if target is not None:
                parts = urlsplit(target.decode("latin-1"))
                path = parts.path or "/"
                if not (parts.hostname or "").startswith("queue."):
                    path = self.run_prefix + path
                scope = dict(scope, path=path, raw_path=path.encode(), query_string=parts.query.encode())
        await self.app(scope, receive, send)
