"""With a key the server does not know, every call raises FalClientHTTPError 401."""

import sys
from collections.abc import Callable
from typing import Any

import fal_client
from _common import TEXT_TO_IMAGE, emit, http_error


def attempt(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        call()
    except fal_client.FalClientHTTPError as error:
        return {"raised": True, **http_error(error)}
    return {"raised": False}


existing = sys.argv[1]  # a request made with the right key
emit(
    {
        "submit": attempt(lambda: fal_client.submit(TEXT_TO_IMAGE, {"prompt": "x"})),
        "run": attempt(lambda: fal_client.run(TEXT_TO_IMAGE, {"prompt": "x"})),
        "status": attempt(lambda: fal_client.status(TEXT_TO_IMAGE, existing)),
        "result": attempt(lambda: fal_client.result(TEXT_TO_IMAGE, existing)),
        "cancel": attempt(lambda: fal_client.cancel(TEXT_TO_IMAGE, existing)),
    }
)
