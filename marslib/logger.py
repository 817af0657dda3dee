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
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from marslib.device import Device
from marslib.errors import DeviceError, LogCorrupt
from marslib.extents import ExtentMap
from marslib.formats import logrecord
from marslib.formats.logrecord import FLAG_END, FLAG_GAP, LogRecord
from marslib.history import links, write_link
from marslib.layout import MarsPaths, logfile_name
from marslib.logfile import LogAppender, LogScanner, StopKind, judge_stop
from marslib.meta import MetaStore
from marslib.position import LogPosition
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


@dataclass
class _Pending:
    seq: int
    offset: int
    data: bytes
    encoded: bytes
    future: asyncio.Future[None]


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
        self._queue: list[_Pending] = []
        self._active = ExtentMap(1)
        self._active_end: LogPosition | None = None
        self._arrivals: dict[int, list[tuple[int, bytes]]] = {1: []}
        self._maps: list[ExtentMap] = [self._active]
        self._commit_wake = asyncio.Event()
        self._writeback_wake = asyncio.Event()
        self._space = asyncio.Condition()
        self._append_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._failed: str | None = None
        self._stopping = False
        self._grew = asyncio.Event()  # set (and replaced) whenever the durable log grows
        self._wb_lock = asyncio.Lock()  # one writeback round at a time
        self._device_dirty = False  # written back but not yet flushed
        self._arrival_bytes = 0
        self.emergency = False  # /mars is full: writes bypass the log
        self._drained = asyncio.Event()  # in emergency: set once the log is written back
        self._direct_lock = asyncio.Lock()

    # ------------------------------------------------------------------ keys
    @property
    def _replay_key(self) -> str:
        return f"resource-{self.resource}/replay-{self.host}"

    # -------------------------------------------------------------- recovery
    async def start(self) -> RecoveryReport:
        """Recover from the log, then accept writes."""
        report = await asyncio.to_thread(self._recover)
        self._drained.set()
        self._tasks = [
            asyncio.create_task(self._committer(), name=f"commit-{self.resource}"),
            asyncio.create_task(self._writeback(), name=f"writeback-{self.resource}"),
        ]
        if self.meta.get(f"resource-{self.resource}/actual-{self.host}/emergency") == "1":
            # direct writes happened before a restart: they are in no log
            await self.leave_emergency()
        return report

    def _recover(self) -> RecoveryReport:
        t0 = time.monotonic()
        saved = self.meta.get(self._replay_key)
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
    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Log a write; return once it is durable in the log (the acknowledgement)."""
        if self._failed:
            raise OSError(errno.EIO, self._failed)
        if offset < 0 or offset + len(data) > self.size:
            raise OSError(errno.ENOSPC, "write beyond the end of the device")
        if not isinstance(data, bytes):
            data = bytes(data)
        if not data:
            return
        if self.emergency:
            await self._write_direct(offset, data)
            return
        if self._held_bytes() >= self.config.memory_limit:
            async with self._space:
                await self._space.wait_for(
                    lambda: self._held_bytes() < self.config.memory_limit or self._failed
                )
        seq = self._next_seq
        self._next_seq += 1
        encoded = logrecord.encode(
            LogRecord(seq=seq, offset=offset, data=data, stamp_ns=time.time_ns()),
            self.config.compress_level,
        )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(seq, offset, data, encoded, fut))
        self._commit_wake.set()
        await fut

    def _held_bytes(self) -> int:
        held = sum(m.bytes for m in self._maps) + sum(len(p.data) for p in self._queue)
        return held + self._arrival_bytes  # arrival order keeps superseded versions too

    async def flush(self) -> None:
        """Every acknowledged write is already durable; wait for queued ones too."""
        while self._queue:
            await asyncio.sleep(0)

    async def _committer(self) -> None:
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            while self._queue:
                async with self._append_lock:
                    await self._commit_batch()

    async def _commit_batch(self) -> None:
        batch, self._queue = self._queue, []
        appender = self._appender
        assert appender is not None
        if self.emergency:
            self._next_seq = batch[0].seq
            await self._apply_directly(batch)
            return
        try:
            size = await asyncio.to_thread(appender.append, [p.encoded for p in batch])
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                # never stop the primary's I/O for a full /mars: bypass the log
                self._next_seq = batch[0].seq
                await self._enter_emergency_locked(f"/mars is full: cannot append to "
                                                   f"{appender.path}")
                await self._apply_directly(batch)
                return
            failed = batch + self._queue
            self._queue = []
            self._next_seq = batch[0].seq
            reason = (
                f"/mars is full: cannot append to {appender.path}"
                if exc.errno == errno.ENOSPC
                else f"cannot append to {appender.path}: {exc.strerror}"
            )
            self.log.error("%s; %d writes refused, nothing acknowledged was lost",
                           reason, len(failed))
            self._set_error(reason)
            for p in failed:
                if not p.future.done():
                    p.future.set_exception(OSError(exc.errno or errno.EIO, reason))
            return
        self.stats.commits += 1
        arrivals = self._arrivals.get(self._active.generation)
        for p in batch:
            self._active.insert(p.offset, p.data)
            if arrivals is not None and self.config.writeback_order == "arrival":
                arrivals.append((p.offset, p.data))
                self._arrival_bytes += len(p.data)
            self.stats.writes += 1
            self.stats.bytes_written += len(p.data)
        self._log_end = LogPosition(self._number, size, batch[-1].seq, self.host)
        self._active_end = self._log_end
        self._notify_growth()
        self._clear_error()
        for p in batch:
            if not p.future.done():
                p.future.set_result(None)
        self._writeback_wake.set()
        if size >= self.config.max_logfile_size:
            await self._rotate_locked()

    def _notify_growth(self) -> None:
        grew, self._grew = self._grew, asyncio.Event()
        grew.set()

    @property
    def log_end(self) -> LogPosition | None:
        """The end of the durable log: what secondaries may fetch."""
        return self._log_end

    async def wait_growth(self, timeout: float) -> None:
        """Return when the durable log grows, or after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._grew.wait(), timeout)
        except TimeoutError:
            pass

    # --------------------------------------------------------- emergency mode
    async def _write_direct(self, offset: int, data: bytes) -> None:
        """Emergency mode: durable on the device before it is acknowledged."""
        await self._drained.wait()
        async with self._direct_lock:
            await asyncio.to_thread(self._pwrite_durable, offset, data)
        self.stats.direct_writes += 1

    def _pwrite_durable(self, offset: int, data: bytes) -> None:
        self.device.pwrite(offset, data)
        self.device.flush()

    async def _apply_directly(self, batch: list[_Pending]) -> None:
        """Write queued (unlogged) writes straight to the device, in order."""
        for p in batch:
            try:
                await self._write_direct(p.offset, p.data)
            except (OSError, DeviceError) as exc:
                if not p.future.done():
                    p.future.set_exception(OSError(errno.EIO, str(exc)))
                continue
            if not p.future.done():
                p.future.set_result(None)

    async def enter_emergency(self, reason: str) -> None:
        """Stop logging: write back everything logged, then write straight to the device.
        Replicas keep a consistent but outdated state."""
        async with self._append_lock:
            await self._enter_emergency_locked(reason)

    async def _enter_emergency_locked(self, reason: str) -> None:
        if self.emergency:
            return
        self.emergency = True
        self._drained.clear()
        self.log.error("EMERGENCY MODE: %s. The primary keeps serving, writing straight to "
                       "the device; replicas stay consistent but outdated", reason)
        self._set_error(f"emergency mode: {reason}")
        while len(self._active) or len(self._maps) > 1:
            await self._writeback_round()
        self._applied = self._log_end
        await asyncio.to_thread(self._save_position, True)
        self.meta.set(f"resource-{self.resource}/actual-{self.host}/emergency", "1",
                      durable=True)
        self._drained.set()

    async def leave_emergency(self) -> None:
        """Log again, in a new logfile after a history gap: every replica must be
        resynced (marsadm invalidate) since the direct writes are in no log."""
        async with self._append_lock:
            if not self.emergency and self.meta.get(
                    f"resource-{self.resource}/actual-{self.host}/emergency") != "1":
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
            gap_key = f"resource-{self.resource}/history-gap"
            self.meta.set(gap_key, str(self._number), durable=True)
            self.meta.set(f"resource-{self.resource}/actual-{self.host}/emergency", "0")
            self._clear_error()
            self.log.warning("left emergency mode: logging again in %s; every secondary must "
                             "be resynced with 'marsadm invalidate %s' (run it on each secondary)",
                             logfile_name(self._number, self.host), self.resource)

    # --------------------------------------------------------------- rotation
    async def rotate(self) -> str:
        """Start the next logfile; return its name."""
        async with self._append_lock:
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
            try:
                await asyncio.wait_for(self._writeback_wake.wait(),
                                       timeout=self.config.position_interval)
            except TimeoutError:
                pass
            self._writeback_wake.clear()
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
        async with self._space:
            self._space.notify_all()

    def _write_map(self, gen: ExtentMap, arrivals: list[tuple[int, bytes]] | None) -> None:
        """Copy one generation to the device and make it durable (runs in a thread)."""
        counters = WritebackCounters()
        # the device is flushed before the applied position is saved, not every round
        if arrivals is not None and self.config.writeback_order == "arrival":
            write_in_order(self.device, arrivals, counters, flush=False)
        else:
            write_sorted(self.device, gen, self.config.writeback_chunk, counters, flush=False)
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
        by_gen = {m.generation: m for m in maps}
        for m in self._maps:
            by_gen.setdefault(m.generation, m)
        for g in sorted(by_gen):
            by_gen[g].overlay(buf, offset)
        return buf

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
        self.meta.set(self._replay_key, self._applied.encode(), durable=durable)
        self._saved = self._applied
        self._saved_at = time.monotonic()

    def _set_error(self, reason: str) -> None:
        key = f"resource-{self.resource}/actual-{self.host}/error"
        if self.meta.get(key) != reason:
            self.meta.set(key, reason[:1000])
        self.stats.errors = (self.stats.errors + [reason])[-5:]

    def _clear_error(self) -> None:
        if self.stats.errors:
            self.stats.errors = []
            self.meta.delete(f"resource-{self.resource}/actual-{self.host}/error")

    # ------------------------------------------------------------------- stop
    async def stop(self, end_marker: bool = False) -> LogPosition | None:
        """Drain: commit queued writes, optionally end the log, write everything back."""
        self._stopping = True
        while self._queue:
            self._commit_wake.set()
            await asyncio.sleep(0.001)
        async with self._append_lock:
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
        return self._log_end

    # ----------------------------------------------------------------- status
    def status(self) -> dict[str, object]:
        return {
            "logfile": logfile_name(self._number, self.host),
            "log_end": self._log_end.encode() if self._log_end else None,
            "applied": self._applied.encode() if self._applied else None,
            "next_seq": self._next_seq,
            "pending_bytes": self._held_bytes(),
            "queued_writes": len(self._queue),
            "writes": self.stats.writes,
            "bytes_written": self.stats.bytes_written,
            "commits": self.stats.commits,
            "writes_per_commit": round(self.stats.writes / self.stats.commits, 2)
            if self.stats.commits else 0.0,
            "writeback_rounds": self.stats.writeback_rounds,
            "device_writes": self.stats.device_writes,
            "direct_writes": self.stats.direct_writes,
            "emergency": self.emergency,
            "errors": list(self.stats.errors),
        }


def logfile_path(paths: MarsPaths, resource: str, pos: LogPosition) -> Path:
    return paths.logfile(resource, pos.number, pos.host)
