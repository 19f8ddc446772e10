"""The baseline for status-poll throughput: a bare ASGI app answering a fixed status-sized JSON body."""

import json

BODY = json.dumps(
    {
        "status": "IN_QUEUE",
        "request_id": "00000000-0000-0000-0000-000000000000",
        "response_url": "http://127.0.0.1/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000000",
        "status_url": "http://127.0.0.1/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000000/status",
        "cancel_url": "http://127.0.0.1/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000000/cancel",
        "logs": None,
        "metrics": {},
        "queue_position": 0,
    }
).encode()


async def app(scope: dict, receive: object, send: object) -> None:
    assert scope["type"] == "http"
    await send(
        {"type": "http.response.start", "status": 202, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": BODY})
