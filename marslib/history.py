"""A resource's history as its members see it: version links and split-brain detection.

Every host writes its own version link for each logfile it finished: the primary when it
rotates or ends a log, a secondary when its replay moves past a logfile, a new primary for
the logfile it took over from. Links of different hosts for the same logfile number must
agree; where they do not, the histories forked there (a split brain).
"""

from __future__ import annotations

from dataclasses import dataclass

from marslib.formats.versionlink import GENESIS, VersionLink
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import ResourceKeys


@dataclass(frozen=True)
class Fork:
    """Logfile ``number`` ends differently for different hosts."""

    number: int
    views: dict[str, tuple[str, int, int]]  # writer -> (logfile host, end offset, last seq)

    def describe(self) -> str:
        parts = [f"{w}: {h} log ends at {end} (seq {seq})"
                 for w, (h, end, seq) in sorted(self.views.items())]
        return f"logfile {self.number:09d}: " + "; ".join(parts)


def links(meta: MetaStore, resource: str) -> dict[int, dict[str, VersionLink]]:
    """Every version link: number -> writer -> link."""
    out: dict[int, dict[str, VersionLink]] = {}
    for mv in meta.items(ResourceKeys(resource).dir):
        parsed = ResourceKeys.parse_version_link(mv.key)
        if parsed is None or mv.value is None:
            continue
        number, writer = parsed
        try:
            link = VersionLink.decode(number, writer, mv.value)
        except ValueError:
            continue
        out.setdefault(link.number, {})[writer] = link
    return out


def write_link(meta: MetaStore, resource: str, writer: str, end: LogPosition) -> VersionLink:
    """Record ``writer``'s view of where logfile ``end.number`` ended."""
    prev = GENESIS
    before = links(meta, resource).get(end.number - 1, {})
    if writer in before:
        prev = before[writer].digest
    elif before:
        prev = sorted(before.values(), key=lambda v: v.digest)[0].digest
    link = VersionLink(end.number, end.host, end.offset, end.seq, prev)
    key = link.key(resource, writer)
    if meta.get(key) != link.encode():
        meta.set(key, link.encode(), durable=True)  # once per logfile: split brain needs it
    return link


def forks(meta: MetaStore, resource: str) -> list[Fork]:
    """Where members' histories disagree, oldest first."""
    out = []
    for number, by_writer in sorted(links(meta, resource).items()):
        views = {w: (v.host, v.end_offset, v.last_seq) for w, v in by_writer.items()}
        if len(set(views.values())) > 1:
            out.append(Fork(number, views))
    return out


def forget_links(meta: MetaStore, resource: str, writer: str) -> int:
    """Drop ``writer``'s links (its history lost a split brain and is being resynced)."""
    n = 0
    for by_writer in links(meta, resource).values():
        if writer in by_writer:
            meta.delete(by_writer[writer].key(resource, writer), durable=True)
            n += 1
    return n


def fork_point(meta: MetaStore, resource: str, loser: str, winner: str
               ) -> LogPosition | None:
    """The last log position ``loser``'s and ``winner``'s histories share, as far as their
    version links tell: every write either side made after it is in that side's logfiles
    after it. None when they share no link (then only a full comparison is safe).

    The links are walked by number. Numbers only one side has before the first both have
    are skipped (a member that joined later has no links of the logfiles before its
    join). At the first number where they differ: if both name the same logfile (the
    failover case: one copy of it is a prefix of the other), the fork lies in it, at the
    shorter end; otherwise (different logfiles, or a link only one side has) at the end
    of the last link they share. When nothing differs, that end too. An earlier point is
    always safe: it only widens the scan."""
    common: VersionLink | None = None
    for _number, by_writer in sorted(links(meta, resource).items()):
        mine, theirs = by_writer.get(loser), by_writer.get(winner)
        if mine is None or theirs is None:
            if common is None:
                continue  # before the first link both have
            break
        if (mine.host, mine.end_offset, mine.last_seq) == \
                (theirs.host, theirs.end_offset, theirs.last_seq):
            common = mine
            continue
        if mine.host == theirs.host:
            short = min(mine, theirs, key=lambda v: (v.end_offset, v.last_seq))
            return LogPosition(short.number, short.end_offset, short.last_seq, short.host)
        break
    if common is None:
        return None
    return LogPosition(common.number, common.end_offset, common.last_seq, common.host)


def effective_fork_point(fork: LogPosition, replay_value: str | None) -> LogPosition | None:
    """Where a resync's scan of both logs starts: the fork point, or the loser's replay
    position (``replay-LOSER``) if that is earlier: a crashed primary's saved position lags
    its device, and a replay batch interrupted by a crash may have left part of its records
    on the device (the batch's end, appended to the value, is ignored: its records lie after
    the position, in the loser's logfiles, and so are scanned). None when the loser has no
    readable replay position (its device's state is unknown).

    Positions in different logfiles of the same number are ordered by offset; when the
    earlier one is in another logfile, byte 0 of the number is taken, so that every
    logfile of it is scanned whole."""
    try:
        replay = LogPosition.decode(replay_value) if replay_value else None
    except ValueError:
        return None
    if replay is None:
        return None
    if replay.number != fork.number:
        return min(fork, replay, key=lambda p: p.number)
    if replay.host == fork.host or not replay.host:
        return min(fork, replay, key=lambda p: p.offset)
    return LogPosition(fork.number, 0, min(fork.seq, replay.seq), fork.host)
