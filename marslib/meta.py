"""The metadata tree: small string values under ``/mars`` stored as symlinks.

Each key is a path relative to the root (``resource-r0/primary``); its value is the
symlink target and its Lamport stamp is the symlink's mtime in nanoseconds. Updates
replace the link atomically (a temporary link renamed over the old one); durable ones
also fsync it into the filesystem (:mod:`marslib.durable`). A deletion
writes a tombstone so that it can win over older values from other hosts. A value
from elsewhere replaces the local one only if its stamp is newer (ties: larger value).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from marslib.durable import fsync_dir, mkdir_durably, replace_symlink

TOMBSTONE = "(deleted)"
MAX_VALUE_LEN = 1024


@dataclass(frozen=True)
class MetaValue:
    key: str
    value: str | None  # None: deleted (tombstone)
    stamp: int  # Lamport stamp, nanoseconds

    def to_wire(self) -> list[object]:
        """``[key, value, stamp]``: how a key crosses the network (metadata pushes, the
        link in a rotation's reply)."""
        return [self.key, self.value, self.stamp]

    @classmethod
    def from_wire(cls, item: object) -> MetaValue:
        """The inverse of :meth:`to_wire`; ValueError for anything else."""
        if not isinstance(item, list) or len(item) != 3:
            raise ValueError(f"not a [key, value, stamp] item: {item!r}"[:200])
        key, value, stamp = str(item[0]), item[1], int(item[2])
        if value is not None and not isinstance(value, str):
            raise ValueError("value is not a string")
        return cls(key, value, stamp)


class LamportClock:
    """A clock that never goes backwards and moves past every stamp it has seen."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def tick(self) -> int:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last

    def witness(self, stamp: int) -> None:
        with self._lock:
            self._last = max(self._last, stamp)


class MetaStore:
    """The local copy of the metadata tree rooted at ``root``."""

    def __init__(self, root: Path, clock: LamportClock | None = None) -> None:
        self.root = root
        self.clock = clock or LamportClock()

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/") or not key:
            raise ValueError(f"invalid metadata key {key!r}")
        return self.root / key

    def read(self, key: str) -> MetaValue | None:
        path = self._path(key)
        try:
            target = os.readlink(path)
            stamp = os.lstat(path).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            return None
        self.clock.witness(stamp)
        return MetaValue(key, None if target == TOMBSTONE else target, stamp)

    def get(self, key: str, default: str | None = None) -> str | None:
        mv = self.read(key)
        return default if mv is None or mv.value is None else mv.value

    def set(self, key: str, value: str, *, durable: bool = False) -> MetaValue:
        """Write ``value`` with a fresh stamp (this host is the writer).

        ``durable``: survive a power loss once this returns (an fsync or more); without it
        the write is atomic only, for keys written often that a crash may take back."""
        if len(value) > MAX_VALUE_LEN or "\0" in value or value == TOMBSTONE:
            raise ValueError(f"invalid metadata value for {key}: {value[:60]!r}")
        mv = MetaValue(key, value, self.clock.tick())
        self._store(mv, durable)
        return mv

    def delete(self, key: str, *, durable: bool = False) -> MetaValue | None:
        """Replace ``key`` with a tombstone (a fresh stamp); None if there is no such key."""
        if self.read(key) is None:
            return None
        mv = MetaValue(key, None, self.clock.tick())
        self._store(mv, durable)
        return mv

    def merge(self, mv: MetaValue, *, durable: bool = False) -> bool:
        """Take a value from another host if it is newer; return whether it was taken.

        Raises ValueError for keys that are not metadata here (a file or directory of the
        same name, such as a logfile or the secret, is never replaced)."""
        path = self._path(mv.key)
        if any(part.startswith(".") for part in mv.key.split("/")) or mv.key == "secret":
            raise ValueError(f"refusing metadata key {mv.key!r}")
        if path.exists() and not path.is_symlink() or path.is_dir():
            raise ValueError(f"refusing metadata key {mv.key!r}: a non-link file is there")
        if mv.value is not None and (len(mv.value) > MAX_VALUE_LEN or "\0" in mv.value):
            raise ValueError(f"refusing oversized or binary value for {mv.key!r}")
        self.clock.witness(mv.stamp)
        local = self.read(mv.key)
        if local is not None:
            if (local.stamp, local.value or "") >= (mv.stamp, mv.value or ""):
                return False
        self._store(mv, durable)
        return True

    def _store(self, mv: MetaValue, durable: bool) -> None:
        """Replace the link atomically. With ``durable`` also fsync it into its directory
        and every directory above it up to the root (one of them may have been created by
        a cheap write before), so that a power loss cannot take it back."""
        path = self._path(mv.key)
        if durable:
            mkdir_durably(path.parent)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        replace_symlink(path, TOMBSTONE if mv.value is None else mv.value,
                        mtime_ns=mv.stamp, durable=durable)
        parent = path.parent
        while durable and parent != self.root:
            parent = parent.parent
            fsync_dir(parent)

    def items(self, prefix: str = "") -> list[MetaValue]:
        """Every key (tombstones included) below the directory ``prefix``."""
        base = self.root / prefix if prefix else self.root
        out: list[MetaValue] = []
        if not base.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            for name in filenames + dirnames:
                full = os.path.join(dirpath, name)
                if os.path.islink(full) and not name.startswith("."):
                    rel = os.path.relpath(full, self.root)
                    mv = self.read(rel)
                    if mv is not None:
                        out.append(mv)
        return sorted(out, key=lambda m: m.key)
