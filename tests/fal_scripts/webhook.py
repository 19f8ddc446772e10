"""submit(..., webhook_url=...): the result, and the request id the webhook must carry."""

import sys

import fal_client
from _common import TEXT_TO_IMAGE, emit

handle = fal_client.submit(TEXT_TO_IMAGE, {"prompt": "a tiny robot", "seed": 99}, webhook_url=sys.argv[1])
emit({"request_id": handle.request_id, "result": handle.get(interval=0.05)})
