"""Copy an extent map to a data device: sorted by offset, adjacent extents merged into
aligned chunks, unaligned edges read first, one device flush at the end.

Shared by the primary's writeback and a secondary's replay."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from marslib.device import Device
from marslib.extents import Extent, ExtentMap


@dataclass
class WritebackCounters:
    device_writes: int = 0
    bytes: int = 0


def merged_chunks(gen: ExtentMap, alignment: int,
                  limit: int) -> Iterator[tuple[int, int, list[Extent]]]:
    """Group extents whose aligned envelopes touch into chunks of at most ``limit``."""
    cur_start = cur_end = -1
    pieces: list[Extent] = []
    for ext in gen:
        e_start = ext.start - ext.start % alignment
        e_end = -(-ext.end // alignment) * alignment
        if pieces and e_start <= cur_end and max(cur_end, e_end) - cur_start <= limit:
            cur_end = max(cur_end, e_end)
            pieces.append(ext)
            continue
        if pieces:
            yield cur_start, cur_end, pieces
        cur_start, cur_end, pieces = e_start, e_end, [ext]
    if pieces:
        yield cur_start, cur_end, pieces


def write_sorted(dev: Device, gen: ExtentMap, chunk_limit: int,
                 counters: WritebackCounters, flush: bool = True) -> None:
    """Write every extent of ``gen`` in offset order, then (with ``flush``) flush the
    device."""
    for start, end, pieces in merged_chunks(gen, dev.alignment, chunk_limit):
        image = bytearray(end - start)
        view = memoryview(image)
        covered = pieces[0].start == start and sum(len(p.data) for p in pieces) == end - start
        if not covered:
            dev.read_envelope_into(start, view)
        for p in pieces:
            view[p.start - start : p.end - start] = p.data
        dev.write_envelope(start, view)
        counters.device_writes += 1
        counters.bytes += end - start
    if flush and len(gen):
        dev.flush()


def write_in_order(dev: Device, writes: list[tuple[int, bytes]],
                   counters: WritebackCounters, flush: bool = True) -> None:
    """Write each logged write in arrival order (the baseline sorting is measured against)."""
    for offset, data in writes:
        dev.pwrite(offset, data)
        counters.device_writes += 1
        counters.bytes += len(data)
    if flush and writes:
        dev.flush()
