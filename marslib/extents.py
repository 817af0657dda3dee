"""An extent map: the newest bytes written to each byte range, not yet on the device.

Extents never overlap: newer data replaces older data beneath it, so a superseded version
of a block is never written back. Iteration is sorted by offset.

Writes of whole 4 KiB blocks (what filesystems and databases send) go into a dict keyed
by block number, an insert or a lookup costing one dict operation per block; each entry
refers to the whole write it came from, uncopied. Anything else (a 512-byte write, an
unaligned edge) goes into a sorted map of byte extents. The two never hold the same byte:
a block write drops what the byte map holds there, and a small write into a block the
dict holds patches a private copy of that block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from heapq import merge
from typing import NamedTuple

from sortedcontainers import SortedDict

BLOCK_SHIFT = 12
BLOCK = 1 << BLOCK_SHIFT


class Extent(NamedTuple):
    start: int
    data: memoryview

    @property
    def end(self) -> int:
        return self.start + len(self.data)


Data = bytes | bytearray | memoryview
_Entry = tuple[int, memoryview]  # (start of the write, its data): the block lies inside it


class ByteExtents:
    """Non-overlapping extents of any size and alignment, keyed by start offset."""

    def __init__(self) -> None:
        self._by_start: SortedDict = SortedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._by_start)

    def cut(self, start: int, end: int) -> None:
        """Forget the bytes in [start, end); extents reaching out of it keep their rest."""
        keys = self._by_start
        idx = max(keys.bisect_right(start) - 1, 0)
        doomed: list[int] = []
        kept: list[Extent] = []
        for key in keys.islice(idx):
            ext: Extent = keys[key]
            if ext.start >= end:
                break
            if ext.end <= start:
                continue
            doomed.append(key)
            if ext.start < start:
                kept.append(Extent(ext.start, ext.data[: start - ext.start]))
            if ext.end > end:
                kept.append(Extent(end, ext.data[end - ext.start :]))
        for key in doomed:
            self.bytes -= len(keys.pop(key).data)
        for ext in kept:
            keys[ext.start] = ext
            self.bytes += len(ext.data)

    def insert(self, start: int, view: memoryview) -> None:
        self.cut(start, start + len(view))
        self._by_start[start] = Extent(start, view)
        self.bytes += len(view)

    def overlay(self, buf: bytearray | memoryview, offset: int) -> None:
        end = offset + len(buf)
        keys = self._by_start
        idx = max(keys.bisect_right(offset) - 1, 0)
        for key in keys.islice(idx):
            ext: Extent = keys[key]
            if ext.start >= end:
                break
            lo = max(ext.start, offset)
            hi = min(ext.end, end)
            if lo < hi:
                buf[lo - offset : hi - offset] = ext.data[lo - ext.start : hi - ext.start]

    def __iter__(self) -> Iterator[Extent]:
        return iter(self._by_start.values())


class ExtentMap:
    """The newest data per byte range; ``generation`` orders maps by age."""

    def __init__(self, generation: int = 0) -> None:
        self.generation = generation
        self._blocks: dict[int, _Entry] = {}  # block number -> the write holding it
        self._bytes = ByteExtents()  # what is not whole blocks

    def __len__(self) -> int:
        """Pieces held (blocks and byte extents): zero when the map is empty."""
        return len(self._blocks) + len(self._bytes)

    @property
    def bytes(self) -> int:
        """Logical bytes held."""
        return (len(self._blocks) << BLOCK_SHIFT) + self._bytes.bytes

    def insert(self, start: int, data: Data) -> None:
        view = data if type(data) is memoryview else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        if not n:
            return
        if not (start | n) & (BLOCK - 1):
            if self._bytes.bytes:
                self._bytes.cut(start, start + n)
            entry = (start, view)
            first = start >> BLOCK_SHIFT
            if n == BLOCK:
                self._blocks[first] = entry
            else:
                self._blocks.update(dict.fromkeys(range(first, first + (n >> BLOCK_SHIFT)),
                                                  entry))
            return
        self._insert_unaligned(start, view)

    def _insert_unaligned(self, start: int, view: memoryview) -> None:
        end = start + len(view)
        blocks = self._blocks
        loose_start = -1  # a run of bytes in blocks the dict does not hold
        for block in range(start >> BLOCK_SHIFT, ((end - 1) >> BLOCK_SHIFT) + 1):
            b_start = block << BLOCK_SHIFT
            lo = max(start, b_start)
            hi = min(end, b_start + BLOCK)
            entry = blocks.get(block)
            if entry is None:
                if loose_start < 0:
                    loose_start = lo
                continue
            if loose_start >= 0:
                self._bytes.insert(loose_start, view[loose_start - start : lo - start])
                loose_start = -1
            w_start, w_view = entry
            copy = bytearray(w_view[b_start - w_start : b_start - w_start + BLOCK])
            copy[lo - b_start : hi - b_start] = view[lo - start : hi - start]
            blocks[block] = (b_start, memoryview(copy))
        if loose_start >= 0:
            self._bytes.insert(loose_start, view[loose_start - start :])

    def overlay(self, buf: bytearray | memoryview, offset: int) -> None:
        """Copy the parts of this map that fall into ``buf`` (which starts at ``offset``)."""
        end = offset + len(buf)
        if end <= offset:
            return
        blocks = self._blocks
        if blocks:
            get = blocks.get
            for block in range(offset >> BLOCK_SHIFT, ((end - 1) >> BLOCK_SHIFT) + 1):
                entry = get(block)
                if entry is None:
                    continue
                w_start, w_view = entry
                b_start = block << BLOCK_SHIFT
                lo = b_start if b_start > offset else offset
                hi = b_start + BLOCK
                if hi > end:
                    hi = end
                buf[lo - offset : hi - offset] = w_view[lo - w_start : hi - w_start]
        if len(self._bytes):
            self._bytes.overlay(buf, offset)

    def _block_runs(self) -> Iterator[Extent]:
        """Runs of consecutive blocks that come from the same write, sorted."""
        blocks = self._blocks
        entry: _Entry | None = None
        first = last = -2
        for block in sorted(blocks):
            e = blocks[block]
            if e is entry and block == last + 1:
                last = block
                continue
            if entry is not None:
                yield _run(entry, first, last)
            entry, first, last = e, block, block
        if entry is not None:
            yield _run(entry, first, last)

    def __iter__(self) -> Iterator[Extent]:
        if not len(self._bytes):
            return self._block_runs()
        if not self._blocks:
            return iter(self._bytes)
        return merge(self._block_runs(), iter(self._bytes), key=lambda e: e.start)


def _run(entry: _Entry, first: int, last: int) -> Extent:
    w_start, w_view = entry
    lo = first << BLOCK_SHIFT
    hi = (last + 1) << BLOCK_SHIFT
    if lo == w_start and hi - lo == len(w_view):
        return _extent((lo, w_view))
    return _extent((lo, w_view[lo - w_start : hi - w_start]))


# Extent((start, data)) without the Python-level __new__ of a NamedTuple: the writeback
# makes one per run of blocks
_extent: Callable[[tuple[int, memoryview]], Extent] = partial(tuple.__new__, Extent)
