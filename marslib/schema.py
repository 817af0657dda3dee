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

# ------------------------------------------------------------------ values
NO_PRIMARY = "(none)"  # value of ``primary`` during a handover and after ``secondary``
ON, OFF = "1", "0"  # switches (todo-HOST/*) and flags (actual-HOST/*)
SWITCHES = ("attach", "fetch", "replay", "sync", "device")
FLAGS = ("is-primary", "open-count", "emergency", "error", "space-level", "device")
SYNC_DONE = "done"


def is_primary_host(value: str | None) -> bool:
    """A ``primary`` value that names a host (not missing, not ``(none)``)."""
    return bool(value) and value != NO_PRIMARY


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
                self.synced_size(host), self.syncresult(host))

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
