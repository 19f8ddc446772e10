"""AsyncClient: submit, poll status with logs through the handle, then get the result."""

import asyncio
from typing import Any

import fal_client
from _common import TEXT_TO_IMAGE, describe, emit


async def main() -> dict[str, Any]:
    client = fal_client.AsyncClient()
    handle = await client.submit(TEXT_TO_IMAGE, {"prompt": "an owl on a branch", "num_images": 2})
    statuses = []
    while True:
        status = describe(await handle.status(with_logs=True))
        statuses.append(status)
        if status["type"] == "Completed":
            break
        await asyncio.sleep(0.05)
    result = await handle.get()
    by_id = describe(await client.status(TEXT_TO_IMAGE, handle.request_id, with_logs=False))
    return {"request_id": handle.request_id, "statuses": statuses, "result": result, "status_by_id": by_id}


emit(asyncio.run(main()))
