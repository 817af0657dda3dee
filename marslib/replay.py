"""Replay on a secondary: apply fetched logfiles to the data device in log order.

Records are applied in batches that end on record boundaries: the records of a batch are
collected in an extent map (newest data per range), written sorted, the device flushed,
and only then is the replay position saved. Between batches the device holds exactly a
prefix of the primary's history; ``pause`` waits for the current batch to end.
A record that fails its checksum in a fetched logfile is never applied: the bytes from
there on are fetched again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from marslib.device import Device
from marslib.errors import LogCorrupt
from marslib.extents import ExtentMap
from marslib.fetch import Fetcher
from marslib.history import forks, write_link
from marslib.layout import MarsPaths, parse_logfile_name
from marslib.logfile import LogScanner, StopKind
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.writeback import WritebackCounters, write_sorted

log = logging.getLogger(__name__)

BATCH_BYTES = 32 << 20
MAX_REFETCH = 3


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
        self.host = host
        self.paths = paths
        self.meta = meta
        self.device = device
        self.fetcher = fetcher
        self.position = self._load_position()
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
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})

    @property
    def _key(self) -> str:
        return f"resource-{self.resource}/replay-{self.host}"

    def _load_position(self) -> LogPosition:
        value = self.meta.get(self._key)
        if not value:
            raise LogCorrupt(self._key, 0, "no replay position: join or invalidate first")
        return LogPosition.decode(value)

    async def pause(self) -> None:
        """Stop after the current batch; the device then holds a consistent prefix."""
        self.paused = True
        self._resume.clear()
        await self._idle.wait()

    def resume(self) -> None:
        self.paused = False
        self._resume.set()

    async def run(self) -> None:
        while True:
            self._note_caught_up()
            await self._resume.wait()
            div = self.fetcher.diverged
            if div is not None and div[0] == self.position.logfile:
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
            self._idle.clear()
            try:
                applied, bad = await asyncio.to_thread(self._apply_batch)
            finally:
                self._idle.set()
            if bad is not None:
                self._bad_record(*bad)
            if applied:
                self.meta.set(self._key, self.position.encode())
                continue
            if self.blocked:  # look again later: a resync elsewhere may resolve it
                await asyncio.sleep(1.0)
                self.blocked = False
                continue
            if self._advance_logfile():
                continue
            try:
                await asyncio.wait_for(progress.wait(), 1.0)
            except TimeoutError:
                pass

    def _note_caught_up(self) -> None:
        f = self.fetcher
        if self.position.logfile == f.logfile and self.position.offset >= f.remote_end >= 0:
            self.caught_up_at = time.time()

    def _path(self, pos: LogPosition):  # type: ignore[no-untyped-def]
        return self.paths.logfile(self.resource, pos.number, pos.host)

    def _apply_batch(self) -> tuple[int, tuple[str, int, str] | None]:
        """Apply the next batch of complete records (runs in a thread); return how many
        were applied and where a record failed its checks, if one did."""
        pos = self.position
        path = self._path(pos)
        if not path.exists():
            return 0, None
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
                batch.insert(rec.offset, bytes(rec.data))
                self.stats.bytes += rec.data_len
            count += 1
            self.stats.last_stamp_ns = rec.stamp_ns or self.stats.last_stamp_ns
            new_pos = LogPosition(pos.number, end, rec.seq, pos.host)
            if batch.bytes >= BATCH_BYTES:
                break
        stop = scanner.stop
        bad = None
        if stop is not None and not stop.clean and count == 0 and (
                stop.kind is not StopKind.TORN or limit is None):
            # damaged, or cut short in a logfile that is complete: never applied
            bad = (path.name, stop.offset, stop.describe(path))
        if count:
            write_sorted(self.device, batch, 1 << 20, self.counters)
            self.position = new_pos
            self.stats.records += count
            self.stats.batches += 1
            if not self.blocked:
                self.error = None
        return count, bad

    def _bad_record(self, name: str, offset: int, what: str) -> None:
        times = self.fetcher.refetch_from(name, offset)
        self.stats.corrupt_refetched += 1
        self.error = f"{what}: not applied, fetching it again (attempt {times})"
        self.log.warning("%s", self.error)
        if times > MAX_REFETCH:
            self.error = (f"{what}: the primary's copy fails the same check: its log is "
                          "damaged; resync this host with 'marsadm invalidate "
                          f"{self.resource}' once the primary is repaired")
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
        gap = int(self.meta.get(f"resource-{self.resource}/history-gap") or 0)
        for number, host, _ in self.paths.logfiles(self.resource):
            if number > pos.number:
                if number >= gap > pos.number:
                    self.error = (
                        f"outdated: the primary ran in emergency mode and its history has a "
                        f"gap before logfile {number}; this replica stays consistent at "
                        f"{pos.encode()}: run 'marsadm invalidate {self.resource}'")
                    return False
                self.position = LogPosition(number, 0, pos.seq, host)
                self.meta.set(self._key, self.position.encode())
                return True
        return False

    def status(self) -> dict[str, object]:
        secs = max(time.monotonic() - self.started, 1e-6)
        return {
            "replay": self.position.encode(),
            "replay_records": self.stats.records,
            "replay_bytes": self.stats.bytes,
            "replay_rate": round(self.stats.bytes / secs),
            # paused only once the batch in progress has ended: the device is consistent
            "replay_paused": self.paused and self._idle.is_set(),
            "replay_error": self.error,
            "corrupt_refetched": self.stats.corrupt_refetched,
            "replay_stamp_ns": self.stats.last_stamp_ns,
            "caught_up_at": self.caught_up_at,
        }


def logfile_number(name: str) -> int:
    parsed = parse_logfile_name(name)
    return parsed[0] if parsed else -1
