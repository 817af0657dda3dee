"""Group commits in a thread of their own.

The event loop queues batches of writes with :meth:`CommitThread.put` (no task, no
future). The thread takes everything queued, runs the commit function on it (encode,
``pwritev``, ``fdatasync``) and hands the result back to the loop with one
``call_soon_threadsafe``; then it takes what was queued meanwhile. So the next commit
starts as soon as the previous one is durable, while the loop acknowledges the previous
one. Commits never overlap: a commit is written only after every earlier one is durable,
which is what recovery relies on to tell a torn tail from damage.

Operations that must not run beside a commit (rotation, the end marker, emergency mode)
pause the thread first: :meth:`pause` returns once no commit is running and every result
has been handed to the loop's callback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

B = TypeVar("B")  # a batch
R = TypeVar("R")  # what a commit returns

PAUSE_POLL = 0.0005  # seconds between checks while waiting for the thread to be idle


class CommitThread(Generic[B, R]):
    """One thread that commits queued batches, one commit at a time."""

    def __init__(self, name: str, commit: Callable[[list[B]], R],
                 done: Callable[[list[B], R | None, BaseException | None], None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._commit = commit
        self._done = done
        self._loop = loop
        self._cond = threading.Condition()
        self._queue: list[B] = []
        self._idle_waiting = False  # the thread sleeps on _cond: put() must wake it
        self._paused = False
        self._stopping = False
        self._started = 0  # commits the thread has taken (thread side)
        self._finished = 0  # results the loop has handled (loop side)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- loop side
    def put(self, batch: B) -> None:
        with self._cond:
            self._queue.append(batch)
            if self._idle_waiting and not self._paused:
                self._cond.notify()

    def __len__(self) -> int:
        """Batches queued and not yet taken by a commit."""
        return len(self._queue)

    def queued(self) -> list[B]:
        """A copy of the queued batches."""
        with self._cond:
            return list(self._queue)

    def take_all(self) -> list[B]:
        """Remove and return the queued batches (to apply them another way)."""
        with self._cond:
            taken, self._queue = self._queue, []
        return taken

    @property
    def idle(self) -> bool:
        """Nothing queued, no commit running, every result handled."""
        with self._cond:
            return not self._queue and self._started == self._finished

    async def pause(self) -> None:
        """Start no new commit; return once the running one's result has been handled."""
        with self._cond:
            self._paused = True
        while self._started != self._finished:
            await asyncio.sleep(PAUSE_POLL)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    async def drained(self) -> None:
        """Return once everything queued has been committed and handled."""
        while not self.idle:
            if self._paused:
                raise RuntimeError("commit thread paused with batches queued")
            await asyncio.sleep(PAUSE_POLL)

    def stop(self) -> None:
        """End the thread (after its running commit); queued batches stay queued."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _handled(self, batches: list[B], result: R | None,
                 error: BaseException | None) -> None:
        try:
            self._done(batches, result, error)
        finally:
            self._finished += 1

    # -------------------------------------------------------------- thread side
    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while (self._paused or not self._queue) and not self._stopping:
                    self._idle_waiting = True
                    cond.wait()
                    self._idle_waiting = False
                if self._stopping:
                    return
                batches, self._queue = self._queue, []
                self._started += 1
            result: R | None = None
            error: BaseException | None = None
            try:
                result = self._commit(batches)
            except BaseException as exc:  # handed to the loop, which decides
                error = exc
                with cond:
                    self._paused = True  # nothing more until the loop has seen the error
            try:
                self._loop.call_soon_threadsafe(self._handled, batches, result, error)
            except RuntimeError:  # the loop is closed: nobody waits for the result
                return
