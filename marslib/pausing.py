"""A pause switch for a brick's loop: ``pause()``, ``resume()``, ``await wait()``."""

from __future__ import annotations

import asyncio


class PauseSwitch:
    def __init__(self) -> None:
        self.paused = False
        self._running = asyncio.Event()
        self._running.set()

    def pause(self) -> None:
        self.paused = True
        self._running.clear()

    def resume(self) -> None:
        self.paused = False
        self._running.set()

    async def wait(self) -> None:
        """Return at once when running; else when resumed."""
        await self._running.wait()
