"""Replay on a secondary: apply fetched logfiles to the data device in log order.

Records are applied in batches that end on record boundaries: the records of a batch are
collected in an extent map (newest data per range), written sorted, the device flushed,
and only then is the replay position saved. Between batches the device holds exactly a
prefix of the primary's history; ``pause`` waits for the current batch to end.
Before its first device write a batch durably records where it ends, appended to the
position (``replay_value``). A crash in the middle of a batch leaves the device holding
any part of it; the next start redoes the records from the position up to that end (the
same bytes to the same offsets again), and until then the replica is not consistent and
does not honour a pause.
A batch waits for more of its bytes (GATHER_BYTES while the fetch is far behind the
primary, else STEADY_BYTES; at most GATHER_MAX_S or STEADY_MAX_S): the fetch, which
protects the data, gets the CPU it needs to catch up, and the device is not flushed for
every fetched reply.
A record that fails its checksum in a fetched logfile is never applied: the bytes from
there on are fetched again.
Readers that need the device at a known position (online verify) take
:meth:`Replayer.quiesced`: no batch writes the device while they hold it, and it tells
them the position the device holds (several readers at once; a batch waiting to write
goes first, and the readers that waited for it go before the next one).
Replay moves on from a finished logfile only along the fetcher's chain: never to a number
the fetcher has not reached, and at the fetcher's number only to the fetcher's logfile (a
stale local logfile of the same number from another history is not replayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from marslib.device import Device, Piece
from marslib.errors import LogCorrupt
from marslib.eventwait import wait_set
from marslib.extents import ExtentMap
from marslib.fetch import Fetcher
from marslib.history import forks, write_link
from marslib.layout import MarsPaths, parse_logfile_name
from marslib.logfile import LogScanner, StopKind
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import ResourceKeys, interrupted_batch, replay_value
from marslib.status import ReplayStatus
from marslib.writeback import WritebackCounters, write_sorted

log = logging.getLogger(__name__)

BATCH_BYTES = 32 << 20
# Every batch costs a durable position write and a device flush, so a batch waits for
# more of its bytes. While the fetch is behind the primary by GATHER_WHEN_BEHIND or more,
# until GATHER_BYTES have arrived (at most GATHER_MAX_S): batches of a megabyte each at
# link speed took the CPU the fetch needed to catch up. Otherwise until STEADY_BYTES have
# arrived (at most STEADY_MAX_S after the first of them): one batch per fetched reply at
# 40 MB/s meant a hundred device flushes a second.
GATHER_WHEN_BEHIND = 8 << 20
GATHER_BYTES = 16 << 20
GATHER_MAX_S = 0.5
STEADY_BYTES = 4 << 20
STEADY_MAX_S = 0.1
MAX_REFETCH = 3
# fault injection for tests: marsd kills itself (SIGKILL) in the middle of a replay batch,
# before the device write after this many of them; its whole process group, so that with
# resource workers marsd dies together with the worker that replays
FAULT_KILL_AFTER = "MARS_FAULT_REPLAY_KILL_AFTER"


class _KillAfterWrites:
    """A device whose user dies by SIGKILL before its write number ``writes`` + 1."""

    def __init__(self, device: Device, writes: int) -> None:
        self._device = device
        self._left = writes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._device, name)

    def write_gathered(self, start: int, end: int, pieces: Sequence[Piece]) -> None:
        if self._left <= 0:
            os.killpg(0, signal.SIGKILL)
        self._left -= 1
        self._device.write_gathered(start, end, pieces)


class DeviceQuiesce:
    """A shared/exclusive lock over the replica's device: replay batches take it exclusive,
    readers that want the device between batches take it shared. Phase-fair: a batch that
    waits keeps new readers out, and the readers that waited for a batch go before the
    next one, so that neither side starves the other while the replay is busy."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._admit = 0  # readers that waited for the last batch: in before the next one

    def _may_read(self) -> bool:
        return not self._writing and (self._admit > 0 or not self._writers_waiting)

    def _may_write(self) -> bool:
        return not self._writing and not self._readers and not self._admit

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            self._readers_waiting += 1
            try:
                await self._cond.wait_for(self._may_read)
            except BaseException:
                self._readers_waiting -= 1
                self._admit = min(self._admit, self._readers_waiting)
                self._cond.notify_all()
                raise
            self._readers_waiting -= 1
            self._admit = max(0, self._admit - 1)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(self._may_write)
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            async with self._cond:
                self._writing = False
                self._admit = self._readers_waiting
                self._cond.notify_all()


@dataclass
class ReplayStats:
    records: int = 0
    bytes: int = 0
    batches: int = 0
    corrupt_refetched: int = 0
    last_stamp_ns: int = 0  # when the newest applied write was made on the primary


