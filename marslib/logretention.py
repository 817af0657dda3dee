"""Which logfiles may go and when the active one is due for rotation: the pure decisions
behind ``marsadm log-delete`` and ``cron``, and the one place that deletes logfiles.
Logfiles a log-based resync after a split brain may still read are pinned (kept).

marsd owns a host's logfiles while it runs: the control commands ``log-delete`` and
``cron`` (:mod:`marslib.daemon`) and a secondary dropping applied logfiles when space is
short all decide here and delete with :func:`delete_logfiles`. ``marsadm`` calls the
same functions itself only while marsd is down.
"""

from __future__ import annotations

import logging
from pathlib import Path

from marslib.history import forks
from marslib.layout import MarsPaths
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import RESYNC_LOG, ResourceKeys, ResyncPlan, SyncStatus

log = logging.getLogger(__name__)


def member_positions(meta: MetaStore, resource: str) -> dict[str, LogPosition]:
    """HOST -> the log position HOST's device holds (``replay-HOST``) for every member
    that has one; a damaged value counts as missing."""
    out = {}
    for mv in meta.items(ResourceKeys(resource).dir):
        host = ResourceKeys.replay_host(mv.key)
        if host is None or not mv.value:
            continue
        try:
            out[host] = LogPosition.decode(mv.value)
        except ValueError:
            continue
    return out


def resync_pins(meta: MetaStore, resource: str) -> dict[str, int]:
    """Logfile numbers a log-based resync may still read, from which on nothing goes,
    and why: the oldest number where members' histories fork (an invalidate will plan
    from there), and the start of every log-based resync that is not finished (its
    ``resync-HOST`` plan while ``syncstatus-HOST`` is unfinished)."""
    k = ResourceKeys(resource)
    pins: dict[str, int] = {}
    split = forks(meta, resource)
    if split:
        pins["split brain"] = split[0].number
    for mv in meta.items(k.dir):
        host = ResourceKeys.member_of(mv.key)
        if host is None or mv.value is None:
            continue
        plan = ResyncPlan.decode(meta.get(k.resync(host)))
        sync = SyncStatus.decode(meta.get(k.syncstatus(host)))
        if plan is not None and plan.mode == RESYNC_LOG and plan.since is not None \
                and sync is not None and not sync.finished:
            pins[f"the resync of {host}"] = plan.since.number
    return pins


def deletable_logfiles(meta: MetaStore, paths: MarsPaths, resource: str) -> list[Path]:
    """Logfiles of ``resource`` on this host that every member has applied: older than
    the oldest ``replay-HOST`` position, never the newest logfile, and none a log-based
    resync may still read (:func:`resync_pins`). None while no member has a position."""
    positions = member_positions(meta, resource)
    if not positions:
        return []
    oldest = min([p.number for p in positions.values()]
                 + list(resync_pins(meta, resource).values()))
    files = paths.logfiles(resource)
    newest = files[-1][0] if files else 0
    return [p for number, _, p in files if number < oldest and number < newest]


def applied_logfiles(paths: MarsPaths, resource: str, applied: LogPosition) -> list[Path]:
    """Logfiles this host has applied up to ``applied``, whatever the other members have
    (a secondary under space pressure drops these: space level ``drop``)."""
    return [p for number, _, p in paths.logfiles(resource) if number < applied.number]


def rotation_due(log_end: LogPosition, first_stamp: float | None, now: float,
                 rotate_size: int, rotate_age: float) -> str | None:
    """Why the logfile ending at ``log_end`` is due for rotation, or None. ``first_stamp``
    is when its first record was written (seconds since the epoch, None: no record yet),
    ``now`` the current time in the same unit. An empty logfile is never due."""
    if log_end.offset <= 0:
        return None
    if log_end.offset >= rotate_size:
        return f"{log_end.logfile} holds {log_end.offset} bytes (rotate at {rotate_size})"
    if first_stamp is not None and now - first_stamp >= rotate_age:
        return (f"the first record of {log_end.logfile} is {now - first_stamp:.0f} s old "
                f"(rotate at {rotate_age:g} s)")
    return None


def delete_logfiles(files: list[Path], resource: str = "") -> int:
    """Delete ``files`` (gone already counts as deleted); the bytes freed."""
    freed = 0
    for path in files:
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
    if files:
        log.info("deleted logfiles %s (%d bytes)", " ".join(p.name for p in files), freed,
                 extra={"resource": resource})
    return freed
