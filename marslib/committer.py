"""Group commits in threads of their own, several in flight, acknowledged in order.

The event loop queues batches of writes with :meth:`CommitPipeline.put` (no task, no
future). A dispatcher thread takes everything queued as one commit, has it prepared
(encoded, its place in the log reserved, copied into an aligned buffer) and hands the
write to one of ``depth`` I/O threads; then it takes what was queued meanwhile. While
commits are in flight the next one starts only if the log allows it (``can_overlap``:
the last reserved commit ends on a block boundary, so no block is written twice at
once). Results come back to the loop in log order, whatever order the writes finish
in: a commit is acknowledged only when every earlier one is durable.

If a commit fails, nothing new starts; once every commit in flight is back, the failed
one and all later ones are reported failed together (none was acknowledged), the log is
rolled back to where the failed one began, and the loop decides what comes next
(:meth:`resume`, or emergency mode).

Operations that must not run beside a commit (rotation, the end marker, emergency mode)
:meth:`pause` the pipeline first: it returns once no commit is in flight and every result
has been handed to the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

B = TypeVar("B")  # a batch
R = TypeVar("R")  # what a commit returns
J = TypeVar("J", bound="Job")

PAUSE_POLL = 0.0005  # seconds between checks while waiting for the pipeline to be idle


class Job(Protocol):
    """A prepared commit."""

    def write(self) -> None:
        """Write it and make it durable (blocking; raises OSError)."""
        ...


_Result = tuple[list[B], J | None, R | None, BaseException | None]


class CommitPipeline(Generic[B, J, R]):
    """Commits queued batches, up to ``depth`` at once, results in order."""

    def __init__(self, name: str, *, prepare: Callable[[list[B], bool], J | None],
                 complete: Callable[[J | None], R], rollback: Callable[[J], None],
                 done: Callable[[list[B], R | None, BaseException | None], None],
                 can_overlap: Callable[[], bool], loop: asyncio.AbstractEventLoop,
                 depth: int = 1) -> None:
        self._prepare = prepare  # (batches, overlapping) -> job, or None: nothing to write
        self._complete = complete  # after the job's write returned: its result
        self._rollback = rollback  # a failed job: forget it and everything after it
        self._done = done  # on the loop: the result of a commit, in order
        self._can_overlap = can_overlap
        self._loop = loop
        self.depth = max(1, depth)
        self._cond = threading.Condition()
        self._queue: list[B] = []
        self._idle_waiting = False  # the dispatcher sleeps on _cond: put() must wake it
        self._paused = False
        self._failed = False  # a commit failed: nothing new until resume()
        self._stopping = False
        self._in_flight = 0
        self._next_no = 0  # number of the next commit to start
        self._next_out = 0  # number of the next result to hand to the loop
        self._results: dict[int, _Result[B, J, R]] = {}
        self._started = 0
        self._finished = 0  # results handed to the loop (loop side)
        self._io = ThreadPoolExecutor(self.depth, thread_name_prefix=f"{name}-io")
        self._thread = threading.Thread(target=self._dispatch, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- loop side
    def put(self, batch: B) -> None:
        with self._cond:
            self._queue.append(batch)
            if self._idle_waiting:
                self._cond.notify_all()

    def queued(self) -> list[B]:
        """A copy of the queued batches (not yet in a commit)."""
        with self._cond:
            return list(self._queue)

    def take_all(self) -> list[B]:
        """Remove and return the queued batches (to apply them another way)."""
        with self._cond:
            taken, self._queue = self._queue, []
        return taken

    @property
    def idle(self) -> bool:
        """Nothing queued, no commit in flight, every result handed to the loop."""
        with self._cond:
            return not self._queue and self._started == self._finished

    async def pause(self) -> None:
        """Start no new commit; return once every result has been handed to the loop."""
        with self._cond:
            self._paused = True
        while self._started != self._finished:
            await asyncio.sleep(PAUSE_POLL)

    def resume(self) -> None:
        """Commit again (after a pause or a failure)."""
        with self._cond:
            self._paused = False
            self._failed = False
            self._cond.notify_all()

    def stop(self) -> None:
        """End the threads (after the commits in flight); queued batches stay queued."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        self._io.shutdown(wait=True)

    def _deliver(self) -> None:
        """Hand finished commits to the loop's callback in log order."""
        while True:
            with self._cond:
                item = self._results.get(self._next_out)
                if item is None:
                    return
                batches, job, result, error = item
                if error is not None and self._in_flight:
                    return  # every later commit must be back before the rollback
                del self._results[self._next_out]
                self._next_out += 1
                later: list[_Result[B, J, R]] = []
                if error is not None:
                    later = [self._results.pop(k) for k in sorted(self._results)]
                    self._next_out += len(later)
            if error is None:
                try:
                    self._done(batches, result, None)
                finally:
                    self._finished += 1
                continue
            try:
                if job is not None:
                    self._rollback(job)
                failed = batches + [b for item in later for b in item[0]]
                self._done(failed, None, error)
            finally:
                self._finished += 1 + len(later)
            return

    # ---------------------------------------------------------- dispatcher side
    def _ready(self) -> bool:
        if not self._queue or self._paused or self._failed:
            return False
        if self._in_flight == 0:
            return True
        return self._in_flight < self.depth and self._can_overlap()

    def _dispatch(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._stopping and not self._ready():
                    self._idle_waiting = True
                    cond.wait()
                    self._idle_waiting = False
                if self._stopping:
                    return
                batches, self._queue = self._queue, []
                number = self._next_no
                self._next_no += 1
                overlapping = self._in_flight > 0
                self._in_flight += 1
                self._started += 1
            try:
                job = self._prepare(batches, overlapping)
            except BaseException as exc:  # nothing was written
                self._finish(number, batches, None, None, exc)
                continue
            if job is None:  # nothing to write (barriers only)
                self._finish(number, batches, None, self._complete(None), None)
                continue
            if self.depth > 1 and self._can_overlap():
                self._io.submit(self._write, number, batches, job)
            else:  # the next commit must wait for this one anyway: no hand-off
                self._write(number, batches, job)

    def _write(self, number: int, batches: list[B], job: J) -> None:
        try:
            job.write()
            result = self._complete(job)
        except BaseException as exc:  # handed to the loop, which decides
            self._finish(number, batches, job, None, exc)
        else:
            self._finish(number, batches, job, result, None)

    def _finish(self, number: int, batches: list[B], job: J | None, result: R | None,
                error: BaseException | None) -> None:
        with self._cond:
            self._results[number] = (batches, job, result, error)
            self._in_flight -= 1
            if error is not None:
                self._failed = True
            self._cond.notify_all()
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody waits for the result
            pass
