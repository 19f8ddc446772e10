"""Small ASGI layers in front of the routes."""

import json
from urllib.parse import unquote, urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
    """Refuse bodies over `max_bytes` with a JSON 413: at once when Content-Length declares more, else as soon
    as the bytes received pass it (a chunked body declares nothing), before any route has acted on them.

    Starlette has a limiter of its own, but it answers a declared-too-long body in plain text whatever the
    app sends, and every error here is JSON in fal's shape.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, {"detail": self.message})
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body: our handler answers.
                    raise HTTPException(413, self.message)
            return message

        await self.app(scope, counting_receive, send)

    @property
    def message(self) -> str:
        return f"Request body too large: at most {self.max_bytes // (1024 * 1024)} MB"


# Proxied targets on these hosts are this server's root routes (the queue's, the storage API's).
ROOT_HOSTS = ("queue.", "rest.")


class TargetUrl:
    """`@fal-ai/client` in proxy mode sends every call to one proxy URL with the real target in
    `x-fal-target-url`. Route such a request by the target's path (its host is not followed): a target on
    the queue host (`queue.…`) or the storage host (`rest.…`, fal's upload API) goes to the root routes, one
    on a run host (any other) to the /run routes. A target that is not a URL is a 400."""

    def __init__(self, app: ASGIApp, run_prefix: str) -> None:
        self.app = app
        self.run_prefix = run_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = dict(scope["headers"]).get(b"x-fal-target-url")
            if target is not None:
                try:
                    parts = urlsplit(target.decode("latin-1"))
                    host = parts.hostname or ""
                except ValueError as error:  # "Invalid IPv6 URL", a bad port: the header is malformed
                    await _bad_header(send, "x-fal-target-url", f"not a URL ({error})")
                    return
                raw_path = parts.path or "/"
                path = unquote(raw_path)
                if not host.startswith(ROOT_HOSTS):
                    path, raw_path = self.run_prefix + path, self.run_prefix + raw_path
                scope = dict(
                    scope,
                    path=path,
                    raw_path=raw_path.encode("latin-1"),
                    query_string=parts.query.encode("latin-1"),
                )
        await self.app(scope, receive, send)


async def _bad_header(send: Send, name: str, message: str) -> None:
    """A 400 in the shape of fal's validation errors, sent before any route sees the request."""
    await _send_json(
        send, 400, {"detail": [{"loc": ["header", name], "msg": message, "type": "value_error"}]}
    )


async def _send_json(send: Send, status: int, content: object) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
