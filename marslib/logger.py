"""The primary's write path: log, acknowledge, write back sorted, overlay reads, recover.

A write becomes a log record appended to the current logfile; batches of concurrent
writes share one ``fdatasync`` (group commit) and are acknowledged when it returns. Only
then does the data enter the in-memory extent map, from which the writeback copies it to
the data device sorted by offset, adjacent writes merged and superseded data skipped.
Reads overlay the extent maps on the device, so they see every acknowledged write. The
position up to which the device holds the log is saved in ``replay-HOST``; after a crash,
``start()`` replays the log from there and cuts a torn tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from marslib.committer import CommitPipeline
from marslib.device import Device
from marslib.errors import DeviceError, LogCorrupt
from marslib.eventwait import wait_set
from marslib.extents import ExtentMap
from marslib.formats import logrecord
from marslib.formats.logrecord import FLAG_END, FLAG_GAP, LogRecord
from marslib.history import links, write_link
from marslib.layout import MarsPaths, logfile_name
from marslib.logfile import LogAppender, LogScanner, PreparedCommit, StopKind, judge_stop
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import ON, ResourceKeys, flag
from marslib.status import LoggerStatus
from marslib.writeback import WritebackCounters, write_in_order, write_sorted

log = logging.getLogger(__name__)


@dataclass
class LoggerConfig:
    """Tunables of one resource's logger."""

    max_logfile_size: int = 256 << 20  # rotate when the current logfile reaches this size
    memory_limit: int = 128 << 20  # bytes of acknowledged data waiting for writeback
    compress_level: int | None = None  # zstd level for log records; None: off
    writeback_order: str = "sorted"  # or "arrival" (for comparison)
    writeback_chunk: int = 1 << 20  # largest merged device write
    position_interval: float = 0.2  # seconds between saves of the applied position
    writeback_threads: int = 4  # device writes in flight during a writeback round
    commit_depth: int = 4  # group commits in flight at once (where O_DIRECT works)
    writeback_delay: float = 0.02  # seconds a writeback round waits for more writes,
    # unless a quarter of memory_limit is held


@dataclass(frozen=True)
class RecoveryReport:
    """What ``Logger.start`` found and did."""

    started_from: str | None
    ended_at: str
    records_replayed: int
    bytes_replayed: int
    logfiles_read: list[str]
    torn_tail: str | None
    seconds: float


Write = tuple[int, bytes | bytearray]  # device offset, data
DoneCallback = Callable[[OSError | None], None]
ReadsDone = Callable[[Sequence[bytes | bytearray | memoryview | OSError]], None]
_Committed = tuple[int, list[Write]]  # the commit's end, its writes
# a commit of this many writes or bytes ends on a block boundary (with commit_depth > 1),
# so that the next one may be written while it is in flight; the padding (< 4 KiB) costs
# little beside it, and a single small write at queue depth 1 gains nothing from it
ALIGN_WRITES = 4
ALIGN_BYTES = 64 << 10
READ_WAYS = 4  # threads reading one batch of NBD reads at once
READ_AT_TRIES = 3  # reads of read_at raced by a whole writeback round, before it locks


@dataclass(slots=True)
class _LoggedCommit:
    """A group commit ready to be written, and the writes it holds."""

    prepared: PreparedCommit
    writes: list[Write]

    def write(self) -> None:
        self.prepared.write()


@dataclass(slots=True)
class _Batch:
    """Writes handed over as one unit, waiting for their group commit."""

    writes: list[Write]  # (device offset, data)
    first_seq: int
    nbytes: int
    done: DoneCallback


def _finish_one(done: DoneCallback, error: OSError | None) -> None:
    try:
        done(error)
    except Exception:  # a caller's callback must not stop the committer
        log.exception("write completion callback failed")


def _finish(batches: list[_Batch], error: OSError | None) -> None:
    for batch in batches:
        _finish_one(batch.done, error)


def _settle(fut: asyncio.Future[None]) -> DoneCallback:
    """A completion callback that resolves ``fut``."""
    def done(error: OSError | None) -> None:
        if not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
    return done


@dataclass
class LoggerStats:
    writes: int = 0
    bytes_written: int = 0
    commits: int = 0
    writeback_rounds: int = 0
    direct_writes: int = 0
    writeback_bytes: int = 0
    device_writes: int = 0
    reads: int = 0
    errors: list[str] = field(default_factory=list)


