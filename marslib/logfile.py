"""Logfiles: appending batches of records durably, and reading records back with checks.

A logfile is a plain file on the ``/mars`` filesystem. Each batch of encoded records is
written with one ``writev`` and made durable with one ``fdatasync`` (group commit); its
last record is sealed as the commit's marker. The scanner reads records from any offset,
checks each header and payload checksum and the sequence numbers, and says precisely
where and why it stopped; ``judge_stop`` tells a torn tail (an incomplete last commit,
never acknowledged) from damage (an acknowledged record that no longer reads back).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

from marslib.checksum import Buffer
from marslib.durable import fsync_dir
from marslib.errors import LogCorrupt
from marslib.formats import logrecord
from marslib.formats.logrecord import LogRecord, Problem, RecordError

READ_CHUNK = 8 << 20


PREALLOC_CHUNK = 16 << 20  # zero-filled ahead of the log's end at a time
PREALLOC_LOW = 8 << 20  # fill the next chunk in the background below this much reserve
KEEP_BUFFERS = 4  # aligned commit buffers kept for reuse (memory beside memory_limit) ...
KEEP_BUFFER_SIZE = 4 << 20  # ... of at most this size
SYNC_FILL = 1 << 20  # what a commit that finds no reserve fills itself (a new logfile)
DIRECT_BLOCK = 4096  # O_DIRECT alignment, safe whatever the filesystem's block size
IOV_MAX = 1024  # buffers per pwritev (Linux's UIO_MAXIOV)
BIG_BATCH = 256 << 10  # commits this big are written without zero-filling ahead


class LogAppender:
    """The open tail of the current logfile; only the primary's committer writes it.

    The file is zero-filled ahead of the log's end (a background thread keeps a reserve),
    so that a commit overwrites allocated, initialised blocks: no filesystem journal
    commit for a growing file. Where the filesystem allows O_DIRECT (``direct``), each
    commit is one ``O_DIRECT|O_DSYNC`` write of the blocks it touches, durable when the
    write returns: the partial block at the log's end is written again with the same
    leading bytes, which a torn write of it cannot change. Elsewhere (tmpfs, some FUSE
    filesystems) it is a ``pwritev`` and an ``fdatasync``. ``close`` cuts the zeros off;
    a crash leaves them, and recovery treats a zero tail as the end of the log.
    """

    def __init__(self, path: Path, prealloc: int = PREALLOC_CHUNK, direct: bool = True
                 ) -> None:
        self.path = path
        created = not path.exists()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if created:  # the name is durable before any write into the file is acknowledged
            fsync_dir(path.parent)
        self.size = os.fstat(self.fd).st_size  # the log's end: what is written and synced
        self.prealloc = prealloc
        self.allocated = self.size  # zero-filled (and synced) up to here
        self.reserved = self.size  # end of the last commit handed out (>= size)
        self._ends_lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # start -> end of commits being written
        self._durable: dict[int, int] = {}  # written out of order, not yet in size
        self._free_buffers: list[mmap.mmap] = []
        self._alloc_lock = threading.Lock()  # the commit thread and the filler
        self._filler: threading.Thread | None = None
        self._failed_fill: OSError | None = None
        self.dfd = -1
        self._tail = b""  # direct mode: the log's bytes in the block holding ``reserved``
        if direct:
            try:
                self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    os.close(self.fd)
                    raise
            else:
                head = self.size % DIRECT_BLOCK
                self._tail = os.pread(self.fd, head, self.size - head) if head else b""

    @property
    def direct(self) -> bool:
        return self.dfd >= 0

    # ------------------------------------------------------------ reservation
    def _extend(self, need: int) -> None:
        """Make sure [size, need) is zero-filled; start the background filler when the
        reserve runs low."""
        if self.prealloc <= 0:
            return
        if need > self.allocated:
            with self._alloc_lock:  # only a little now: the filler does the rest
                if need > self.allocated:
                    step = min(self.prealloc, SYNC_FILL)
                    self._fill_to(need, self._round(max(need, self.allocated + step)))
        if self.allocated - need < PREALLOC_LOW and self._filler is None \
                and self._failed_fill is None:
            self._filler = threading.Thread(target=self._fill_ahead, daemon=True,
                                             name=f"prealloc-{self.path.name}")
            self._filler.start()

    def _round(self, offset: int) -> int:
        return -(-offset // DIRECT_BLOCK) * DIRECT_BLOCK

    def _fill_to(self, need: int, target: int) -> None:
        """Zero-fill up to ``target``, or only to ``need`` if /mars is short of space."""
        for goal in (target, need):
            try:
                self._zero_fill(goal)
                return
            except OSError as exc:
                os.ftruncate(self.fd, max(self.size, self.allocated))
                if exc.errno != errno.ENOSPC or goal == need:
                    raise

    def _fill_ahead(self) -> None:
        """Background: one more chunk of reserve, so that commits never wait for it."""
        try:
            with self._alloc_lock:
                if self.fd >= 0:
                    self._zero_fill(self._round(self.allocated + self.prealloc))
        except OSError as exc:  # e.g. ENOSPC: commits reserve what they need themselves
            self._failed_fill = exc
            with contextlib.suppress(OSError):
                if self.fd >= 0:
                    os.ftruncate(self.fd, max(self.size, self.allocated))
        finally:
            self._filler = None

    def _zero_fill(self, target: int) -> None:
        zeros = bytes(1 << 20)
        pos = self.allocated
        while pos < target:
            pos += os.pwrite(self.fd, zeros[: min(len(zeros), target - pos)], pos)
        os.fdatasync(self.fd)
        self.allocated = target

    # ---------------------------------------------------------------- commits
    def append(self, records: list[bytes]) -> int:
        """Write the encoded ``records`` at the log's end as one group commit (the last
        one sealed as its marker) and make them durable; return the new end."""
        return self.write_commit(logrecord.sealed_commit(records, self.reserved))

    def write_commit(self, chunks: list[Buffer]) -> int:
        """Write one encoded group commit (its last record already sealed for an offset of
        ``self.size``; see ``logrecord.encode_commit``) at the log's end and make it
        durable; return the new end. Only when no commit is in flight.

        On failure (e.g. ENOSPC) the file is cut back to the old end, so a half-written
        batch never stays behind, and the error is raised.
        """
        commit = self.prepare(chunks, sum(map(len, chunks)))
        try:
            commit.write()
        except OSError:
            self.rollback(commit.start)
            raise
        return self.complete(commit)

    # ------------------------------------------------- commits in flight at once
    @property
    def can_overlap(self) -> bool:
        """Whether a commit may be written before the ones in flight are durable: only
        in direct mode, and only after an aligned end (no block is shared)."""
        return self.dfd >= 0 and self.reserved % DIRECT_BLOCK == 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def prepare(self, chunks: list[Buffer], total: int) -> PreparedCommit:
        """Reserve the next ``total`` bytes of the log for the encoded commit ``chunks``
        (sealed for an offset of ``self.reserved``) and make the write ready."""
        start = self.reserved
        end = start + total
        if self.dfd >= 0:
            if total < BIG_BATCH:
                self._extend(self._round(end))
            else:  # written whole: no zeros first (that would write it twice)
                with self._alloc_lock:
                    self.allocated = max(self.allocated, self._round(end))
            commit = self._prepare_direct(chunks, start, end)
        else:
            if total < BIG_BATCH:
                self._extend(end)
            commit = PreparedCommit(self, start, end, chunks, 0, None)
        with self._ends_lock:
            self._in_flight[start] = end
        self.reserved = end
        return commit

    def _prepare_direct(self, chunks: list[Buffer], start: int, end: int) -> PreparedCommit:
        """The blocks from the one holding ``start`` to the end of the commit, copied into
        an aligned buffer (the log's bytes before ``start`` in that block first, zeros
        after the commit) for one O_DIRECT|O_DSYNC write."""
        tail = self._tail
        block_start = start - len(tail)
        length = self._round(end) - block_start
        buf = self._take_buffer(length)
        view = memoryview(buf)
        try:
            pos = len(tail)
            view[:pos] = tail
            for chunk in chunks:
                n = len(chunk)
                view[pos:pos + n] = chunk
                pos += n
            if length > pos:
                view[pos:length] = bytes(length - pos)
            keep = end % DIRECT_BLOCK
            self._tail = bytes(view[end - block_start - keep:end - block_start]) if keep else b""
        finally:
            view.release()
        return PreparedCommit(self, start, end, [], block_start, buf)

    def _take_buffer(self, length: int) -> mmap.mmap:
        with self._ends_lock:
            for i, buf in enumerate(self._free_buffers):
                if len(buf) >= length:
                    return self._free_buffers.pop(i)
        return mmap.mmap(-1, max(-(-length // (1 << 20)) << 20, 1 << 20))  # page-aligned

    def _give_buffer(self, buf: mmap.mmap) -> None:
        with self._ends_lock:
            if len(self._free_buffers) < KEEP_BUFFERS and len(buf) <= KEEP_BUFFER_SIZE:
                self._free_buffers.append(buf)
                return
        buf.close()

    def _write_prepared(self, commit: PreparedCommit) -> None:
        if commit.buffer is None:
            self._write_buffered(commit.chunks, commit.start, commit.end - commit.start)
            os.fdatasync(self.fd)
            return
        length = self._round(commit.end) - commit.block_start
        view = memoryview(commit.buffer)
        try:
            done = 0
            while done < length:
                n = os.pwritev(self.dfd, [view[done:length]], commit.block_start + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        finally:
            view.release()

    def complete(self, commit: PreparedCommit) -> int:
        """``commit`` is durable; return the end of the log's durable prefix (the commits
        written before it may still be in flight)."""
        if commit.buffer is not None:
            self._give_buffer(commit.buffer)
            commit.buffer = None
        with self._ends_lock:
            self._in_flight.pop(commit.start, None)
            self._durable[commit.start] = commit.end
            size = self.size
            while size in self._durable:
                size = self._durable.pop(size)
            self.size = size
            return size

    def rollback(self, offset: int) -> None:
        """Forget everything from ``offset`` on (a failed commit and any written after
        it, none acknowledged): cut the file there. Only with nothing in flight."""
        with self._ends_lock:
            self._in_flight.clear()
            self._durable.clear()
        try:
            with self._alloc_lock:
                os.ftruncate(self.fd, offset)
                self.allocated = offset
        except OSError:
            pass
        self.size = self.reserved = offset
        if self.dfd >= 0:
            head = offset % DIRECT_BLOCK
            self._tail = os.pread(self.fd, head, offset - head) if head else b""

    def _write_buffered(self, chunks: list[Buffer], before: int, total: int) -> None:
        pos = before
        for i in range(0, len(chunks), IOV_MAX):
            part = chunks[i:i + IOV_MAX]
            want = sum(map(len, part)) if len(chunks) > IOV_MAX else total
            written = os.pwritev(self.fd, part, pos)
            if written < want:  # rare: a partial write; finish it
                rest = b"".join(part)[written:]
                while rest:
                    n = os.pwrite(self.fd, rest, pos + written)
                    if n <= 0:
                        raise OSError(errno.EIO, "short write")
                    written += n
                    rest = rest[n:]
            pos += want

    def close(self) -> None:
        """Cut the zero-filled space off and close."""
        filler = self._filler
        if filler is not None:
            filler.join()
        if self.fd >= 0:
            try:
                if self.allocated > self.size or os.fstat(self.fd).st_size > self.size:
                    os.ftruncate(self.fd, self.size)
                    os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1
                if self.dfd >= 0:
                    os.close(self.dfd)
                    self.dfd = -1
                for buf in self._free_buffers:
                    buf.close()
                self._free_buffers = []


@dataclass
class PreparedCommit:
    """A commit with its place in the log reserved, ready to be written (in any thread)."""

    appender: LogAppender
    start: int
    end: int
    chunks: list[Buffer]  # buffered mode: what pwritev writes at ``start``
    block_start: int  # direct mode: where ``buffer`` goes
    buffer: mmap.mmap | None  # direct mode: the aligned blocks

    def write(self) -> None:
        """Write and make durable (O_DSYNC, or pwritev and fdatasync); raises OSError."""
        self.appender._write_prepared(self)


def valid_end(path: Path) -> int:
    """Where the complete group commits of a logfile end: zero-filled space, a torn tail
    and the records of an incomplete last commit excluded."""
    scanner = LogScanner(path)
    for _ in scanner:
        pass
    return scanner.committed_end


class StopKind(Enum):
    END = "end of file"  # every byte read was a valid record
    TORN = "torn tail"  # an incomplete or zero-filled record at the end of the file
    CORRUPT = "corrupt record"  # a checksum, magic or header check failed
    SEQ_GAP = "sequence gap"  # a valid record with an unexpected sequence number
    CHANGED = "file changed"  # the file shrank while it was read


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
        # the end of the last complete group commit read (records of format 1.0, which
        # has no commit marks, each count as one)
        self.committed_end = start

    def __iter__(self) -> Iterator[tuple[int, int, LogRecord]]:
        """Yield ``(record_offset, end_offset, record)`` for each valid record.

        The scan reads the bytes the file held when it began (appends after that are left
        for the next scan). It ends, with ``stop`` of kind CHANGED, when the file shrinks
        under it (recovery cutting reserved space, a refetch cutting a copy): it never
        waits for bytes that went.
        """
        with open(self.path, "rb", buffering=0) as f:
            file_size = os.fstat(f.fileno()).st_size
            size = file_size if self.limit is None else min(file_size, self.limit)
            pos = self.start
            # each chunk is a buffer of its own, never written again once read: records
            # yielded earlier keep views into theirs (no copy of their data)
            buf: bytes | memoryview = b""
            base = pos  # file offset of buf[0]
            while True:
                rel = pos - base
                try:
                    record, rel_end = logrecord.decode(buf, rel)
                except RecordError as exc:
                    if exc.problem is Problem.SHORT and base + len(buf) < size:
                        now = os.fstat(f.fileno()).st_size
                        left = memoryview(buf)[rel:]  # a record cut by the chunk's end
                        chunk = bytearray(len(left) + min(READ_CHUNK,
                                                          size - base - len(buf)))
                        chunk[: len(left)] = left
                        n = os.preadv(f.fileno(), [memoryview(chunk)[len(left):]],
                                      base + len(buf))
                        if now < size or not n:  # growth is harmless: we stop at size
                            self.stop = ScanStop(StopKind.CHANGED, pos, now,
                                                 f"size {file_size} became {now} during the "
                                                 "scan")
                            return
                        buf = memoryview(chunk)[: len(left) + n]
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
                if record.is_commit or not record.has_commit_marks:
                    self.committed_end = end
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


SECTOR = 512  # the smallest unit a disk writes whole: a write that did not land is zeros


@dataclass(frozen=True)
class StopVerdict:
    """What a scan's stop in the last logfile means: ``torn`` is an incomplete last group
    commit (never acknowledged, may be cut); otherwise acknowledged records are damaged."""

    torn: bool
    reason: str


def judge_stop(path: Path, stop: ScanStop) -> StopVerdict:
    """Tell a torn tail from damage at ``stop.offset`` (the end of the last good record).

    Appends are preallocated with zeros, and a commit's marker says how far the log was
    durable when the commit was written (format 1.2; before, commits were written one
    after the other, so everything before a commit was durable), so: a later complete
    commit written after the bad record was durable proves it was acknowledged (damage);
    bad bytes that no lost 512-byte sector explains (none of the sectors of the record's
    commit is all zeros, the record lies within the file) are damage too; anything else
    is an incomplete commit of a write that never returned, and so are the commits that
    were in flight beside it.
    """
    pos = stop.offset
    if stop.kind is StopKind.SEQ_GAP:
        return StopVerdict(False, f"sequence gap: {stop.detail}")
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        overlapped: int | None = None  # where the first commit in flight beside it begins
        for at, rec_end, rec in _valid_records_after(f, pos, size):
            if rec.is_commit and rec.commit_start > pos:
                if logrecord.has_durable_end(rec.format_version) and rec.durable_end <= pos:
                    # written while the bad record's commit was still in flight: no proof
                    # either way; the commit ends where this one begins
                    if overlapped is None:
                        overlapped = rec.commit_start
                    continue
                return StopVerdict(False, (
                    f"{stop.detail or stop.kind.value} at offset {pos}, but the complete group "
                    f"commit of records from offset {rec.commit_start} to {rec_end} (last seq "
                    f"{rec.seq}) was written after it was durable: the damaged record was "
                    "acknowledged"))
            if overlapped is not None:
                continue
            if rec.is_commit or not rec.has_commit_marks:
                lost = _lost_sector(f, pos, at)
                if lost is not None:
                    return StopVerdict(True, f"unwritten sector at offset {lost} inside the "
                                       f"commit that ends at {rec_end}: it never completed")
                what = ("the commit it belongs to is complete (its marker at offset "
                        f"{at}, seq {rec.seq})" if rec.is_commit
                        else f"a valid record follows at offset {at}")
                return StopVerdict(False, f"{stop.detail or stop.kind.value} at offset {pos}, "
                                   f"and {what}: damage, not a torn write")
        if overlapped is not None:
            lost = _lost_sector(f, pos, overlapped)
            if lost is not None:
                return StopVerdict(True, f"unwritten sector at offset {lost} in the commit "
                                   f"that ends at {overlapped}, written while later commits "
                                   "were in flight: none of them was acknowledged")
            return StopVerdict(False, f"{stop.detail or stop.kind.value} at offset {pos}, "
                               f"and every sector up to the next commit (offset {overlapped})"
                               " was written: damage, not a torn write")
        # no complete commit after the stop: the end of the log, torn or damaged
        written = _written_end(f, size)
        if written <= pos:
            return StopVerdict(True, "only zeros follow: space the writer had reserved")
        lost = _lost_sector(f, pos, written)
        if lost is not None:
            return StopVerdict(True, f"unwritten sector at offset {lost}: the last commit "
                               "never completed")
        if pos + logrecord.HEADER_V1_1_LEN > written:
            return StopVerdict(True, "the last record's header was never completely written")
        try:
            header = logrecord.decode_header(os.pread(f.fileno(), logrecord.MAX_HEADER_LEN,
                                                      pos))
        except RecordError as exc:
            if exc.problem is Problem.SHORT:
                return StopVerdict(True, "the file ends inside the last record")
            return StopVerdict(False, f"{exc.problem.value} at offset {pos}, and every "
                               f"sector up to offset {written} was written: damage, not a "
                               "torn write")
        if pos + header.record_len > written:
            return StopVerdict(True, f"the last record ends at offset {pos + header.record_len}"
                               f" but the file holds data only to {written}: it was never "
                               "completely written")
        return StopVerdict(False, f"{stop.detail or stop.kind.value} at offset {pos}: every "
                           f"sector of the record (to offset {pos + header.record_len}) was "
                           "written, so it is damage, not a torn write")


def _written_end(f: BinaryIO, size: int) -> int:
    """The end of the file's last non-zero byte."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 20))
        chunk = os.pread(f.fileno(), end - start, start)
        stripped = chunk.rstrip(b"\0")
        if stripped:
            return start + len(stripped)
        end = start
    return 0


