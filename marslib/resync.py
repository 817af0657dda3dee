"""Log-based resync after a split brain: compare only the blocks either side wrote since
the histories forked, found in the logfiles both sides still hold.

``marsadm invalidate`` plans (:func:`marslib.resyncplan.plan`) on the losing host, before
the fork's evidence (its version links) is dropped: ``resync-HOST`` = ``log,F_EFF`` when a
fork with the primary is known and the local logfiles since it are all here, else
``full,REASON``. The secondary then resyncs in place (:mod:`marslib.secondary`) through
the full sync's checksum-then-copy path (:class:`marslib.sync.SyncClient`), restricted by
:class:`LogResync` to a :class:`marslib.blockset.BlockSet`: the blocks the local logs
wrote after F_EFF, and those the primary's logs wrote from F_EFF to P0 (the primary's log
end at the sync's start, byte 0 of a new logfile), which the primary scans when asked
(``SYNC_WRITTEN_REQ``).

Why that set is complete: the loser's device is the state at F_EFF plus the writes of the
records in its local logfiles after F_EFF (unless it wrote without a log, in emergency
mode, or a sync had copied blocks into it: both give a full comparison). The primary's
device at P0 is the state at F_EFF plus its records in (F_EFF, P0]. A block in neither
set is equal on both sides; those in it are compared at P0 or later and copied where they
differ, and the replay from P0 does the rest, as after a full sync. A superset is always
safe, so every local logfile from F_EFF's number on is scanned whole.

The set is saved (``MarsPaths.resync_blocks``) before the first block is compared and
``resync-HOST`` gains its size; a resync that is killed resumes with it. Only then are the
loser's logfiles that are not the primary's history deleted (:func:`drop_stale_logfiles`,
while the sync runs, and done before the replay starts): the replay after the resync
would otherwise take them for the next logfile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from marslib.blockset import BlockSet
from marslib.formats.versionlink import VersionLink
from marslib.history import links
from marslib.layout import MarsPaths
from marslib.logretention import delete_logfiles
from marslib.logscan import WrittenBlocks, written_blocks
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.resyncplan import forget_saved_set, read_plan
from marslib.schema import ON, RESYNC_LOG, ResourceKeys, ResyncPlan, is_primary_host

log = logging.getLogger(__name__)

LINK_WAIT = 10.0  # seconds the loser waits for the primary's link of the logfile before P0


# ---------------------------------------------------------------- the resync
def drop_stale_logfiles(paths: MarsPaths, meta: MetaStore, resource: str, winner: str,
                        since: LogPosition, p0: LogPosition) -> list[str]:
    """Delete (or cut) the local logfiles from ``since``'s number on that are not the
    primary's history, once the block set holds their writes: the replay after the resync
    advances to the next local logfile by number, whatever its writer.

    From P0's number on, only the primary's P0 logfile is its history (and nothing of it
    beyond P0). Before it, the primary's own version links say which logfile each number
    is and where it ended; a copy of another writer goes, a longer copy of the same one is
    cut to that end. A number without the primary's link stays as it is. Returns what
    changed, for the log."""
    winner_links: dict[int, VersionLink] = {
        n: by_writer[winner] for n, by_writer in links(meta, resource).items()
        if winner in by_writer}
    doomed: list[Path] = []
    cut: list[tuple[Path, int]] = []
    for number, host, path in paths.logfiles(resource):
        if number < since.number:
            continue
        if number > p0.number or (number == p0.number and host != p0.host):
            doomed.append(path)
            continue
        end = p0.offset if number == p0.number else None
        if end is None:
            link = winner_links.get(number)
            if link is None:
                continue
            if link.host != host:
                doomed.append(path)
                continue
            end = link.end_offset
        try:
            if path.stat().st_size > end:
                cut.append((path, end))
        except FileNotFoundError:
            continue
    delete_logfiles(doomed, resource)
    for path, end in cut:
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    return [p.name for p in doomed] + [f"{p.name} cut to {end}" for p, end in cut]


@dataclass
class _Sides:
    """The written blocks of both sides, or why a full comparison is needed."""

    blocks: BlockSet | None
    reason: str | None = None


WrittenOnPrimary = Callable[[LogPosition, LogPosition | None], Awaitable[WrittenBlocks]]


class LogResync:
    """The block set of a log-based resync, for ``SyncClient.run(plan=...)`` on the loser:
    called with P0 each time the sync (re)starts. It returns the saved set when the sync
    resumes, else computes it (the local scan from ``since``, the primary's from ``since``
    to P0), saves it, records its size in ``resync-HOST`` and drops the stale logfiles.
    When either log cannot vouch for every write, ``resync-HOST`` becomes ``full,REASON``
    and None is returned: the sync compares everything."""

    def __init__(self, resource: str, host: str, paths: MarsPaths, meta: MetaStore,
                 since: LogPosition, size: int, block_size: int,
                 written_on_primary: WrittenOnPrimary) -> None:
        self.resource = resource
        self.host = host
        self.paths = paths
        self.meta = meta
        self.since = since
        self.size = size
        self.block_size = block_size
        self.written_on_primary = written_on_primary
        self.keys = ResourceKeys(resource)
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})
        self.fallback: str | None = None  # why this resync compares the whole device
        self._cleanup: asyncio.Task[None] | None = None  # dropping the stale logfiles

    @property
    def path(self) -> Path:
        return self.paths.resync_blocks(self.resource)

    def _saved(self) -> BlockSet | None:
        try:
            saved = BlockSet.load(self.path)
        except (ValueError, OSError) as exc:
            self.log.warning("the saved block set %s is unusable: %s", self.path, exc)
            return None
        if saved is not None and (saved.size, saved.block_size) != (self.size,
                                                                    self.block_size):
            self.log.warning("the saved block set %s is for %d bytes, not %d", self.path,
                             saved.size, self.size)
            return None
        return saved

    def _full(self, reason: str) -> None:
        self.fallback = reason
        self.meta.set(self.keys.resync(self.host), ResyncPlan.full(reason).encode(),
                      durable=True)
        forget_saved_set(self.paths, self.resource)
        self.log.warning("full comparison instead of a log-based resync: %s", reason)
        return None

    async def __call__(self, p0: LogPosition, fresh: bool) -> BlockSet | None:
        current = read_plan(self.meta, self.resource, self.host)
        if current is None or current.mode != RESYNC_LOG:
            return None  # planned again meanwhile (a full comparison): compare everything
        saved = self._saved()
        if current.blocks is not None and saved is None:
            # the loser's stale logfiles may be gone already: only the set held their writes
            self._full("the saved block set of this resync is gone")
            return None
        if saved is not None and not fresh:
            self.log.info("the resync resumes with its saved set of %d blocks", saved.count)
            self._start_cleanup(p0)  # (again: it may not have ended before the restart)
            return saved
        winner = self.meta.get(self.keys.primary) or "the primary"
        if self.meta.get(self.keys.actual(winner, "emergency")) == ON:
            self._full(f"{winner} is in emergency mode: writes bypass its log")
            return None
        sides = await self._both_sides(p0, winner, saved)
        if sides.blocks is None:
            assert sides.reason is not None
            self._full(sides.reason)
            return None
        blocks = sides.blocks
        await asyncio.to_thread(blocks.save, self.path)
        self.meta.set(self.keys.resync(self.host),
                      ResyncPlan(RESYNC_LOG, since=self.since, blocks=blocks.count).encode(),
                      durable=True)
        self.log.info("log-based resync since %s: %d blocks (%d bytes) written on either "
                      "side up to %s", self.since.encode(), blocks.count, blocks.nbytes,
                      p0.encode())
        self._start_cleanup(p0)
        return blocks

    def _start_cleanup(self, p0: LogPosition) -> None:
        """Drop the stale logfiles while the sync runs (the set holds their writes now);
        :meth:`finish` waits for it, before the replay starts."""
        if self._cleanup is not None:
            self._cleanup.cancel()
        self._cleanup = asyncio.create_task(self._drop_stale(p0))

    async def _drop_stale(self, p0: LogPosition) -> None:
        winner = self.meta.get(self.keys.primary)
        if not is_primary_host(winner):
            return
        assert winner is not None
        await self._wait_for_link(winner, p0)
        changed = await asyncio.to_thread(drop_stale_logfiles, self.paths, self.meta,
                                          self.resource, winner, self.since, p0)
        if changed:
            self.log.info("logfiles here that are not %s's history: %s", winner,
                          ", ".join(changed))

    async def _both_sides(self, p0: LogPosition, winner: str,
                          saved: BlockSet | None) -> _Sides:
        theirs = await self.written_on_primary(self.since, p0)
        if not theirs.complete:
            return _Sides(None, f"{winner}'s logs since the fork: {theirs.reason}")
        if saved is not None:
            # a sync started over (a new P0): the saved set holds what this host's logs
            # wrote (they may be gone by now), the primary may have written more since
            return _Sides(saved | theirs.blocks)
        mine = await asyncio.to_thread(written_blocks, self.paths, self.resource, self.since,
                                       None, self.block_size, self.size)
        if not mine.complete:
            return _Sides(None, f"{self.host}'s logs since the fork: {mine.reason}")
        self.log.info("written since %s: %d blocks here (%d records, %d bytes of log), %d "
                      "on %s (%d records)", self.since.encode(), mine.blocks.count,
                      mine.records, mine.log_bytes, theirs.blocks.count, winner,
                      theirs.records)
        return _Sides(mine.blocks | theirs.blocks)

    async def _wait_for_link(self, winner: str, p0: LogPosition) -> None:
        """The primary wrote its version link of the logfile before P0 when it rotated
        for this sync; wait a moment for it to arrive here, since it says which logfile
        of that number is the primary's history."""
        number = p0.number - 1
        if p0.offset or number < self.since.number:
            return
        key = self.keys.version_link(number, winner)
        deadline = time.monotonic() + LINK_WAIT
        while self.meta.get(key) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def finish(self) -> None:
        """The sync is done: the stale logfiles must be gone before the replay starts;
        the set is no longer needed."""
        if self._cleanup is not None:
            await self._cleanup
        forget_saved_set(self.paths, self.resource)

    def close(self) -> None:
        """The sync was stopped: no cleanup goes on behind it (the next start redoes it)."""
        if self._cleanup is not None:
            self._cleanup.cancel()