class Replayer:
    """Applies the local logfiles of ``resource`` from the saved replay position."""

    def __init__(self, resource: str, host: str, paths: MarsPaths, meta: MetaStore,
                 device: Device, fetcher: Fetcher) -> None:
        self.resource = resource
        self.keys = ResourceKeys(resource)
        self.host = host
        self.paths = paths
        self.meta = meta
        self.device = device
        self.fetcher = fetcher
        value = self._load_value()
        self.position = LogPosition.decode(value)
        # the end of a batch a crash interrupted: redone before anything else
        self.redo_to = interrupted_batch(value)
        self._batch_end: LogPosition | None = None  # the batch being applied ends there
        self._gather_since: float | None = None  # the next batch waits for bytes since then
        self._halting = False
        self.stats = ReplayStats()
        self.counters = WritebackCounters()
        self.error: str | None = None
        self.started = time.monotonic()
        self.paused = False
        self.blocked = False  # at a history gap: only a full sync helps
        self.caught_up_at = time.time()  # when this replica last had everything
        self._resume = asyncio.Event()
        self._resume.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._quiesce = DeviceQuiesce()
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})
        self._write_dev = device
        kill_after = os.environ.get(FAULT_KILL_AFTER)
        if kill_after:
            self.log.warning("fault injection: %s=%s", FAULT_KILL_AFTER, kill_after)
            self._write_dev = cast(Device, _KillAfterWrites(device, int(kill_after)))
        if self.redo_to is not None:
            self.log.warning("replay was interrupted in the middle of a batch: redoing %s "
                             "up to offset %d before anything else; not consistent until "
                             "then", self.position.encode(), self.redo_to.offset)

    def _load_value(self) -> str:
        value = self.meta.get(self.keys.replay(self.host))
        if not value:
            raise LogCorrupt(self.keys.replay(self.host), 0,
                             "no replay position: join or invalidate first")
        return value

    @property
    def redoing(self) -> bool:
        """A batch interrupted by a crash is not applied again yet: the device may hold any
        part of it, it is no consistent prefix."""
        return self.redo_to is not None

    def saved_value(self) -> str:
        """The ``replay-HOST`` value for the current state (with the end of a batch that is
        in progress or still to be redone)."""
        return replay_value(self.position, self._batch_end or self.redo_to)

    async def pause(self) -> None:
        """Stop after the current batch (after the redo of an interrupted one: see
        ``status()['replay_paused']``); the device then holds a consistent prefix."""
        self.paused = True
        self._resume.clear()
        await self._idle.wait()

    async def halt(self) -> None:
        """Start no further batch, not even of a redo, and wait for the one in progress
        (marsd stops): what is left to redo stays recorded for the next start."""
        self._halting = True
        self._resume.clear()
        await self._idle.wait()

    def resume(self) -> None:
        self.paused = False
        if not self._halting:
            self._resume.set()

    @contextlib.asynccontextmanager
    async def quiesced(self) -> AsyncIterator[LogPosition]:
        """Hold off the device writes of replay batches: while this is held the device
        holds exactly the state at the position it yields (see :attr:`redoing`: after a
        crash in a batch, not until that batch is redone). Several holders at once; a
        batch waiting to write keeps new ones out."""
        async with self._quiesce.shared():
            yield self.position

    @contextlib.asynccontextmanager
    async def device_held(self) -> AsyncIterator[LogPosition]:
        """Hold off replay batches and every :meth:`quiesced` reader: the caller alone may
        write the device (a repair copies blocks), at the position it yields."""
        async with self._quiesce.exclusive():
            yield self.position

    async def run(self) -> None:
        while True:
            self._note_caught_up()
            if self.redo_to is None or self._halting:
                await self._resume.wait()
            div = self.fetcher.diverged
            if div is not None and div[0] == self.position.logfile and self.redo_to is None:
                # our copy of this logfile goes further than the primary's: say so in the
                # history, so that every member sees the split brain
                write_link(self.meta, self.resource, self.host, self.position)
                self.error = (f"split brain: this host's {div[0]} goes to "
                              f"{self.position.offset}, the primary's ends at {div[1]}; not "
                              f"replaying the primary's history. Resync this host with "
                              f"'marsadm invalidate {self.resource}'")
                await asyncio.sleep(1.0)
                continue
            progress = self.fetcher.progress
            gather = self._gather_wait()
            if gather > 0:  # then from the top: a pause may come meanwhile
                await wait_set(progress, gather)
                continue
            self._gather_since = None
            self._idle.clear()
            try:
                applied, bad = await self._apply_batch()
            finally:
                self._idle.set()
            if bad is not None:
                self._bad_record(*bad)
            if applied:
                redo = self.redo_to
                if redo is not None and self.position.offset >= redo.offset:
                    self.redo_to = None
                    self.log.info("redone the batch interrupted by a crash: consistent at %s",
                                  self.position.encode())
                self._batch_end = None
                self.meta.set(self.keys.replay(self.host), self.saved_value())
                continue
            if self.redo_to is not None:  # its records are not readable yet: wait for them
                await wait_set(progress, 1.0)
                continue
            if self.blocked:  # look again later: a resync elsewhere may resolve it
                await asyncio.sleep(1.0)
                self.blocked = False
                continue
            if self._advance_logfile():
                continue
            await wait_set(progress, 1.0)

    @property
    def gathering(self) -> bool:
        """The next batch waits for more of its bytes (see :meth:`_gather_wait`)."""
        return self._gather_since is not None and self._idle.is_set()

    def _gather_wait(self) -> float:
        """How long the next batch waits for more of its bytes (0: apply it now): until
        GATHER_BYTES are ready while the fetch is far behind, else STEADY_BYTES; no longer
        than GATHER_MAX_S or STEADY_MAX_S since bytes were first ready. A batch of a
        finished logfile, or a redo, goes at once."""
        f = self.fetcher
        if self.redo_to is not None or self.position.logfile != f.logfile:
            return 0.0  # a redo, or a finished logfile: it will not grow
        ready = f.local_end - self.position.offset
        if ready <= 0:
            return 0.0  # nothing yet: the batch finds nothing and waits for the fetch
        if f.remote_end - f.local_end >= GATHER_WHEN_BEHIND:
            want, most = GATHER_BYTES, GATHER_MAX_S
        else:
            want, most = STEADY_BYTES, STEADY_MAX_S
        if ready >= want:
            return 0.0
        now = time.monotonic()
        if self._gather_since is None:
            self._gather_since = now
        return max(0.0, self._gather_since + most - now)

    def _note_caught_up(self) -> None:
        f = self.fetcher
        if self.position.logfile == f.logfile and self.position.offset >= f.remote_end >= 0:
            self.caught_up_at = time.time()

    def _path(self, pos: LogPosition):  # type: ignore[no-untyped-def]
        return self.paths.logfile(self.resource, pos.number, pos.host)

    async def _apply_batch(self) -> tuple[int, tuple[str, int, str] | None]:
        """Apply the next batch of complete records; return how many were applied and
        where a record failed its checks, if one did. The records are read and the batch's
        end recorded first; only the device writes hold the device (readers that quiesce
        it see the state before the batch or after it); the flush comes after them."""
        batch, count, new_pos, bad = await asyncio.to_thread(self._read_batch)
        if count:
            async with self._quiesce.exclusive():
                await asyncio.to_thread(self._write_batch, batch, count, new_pos)
            await asyncio.to_thread(self._write_dev.flush)
        return count, bad

    def _read_batch(self) -> tuple[ExtentMap, int, LogPosition,
                                   tuple[str, int, str] | None]:
        """Read the next batch of complete records (in a thread): their data, how many,
        where they end, and where a record failed its checks, if one did. With records,
        the batch's end is durable in ``replay-HOST`` when this returns."""
        pos = self.position
        redo = self.redo_to
        path = self._path(pos)
        if not path.exists():
            if redo is not None:
                self.error = (f"{path} is missing: the batch interrupted by a crash (up to "
                              f"offset {redo.offset}) cannot be redone, the device is not "
                              f"consistent; resync this host with 'marsadm invalidate "
                              f"{self.resource}'")
            return ExtentMap(), 0, pos, None
        limit = self.fetcher.complete_end(path.name)
        scanner = LogScanner(path, pos.offset, pos.seq + 1 if pos.seq else None, limit)
        batch = ExtentMap()
        count = 0
        new_pos = pos
        for _, end, rec in scanner:
            if rec.is_gap:
                self.error = (
                    f"outdated: the primary ran in emergency mode, its history has a gap at "
                    f"{path.name} offset {end}; this replica stays consistent at "
                    f"{new_pos.encode()}: run 'marsadm invalidate {self.resource}'")
                self.blocked = True
                break
            if rec.data_len and not rec.is_end:
                batch.insert(rec.offset, rec.data)  # a view into the scanner's chunk
                self.stats.bytes += rec.data_len
            count += 1
            self.stats.last_stamp_ns = rec.stamp_ns or self.stats.last_stamp_ns
            new_pos = LogPosition(pos.number, end, rec.seq, pos.host)
            if redo is not None:  # a redo is one batch: exactly the interrupted one
                if end >= redo.offset:
                    break
            elif batch.bytes >= BATCH_BYTES:
                break
        stop = scanner.stop
        bad = None
        if stop is not None and not stop.clean and count == 0 \
                and stop.kind is not StopKind.CHANGED and (
                stop.kind is not StopKind.TORN or limit is None):
            # damaged, or cut short in a logfile that is complete: never applied
            bad = (path.name, stop.offset, stop.describe(path))
        if count:
            batch_end = new_pos if redo is None or new_pos >= redo else redo
            self._batch_end = batch_end
            # durable before the first device write: a crash from here on leaves the
            # device torn, and the next start must know up to where to redo
            self.meta.set(self.keys.replay(self.host), replay_value(pos, batch_end), durable=True)
        return batch, count, new_pos, bad

    def _write_batch(self, batch: ExtentMap, count: int, new_pos: LogPosition) -> None:
        """Write a batch read by :meth:`_read_batch` (in a thread, the device held); the
        device then holds the state at ``new_pos`` (flushed by the caller)."""
        write_sorted(self._write_dev, batch, 1 << 20, self.counters, flush=False)
        self.position = new_pos
        self.stats.records += count
        self.stats.batches += 1
        if not self.blocked:
            self.error = None

    def _bad_record(self, name: str, offset: int, what: str) -> None:
        times = self.fetcher.refetch_from(name, offset)
        self.stats.corrupt_refetched += 1
        self.error = f"{what}: not applied, fetching it again (attempt {times})"
        self.log.warning("%s", self.error)
        if times > MAX_REFETCH:
            self.error = (f"{what}: the primary's copy fails the same check: its log is "
                          "damaged; resync this host from the primary's device with 'marsadm "
                          f"invalidate {self.resource}' (here)")
            self.log.error("%s", self.error)
            raise LogCorrupt(name, offset, "damaged on the primary")

    def _advance_logfile(self) -> bool:
        """At the end of a finished logfile, continue with the next local one, unless the
        members' histories fork there."""
        pos = self.position
        name = self._path(pos).name
        if not self.fetcher.is_finished(name):
            return False
        write_link(self.meta, self.resource, self.host, pos)
        split = [f for f in forks(self.meta, self.resource) if f.number <= pos.number]
        if split:
            self.error = (f"split brain: {split[0].describe()}; not replaying past it. "
                          f"Resync the losing host(s) with 'marsadm invalidate "
                          f"{self.resource}'")
            self.blocked = True
            return False
        gap = int(self.meta.get(self.keys.history_gap) or 0)
        nxt = self._next_in_chain(pos.number)
        if nxt is None:
            return False
        number, host = nxt
        if number >= gap > pos.number:
            self.error = (
                f"outdated: the primary ran in emergency mode and its history has a "
                f"gap before logfile {number}; this replica stays consistent at "
                f"{pos.encode()}: run 'marsadm invalidate {self.resource}'")
            return False
        self.position = LogPosition(number, 0, pos.seq, host)
        self.meta.set(self.keys.replay(self.host), self.position.encode())
        return True

    def _next_in_chain(self, after: int) -> tuple[int, str] | None:
        """The local logfile (number, host) to replay after number ``after``: the lowest
        number above it, not beyond the one the fetcher is at, and at the fetcher's number
        the fetcher's logfile itself (another host's file of that number is a stale one
        from another history)."""
        fetching = parse_logfile_name(self.fetcher.logfile)
        for number, host, _ in self.paths.logfiles(self.resource):
            if number <= after:
                continue
            if fetching is None or number < fetching[0]:
                return number, host
            if number == fetching[0]:
                return number, fetching[1]  # the fetcher created it before switching
            return None
        return None

    def status(self) -> ReplayStatus:
        secs = max(time.monotonic() - self.started, 1e-6)
        return ReplayStatus(
            replay=self.position.encode(),
            replay_records=self.stats.records,
            replay_bytes=self.stats.bytes,
            replay_rate=round(self.stats.bytes / secs),
            # paused only once the batch in progress has ended (and an interrupted one is
            # redone): the device is consistent
            replay_paused=self.paused and self._idle.is_set() and self.redo_to is None,
            replay_redo=None if self.redo_to is None else self.redo_to.encode(),
            replay_error=self.error,
            corrupt_refetched=self.stats.corrupt_refetched,
            replay_stamp_ns=self.stats.last_stamp_ns,
            caught_up_at=self.caught_up_at,
        )


def logfile_number(name: str) -> int:
    parsed = parse_logfile_name(name)
    return parsed[0] if parsed else -1
