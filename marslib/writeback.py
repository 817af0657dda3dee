"""Copy an extent map to a data device: sorted by offset, adjacent extents merged into
aligned chunks (each copied once into an aligned buffer and written with one request,
unaligned edges read first), several chunks in flight, one device flush at the end.

Shared by the primary's writeback and a secondary's replay."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

from marslib.device import Device
from marslib.extents import Extent, ExtentMap


@dataclass
class WritebackCounters:
    device_writes: int = 0
    bytes: int = 0


Chunk = tuple[int, int, list[Extent]]  # aligned start, aligned end, the extents in it


def merged_chunks(gen: ExtentMap, alignment: int, limit: int) -> Iterator[Chunk]:
    """Group extents whose aligned envelopes touch into chunks of at most ``limit``."""
    cur_start = cur_end = -1
    pieces: list[Extent] = []
    for ext in gen:
        start, data = ext  # a tuple: no attribute lookups on the hot path
        e_start = start - start % alignment
        e_end = -(-(start + len(data)) // alignment) * alignment
        if pieces and e_start <= cur_end:
            end = e_end if e_end > cur_end else cur_end
            if end - cur_start <= limit:
                cur_end = end
                pieces.append(ext)
                continue
        if pieces:
            yield cur_start, cur_end, pieces
        cur_start, cur_end, pieces = e_start, e_end, [ext]
    if pieces:
        yield cur_start, cur_end, pieces




def write_sorted(dev: Device, gen: ExtentMap, chunk_limit: int,
                 counters: WritebackCounters, flush: bool = True,
                 pool: ThreadPoolExecutor | None = None, ways: int = 1) -> None:
    """Write every extent of ``gen`` in offset order, then (with ``flush``) flush the
    device. With a ``pool``, ``ways`` threads write at once, each its share of the chunks
    in ascending order: the device gets several requests in flight."""
    chunks = list(merged_chunks(gen, dev.alignment, chunk_limit))
    if not chunks:
        return
    ways = min(ways, len(chunks))
    if pool is None or ways < 2:
        _write_chunks(dev, chunks)
    else:
        jobs = [pool.submit(_write_chunks, dev, chunks[i::ways]) for i in range(ways)]
        wait(jobs)  # all of them, also when one fails: a retry must not race a straggler
        for job in jobs:
            job.result()
    counters.device_writes += len(chunks)
    counters.bytes += sum(end - start for start, end, _ in chunks)
    if flush:
        dev.flush()


def _write_chunks(dev: Device, chunks: list[Chunk]) -> None:
    for start, end, pieces in chunks:
        dev.write_gathered(start, end, pieces)


def write_in_order(dev: Device, writes: list[tuple[int, bytes | bytearray]],
                   counters: WritebackCounters, flush: bool = True) -> None:
    """Write each logged write in arrival order (the baseline sorting is measured against)."""
    for offset, data in writes:
        dev.pwrite(offset, data)
        counters.device_writes += 1
        counters.bytes += len(data)
    if flush and writes:
        dev.flush()
