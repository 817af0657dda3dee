"""Which device blocks the local logfiles wrote, from their record headers only.

A resync after a known divergence compares only the blocks either side wrote since the
fork (:func:`written_blocks`); online verify asks which blocks were written between two
log positions (:class:`TouchIndex`). Both read record headers only: each header is
checked (magic, header checksum, lengths) with :func:`marslib.formats.logrecord.
decode_header`, and ``[offset, offset + data_len)`` (the logical length, compressed or
not) is marked; payloads are skipped, not decompressed or checksummed. The file is read
in chunks of 8 MiB, and after a big record (256 KiB or more) only the next header is
read.

A scan that cannot vouch for every record says why (``missing`` or ``gap``): a logfile
number absent in the range, a file shorter than the position it should hold, a damaged
header with data after it, a record of a newer format, or a history-gap record (writes no
log holds). Then only a full comparison is safe.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from pathlib import Path

from marslib.blockset import BLOCK_SIZE, BlockSet
from marslib.errors import FormatTooNew
from marslib.formats.logrecord import (
    FLAG_GAP,
    MAX_HEADER_LEN,
    Problem,
    RecordError,
    RecordHeader,
    decode_header,
)
from marslib.layout import MarsPaths, logfile_name
from marslib.position import LogPosition

READ_CHUNK = 8 << 20
BIG_RECORD = 256 << 10  # after a record this big, read only the next header
_ZERO_CHECK = 1 << 20


@dataclass
class WrittenBlocks:
    """What :func:`written_blocks` found: ``blocks`` is complete only when neither
    ``missing`` nor ``gap`` is set (then it is a superset of what the records wrote)."""

    blocks: BlockSet
    records: int = 0
    log_bytes: int = 0  # bytes of log covered by the scan
    logfiles: list[str] = field(default_factory=list)
    missing: str | None = None  # why the logs here cannot vouch for every write
    gap: str | None = None  # a history-gap record lies in the range

    @property
    def complete(self) -> bool:
        return self.missing is None and self.gap is None

    @property
    def reason(self) -> str | None:
        """Why only a full comparison is safe (None: the set is complete)."""
        return self.missing or self.gap


class _Damaged(Exception):
    """The scan cannot vouch for the rest of a file."""


def _only_zeros(fd: int, pos: int, end: int) -> bool:
    while pos < end:
        chunk = os.pread(fd, min(_ZERO_CHECK, end - pos), pos)
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        pos += len(chunk)
    return True


def scan_headers(path: Path, start: int, stop: int | None = None,
                 ) -> tuple[list[tuple[int, RecordHeader]], int, str | None]:
    """The valid record headers of ``path`` from offset ``start`` up to ``stop`` (default:
    the file's end), as ``(record offset, header)``; where the last complete record ends;
    and why the scan ended early (None: it reached ``stop``, or the file's end at a torn or
    zero-filled tail). A record that starts before ``stop`` and ends after it is included
    and reported."""
    out: list[tuple[int, RecordHeader]] = []
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        fsize = os.fstat(fd).st_size
        end = fsize if stop is None else min(stop, fsize)
        if start > fsize:
            return out, start, f"{path.name} has only {fsize} bytes, not {start}"
        pos = start
        buf = b""
        base = pos
        small = False
        while pos < end:
            rel = pos - base
            if len(buf) - rel < MAX_HEADER_LEN and base + len(buf) < fsize:
                want = MAX_HEADER_LEN if small else READ_CHUNK
                buf = os.pread(fd, min(want, fsize - pos), pos)
                base, rel = pos, 0
            try:
                h = decode_header(buf, rel)
            except RecordError as exc:
                if exc.problem is Problem.SHORT:
                    # the file ends inside a header: a torn tail
                    return out, pos, None if stop is None else \
                        f"{path.name} ends inside a record at offset {pos}"
                if exc.problem is Problem.ZERO and _only_zeros(fd, pos, fsize):
                    # space reserved ahead of the log, never written
                    return out, pos, None if stop is None else \
                        f"{path.name} holds only zeros from offset {pos}"
                return out, pos, (f"{path.name}: {exc.problem.value} at offset {pos}"
                                  + (f" ({exc.detail})" if exc.detail else ""))
            except FormatTooNew as exc:
                return out, pos, f"{path.name}: {exc}"
            out.append((pos, h))
            nxt = pos + h.record_len
            if nxt > fsize:  # a torn last record: what its header says counts
                return out, pos, None if stop is None else \
                    f"{path.name} ends inside the record at offset {pos}"
            if nxt > end:
                return out, nxt, f"the record at offset {pos} of {path.name} crosses " \
                    f"offset {end}"
            small = h.record_len >= BIG_RECORD
            pos = nxt
        return out, pos, None


def written_blocks(paths: MarsPaths, resource: str, since: LogPosition,
                   until: LogPosition | None = None, block_size: int = BLOCK_SIZE,
                   size: int = 0) -> WrittenBlocks:
    """The blocks written by the records of the local logfiles of ``resource`` after
    ``since``, up to ``until`` (None: to the end of the newest local logfile).

    Every local logfile numbered from ``since.number`` on is read (a superset is safe):
    from ``since.offset`` the one ``since`` names (every one of that number if ``since``
    names no host), from 0 the others; up to ``until.offset`` the one ``until`` names.
    ``size`` is the device's size in bytes (blocks past it are not marked)."""
    result = WrittenBlocks(BlockSet(size, block_size))
    files = [(n, h, p) for n, h, p in paths.logfiles(resource)
             if n >= since.number and (until is None or n <= until.number)]
    have = {n for n, _, _ in files}
    last = until.number if until is not None else max(have, default=since.number - 1)
    for number in range(since.number, last + 1):
        if number in have:
            continue
        if until is not None and number == until.number and until.offset == 0:
            continue  # nothing of it is asked for
        # since and until name their writers; one in the middle may come from any writer
        # (a handover in between)
        writer = since.host if number == since.number else ""
        if until is not None and number == until.number:
            writer = until.host
        name = logfile_name(number, writer or "*")
        result.missing = f"{name} is not here"
        return result
    if since.offset > 0 and since.host and not any(
            n == since.number and h == since.host for n, h, _ in files):
        result.missing = f"{since.logfile} is not here"
        return result
    if until is not None and until.offset > 0 and until.host and not any(
            n == until.number and h == until.host for n, h, _ in files):
        result.missing = f"{until.logfile} is not here"
        return result
    for number, host, path in files:
        start = since.offset if number == since.number and since.host in ("", host) else 0
        stop = until.offset if until is not None and number == until.number \
            and until.host in ("", host) else None
        if stop is not None and stop <= start:
            continue
        try:
            headers, end, problem = scan_headers(path, start, stop)
        except FileNotFoundError:
            result.missing = f"{path.name} went away during the scan"
            return result
        result.logfiles.append(path.name)
        result.log_bytes += end - start
        for at, h in headers:
            result.records += 1
            if h.flags & FLAG_GAP and result.gap is None:
                result.gap = f"{path.name} holds a history gap (writes no log holds) at " \
                             f"offset {at}"
            if h.data_len:
                result.blocks.add_range(h.offset, h.data_len)
        if problem is not None:
            result.missing = problem
            return result
    return result


class TouchIndex:
    """Which blocks the records of the local log wrote, by the position they end at: an
    incremental header scan of the local logfiles from ``start`` on, following the
    logfiles by number (one file per number).

    :meth:`update` reads what was appended since the last call; :meth:`touched` answers
    for a range of positions the index covers, and None for one it cannot vouch for: from
    before ``start``, past what was scanned, or across a copy that was cut (a refetch) or
    a logfile that went before it was scanned (the index then starts over after it)."""

    def __init__(self, paths: MarsPaths, resource: str, start: LogPosition,
                 block_size: int = BLOCK_SIZE) -> None:
        self.paths = paths
        self.resource = resource
        self.block_size = block_size
        self.problem: str | None = None  # why the index stopped following the log
        self.reset(start)

    def reset(self, start: LogPosition) -> None:
        """Forget everything; cover from ``start`` (exclusive) on."""
        self.start = (start.number, start.offset)
        self.end = start  # scanned up to here
        self._keys: list[tuple[int, int]] = []  # (number, end offset) of each record
        self._spans: list[tuple[int, int]] = []  # (first block, last block) of each record
        self._number = start.number
        self._offset = start.offset
        self._path: Path | None = None
        self._host = start.host

    def _file(self, number: int) -> Path | None:
        found = [(h, p) for n, h, p in self.paths.logfiles(self.resource) if n == number]
        if len(found) == 1:
            return found[0][1]
        for h, p in found:
            if h == self._host:
                return p
        return None

    def update(self) -> LogPosition:
        """Scan what the local logfiles gained; return the position now covered."""
        while True:
            path = self._path or self._file(self._number)
            if path is None:
                if self._later_exists(self._number) and self._offset == 0:
                    self._number += 1  # an empty or never fetched number: go on
                    continue
                return self.end
            self._path = path
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                if self._later_exists(self._number):
                    self._restart_at(LogPosition(self._number + 1, 0, 0))
                    continue
                return self.end
            if size < self._offset:  # cut under us: what was indexed of it may be stale
                self._restart_at(LogPosition(self._number, size, 0, self._host))
                continue
            headers, end, problem = scan_headers(path, self._offset, None)
            for at, h in headers:
                rec_end = at + h.record_len
                if rec_end > end:
                    break  # a torn last record: indexed once it is complete
                if h.data_len:
                    first = h.offset // self.block_size
                    last = (h.offset + h.data_len - 1) // self.block_size
                    self._keys.append((self._number, rec_end))
                    self._spans.append((first, last))
            self._offset = end
            parsed = path.name.split("-")
            self._host = parsed[2] if len(parsed) > 2 else self._host
            self.end = LogPosition(self._number, end, 0, self._host)
            if problem is not None:
                self.problem = problem
                return self.end
            if end < size or not self._later_exists(self._number):
                return self.end  # a partial record still being fetched, or the newest file
            self._number += 1
            self._offset = 0
            self._path = None

    def _restart_at(self, pos: LogPosition) -> None:
        host = pos.host or self._host
        self.reset(LogPosition(pos.number, pos.offset, pos.seq, host))

    def _later_exists(self, number: int) -> bool:
        return any(n > number for n, _, _ in self.paths.logfiles(self.resource))

    def covers(self, lo: LogPosition, hi: LogPosition) -> bool:
        a, b = (lo.number, lo.offset), (hi.number, hi.offset)
        return self.start <= min(a, b) and max(a, b) <= (self.end.number, self.end.offset)

    def touched(self, lo: LogPosition, hi: LogPosition, offset: int, length: int
                ) -> list[int] | None:
        """The blocks (device block indexes) within ``[offset, offset + length)`` that
        records ending in ``(lo, hi]`` wrote (the two may come in either order); None if
        the index does not cover that range."""
        a, b = sorted(((lo.number, lo.offset), (hi.number, hi.offset)))
        if not self.covers(lo, hi):
            return None
        first_block = offset // self.block_size
        last_block = (offset + length - 1) // self.block_size
        out: set[int] = set()
        i = bisect.bisect_right(self._keys, a)
        j = bisect.bisect_right(self._keys, b)
        for first, last in self._spans[i:j]:
            lo_b, hi_b = max(first, first_block), min(last, last_block)
            if lo_b <= hi_b:
                out.update(range(lo_b, hi_b + 1))
        return sorted(out)

    def forget_before(self, pos: LogPosition) -> None:
        """Drop what ends at or before ``pos``: no question will reach back that far."""
        key = (pos.number, pos.offset)
        if key <= self.start:
            return
        i = bisect.bisect_right(self._keys, key)
        del self._keys[:i]
        del self._spans[:i]
        self.start = min(key, (self.end.number, self.end.offset))
