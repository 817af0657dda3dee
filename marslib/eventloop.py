"""The event loop marsd's processes run on: uvloop where it is installed, else asyncio's.

uvloop (libuv, a well-kept compiled library from PyPI) runs the same asyncio code with
less CPU per socket read, callback and thread hand-off; bench/README.md has the figures.
``MARS_EVENT_LOOP=asyncio`` (or ``marsd --event-loop asyncio``) forces the standard loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")


def resolve(kind: str | None = None) -> str:
    """The loop to use: ``kind``, else $MARS_EVENT_LOOP, else uvloop if importable."""
    kind = kind or os.environ.get("MARS_EVENT_LOOP") or "auto"
    if kind not in CHOICES:
        raise ValueError(f"unknown event loop {kind!r}: choose one of {', '.join(CHOICES)}")
    if kind == "auto":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio"
        return "uvloop"
    return kind


def run(main: Coroutine[Any, Any, T], kind: str | None = None) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    if resolve(kind) == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
