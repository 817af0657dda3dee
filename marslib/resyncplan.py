"""The plan of a resync after a split brain, made by ``marsadm invalidate`` on the losing
host before the fork's evidence (its version links) is dropped: ``resync-HOST`` =
``log,F_EFF`` when a fork with the primary is known and the local logfiles since it are all
here (as far as names and sizes tell), else ``full,REASON``. The resync that follows the
plan runs in marsd (:mod:`marslib.resync`). Kept apart from it, so that the command (and
``view``, which shows the plan) loads no log scanner and no event loop.
"""

from __future__ import annotations

import contextlib
import os

from marslib.history import effective_fork_point, fork_point, forks, links
from marslib.layout import MarsPaths, logfile_name
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import (
    ON,
    RESYNC_FULL,
    RESYNC_LOG,
    ResourceKeys,
    ResyncPlan,
    SyncStatus,
    interrupted_batch,
    is_primary_host,
)

FULL_ASKED = "asked for (invalidate --full)"


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
    value = meta.get(ResourceKeys(resource).replay(host))
    if value:
        try:
            replay = LogPosition.decode(value)
        except ValueError:
            replay = None
        batch_end = interrupted_batch(value)
        reach = batch_end.offset if batch_end else replay.offset if replay else 0
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
