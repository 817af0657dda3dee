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