class Logger:
    """The transaction logger of one resource on its primary host."""

    def __init__(
        self,
        resource: str,
        host: str,
        paths: MarsPaths,
        meta: MetaStore,
        device: Device,
        config: LoggerConfig | None = None,
        size: int | None = None,
    ) -> None:
        self.resource = resource
        self.keys = ResourceKeys(resource)
        self.host = host
        self.paths = paths
        self.meta = meta
        self.device = device
        self.config = config or LoggerConfig()
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})
        self.stats = LoggerStats()
        self.size = device.size if size is None else size
        if self.size > device.size:
            raise DeviceError(
                f"resource {resource} is {self.size} bytes but {device.path} has only "
                f"{device.size}: grow the device first"
            )
        self._next_seq = 1
        self._appender: LogAppender | None = None
        self._number = 0  # current logfile number
        self._log_end: LogPosition | None = None  # end of the durable log
        self._applied: LogPosition | None = None  # device holds the log up to here
        self._saved: LogPosition | None = None  # applied position as last saved
        self._saved_at = 0.0
        self._committer: CommitPipeline[_Batch, _LoggedCommit, _Committed] | None = None
        self._queued_bytes = 0  # in batches handed to the committer, not yet in a map
        self._waiting: deque[tuple[list[Write], int, DoneCallback]] = deque()
        self._background: set[asyncio.Task[None]] = set()  # _spawn's tasks, kept referenced
        self._pressure = asyncio.Event()  # much is held: write back without delay
        self._pressure_bytes = max(1, self.config.memory_limit // 4)
        self._writers = ThreadPoolExecutor(max(1, self.config.writeback_threads),
                                           thread_name_prefix=f"writeback-{resource}")
        self._active = ExtentMap(1)
        self._active_end: LogPosition | None = None
        self._arrivals: dict[int, list[Write]] = {1: []}
        self._maps: list[ExtentMap] = [self._active]
        self._writeback_wake = asyncio.Event()
        self._append_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._failed: str | None = None
        self._grew = asyncio.Event()  # set (and replaced) whenever the durable log grows
        self._wb_lock = asyncio.Lock()  # one writeback round at a time
        self._device_dirty = False  # written back but not yet flushed
        self._arrival_bytes = 0
        self.emergency = False  # /mars is full: writes bypass the log
        self._drained = asyncio.Event()  # in emergency: set once the log is written back
        self._direct_lock = asyncio.Lock()
        self._rotating = False  # a rotation of the full logfile is under way

    # -------------------------------------------------------------- recovery
    async def start(self) -> RecoveryReport:
        """Recover from the log, then accept writes."""
        report = await asyncio.to_thread(self._recover)
        self._drained.set()
        self._committer = CommitPipeline(
            f"commit-{self.resource}", prepare=self._prepare_commit,
            complete=self._complete_commit, rollback=self._rollback_commit,
            done=self._commit_done, can_overlap=self._can_overlap,
            loop=asyncio.get_running_loop(), depth=self.config.commit_depth)
        self._tasks = [
            asyncio.create_task(self._writeback(), name=f"writeback-{self.resource}"),
        ]
        if self.meta.get(self.keys.actual(self.host, "emergency")) == ON:
            # direct writes happened before a restart: they are in no log
            await self.leave_emergency()
        return report

    def _recover(self) -> RecoveryReport:
        t0 = time.monotonic()
        saved = self.meta.get(self.keys.replay(self.host))
        start = LogPosition.decode(saved) if saved else None
        files = self.paths.logfiles(self.resource)
        if start is not None:
            files = [f for f in files if f[0] >= start.number]
        pos = start
        expect_seq = start.seq + 1 if start else None
        replay_map = ExtentMap(0)
        records = nbytes = 0
        torn: str | None = None
        read_names: list[str] = []
        last_file: tuple[int, str, bool] | None = None  # number, host, ended
        durable, finished = self._durable_facts(start)
        for i, (number, host, path) in enumerate(files):
            offset = start.offset if start and number == start.number else 0
            must_reach = durable.get((number, host), 0)
            if path.stat().st_size < must_reach:
                raise LogCorrupt(str(path), path.stat().st_size, self._missing(
                    path, path.stat().st_size, must_reach))
            read_names.append(path.name)
            scanner = LogScanner(path, offset, expect_seq)
            ended = False
            for _, end, rec in scanner:
                if rec.is_end:
                    ended = True
                elif rec.data_len:
                    if rec.offset + rec.data_len > self.size:
                        raise DeviceError(
                            f"{path}: record {rec.seq} writes {rec.offset}+{rec.data_len}, "
                            f"beyond the end of {self.device.path} ({self.size} bytes): "
                            "was the device shrunk or replaced?"
                        )
                    replay_map.insert(rec.offset, bytes(rec.data))
                    nbytes += rec.data_len
                records += 1
                pos = LogPosition(number, end, rec.seq, host)
                if replay_map.bytes >= self.config.memory_limit:
                    self._write_map(replay_map, None)
                    replay_map = ExtentMap(0)
            stop = scanner.stop
            assert stop is not None
            if pos is None or pos.number != number:
                pos = LogPosition(number, offset, expect_seq - 1 if expect_seq else 0, host)
            expect_seq = pos.seq + 1
            last_file = (number, host, ended)
            if stop.clean and pos.offset >= must_reach:
                continue
            if stop.offset < must_reach:
                # records this host recorded as durable do not read back: never cut them
                raise LogCorrupt(str(path), stop.offset, (
                    f"{stop.detail or stop.kind.value}; "
                    + self._missing(path, stop.offset, must_reach)))
            is_last = i == len(files) - 1
            if stop.kind in (StopKind.SEQ_GAP, StopKind.CHANGED) or not is_last:
                raise LogCorrupt(str(path), stop.offset, f"{stop.kind.value}: {stop.detail}. "
                                 "Acknowledged writes may follow; nothing was cut. "
                                 + self._damage_advice())
            verdict = judge_stop(path, stop)
            if not verdict.torn:
                raise LogCorrupt(str(path), stop.offset, f"{verdict.reason}. Nothing was "
                                 "cut. " + self._damage_advice())
            cut = stop.file_size - stop.offset
            with open(path, "r+b") as f:
                f.seek(stop.offset)
                zero_tail = not any(f.read(cut))
                f.truncate(stop.offset)
                os.fsync(f.fileno())
            if zero_tail:  # zero-filled space the appender had reserved: not a torn write
                self.log.info("recovery: released %d bytes of reserved space in %s", cut,
                              path.name)
            else:
                torn = stop.describe(path) + f"; {verdict.reason}; cut {cut} bytes"
                self.log.warning("recovery: torn tail (an incomplete last group commit, "
                                 "never acknowledged): %s", torn)
        self._write_map(replay_map, None)
        self.device.flush()
        self._next_seq = (pos.seq if pos else 0) + 1
        self._log_end = None
        if last_file is not None and last_file[1] == self.host and not last_file[2] \
                and last_file[0] not in finished:
            number = last_file[0]  # continue our own unfinished logfile
        elif last_file is not None:
            number = last_file[0] + 1
            if pos is not None and last_file[1] != self.host:
                # taking over: record where this host saw the previous primary's log end
                self._finish_logfile(pos)
        else:
            # nothing on disk: a fresh resource, or our last logfile was deleted
            number = (start.number + (1 if start.offset else 0)) if start else 1
        self._open_logfile(number)
        # everything logged so far is on the device now
        self._applied = self._active_end = self._log_end
        self._save_position(durable=True)
        seconds = time.monotonic() - t0
        report = RecoveryReport(
            started_from=start.encode() if start else None,
            ended_at=self._log_end.encode() if self._log_end else "",
            records_replayed=records,
            bytes_replayed=nbytes,
            logfiles_read=read_names,
            torn_tail=torn,
            seconds=round(seconds, 3),
        )
        self.log.info("recovered: %d records (%d bytes) replayed in %.3fs, log at %s%s",
                      records, nbytes, seconds, report.ended_at,
                      f"; {torn}" if torn else "")
        return report

    def _durable_facts(self, start: LogPosition | None
                       ) -> tuple[dict[tuple[int, str], int], set[int]]:
        """Offsets this host has recorded as durable, per logfile (number, writer): the
        saved replay position and the ends in its own version links. A log that ends
        before one of them is damaged, whatever its tail looks like. Also the numbers of
        the logfiles this host wrote and finished (its own links): they get no more
        records."""
        facts: dict[tuple[int, str], int] = {}
        finished: set[int] = set()
        for number, by_writer in links(self.meta, self.resource).items():
            mine = by_writer.get(self.host)
            if mine is not None:
                facts[(number, mine.host)] = mine.end_offset
                if mine.host == self.host:
                    finished.add(number)
        if start is not None:
            key = (start.number, start.host)
            facts[key] = max(facts.get(key, 0), start.offset)
        return facts, finished

    def _missing(self, path: Path, end: int, must_reach: int) -> str:
        return (f"{path.name} reads back only to offset {end}, but this host recorded offset "
                f"{must_reach} of it as durable: {must_reach - end} bytes of acknowledged "
                f"writes are missing from the log. Nothing was changed. The data device "
                f"holds every write up to the replay position. Either restore the logfile "
                f"(a secondary keeps a copy of the same name in its /mars/resource-"
                f"{self.resource}/; copy it back if it is at least {must_reach} bytes) and "
                f"run 'marsadm up {self.resource}', or " + self._damage_advice(lowercase=True))

    def _damage_advice(self, lowercase: bool = False) -> str:
        advice = (f"Make an up-to-date secondary the primary ('marsadm primary --force "
                  f"{self.resource}' there), then resync this host as its secondary "
                  f"('marsadm invalidate {self.resource}' here)")
        return (advice[0].lower() + advice[1:]) if lowercase else advice

    def _open_logfile(self, number: int) -> None:
        """Start appending to logfile ``number``; the log ends at its current size."""
        path = self.paths.logfile(self.resource, number, self.host)
        self._appender = LogAppender(path)
        self._number = number
        # the last durable record, not _next_seq - 1: queued writes already hold seqs
        durable_seq = self._log_end.seq if self._log_end else self._next_seq - 1
        self._log_end = LogPosition(number, self._appender.size, durable_seq, self.host)

    def _finish_logfile(self, end: LogPosition) -> None:
        """Write this host's version link of a logfile that will get no more records."""
        write_link(self.meta, self.resource, self.host, end)

    # ----------------------------------------------------------------- writes
    def submit(self, writes: list[Write], done: DoneCallback) -> None:
        """Log ``writes`` (device offset, data) as one unit: they get consecutive sequence
        numbers and go into the same group commit. ``done(None)`` is called on the event
        loop once all of them are durable in the log (the acknowledgement), or
        ``done(OSError)`` if they failed. No task or future per write: this is the hot path.

        An empty ``writes`` is a barrier: ``done`` is called once everything submitted
        before it is durable (NBD flush). Every write lies within ``size``: the callers
        check that (the NBD protocol against the export size, :meth:`write` itself), and
        the size only grows."""
        if self._failed:
            done(OSError(errno.EIO, self._failed))
            return
        nbytes = sum(len(data) for _, data in writes)
        if self.emergency:
            self._spawn(self._direct_batch(writes, done), "direct")
            return
        if self._waiting or self._held_bytes() >= self.config.memory_limit:
            self._waiting.append((writes, nbytes, done))  # admitted as writeback frees memory
            self._pressure.set()
            return
        self._enqueue(writes, nbytes, done)

    def _enqueue(self, writes: list[Write], nbytes: int, done: DoneCallback
                 ) -> None:
        seq = self._next_seq
        self._next_seq = seq + len(writes)
        assert self._committer is not None, "Logger.start() first"
        self._committer.put(_Batch(writes, seq, nbytes, done))
        self._queued_bytes += nbytes
        if not self._pressure.is_set() and self._held_bytes() >= self._pressure_bytes:
            self._pressure.set()

    def _admit_waiting(self) -> None:
        """Queue the batches that waited for memory, oldest first, while there is room."""
        waiting = self._waiting
        while waiting and (self._failed or self._held_bytes() < self.config.memory_limit):
            writes, nbytes, done = waiting.popleft()
            if self._failed:
                done(OSError(errno.EIO, self._failed))
            else:
                self._enqueue(writes, nbytes, done)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Log one write; return once it is durable in the log (the acknowledgement)."""
        if offset < 0 or offset + len(data) > self.size:
            raise OSError(errno.ENOSPC, "write beyond the end of the device")
        if not isinstance(data, bytes):
            data = bytes(data)
        if not data:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit([(offset, data)], _settle(fut))
        await fut

    def _held_bytes(self) -> int:
        held = self._queued_bytes + self._arrival_bytes  # arrival order keeps old versions
        for m in self._maps:
            held += m.bytes
        return held

    async def flush(self) -> None:
        """Every acknowledged write is already durable; wait for queued ones too."""
        if not self._waiting and (self._committer is None or self._committer.idle):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit([], _settle(fut))
        await fut

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """No group commit runs meanwhile (rotation, end marker, emergency mode)."""
        async with self._append_lock:
            committer = self._committer
            if committer is not None:
                await committer.pause()
            try:
                yield
            finally:
                if committer is not None and not self.emergency:
                    committer.resume()

    def _prepare_commit(self, batches: list[_Batch], overlapping: bool
                        ) -> _LoggedCommit | None:
        """Encode everything queued as one group commit and reserve its place in the log
        (in the commit thread; the appender changes only while the pipeline is paused).
        None if there is nothing to write (barriers only)."""
        appender = self._appender
        assert appender is not None
        writes = [w for batch in batches for w in batch.writes]
        if not writes:
            return None
        first_seq = batches[0].first_seq
        start = appender.reserved
        durable = appender.size  # every commit before this offset is durable
        stamp = time.time_ns()
        level = self.config.compress_level
        if level is None:
            # end on a block boundary where the next commit may start before this one is
            # durable: under load (commits in flight, or many writes in one)
            align = appender.direct and self.config.commit_depth > 1 and (
                overlapping or len(writes) >= ALIGN_WRITES
                or sum(batch.nbytes for batch in batches) >= ALIGN_BYTES)
            chunks, total = logrecord.encode_commit(writes, first_seq, start, stamp, durable,
                                                    align)
        else:
            records = [logrecord.encode(LogRecord(seq=first_seq + i, offset=offset,
                                                  data=bytes(data), stamp_ns=stamp), level)
                       for i, (offset, data) in enumerate(writes)]
            chunks = logrecord.sealed_commit(records, start, durable)
            total = sum(map(len, chunks))
        return _LoggedCommit(appender.prepare(chunks, total), writes)

    def _can_overlap(self) -> bool:
        appender = self._appender
        return appender is not None and appender.can_overlap

    def _complete_commit(self, job: _LoggedCommit | None) -> _Committed:
        """A commit's write returned (in an I/O thread): it is durable."""
        if job is None:
            return -1, []
        assert self._appender is not None
        self._appender.complete(job.prepared)
        return job.prepared.end, job.writes

    def _rollback_commit(self, job: _LoggedCommit) -> None:
        """A commit failed (on the loop, nothing in flight): cut the log where it began."""
        assert self._appender is not None
        self._appender.rollback(job.prepared.start)

    def _commit_done(self, batches: list[_Batch], result: _Committed | None,
                     error: BaseException | None) -> None:
        """A group commit ended (on the loop): acknowledge its writes, or handle the
        failure (the commit thread stays paused after one until this is done)."""
        total = sum(batch.nbytes for batch in batches)
        if error is not None or result is None:
            self._commit_failed(batches, total, error)
            return
        size, writes = result
        if not writes:
            _finish(batches, None)
            return
        self.stats.commits += 1
        active = self._active
        insert = active.insert
        for offset, data in writes:
            insert(offset, data)
        if self.config.writeback_order == "arrival":
            arrivals = self._arrivals.get(active.generation)
            if arrivals is not None:
                arrivals.extend(writes)
                self._arrival_bytes += total
        self._queued_bytes -= total
        self.stats.writes += len(writes)
        self.stats.bytes_written += total
        first_seq = batches[0].first_seq
        self._log_end = LogPosition(self._number, size, first_seq + len(writes) - 1, self.host)
        self._active_end = self._log_end
        self._notify_growth()
        if self.stats.errors and not self.emergency:
            self._clear_error()
        _finish(batches, None)
        if not self._writeback_wake.is_set():
            self._writeback_wake.set()
        if size >= self.config.max_logfile_size and not self._rotating:
            self._rotating = True
            self._spawn(self._rotate_full(), "rotate")

    def _commit_failed(self, batches: list[_Batch], total: int,
                       error: BaseException | None) -> None:
        assert self._committer is not None and self._appender is not None
        path = self._appender.path
        first_seq = batches[0].first_seq
        later = self._committer.take_all()  # queued behind the failed commit
        self._queued_bytes -= total + sum(b.nbytes for b in later)
        self._next_seq = first_seq  # none of them is in the log
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            # never stop the primary's I/O for a full /mars: bypass the log
            self._spawn(self._emergency_after_commit(
                f"/mars is full: cannot append to {path}", batches + later), "emergency")
            return
        if isinstance(error, OSError):
            reason = f"cannot append to {path}: {error.strerror}"
            code = error.errno or errno.EIO
        else:
            self.log.error("group commit failed", exc_info=error)
            reason = f"cannot append to {path}: {error!r}"
            code = errno.EIO
        self.log.error("%s; %d writes refused, nothing acknowledged was lost", reason,
                       sum(len(b.writes) for b in batches + later))
        self._set_error(reason)
        _finish(batches + later, OSError(code, reason))
        self._committer.resume()

    async def _emergency_after_commit(self, reason: str, batches: list[_Batch]) -> None:
        async with self._exclusive():
            await self._enter_emergency_locked(reason)
            await self._apply_directly(batches)

    async def _rotate_full(self) -> None:
        try:
            async with self._exclusive():
                if not self.emergency and self._appender is not None \
                        and self._appender.size >= self.config.max_logfile_size:
                    await self._rotate_locked()
        finally:
            self._rotating = False

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"{what}-{self.resource}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _notify_growth(self) -> None:
        grew, self._grew = self._grew, asyncio.Event()
        grew.set()

    @property
    def log_end(self) -> LogPosition | None:
        """The end of the durable log: what secondaries may fetch."""
        return self._log_end

    async def wait_growth(self, timeout: float) -> None:
        """Return when the durable log grows, or after ``timeout`` seconds."""
        await wait_set(self._grew, timeout)

    # --------------------------------------------------------- emergency mode
    async def _write_direct(self, offset: int, data: bytes | bytearray) -> None:
        """Emergency mode: durable on the device before it is acknowledged."""
        await self._drained.wait()
        async with self._direct_lock:
            await asyncio.to_thread(self._pwrite_durable, offset, data)
        self.stats.direct_writes += 1

    def _pwrite_durable(self, offset: int, data: bytes | bytearray) -> None:
        self.device.pwrite(offset, data)
        self.device.flush()

    async def _apply_directly(self, batches: list[_Batch]) -> None:
        """Write queued (unlogged) writes straight to the device, in order."""
        for batch in batches:
            await self._direct_batch(batch.writes, batch.done)

    async def _direct_batch(self, writes: list[Write], done: DoneCallback
                            ) -> None:
        error: OSError | None = None
        for offset, data in writes:
            try:
                await self._write_direct(offset, data)
            except (OSError, DeviceError) as exc:
                error = OSError(errno.EIO, str(exc))
        _finish_one(done, error)

    async def enter_emergency(self, reason: str) -> None:
        """Stop logging: write back everything logged, then write straight to the device.
        Replicas keep a consistent but outdated state."""
        async with self._exclusive():
            await self._enter_emergency_locked(reason)

    async def _enter_emergency_locked(self, reason: str) -> None:
        if self.emergency:
            return
        self.emergency = True
        self._drained.clear()
        if self._committer is not None:  # paused: what waits for it goes straight through
            queued = self._committer.take_all()
            if queued:
                self._queued_bytes -= sum(b.nbytes for b in queued)
                self._next_seq = queued[0].first_seq
                self._spawn(self._apply_directly(queued), "direct")
        self.log.error("EMERGENCY MODE: %s. The primary keeps serving, writing straight to "
                       "the device; replicas stay consistent but outdated", reason)
        self._set_error(f"emergency mode: {reason}")
        while len(self._active) or len(self._maps) > 1:
            await self._writeback_round()
        self._applied = self._log_end
        await asyncio.to_thread(self._save_position, True)
        self.meta.set(self.keys.actual(self.host, "emergency"), flag(True), durable=True)
        self._drained.set()

    async def leave_emergency(self) -> None:
        """Log again, in a new logfile after a history gap: every replica must be
        resynced (marsadm invalidate) since the direct writes are in no log."""
        async with self._exclusive():
            if not self.emergency and self.meta.get(self.keys.actual(self.host, "emergency")) != ON:
                return
            await self._drained.wait()
            async with self._direct_lock:
                await asyncio.to_thread(self.device.flush)
                self.emergency = False
            await self._rotate_locked()
            # a marker no replica replays past: what came before is not the whole history
            seq = self._next_seq
            self._next_seq += 1
            assert self._appender is not None
            size = await asyncio.to_thread(self._appender.append, [logrecord.encode(
                LogRecord(seq=seq, offset=0, data=b"", stamp_ns=time.time_ns(),
                          flags=FLAG_GAP))])
            self._log_end = LogPosition(self._number, size, seq, self.host)
            self._notify_growth()
            self._applied = self._active_end = self._log_end
            await asyncio.to_thread(self._save_position, True)
            self.meta.set(self.keys.history_gap, str(self._number), durable=True)
            self.meta.set(self.keys.actual(self.host, "emergency"), flag(False))
            self._clear_error()
            self.log.warning("left emergency mode: logging again in %s; every secondary must "
                             "be resynced with 'marsadm invalidate %s' (run it on each secondary)",
                             logfile_name(self._number, self.host), self.resource)

    # --------------------------------------------------------------- rotation
    async def rotate(self) -> str:
        """Start the next logfile; return its name."""
        async with self._exclusive():
            await self._rotate_locked()
        return logfile_name(self._number, self.host)

    async def _rotate_locked(self) -> None:
        assert self._appender is not None and self._log_end is not None
        end = self._log_end
        await asyncio.to_thread(self._finish_logfile, end)
        self._appender.close()
        await asyncio.to_thread(self._open_logfile, self._number + 1)
        self._notify_growth()
        if self._applied == end and not len(self._active) and len(self._maps) == 1:
            self._applied = self._active_end = self._log_end
            await asyncio.to_thread(self._save_position)
        self.log.info("rotated: %s finished at offset %d, now writing %s",
                      end.logfile, end.offset, logfile_name(self._number, self.host))

    # -------------------------------------------------------------- writeback
    async def _writeback(self) -> None:
        while True:
            await wait_set(self._writeback_wake, self.config.position_interval)
            self._writeback_wake.clear()
            if len(self._active) and not self._pressure.is_set():
                # let writes gather for a moment: more merging, fewer and larger device
                # writes, and no device write competing with every single log commit
                await wait_set(self._pressure, self.config.writeback_delay)
            while len(self._active):
                await self._writeback_round()
            await self._maybe_save_position()

    async def _writeback_round(self) -> None:
        async with self._wb_lock:
            await self._writeback_round_locked()

    async def _writeback_round_locked(self) -> None:
        if not len(self._active):
            return
        gen, gen_end = self._active, self._active_end
        self._active = ExtentMap(gen.generation + 1)
        self._arrivals[self._active.generation] = []
        self._maps.append(self._active)
        arrivals = self._arrivals.pop(gen.generation, None)
        while True:
            try:
                await asyncio.to_thread(self._write_map, gen, arrivals)
                break
            except (OSError, DeviceError) as exc:
                reason = f"writeback to {self.device.path} failed: {exc}; retrying"
                self.log.error(reason)
                self._set_error(reason)
                await asyncio.sleep(1.0)
        self._maps.remove(gen)
        if arrivals:
            self._arrival_bytes -= sum(len(d) for _, d in arrivals)
        self.stats.writeback_rounds += 1
        # with nothing newer waiting, the device holds the whole log (even past a rotation)
        self._applied = self._log_end if not len(self._active) else gen_end
        await self._maybe_save_position()
        self._admit_waiting()
        if self._held_bytes() < self._pressure_bytes:
            self._pressure.clear()

    def _write_map(self, gen: ExtentMap, arrivals: list[Write] | None) -> None:
        """Copy one generation to the device and make it durable (runs in a thread)."""
        counters = WritebackCounters()
        # the device is flushed before the applied position is saved, not every round
        if arrivals is not None and self.config.writeback_order == "arrival":
            write_in_order(self.device, arrivals, counters, flush=False)
        else:
            write_sorted(self.device, gen, self.config.writeback_chunk, counters, flush=False,
                         pool=self._writers, ways=self.config.writeback_threads)
        if counters.device_writes:
            self._device_dirty = True
        self.stats.device_writes += counters.device_writes
        self.stats.writeback_bytes += counters.bytes

    # ------------------------------------------------------------------ reads
    async def read(self, offset: int, length: int) -> bytearray:
        """The newest data: acknowledged writes overlaid on the device."""
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, "read beyond the end of the device")
        self.stats.reads += 1
        maps = list(self._maps)
        buf = await asyncio.to_thread(self.device.pread, offset, length)
        self._overlay(buf, offset, maps)
        return buf

    async def read_at(self, offset: int, length: int) -> tuple[bytearray, LogPosition | None]:
        """Like :meth:`read`, and the log position the data reflects: every acknowledged
        record up to it and none after. The end is taken right after the extent maps were
        laid over the device's data, with no wait in between, and a group commit adds its
        writes to the maps and moves the end in one step of the event loop.

        One case needs more: a generation that began after the read started and was
        written back and dropped before it ended may have reached the device after the
        read passed its blocks, and it is no longer there to be laid over. Such a read is
        done again; after a few, under the writeback lock (no generation is dropped)."""
        for _ in range(READ_AT_TRIES):
            newest = self._active.generation
            buf = await self.read(offset, length)
            live = {m.generation for m in self._maps}
            if all(g in live for g in range(newest + 1, self._active.generation + 1)):
                return buf, self._log_end
        async with self._wb_lock:
            buf = await self.read(offset, length)
            return buf, self._log_end

    async def read_many(self, reads: list[tuple[int, int]]) -> list[bytearray]:
        """:meth:`read` of each ``(offset, length)``, in up to ``READ_WAYS`` threads at
        once (:meth:`submit_reads`); the first read that failed raises its OSError."""
        for offset, length in reads:
            if offset < 0 or offset + length > self.size:
                raise OSError(errno.EINVAL, "read beyond the end of the device")
        if not reads:
            return []
        got: asyncio.Future[Sequence[bytes | bytearray | memoryview | OSError]] = \
            asyncio.get_running_loop().create_future()

        def done(out: Sequence[bytes | bytearray | memoryview | OSError]) -> None:
            if not got.done():
                got.set_result(out)

        self.submit_reads(reads, done)
        out: list[bytearray] = []
        for buf in await got:
            if isinstance(buf, OSError):
                raise buf
            assert isinstance(buf, bytearray)
            out.append(buf)
        return out

    def submit_reads(self, reads: list[tuple[int, int]], done: ReadsDone) -> None:
        """Read each (offset, length) like :meth:`read`, in up to ``READ_WAYS`` threads at
        once (the device gets several requests in flight); ``done`` gets the data or an
        OSError per read, on the event loop."""
        self.stats.reads += len(reads)
        maps = list(self._maps)  # before the device is read: see _overlay
        loop = asyncio.get_running_loop()
        ways = min(READ_WAYS, len(reads))
        shares = [reads[i::ways] for i in range(ways)]
        results: list[list[bytearray | OSError] | None] = [None] * ways
        pending = [ways]

        def finished(way: int, job: asyncio.Future[list[bytearray | OSError]]) -> None:
            try:
                results[way] = job.result()
            except Exception as exc:  # the executor is gone (shutdown)
                results[way] = [OSError(errno.EIO, str(exc))] * len(shares[way])
            pending[0] -= 1
            if pending[0]:
                return
            out: list[bytearray | OSError] = [OSError(errno.EIO, "lost")] * len(reads)
            for w in range(ways):
                out[w::ways] = results[w]  # type: ignore[assignment]
            for (offset, _), buf in zip(reads, out, strict=True):
                if not isinstance(buf, OSError):
                    self._overlay(buf, offset, maps)
            done(out)

        for way, share in enumerate(shares):
            job = loop.run_in_executor(None, self._pread_many, share)
            job.add_done_callback(partial(finished, way))

    def _pread_many(self, reads: list[tuple[int, int]]) -> list[bytearray | OSError]:
        out: list[bytearray | OSError] = []
        for offset, length in reads:
            if offset < 0 or offset + length > self.size:
                out.append(OSError(errno.EINVAL, "read beyond the end of the device"))
                continue
            try:
                out.append(self.device.pread(offset, length))
            except (OSError, DeviceError) as exc:
                out.append(OSError(errno.EIO, str(exc)))
        return out

    def _overlay(self, buf: bytearray, offset: int, maps: list[ExtentMap]) -> None:
        """Lay the extent maps over ``buf`` read from the device, oldest first. ``maps``
        were taken before the device was read: a generation written back meanwhile is
        still among them, so its data is not missed; generations started since are
        laid over too."""
        by_gen = {m.generation: m for m in maps}
        for m in self._maps:
            by_gen.setdefault(m.generation, m)
        for g in sorted(by_gen):
            by_gen[g].overlay(buf, offset)

    # ------------------------------------------------------------- positions
    async def _maybe_save_position(self) -> None:
        now = time.monotonic()
        if self._applied != self._saved and now - self._saved_at >= self.config.position_interval:
            await asyncio.to_thread(self._save_position)

    def _save_position(self, durable: bool = False) -> None:
        """Save the applied position; the device is made durable up to it first."""
        if self._applied is None:
            return
        if self._device_dirty:
            self._device_dirty = False
            self.device.flush()
        self.meta.set(self.keys.replay(self.host), self._applied.encode(), durable=durable)
        self._saved = self._applied
        self._saved_at = time.monotonic()

    def _set_error(self, reason: str) -> None:
        if self.meta.get(self.keys.actual(self.host, "error")) != reason:
            self.meta.set(self.keys.actual(self.host, "error"), reason[:1000])
        self.stats.errors = (self.stats.errors + [reason])[-5:]

    def _clear_error(self) -> None:
        if self.stats.errors:
            self.stats.errors = []
            self.meta.delete(self.keys.actual(self.host, "error"))

    # ------------------------------------------------------------------- stop
    async def stop(self, end_marker: bool = False) -> LogPosition | None:
        """Drain: commit queued writes, optionally end the log, write everything back."""
        while self._waiting or (self._committer is not None and not self._committer.idle) \
                or self._rotating:
            self._pressure.set()
            await asyncio.sleep(0.001)
        async with self._exclusive():
            if end_marker and self._appender is not None:
                seq = self._next_seq
                self._next_seq += 1
                rec = logrecord.encode(LogRecord(seq=seq, offset=0, data=b"",
                                                 stamp_ns=time.time_ns(), flags=FLAG_END))
                size = await asyncio.to_thread(self._appender.append, [rec])
                self._log_end = LogPosition(self._number, size, seq, self.host)
                self._active_end = self._log_end
                self._notify_growth()
                await asyncio.to_thread(self._finish_logfile, self._log_end)
            while len(self._active) or len(self._maps) > 1:
                if len(self._active):
                    await self._writeback_round()
                else:
                    await asyncio.sleep(0.001)
            self._applied = self._log_end
            await asyncio.to_thread(self._save_position, True)
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            self._tasks = []
            if self._appender is not None:
                self._appender.close()
                self._appender = None
        self._writers.shutdown(wait=False)  # idle: the last round is done
        if self._committer is not None:
            await asyncio.to_thread(self._committer.stop)
        return self._log_end

    # ----------------------------------------------------------------- status
    def status(self) -> LoggerStatus:
        return LoggerStatus(
            logfile=logfile_name(self._number, self.host),
            log_end=self._log_end.encode() if self._log_end else None,
            applied=self._applied.encode() if self._applied else None,
            next_seq=self._next_seq,
            pending_bytes=self._held_bytes(),
            queued_writes=sum(len(b.writes) for b in self._committer.queued())
            if self._committer is not None else 0,
            writes=self.stats.writes,
            bytes_written=self.stats.bytes_written,
            commits=self.stats.commits,
            writes_per_commit=round(self.stats.writes / self.stats.commits, 2)
            if self.stats.commits else 0.0,
            writeback_rounds=self.stats.writeback_rounds,
            device_writes=self.stats.device_writes,
            direct_writes=self.stats.direct_writes,
            emergency=self.emergency,
            errors=tuple(self.stats.errors),
        )
