"""Helpers for the server's background loops."""

import asyncio
import contextlib


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep up to `seconds`, returning early once `stop` is set, so shutdown never waits out a sleep."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
