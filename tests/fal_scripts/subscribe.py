"""fal_client.subscribe with logs: the queue updates seen and the result."""

import fal_client
from _common import TEXT_TO_IMAGE, describe, emit

events: list[dict] = []
enqueued: list[str] = []
result = fal_client.subscribe(
    TEXT_TO_IMAGE,
    {"prompt": "a red fox in the snow", "seed": 7},
    with_logs=True,
    on_enqueue=enqueued.append,
    on_queue_update=lambda status: events.append(describe(status)),
    interval=0.05,
)
emit({"request_ids": enqueued, "events": events, "result": result})
