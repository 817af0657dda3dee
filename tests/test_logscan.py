"""logscan: which blocks the local logfiles wrote, from record headers only
(written_blocks for a resync, TouchIndex for verify), on generated logfiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from marslib import logscan
from marslib.blockset import BLOCK_SIZE
from marslib.formats.logrecord import FLAG_END, FLAG_GAP, LogRecord, encode, seal_commit
from marslib.layout import MarsPaths
from marslib.logscan import TouchIndex, written_blocks
from marslib.position import LogPosition

BS = BLOCK_SIZE
SIZE = 64 << 20
R = "r0"


class Logs:
    """Logfiles of resource r0 written like a primary writes them: each record a group
    commit of its own."""

    def __init__(self, root: Path) -> None:
        self.paths = MarsPaths(root, root.parent / "run")
        self.paths.resource_dir(R).mkdir(parents=True)
        self.seq = 0

    def write(self, number: int, writes: list[tuple[int, bytes]], host: str = "a",
              compress: int | None = None, flags: int = 0) -> LogPosition:
        """Append one record per (offset, data); the position after the last."""
        path = self.paths.logfile(R, number, host)
        with open(path, "ab") as f:
            for offset, data in writes:
                self.seq += 1
                rec = encode(LogRecord(self.seq, offset, data, flags=flags), compress)
                f.write(seal_commit(rec, f.tell(), 1))
            end = f.tell()
        return LogPosition(number, end, self.seq, host)

    def path(self, number: int, host: str = "a") -> Path:
        return self.paths.logfile(R, number, host)


@pytest.fixture
def logs(tmp_path: Path) -> Logs:
    return Logs(tmp_path / "mars")


def blocks_of(found: logscan.WrittenBlocks) -> list[int]:
    return list(found.blocks)


def test_marks_logical_lengths_of_compressed_records_and_block_edges(logs: Logs) -> None:
    zeros = bytes(3 * BS)  # compresses to almost nothing: stored_len << data_len
    logs.write(1, [(10 * BS, zeros)], compress=3)
    logs.write(1, [(BS - 100, b"x" * 200)])  # across the edge of blocks 0 and 1
    logs.write(1, [(40 * BS + 5, b"y")])
    size = os.path.getsize(logs.path(1))
    assert size < 3 * BS, "the record was not stored compressed: the test proves nothing"
    found = written_blocks(logs.paths, R, LogPosition(1, 0, 0, "a"), None, BS, SIZE)
    assert found.complete, found.reason
    assert blocks_of(found) == [0, 1, 10, 11, 12, 40]
    assert found.records == 3 and found.log_bytes == size


def test_since_inside_a_file_and_until_bound_the_scan(logs: Logs) -> None:
    first = logs.write(1, [(0, b"a" * 100), (BS, b"b" * 100)])
    second = logs.write(1, [(5 * BS, b"c" * 100)])
    logs.write(2, [(7 * BS, b"d" * 100)])
    end = logs.write(2, [(9 * BS, b"e" * 100)])
    found = written_blocks(logs.paths, R, first, None, BS, SIZE)
    assert found.complete and blocks_of(found) == [5, 7, 9]
    found = written_blocks(logs.paths, R, first, LogPosition(2, end.offset // 2 + 1, 0, "a"),
                           BS, SIZE)
    # the until position lies inside a record: reported, never silently cut
    assert found.missing and "crosses" in found.missing
    # until at a record boundary: the record before it counts, the one after does not
    boundary = LogPosition(2, end.offset - len(seal_commit(encode(LogRecord(
        1, 9 * BS, b"e" * 100)), 0, 1)), 0, "a")
    found = written_blocks(logs.paths, R, second, boundary, BS, SIZE)
    assert found.complete, found.reason
    assert blocks_of(found) == [7]
    # until at byte 0 of a logfile that does not exist yet (the primary just rotated)
    found = written_blocks(logs.paths, R, first, LogPosition(3, 0, 0, "a"), BS, SIZE)
    assert found.complete and blocks_of(found) == [5, 7, 9]


def test_a_gap_record_forces_a_full_comparison(logs: Logs) -> None:
    logs.write(1, [(0, b"a" * 10)])
    logs.write(2, [(0, b"")], flags=FLAG_GAP)
    logs.write(2, [(3 * BS, b"b" * 10)])
    found = written_blocks(logs.paths, R, LogPosition(1, 0, 0, "a"), None, BS, SIZE)
    assert found.gap and "log-000000002-a" in found.gap and not found.complete
    assert blocks_of(found) == [0, 3]


def test_a_missing_middle_number_or_a_short_first_file_is_missing(logs: Logs) -> None:
    logs.write(1, [(0, b"a" * 10)])
    logs.write(3, [(BS, b"b" * 10)])
    found = written_blocks(logs.paths, R, LogPosition(1, 0, 0, "a"), None, BS, SIZE)
    assert found.missing == "log-000000002-* is not here"  # its writer is not known
    size = os.path.getsize(logs.path(1))
    found = written_blocks(logs.paths, R, LogPosition(1, size + 100, 1, "a"),
                           LogPosition(1, size + 200, 2, "a"), BS, SIZE)
    assert found.missing and "only" in found.missing
    found = written_blocks(logs.paths, R, LogPosition(0, 50, 0, "a"), None, BS, SIZE)
    assert found.missing == "log-000000000-a is not here"
    # nothing at or after since (offset 0): nothing was written
    found = written_blocks(logs.paths, R, LogPosition(4, 0, 0, "a"), None, BS, SIZE)
    assert found.complete and found.blocks.count == 0


def test_other_hosts_files_of_the_since_number_are_read_whole(logs: Logs) -> None:
    since = logs.write(5, [(0, b"a" * 10)], host="a")
    logs.write(5, [(2 * BS, b"b" * 10)], host="a")
    logs.write(5, [(4 * BS, b"c" * 10), (6 * BS, b"c")], host="b")  # the other side's fork
    found = written_blocks(logs.paths, R, since, None, BS, SIZE)
    assert found.complete and blocks_of(found) == [2, 4, 6]


def test_a_damaged_header_is_missing_a_zero_tail_is_the_end(logs: Logs) -> None:
    logs.write(1, [(0, b"a" * 10), (BS, b"b" * 10)])
    path = logs.path(1)
    with open(path, "ab") as f:
        f.write(bytes(1 << 20))  # space the primary reserved ahead of its log
    found = written_blocks(logs.paths, R, LogPosition(1, 0, 0, "a"), None, BS, SIZE)
    assert found.complete and blocks_of(found) == [0, 1]
    first_len = len(seal_commit(encode(LogRecord(1, 0, b"a" * 10)), 0, 1))
    with open(path, "r+b") as f:
        f.seek(first_len + 20)  # inside the second record's header
        f.write(b"\x99")
    found = written_blocks(logs.paths, R, LogPosition(1, 0, 0, "a"), None, BS, SIZE)
    assert (found.missing or "").startswith(
        f"log-000000001-a: header checksum mismatch at offset {first_len} (")
    assert blocks_of(found) == [0]
    # damage followed by data: not a tail, whatever kind of bytes
    with open(path, "r+b") as f:
        f.seek(first_len)
        f.write(bytes(100))
        f.seek(first_len + 1000)
        f.write(b"late data")
    found = written_blocks(logs.paths, R, LogPosition(1, 0, 0, "a"), None, BS, SIZE)
    assert found.missing and "zero" in found.missing


def test_end_markers_and_writes_past_the_device_are_harmless(logs: Logs) -> None:
    logs.write(1, [(SIZE - 100, b"z" * 1000)])  # a grown resource's write, clipped
    logs.write(1, [(0, b"")], flags=FLAG_END)
    found = written_blocks(logs.paths, R, LogPosition(1, 0, 0, "a"), None, BS, SIZE)
    assert found.complete and blocks_of(found) == [SIZE // BS - 1]


def test_big_records_cost_a_header_read_each(logs: Logs, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    big = os.urandom(1 << 20)
    logs.write(1, [(i << 20, big) for i in range(12)])
    read = [0]
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        data = real(fd, n, off)
        read[0] += len(data)
        return data

    monkeypatch.setattr(logscan.os, "pread", counting)
    found = written_blocks(logs.paths, R, LogPosition(1, 0, 0, "a"), None, BS, SIZE)
    assert found.complete and found.blocks.count == 12 * 16
    # the first chunk holds 8 of them; after that one header each
    assert read[0] < (8 << 20) + 5 * 4096, f"read {read[0]} bytes of a 12 MiB log"


def test_touch_index_follows_the_log_and_refuses_what_it_cannot_vouch_for(logs: Logs
                                                                          ) -> None:
    start = logs.write(1, [(0, b"a" * 10)])
    p1 = logs.write(1, [(2 * BS, b"b" * 10), (3 * BS + BS - 1, b"c" * 2)])  # blocks 2, 3, 4
    idx = TouchIndex(logs.paths, R, start)
    assert idx.update() == LogPosition(1, p1.offset, 0, "a")
    assert idx.touched(start, p1, 0, 16 * BS) == [2, 3, 4]
    assert idx.touched(p1, start, 3 * BS, BS) == [3]  # either order; only the window
    p2 = logs.write(2, [(8 * BS, b"d" * (2 * BS))])  # the primary moved to a new logfile
    assert idx.touched(start, p2, 0, 16 * BS) is None  # not scanned yet
    assert idx.update().number == 2
    assert idx.touched(p1, p2, 0, 16 * BS) == [8, 9]
    assert idx.touched(LogPosition(1, 0, 0, "a"), p1, 0, 16 * BS) is None  # before start
    # a refetch cuts the copy of logfile 2: what was indexed of it may be stale
    with open(logs.path(2), "r+b") as f:
        f.truncate(10)
    idx.update()
    assert idx.touched(p1, LogPosition(2, 10, 0, "a"), 0, 16 * BS) is None
    idx.forget_before(LogPosition(2, 10, 0, "a"))
    assert idx.start == (2, 10)
