"""Waiting for an asyncio event with a time limit, without losing a cancel.

On Python 3.11, ``asyncio.wait_for(event.wait(), t)`` returns normally when the event is
set in the same loop step in which the waiting task is cancelled: the cancel is swallowed,
and a loop of the form ``while True: wait_for(...)`` then never ends, so whatever stops
that task (``Logger.stop``, a worker's shutdown) hangs. ``asyncio.timeout`` keeps the
cancel; every periodic wait in marsd goes through :func:`wait_set`.
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """True as soon as ``event`` is set, False once ``timeout`` seconds have passed first.
    A cancel of the caller always propagates."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