def _lost_sector(f: BinaryIO, start: int, end: int) -> int | None:
    """The offset of the first piece of ``[start, end)`` between sector boundaries that is
    all zeros (a sector that was never written), if any."""
    pos = start
    while pos < end:
        chunk = os.pread(f.fileno(), min(READ_CHUNK, end - pos), pos)
        if not chunk:
            return pos  # the file ends early
        view = memoryview(chunk)
        piece = pos
        while piece < pos + len(chunk):
            nxt = min((piece // SECTOR + 1) * SECTOR, pos + len(chunk))
            if not any(view[piece - pos:nxt - pos]):
                return piece
            piece = nxt
        pos += len(chunk)
    return None


def _valid_records_after(f: BinaryIO, pos: int, size: int
                         ) -> Iterator[tuple[int, int, LogRecord]]:
    """Valid records that start after ``pos`` (found by their magic), in file order, up
    to and including the first commit marker or record of format 1.0."""
    magic = logrecord.MAGIC.to_bytes(4, "little")
    at = pos + 1
    while at < size:
        window = os.pread(f.fileno(), min(READ_CHUNK, size - at), at)
        hit = window.find(magic)
        if hit < 0:
            at += max(1, len(window) - 3)
            continue
        at += hit
        try:
            header = logrecord.decode_header(os.pread(f.fileno(), logrecord.MAX_HEADER_LEN,
                                                      at))
            raw = os.pread(f.fileno(), header.record_len, at)
            rec, rel_end = logrecord.decode(raw)
        except RecordError:
            at += 1
            continue
        yield at, at + rel_end, rec
        if rec.is_commit or not rec.has_commit_marks:
            return
        at += rel_end


def read_all(path: Path, start: int = 0, expect_seq: int | None = None) -> list[LogRecord]:
    """Every record of a logfile that must be intact; raises LogCorrupt otherwise."""
    scanner = LogScanner(path, start, expect_seq)
    records = [rec for _, _, rec in scanner]
    assert scanner.stop is not None
    if not scanner.stop.clean:
        raise LogCorrupt(str(path), scanner.stop.offset, scanner.stop.kind.value)
    return records


def first_record_stamp(path: Path) -> int | None:
    """The stamp (ns since the epoch) of the first record of a logfile: when its oldest
    data was written. None while it holds no valid record (new, empty or zero-filled)."""
    try:
        with open(path, "rb", buffering=0) as f:
            head = os.pread(f.fileno(), logrecord.MAX_HEADER_LEN, 0)
    except FileNotFoundError:
        return None
    try:
        return logrecord.decode_header(head).stamp_ns
    except RecordError:
        return None
