"""Request bodies as strict JSON: what FastAPI would parse, minus what no JSON peer may send.

Python's json module accepts `NaN` and `Infinity`, decodes `"\\ud800"` into a string no UTF-8 encoder can
write back, and raises RecursionError or a plain ValueError (a 5,000-digit integer, invalid UTF-8) where
FastAPI expects JSONDecodeError. Each of those became a 500, and the traceback put the body in the log.
Here every one is a JSONDecodeError, which FastAPI turns into fal's 422 (`json_invalid`). Numbers too large
for a double (`1e400`) parse as infinity and fail field validation as non-finite, like any out-of-range value.

Bodies must also say they are JSON: a browser page can POST `text/plain`, a form, or a Blob with no type to
a server on localhost without any CORS preflight, so accepting those would let any web page queue work on
a key-less local server.
"""

import email.message
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # paired escapes decode to one code point: any left is lone


def loads(body: bytes) -> Any:
    """Parse a request body, raising JSONDecodeError for anything that is not strict, valid JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise json.JSONDecodeError("body is not valid UTF-8", "", error.start) from None
    try:
        # NaN and ±Infinity (not JSON, RFC 8259 §6) still parse, as non-finite floats: field validation then
        # refuses them naming the field, and an unknown field carrying one is ignored like any other.
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except ValueError as error:  # e.g. an integer literal beyond Python's 4,300-digit conversion limit
        raise json.JSONDecodeError(f"unreadable value ({error})", "", 0) from None
    _check_strings(value)
    return value


def _check_strings(value: Any) -> None:
    """Refuse strings with unpaired UTF-16 surrogates: not Unicode text, and unwritable as UTF-8 later."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                raise json.JSONDecodeError("string with an unpaired surrogate escape (not Unicode)", "", 0)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """A route whose JSON body is parsed strictly, and whose body must be declared as JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:  # status, result, cancel: no body to parse, nothing to wrap
            return handler

        async def strict(request: Request) -> Response:
            request = StrictJsonRequest(request.scope, request.receive)
            content_type = request.headers.get("content-type")
            if not is_json(content_type) and await request.body():
                return unsupported_media_type(content_type)
            return await handler(request)

        return strict


def unsupported_media_type(content_type: str | None) -> JSONResponse:
    got = f"got {content_type[:100]!r}" if content_type else "it was missing"
    return JSONResponse(
        {"detail": f"Send the body as JSON with the header 'Content-Type: application/json' ({got})"},
        status_code=415,
    )
