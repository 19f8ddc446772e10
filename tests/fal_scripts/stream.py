"""fal_client.stream: progress events, then the output as the last event; a failed request's error body
last; an invalid input refused before anything streams."""

import time

import fal_client
from _common import DEV_EDIT, TEXT_TO_IMAGE, emit

events, seen_at = [], []
for event in fal_client.stream(TEXT_TO_IMAGE, {"prompt": "a kite", "seed": 0, "num_images": 2}):
    events.append(event)
    seen_at.append(time.monotonic())

# An input the worker refuses (its image cannot be fetched): the stream ends with the error body.
failed = list(
    fal_client.stream(
        DEV_EDIT, {"prompt": "recolour it", "image_url": "http://127.0.0.1:9/missing.png", "seed": 3}
    )
)
try:
    list(fal_client.stream(DEV_EDIT, {"prompt": "no image"}))
    refused = None
except Exception as error:  # whatever the client raises for a JSON answer is what the test reads
    refused = {"raised": type(error).__name__, "message": str(error)}
emit(
    {
        "events": events,
        "spread_seconds": seen_at[-1] - seen_at[0],
        "failed": failed,
        "refused": refused,
    }
)
