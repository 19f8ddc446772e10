"""Our own file URLs in a request's input (outputs edited again, uploads), settled at submit.

* An upload may be used only by the key that uploaded it, while it is kept: anything else is refused at
  once, in fal's shape, exactly as a file that does not exist (so another key's uploads cannot be told
  from names never made).
* A URL of ours that names no file we make is left as it is: the worker refuses it, as ever, without
  looking anything up.
* Each URL of ours is kept in the one form the workers know as ours (`<--public-url or bound address>/files/
  <key>`): a client may have reached this server by another name (`localhost` for `127.0.0.1`), and the
  worker, which never sees that request, must still read the file from storage rather than fetch it.

Only input fields named like fal's file inputs are looked at (`image_url`, `image_urls`, `mask_url`: a name
ending in `_url` or `_urls`): a prompt that happens to be one of our URLs is a prompt.
"""

import time
from collections.abc import Iterator
from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError

from kontextd.api.services import Services
from kontextd.storage import keys

Location = tuple[str | int, ...]


def _url_fields(value: Any, where: Location) -> Iterator[tuple[Location, str]]:
    """(location, URL) of every string in a `*_url` field or a `*_urls` list, at any depth."""
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(name, str) and name.endswith("_url") and isinstance(item, str):
                yield (*where, name), item
            elif isinstance(name, str) and name.endswith("_urls") and isinstance(item, list):
                for index, url in enumerate(item):
                    if isinstance(url, str):
                        yield (*where, name, index), url
            else:
                yield from _url_fields(item, (*where, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _url_fields(item, (*where, index))


def _refused(where: Location, message: str, url: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "file_download_error", "loc": ["body", *where], "msg": message, "input": url}]
    )


def _set(body: dict[str, Any], where: Location, value: str) -> None:
    target: Any = body
    for part in where[:-1]:
        target = target[part]
    target[where[-1]] = value


async def settle_own_files(
    services: Services, body: dict[str, Any], owner: str, request_base: str
) -> dict[str, Any]:
    """`body` (changed in place) with each URL of a file of ours in its canonical form;
    RequestValidationError (422, file_download_error) for an upload this caller may not use."""
    found = [
        (where, url, key)
        for where, url in _url_fields(body, ())
        if (key := services.urls.key_of(url, request_base))
    ]
    if not found:
        return body  # the common case: no store read
    for where, url, key in found:
        if keys.is_upload(key):
            # Off the event loop: on PostgreSQL this is a round trip.
            uploaded_by = await run_in_threadpool(services.store.upload_owner, key, time.time())
            if uploaded_by != owner:
                raise _refused(where, "That uploaded file does not exist for this key (expired?)", url)
        _set(body, where, services.urls.own_url(key, services.settings.base_url))
    return body
