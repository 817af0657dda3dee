"""An extent map: the newest bytes written to each byte range, not yet on the device.

Extents never overlap: inserting a range trims or drops the older extents beneath it, so
a superseded version of a block is never written back. Iteration is sorted by offset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sortedcontainers import SortedDict


@dataclass(frozen=True)
class Extent:
    start: int
    data: memoryview

    @property
    def end(self) -> int:
        return self.start + len(self.data)


class ExtentMap:
    """Non-overlapping extents keyed by start offset; ``generation`` orders maps by age."""

    def __init__(self, generation: int = 0) -> None:
        self.generation = generation
        self._by_start: SortedDict = SortedDict()
        self.bytes = 0  # logical bytes held

    def __len__(self) -> int:
        return len(self._by_start)

    def insert(self, start: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        end = start + len(view)
        if not len(view):
            return
        keys = self._by_start
        idx = keys.bisect_right(start) - 1
        if idx < 0:
            idx = 0
        doomed: list[int] = []
        added: list[Extent] = []
        for key in keys.islice(idx):
            ext: Extent = keys[key]
            if ext.start >= end:
                break
            if ext.end <= start:
                continue
            doomed.append(key)
            if ext.start < start:
                added.append(Extent(ext.start, ext.data[: start - ext.start]))
            if ext.end > end:
                added.append(Extent(end, ext.data[end - ext.start :]))
        for key in doomed:
            self.bytes -= len(keys.pop(key).data)
        for ext in added:
            keys[ext.start] = ext
            self.bytes += len(ext.data)
        keys[start] = Extent(start, view)
        self.bytes += len(view)

    def overlapping(self, start: int, end: int) -> Iterator[Extent]:
        keys = self._by_start
        idx = max(keys.bisect_right(start) - 1, 0)
        for key in keys.islice(idx):
            ext: Extent = keys[key]
            if ext.start >= end:
                break
            if ext.end > start:
                yield ext

    def overlay(self, buf: bytearray | memoryview, offset: int) -> None:
        """Copy the parts of this map that fall into ``buf`` (which starts at ``offset``)."""
        end = offset + len(buf)
        for ext in self.overlapping(offset, end):
            lo = max(ext.start, offset)
            hi = min(ext.end, end)
            buf[lo - offset : hi - offset] = ext.data[lo - ext.start : hi - ext.start]

    def __iter__(self) -> Iterator[Extent]:
        return iter(self._by_start.values())
