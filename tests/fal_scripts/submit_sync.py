"""SyncClient: submit, poll status with logs through the handle, then get the result."""

import time

import fal_client
from _common import TEXT_TO_IMAGE, describe, emit

client = fal_client.SyncClient()
handle = client.submit(TEXT_TO_IMAGE, {"prompt": "a lighthouse at dusk", "aspect_ratio": "16:9"})
statuses = []
while True:
    status = describe(handle.status(with_logs=True))
    statuses.append(status)
    if status["type"] == "Completed":
        break
    time.sleep(0.05)
result = handle.get()
# The module-level functions rebuild the URLs from FAL_QUEUE_RUN_HOST instead of the envelope's.
again = fal_client.result(TEXT_TO_IMAGE, handle.request_id)
by_id = describe(fal_client.status(TEXT_TO_IMAGE, handle.request_id, with_logs=True))
emit(
    {
        "request_id": handle.request_id,
        "urls": [handle.response_url, handle.status_url, handle.cancel_url],
        "statuses": statuses,
        "result": result,
        "result_by_id": again,
        "status_by_id": by_id,
    }
)
