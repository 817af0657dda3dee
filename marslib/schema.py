"""The metadata tree's schema: every key's name and every value's format, in one place.

Code never spells a tree key itself: cluster keys come from the functions here, a
resource's keys from :class:`ResourceKeys`. Each key has a :class:`KeySpec` in ``KEYS``
(its pattern, its value, who owns it); ``docs/metadata.md`` has a table row for each
pattern, and its key index is rendered from ``KEYS`` (``python -m marslib.schema``), which
a test checks. Values that are more than a plain string (positions, sync state, sync
results, switches) are parsed and formatted here too.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from marslib.position import LogPosition

# ------------------------------------------------------------------ values
NO_PRIMARY = "(none)"  # value of ``primary`` during a handover and after ``secondary``
ON, OFF = "1", "0"  # switches (todo-HOST/*) and flags (actual-HOST/*)
SWITCHES = ("attach", "fetch", "replay", "sync", "device")
FLAGS = ("is-primary", "open-count", "emergency", "error", "space-level", "device")
SYNC_DONE = "done"


def is_primary_host(value: str | None) -> bool:
    """A ``primary`` value that names a host (not missing, not ``(none)``)."""
    return bool(value) and value != NO_PRIMARY


def replay_value(pos: LogPosition, batch_end: LogPosition | None = None) -> str:
    """The ``replay-HOST`` value of a secondary: ``pos``, and while the device may hold
    records beyond it (a batch in progress, in the same logfile), where they end:
    ``logfile,offset,seq,END_OFFSET,END_SEQ``. Readers of a position ignore the extra
    fields."""
    if batch_end is None or batch_end.offset <= pos.offset:
        return pos.encode()
    return f"{pos.encode()},{batch_end.offset},{batch_end.seq}"


def interrupted_batch(value: str | None) -> LogPosition | None:
    """From a ``replay-HOST`` value: the end of the batch that was in progress when it was
    saved, if there was one. The device may then hold any part of the records from the
    position up to there: it is not consistent until they are applied again."""
    parts = (value or "").split(",")
    if len(parts) < 5:
        return None
    try:
        pos = LogPosition.decode(",".join(parts[:3]))
        end = LogPosition(pos.number, int(parts[3]), int(parts[4]), pos.host)
    except ValueError:
        return None
    return end if end.offset > pos.offset else None


@dataclass(frozen=True)
class SyncStatus:
    """``syncstatus-HOST``: ``DONE/SIZE`` bytes compared so far, or ``done``."""

    done: int
    size: int
    finished: bool = False

    def encode(self) -> str:
        return SYNC_DONE if self.finished else f"{self.done}/{self.size}"

    @classmethod
    def decode(cls, value: str | None) -> SyncStatus | None:
        """None when missing (never synced, or the key was deleted)."""
        if not value:
            return None
        if value == SYNC_DONE:
            return cls(0, 0, finished=True)
        try:
            done, size = value.split("/", 1)
            return cls(int(done), int(size))
        except ValueError:
            return cls(0, 0)  # damaged: sync from the start

    @property
    def progress(self) -> float | None:
        if self.finished:
            return None
        return round(self.done / self.size, 4) if self.size else None


def sync_from_start(size: int) -> str:
    """The ``syncstatus-HOST`` value that starts a full sync of ``size`` bytes."""
    return SyncStatus(0, size).encode()


@dataclass(frozen=True)
class SyncResult:
    """``syncresult-HOST``: ``COMPARED,COPIED,SECONDS`` of the last finished full sync."""

    compared: int
    copied: int
    seconds: float

    def encode(self) -> str:
        return f"{self.compared},{self.copied},{self.seconds:.3f}"

    @classmethod
    def decode(cls, value: str | None) -> SyncResult | None:
        try:
            compared, copied, seconds = (value or "").split(",")
            return cls(int(compared), int(copied), float(seconds))
        except ValueError:
            return None


RESYNC_LOG, RESYNC_FULL = "log", "full"


@dataclass(frozen=True)
class ResyncPlan:
    """``resync-HOST``: how HOST's last resync after an ``invalidate`` compares the devices.

    ``log,LOGFILE,OFFSET,SEQ`` plans a log-based resync of the blocks written on either
    side since that position (the fork, or the loser's replay position if earlier);
    ``log,LOGFILE,OFFSET,SEQ,BLOCKS`` once the block set is computed and saved (BLOCKS
    blocks of 64 KiB); ``full,REASON`` compares the whole device, REASON saying why (no
    known fork, a log since the fork is gone, ...). The key stays after the sync as the
    record of the last resync."""

    mode: str  # RESYNC_LOG or RESYNC_FULL
    since: LogPosition | None = None  # log mode: where the scan of both logs starts
    blocks: int | None = None  # log mode: size of the saved block set, once known
    reason: str = ""  # full mode: why

    def encode(self) -> str:
        if self.mode == RESYNC_FULL:
            return f"{RESYNC_FULL},{self.reason}"
        assert self.since is not None, "a log-based resync needs its start position"
        tail = "" if self.blocks is None else f",{self.blocks}"
        return f"{RESYNC_LOG},{self.since.encode()}{tail}"

    @classmethod
    def decode(cls, value: str | None) -> ResyncPlan | None:
        """None when missing or unreadable (then the resync compares the whole device)."""
        mode, _, rest = (value or "").partition(",")
        if mode == RESYNC_FULL:
            return cls(RESYNC_FULL, reason=rest)
        if mode != RESYNC_LOG:
            return None
        parts = rest.split(",")
        try:
            since = LogPosition.decode(",".join(parts[:3]))
            blocks = int(parts[3]) if len(parts) > 3 and parts[3] else None
        except ValueError:
            return None
        return cls(RESYNC_LOG, since=since, blocks=blocks)

    @classmethod
    def full(cls, reason: str) -> ResyncPlan:
        # a reason is free text; a comma in it stays (decode keeps all after "full,")
        return cls(RESYNC_FULL, reason=reason)


VERIFY_DONE, VERIFY_REPAIRING = "done", "repairing"


@dataclass(frozen=True)
class VerifyStatus:
    """``verifystatus-HOST``: an online verify of HOST against the primary.

    ``DONE/SIZE`` or ``DONE/SIZE,repair`` while comparing (bytes compared so far; with
    ``repair`` the differences found are resynced at the end), ``repairing`` while the
    differences are being copied (the replica is not consistent then), ``done`` after."""

    done: int = 0
    size: int = 0
    repair: bool = False
    repairing: bool = False
    finished: bool = False

    def encode(self) -> str:
        if self.finished:
            return VERIFY_DONE
        if self.repairing:
            return VERIFY_REPAIRING
        return f"{self.done}/{self.size}" + (",repair" if self.repair else "")

    @classmethod
    def decode(cls, value: str | None) -> VerifyStatus | None:
        """None when missing (no verify asked for) or unreadable."""
        if not value:
            return None
        if value == VERIFY_DONE:
            return cls(finished=True)
        if value == VERIFY_REPAIRING:
            return cls(repair=True, repairing=True)
        head, _, flags = value.partition(",")
        try:
            done, size = (int(x) for x in head.split("/", 1))
        except ValueError:
            return None
        return cls(done, size, repair=flags == "repair")

    @property
    def running(self) -> bool:
        return not self.finished

    @property
    def progress(self) -> float | None:
        if self.finished or self.repairing or not self.size:
            return None
        return round(self.done / self.size, 4)


def verify_from_start(size: int, repair: bool) -> str:
    """The ``verifystatus-HOST`` value that asks for a verify of ``size`` bytes."""
    return VerifyStatus(0, size, repair=repair).encode()


@dataclass(frozen=True)
class VerifyResult:
    """``verifyresult-HOST``: ``COMPARED,DIFFERING,RANGES,UNSETTLED,REPAIRED,SECONDS`` of
    HOST's last finished verify: bytes compared, bytes found different, ranges they form,
    bytes still being written at every pass (never reported as different), bytes
    repaired, seconds."""

    compared: int
    differing: int
    ranges: int
    unsettled: int
    repaired: int
    seconds: float

    def encode(self) -> str:
        return (f"{self.compared},{self.differing},{self.ranges},{self.unsettled},"
                f"{self.repaired},{self.seconds:.3f}")

    @classmethod
    def decode(cls, value: str | None) -> VerifyResult | None:
        try:
            c, d, r, u, rep, sec = (value or "").split(",")
            return cls(int(c), int(d), int(r), int(u), int(rep), float(sec))
        except ValueError:
            return None


VERIFY_DIFF_MAX_RANGES = 64


@dataclass(frozen=True)
class VerifyDiff:
    """``verifydiff-HOST``: the byte ranges the last verify found different, at most
    ``VERIFY_DIFF_MAX_RANGES`` of them as ``OFFSET+LENGTH`` separated by commas, then
    ``+N`` when N more are left out (the whole list is in the verify's state file)."""

    ranges: tuple[tuple[int, int], ...]
    more: int = 0

    @classmethod
    def of(cls, ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> VerifyDiff:
        kept = tuple(ranges[:VERIFY_DIFF_MAX_RANGES])
        return cls(kept, len(ranges) - len(kept))

    def encode(self) -> str:
        parts = [f"{off}+{length}" for off, length in self.ranges]
        if self.more:
            parts.append(f"+{self.more}")
        return ",".join(parts)

    @classmethod
    def decode(cls, value: str | None) -> VerifyDiff | None:
        if value is None:
            return None
        ranges: list[tuple[int, int]] = []
        more = 0
        try:
            for part in filter(None, value.split(",")):
                if part.startswith("+"):
                    more = int(part[1:])
                else:
                    off, length = part.split("+", 1)
                    ranges.append((int(off), int(length)))
        except ValueError:
            return None
        return cls(tuple(ranges), more)


def switch_on(value: str | None, default: bool = True) -> bool:
    """A ``todo-HOST/*`` switch: ``1`` on, ``0`` off, missing counts as ``default``."""
    return default if value is None else value == ON


def flag(on: bool) -> str:
    return ON if on else OFF


# -------------------------------------------------------------------- keys
@dataclass(frozen=True)
class KeySpec:
    """One key pattern of the tree: R a resource, HOST a host, N a logfile number."""

    pattern: str
    value: str
    scope: str  # "cluster" or "resource"

    def regex(self) -> re.Pattern[str]:
        parts = re.split(r"(HOST|NNNNNNNNN|WRITER|(?<=resource-)R)", self.pattern)
        name = r"[A-Za-z0-9_.-]+"
        out = "".join(r"[0-9]{9}" if p == "NNNNNNNNN" else name if p in ("HOST", "WRITER", "R")
                      else re.escape(p) for p in parts)
        return re.compile(out + r"\Z")


KEYS: tuple[KeySpec, ...] = (
    KeySpec("uuid", "cluster id (a UUID)", "cluster"),
    KeySpec("ips/ip-HOST", "address other hosts reach HOST at", "cluster"),
    KeySpec("version-HOST", "software version of HOST", "cluster"),
    KeySpec("alive-HOST", "heartbeat: Unix time in seconds", "cluster"),
    KeySpec("actual-HOST/space-level", "free-space level 0..4 of HOST's state root",
            "cluster"),
    KeySpec("resource-R/primary", f"designated primary host, or {NO_PRIMARY}", "resource"),
    KeySpec("resource-R/size", "size in bytes", "resource"),
    KeySpec("resource-R/history-gap", "number of the first logfile after a gap",
            "resource"),
    KeySpec("resource-R/data-HOST", "absolute path of HOST's data device", "resource"),
    KeySpec("resource-R/device-size-HOST", "size of HOST's data device in bytes",
            "resource"),
    KeySpec("resource-R/buffered-HOST", "1: no O_DIRECT on HOST", "resource"),
    KeySpec("resource-R/replay-HOST", "log position HOST's device holds", "resource"),
    KeySpec("resource-R/syncstatus-HOST", "DONE/SIZE or done", "resource"),
    KeySpec("resource-R/syncpos-HOST", "the primary's log end when the sync finished",
            "resource"),
    KeySpec("resource-R/synced-size-HOST", "size in bytes the last full sync covered",
            "resource"),
    KeySpec("resource-R/syncresult-HOST", "COMPARED,COPIED,SECONDS of the last full sync",
            "resource"),
    KeySpec("resource-R/resync-HOST", "log,LOGFILE,OFFSET,SEQ[,BLOCKS] or full,REASON: how "
            "the last resync compares", "resource"),
    KeySpec("resource-R/verifystatus-HOST", "DONE/SIZE[,repair], repairing or done",
            "resource"),
    KeySpec("resource-R/verifyresult-HOST",
            "COMPARED,DIFFERING,RANGES,UNSETTLED,REPAIRED,SECONDS of the last verify",
            "resource"),
    KeySpec("resource-R/verifydiff-HOST", "OFFSET+LENGTH,... ranges the last verify found "
            "different", "resource"),
    KeySpec("resource-R/version-NNNNNNNNN-WRITER", "WRITER's view of where a logfile ended",
            "resource"),
    KeySpec("resource-R/todo-HOST/attach", "1: run the resource on HOST, 0: do not",
            "resource"),
    KeySpec("resource-R/todo-HOST/fetch", "1/0 (missing: 1): fetch logfiles", "resource"),
    KeySpec("resource-R/todo-HOST/replay", "1/0 (missing: 1): replay logfiles", "resource"),
    KeySpec("resource-R/todo-HOST/sync", "1/0 (missing: 1): full sync when needed",
            "resource"),
    KeySpec("resource-R/todo-HOST/device", "1: give the resource a block device node on "
            "HOST while it is primary there", "resource"),
    KeySpec("resource-R/actual-HOST/is-primary", "1 while HOST serves as primary",
            "resource"),
    KeySpec("resource-R/actual-HOST/open-count", "NBD clients connected on HOST",
            "resource"),
    KeySpec("resource-R/actual-HOST/emergency", "1 while HOST's primary is in emergency mode",
            "resource"),
    KeySpec("resource-R/actual-HOST/error", "HOST's last error, for the operator",
            "resource"),
    KeySpec("resource-R/actual-HOST/device", "the block device node attached on HOST",
            "resource"),
)


def ip_dir() -> str:
    return "ips"


def ip(host: str) -> str:
    return f"ips/ip-{host}"


def ip_host(key: str) -> str | None:
    """HOST of an ``ips/ip-HOST`` key, else None."""
    head, sep, host = key.partition("ips/ip-")
    return host if sep and not head and host and "/" not in host else None


def version(host: str) -> str:
    return f"version-{host}"


def alive(host: str) -> str:
    return f"alive-{host}"


def space_level(host: str) -> str:
    return f"actual-{host}/space-level"


UUID = "uuid"


@dataclass(frozen=True)
class ResourceKeys:
    """The keys of one resource."""

    resource: str

    @property
    def dir(self) -> str:
        return f"resource-{self.resource}"

    def _k(self, name: str) -> str:
        return f"resource-{self.resource}/{name}"

    @property
    def primary(self) -> str:
        return self._k("primary")

    @property
    def size(self) -> str:
        return self._k("size")

    @property
    def history_gap(self) -> str:
        return self._k("history-gap")

    def data(self, host: str) -> str:
        return self._k(f"data-{host}")

    def device_size(self, host: str) -> str:
        return self._k(f"device-size-{host}")

    def buffered(self, host: str) -> str:
        return self._k(f"buffered-{host}")

    def replay(self, host: str) -> str:
        return self._k(f"replay-{host}")

    def syncstatus(self, host: str) -> str:
        return self._k(f"syncstatus-{host}")

    def syncpos(self, host: str) -> str:
        return self._k(f"syncpos-{host}")

    def synced_size(self, host: str) -> str:
        return self._k(f"synced-size-{host}")

    def syncresult(self, host: str) -> str:
        return self._k(f"syncresult-{host}")

    def resync(self, host: str) -> str:
        return self._k(f"resync-{host}")

    def verifystatus(self, host: str) -> str:
        return self._k(f"verifystatus-{host}")

    def verifyresult(self, host: str) -> str:
        return self._k(f"verifyresult-{host}")

    def verifydiff(self, host: str) -> str:
        return self._k(f"verifydiff-{host}")

    def todo_dir(self, host: str) -> str:
        return self._k(f"todo-{host}")

    def actual_dir(self, host: str) -> str:
        return self._k(f"actual-{host}")

    def todo(self, host: str, switch: str) -> str:
        if switch not in SWITCHES:
            raise ValueError(f"unknown switch {switch!r}")
        return self._k(f"todo-{host}/{switch}")

    def actual(self, host: str, what: str) -> str:
        if what not in FLAGS:
            raise ValueError(f"unknown actual-HOST key {what!r}")
        return self._k(f"actual-{host}/{what}")

    def version_prefix(self) -> str:
        return self._k("version-")

    def version_link(self, number: int, writer: str) -> str:
        """``version-NNNNNNNNN-WRITER``: WRITER's view of where logfile ``number`` ended."""
        return self._k(f"version-{number:09d}-{writer}")

    @staticmethod
    def parse_version_link(key: str) -> tuple[int, str] | None:
        """(number, WRITER) of a ``resource-R/version-NNNNNNNNN-WRITER`` key, else None."""
        head, sep, tail = key.rpartition("/version-")
        number, dash, writer = tail.partition("-")
        if not (sep and dash and writer and head.startswith("resource-") and "/" not in tail
                and len(number) == 9 and number.isdigit()):
            return None
        return int(number), writer

    @staticmethod
    def replay_host(key: str) -> str | None:
        """HOST of a ``resource-R/replay-HOST`` key, else None."""
        head, sep, host = key.rpartition("/replay-")
        return host if sep and "/" not in host and head.startswith("resource-") else None

    def member_keys(self, host: str) -> tuple[str, ...]:
        """The keys a member owns outside todo-HOST/ and actual-HOST/ (``leave-resource``
        deletes them)."""
        return (self.data(host), self.replay(host), self.syncstatus(host),
                self.syncpos(host), self.buffered(host), self.device_size(host),
                self.synced_size(host), self.syncresult(host), self.resync(host),
                self.verifystatus(host), self.verifyresult(host), self.verifydiff(host))

    @staticmethod
    def member_of(key: str) -> str | None:
        """HOST of a ``resource-R/data-HOST`` key, else None."""
        head, sep, host = key.rpartition("/data-")
        return host if sep and "/" not in host and head.startswith("resource-") else None


def spec_of(key: str) -> KeySpec | None:
    """The schema entry a concrete key matches, or None (not a key marslib writes)."""
    for spec in KEYS:
        if spec.regex().match(key):
            return spec
    return None


def key_index() -> str:
    """The key index of docs/metadata.md, rendered from ``KEYS``."""
    lines = ["| Key | Scope | Value |", "|---|---|---|"]
    lines += [f"| `{s.pattern}` | {s.scope} | {s.value} |" for s in KEYS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(key_index())
