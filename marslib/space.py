"""Free space in /mars and the emergency levels it maps to.

Levels, from the least to the most drastic (each host judges its own /mars):
0 ok; 1 warn; 2 drop: delete local logfiles this host has applied without waiting for
the other members; 3 no-fetch: secondaries stop fetching; 4 emergency: the primary stops
logging and writes straight to the device. Replicas stay consistent but outdated, and
``marsadm invalidate`` brings them back once there is room again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from marslib.errors import UsageError
from marslib.sizes import parse_size

LEVEL_NAMES = ("ok", "warn", "drop", "no-fetch", "emergency")


@dataclass(frozen=True)
class SpaceLimits:
    """Free-space thresholds in bytes for levels 1-4 (descending)."""

    warn: int = 8 << 30
    drop: int = 4 << 30
    no_fetch: int = 2 << 30
    emergency: int = 1 << 30

    @classmethod
    def parse(cls, text: str) -> SpaceLimits:
        """``warn=8G,drop=4G,no-fetch=2G,emergency=1G`` (any subset)."""
        values = {}
        for part in filter(None, text.split(",")):
            name, _, size = part.partition("=")
            field = name.strip().replace("-", "_")
            if field not in ("warn", "drop", "no_fetch", "emergency") or not size:
                raise UsageError(f"bad space limit {part!r}: use warn=, drop=, no-fetch=, "
                                 "emergency= with sizes")
            values[field] = parse_size(size)
        limits = cls(**values)
        if not limits.warn >= limits.drop >= limits.no_fetch >= limits.emergency:
            raise UsageError("space limits must shrink: warn >= drop >= no-fetch >= emergency")
        return limits

    def level(self, free: int) -> int:
        for level, limit in ((4, self.emergency), (3, self.no_fetch), (2, self.drop),
                             (1, self.warn)):
            if free < limit:
                return level
        return 0


def free_bytes(root: Path) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize
