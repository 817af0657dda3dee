"""Logfiles: appending batches of records durably, and reading records back with checks.

A logfile is a plain file on the ``/mars`` filesystem. Each batch of encoded records is
written with one ``writev`` and made durable with one ``fdatasync`` (group commit).
The scanner reads records from any offset, checks each header and payload checksum and
the sequence numbers, and says precisely where and why it stopped.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from marslib.errors import LogCorrupt
from marslib.formats import logrecord
from marslib.formats.logrecord import LogRecord, Problem, RecordError

READ_CHUNK = 8 << 20


PREALLOC_CHUNK = 4 << 20
BIG_BATCH = 256 << 10  # batches this big append directly: a journal commit costs them little


class LogAppender:
    """The open tail of the current logfile; only the primary's committer writes it.

    The file is zero-filled ahead of the log's end, so that appending a batch overwrites
    allocated blocks and its ``fdatasync`` flushes data only, with no filesystem journal
    commit for a growing file. ``close`` cuts the zeros off; a crash leaves them, and
    recovery treats a zero tail as the end of the log.
    """

    def __init__(self, path: Path, prealloc: int = PREALLOC_CHUNK) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.size = os.fstat(self.fd).st_size  # the log's end: what is written and synced
        self.prealloc = prealloc
        self.allocated = self.size  # zero-filled up to here

    def _extend(self, need: int) -> None:
        if self.prealloc <= 0 or need <= self.allocated:
            return
        for target in (max(need, self.allocated + self.prealloc), need):
            try:
                self._zero_fill(target)
                return
            except OSError as exc:
                os.ftruncate(self.fd, max(self.size, self.allocated))
                if exc.errno != errno.ENOSPC or target == need:
                    raise
                # short of space: reserve only what this batch needs

    def _zero_fill(self, target: int) -> None:
        zeros = bytes(1 << 20)
        pos = self.allocated
        while pos < target:
            pos += os.pwrite(self.fd, zeros[: min(len(zeros), target - pos)], pos)
        os.fdatasync(self.fd)
        self.allocated = target

    def append(self, chunks: list[bytes]) -> int:
        """Write ``chunks`` at the log's end and make them durable; return the new end.

        On failure (e.g. ENOSPC) the file is cut back to the old end, so a half-written
        batch never stays behind, and the error is raised.
        """
        before = self.size
        total = sum(len(c) for c in chunks)
        try:
            if total < BIG_BATCH:
                self._extend(before + total)
            written = os.pwritev(self.fd, chunks, before)
            if written < total:  # rare: a partial write; finish it
                rest = b"".join(chunks)[written:]
                while rest:
                    n = os.pwrite(self.fd, rest, before + written)
                    if n <= 0:
                        raise OSError(errno.EIO, "short write")
                    written += n
                    rest = rest[n:]
            os.fdatasync(self.fd)
            self.allocated = max(self.allocated, before + total)
        except OSError:
            try:
                os.ftruncate(self.fd, before)
                self.allocated = before
            except OSError:
                pass
            raise
        self.size = before + total
        return self.size

    def close(self) -> None:
        """Cut the zero-filled space off and close."""
        if self.fd >= 0:
            try:
                if self.allocated > self.size:
                    os.ftruncate(self.fd, self.size)
                    os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1


def valid_end(path: Path) -> int:
    """Where the valid records of a logfile end (zero-filled or torn space excluded)."""
    scanner = LogScanner(path)
    end = 0
    for _, rec_end, _ in scanner:
        end = rec_end
    return end


class StopKind(Enum):
    END = "end of file"  # every byte read was a valid record
    TORN = "torn tail"  # an incomplete or zero-filled record at the end of the file
    CORRUPT = "corrupt record"  # a checksum, magic or header check failed
    SEQ_GAP = "sequence gap"  # a valid record with an unexpected sequence number


@dataclass(frozen=True)
class ScanStop:
    """Where and why a scan stopped: ``offset`` is the end of the last good record."""

    kind: StopKind
    offset: int
    file_size: int
    detail: str = ""

    @property
    def clean(self) -> bool:
        return self.kind is StopKind.END

    def describe(self, path: Path) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"{path}: {self.kind.value} at offset {self.offset}{extra}"


class LogScanner:
    """Iterate the valid records of one logfile from ``start``; afterwards ``stop`` says
    where and why reading ended. ``expect_seq`` checks sequence continuity."""

    def __init__(self, path: Path, start: int = 0, expect_seq: int | None = None,
                 limit: int | None = None) -> None:
        self.path = path
        self.start = start
        self.expect_seq = expect_seq
        self.limit = limit  # read no further than this (bytes known to be complete)
        self.stop: ScanStop | None = None
        self.last_seq: int | None = None

    def __iter__(self) -> Iterator[tuple[int, int, LogRecord]]:
        """Yield ``(record_offset, end_offset, record)`` for each valid record."""
        with open(self.path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if self.limit is not None:
                size = min(size, self.limit)
            pos = self.start
            buf = b""
            base = pos  # file offset of buf[0]
            while True:
                rel = pos - base
                try:
                    record, rel_end = logrecord.decode(buf, rel)
                except RecordError as exc:
                    if exc.problem is Problem.SHORT and base + len(buf) < size:
                        f.seek(base + len(buf))
                        more = f.read(min(READ_CHUNK, size - base - len(buf)))
                        buf = buf[rel:] + more
                        base = pos
                        continue
                    self.stop = self._classify(exc, pos, size)
                    return
                if self.expect_seq is not None and record.seq != self.expect_seq:
                    self.stop = ScanStop(
                        StopKind.SEQ_GAP, pos, size,
                        f"record has seq {record.seq}, expected {self.expect_seq}",
                    )
                    return
                end = base + rel_end
                self.last_seq = record.seq
                self.expect_seq = record.seq + 1
                yield pos, end, record
                pos = end

    def _classify(self, exc: RecordError, pos: int, size: int) -> ScanStop:
        if exc.problem is Problem.SHORT:
            if pos >= size:
                return ScanStop(StopKind.END, pos, size)
            return ScanStop(StopKind.TORN, pos, size, exc.detail)
        if exc.problem is Problem.ZERO and not self._any_data_after(pos, size):
            return ScanStop(StopKind.TORN, pos, size, "zero-filled tail")
        return ScanStop(StopKind.CORRUPT, pos, size, str(exc).split(": ", 1)[-1])

    def _any_data_after(self, pos: int, size: int) -> bool:
        with open(self.path, "rb") as f:
            f.seek(pos)
            while pos < size and (chunk := f.read(min(1 << 20, size - pos))):
                if any(chunk):
                    return True
                pos += len(chunk)
        return False


def find_record_after(path: Path, pos: int) -> int | None:
    """The offset of the first valid record after ``pos``, if any: a torn tail has none,
    a damaged record in the middle of a log does."""
    magic = logrecord.MAGIC.to_bytes(4, "little")
    data = path.read_bytes()
    at = data.find(magic, pos + 1)
    while at >= 0:
        try:
            logrecord.decode(data, at)
            return at
        except RecordError:
            at = data.find(magic, at + 1)
    return None


def read_all(path: Path, start: int = 0, expect_seq: int | None = None) -> list[LogRecord]:
    """Every record of a logfile that must be intact; raises LogCorrupt otherwise."""
    scanner = LogScanner(path, start, expect_seq)
    records = [rec for _, _, rec in scanner]
    assert scanner.stop is not None
    if not scanner.stop.clean:
        raise LogCorrupt(str(path), scanner.stop.offset, scanner.stop.kind.value)
    return records
