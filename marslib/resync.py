"""Log-based resync after a split brain: compare only the blocks either side wrote since
the histories forked, found in the logfiles both sides still hold.

``marsadm invalidate`` plans (:func:`plan`) on the losing host, before the fork's evidence
(its version links) is dropped: ``resync-HOST`` = ``log,F_EFF`` when a fork with the
primary is known and the local logfiles since it are all here, else ``full,REASON``. The
secondary then resyncs in place (:mod:`marslib.secondary`) through the full sync's
checksum-then-copy path (:class:`marslib.sync.SyncClient`), restricted by
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
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from marslib.blockset import BlockSet
from marslib.formats.versionlink import VersionLink
from marslib.history import effective_fork_point, fork_point, forks, links
from marslib.layout import MarsPaths, logfile_name
from marslib.logretention import delete_logfiles
from marslib.logscan import WrittenBlocks, written_blocks
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import (
    ON,
    RESYNC_FULL,
    RESYNC_LOG,
    ResourceKeys,
    ResyncPlan,
    SyncStatus,
    is_primary_host,
)

log = logging.getLogger(__name__)

FULL_ASKED = "asked for (invalidate --full)"
LINK_WAIT = 10.0  # seconds the loser waits for the primary's link of the logfile before P0


# ------------------------------------------------------------------ the plan
def known_fork(meta: MetaStore, resource: str, loser: str, winner: str) -> bool:
    """Whether the version links show ``loser``'s history forking off ``winner``'s."""
    return any(loser in f.views and winner in f.views and f.views[loser] != f.views[winner]
               for f in forks(meta, resource))


def local_logs_problem(paths: MarsPaths, meta: MetaStore, resource: str, host: str,
                       since: LogPosition) -> str | None:
    """Why ``host``'s own logfiles from ``since`` on cannot vouch for every write its
    device got after ``since`` (None: they can, as far as names and sizes tell; the
    header scan at the resync has the last word). What must be here: the logfile
    ``since`` names (at least up to its offset), every logfile ``host``'s version links
    name from ``since``'s number on (up to their ends), the one its replay position names
    (up to that, or to the end of an interrupted batch), and a logfile of every number in
    between."""
    files = [(n, h, p) for n, h, p in paths.logfiles(resource) if n >= since.number]
    sizes: dict[tuple[int, str], int] = {}
    for n, h, p in files:
        with contextlib.suppress(FileNotFoundError):
            sizes[(n, h)] = p.stat().st_size
    need: dict[tuple[int, str], int] = {}
    if since.host:
        need[(since.number, since.host)] = since.offset
    for number, by_writer in links(meta, resource).items():
        mine = by_writer.get(host)
        if mine is not None and number >= since.number:
            need[(number, mine.host)] = max(need.get((number, mine.host), 0), mine.end_offset)
    replay_value = meta.get(ResourceKeys(resource).replay(host))
    if replay_value:
        parts = replay_value.split(",")
        try:
            replay = LogPosition.decode(replay_value)
            reach = max(replay.offset, int(parts[3]) if len(parts) >= 5 else 0)
        except ValueError:
            replay, reach = None, 0
        if replay is not None and replay.number >= since.number:
            key = (replay.number, replay.host)
            need[key] = max(need.get(key, 0), reach)
    for (number, h), reach in sorted(need.items()):
        name = logfile_name(number, h)
        if (number, h) not in sizes:
            if reach == 0 and number == since.number and since.offset == 0:
                continue  # nothing of it is needed
            return f"{name} is gone on {host}"
        if sizes[(number, h)] < reach:
            return f"{name} on {host} has {sizes[(number, h)]} bytes, its history " \
                   f"reaches offset {reach}"
    have = {n for n, _ in sizes}
    last = max([n for n, _ in need] + list(have), default=since.number)
    for number in range(since.number + 1, last + 1):
        if number not in have:
            return f"no logfile {number:09d} on {host}"
    return None


def plan(meta: MetaStore, paths: MarsPaths, resource: str, loser: str,
         full: bool = False) -> ResyncPlan:
    """How ``loser`` (this host, being invalidated) is to be resynced from the primary:
    log-based from the fork point when that is safe, else a full comparison and why."""
    k = ResourceKeys(resource)
    if full:
        return ResyncPlan.full(FULL_ASKED)
    winner = meta.get(k.primary)
    if not is_primary_host(winner) or winner == loser:
        return ResyncPlan.full("no primary to compare with")
    assert winner is not None
    sync = SyncStatus.decode(meta.get(k.syncstatus(loser)))
    if sync is None:
        return ResyncPlan.full(f"{loser} was never synced")
    if not sync.finished:
        return ResyncPlan.full(f"an unfinished sync on {loser}: its device is partly copied")
    for host in (loser, winner):
        if meta.get(k.actual(host, "emergency")) == ON:
            return ResyncPlan.full(f"{host} ran in emergency mode: writes bypassed its log")
    if not known_fork(meta, resource, loser, winner):
        return ResyncPlan.full(f"no known fork between {loser} and the primary {winner}")
    fork = fork_point(meta, resource, loser, winner)
    if fork is None:
        return ResyncPlan.full(f"{loser} and {winner} share no logfile in their histories")
    since = effective_fork_point(fork, meta.get(k.replay(loser)))
    if since is None:
        return ResyncPlan.full(f"{loser} has no replay position")
    try:
        gap = int(meta.get(k.history_gap) or 0)
    except ValueError:
        gap = 0
    if gap and (gap > since.number or (gap == since.number and since.offset == 0)):
        return ResyncPlan.full(f"a history gap (emergency mode) before logfile {gap:09d}")
    problem = local_logs_problem(paths, meta, resource, loser, since)
    if problem is not None:
        return ResyncPlan.full(problem)
    return ResyncPlan(RESYNC_LOG, since=since)


def read_plan(meta: MetaStore, resource: str, host: str) -> ResyncPlan | None:
    return ResyncPlan.decode(meta.get(ResourceKeys(resource).resync(host)))


def pending_log_plan(meta: MetaStore, paths: MarsPaths, resource: str, host: str
                     ) -> ResyncPlan | None:
    """The log-based plan the sync now due on ``host`` is to follow, if there is one: a
    ``log`` plan whose set is not computed yet, or is saved here. A ``log`` plan with a
    size and no saved set is the record of a finished resync (the set is deleted at its
    end): a later sync (a grown device) compares everything."""
    p = read_plan(meta, resource, host)
    if p is None or p.mode != RESYNC_LOG:
        return None
    if p.blocks is not None and not paths.resync_blocks(resource).exists():
        return None
    return p


def forget_saved_set(paths: MarsPaths, resource: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.resync_blocks(resource))


def describe(p: ResyncPlan | None) -> str | None:
    """One line for operators: how the last (or running) resync compares."""
    if p is None:
        return None
    if p.mode == RESYNC_FULL:
        return f"full comparison: {p.reason}" if p.reason else "full comparison"
    assert p.since is not None
    where = f"{p.since.logfile} offset {p.since.offset}"
    if p.blocks is None:
        return f"log-based resync since {where}: the block set is being computed"
    return f"log-based resync since {where}: {p.blocks} blocks of 64 KiB written on " \
           "either side"


def view_entry(p: ResyncPlan | None) -> dict[str, object] | None:
    """A member's ``resync`` entry of ``view --json``."""
    if p is None:
        return None
    return {"mode": p.mode, "since": p.since.encode() if p.since else None,
            "blocks": p.blocks, "reason": p.reason or None}


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
            return self._full("the saved block set of this resync is gone")
        if saved is not None and not fresh:
            self.log.info("the resync resumes with its saved set of %d blocks", saved.count)
            self._start_cleanup(p0)  # (again: it may not have ended before the restart)
            return saved
        winner = self.meta.get(self.keys.primary) or "the primary"
        if self.meta.get(self.keys.actual(winner, "emergency")) == ON:
            return self._full(f"{winner} is in emergency mode: writes bypass its log")
        sides = await self._both_sides(p0, winner, saved)
        if sides.blocks is None:
            assert sides.reason is not None
            return self._full(sides.reason)
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
