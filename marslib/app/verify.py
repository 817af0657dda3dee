"""Check the data set the writer left on the filesystem.

Every chunk is read whole and walked record by record: each record's crc32c must hold and
the seqs must run 1, 2, 3, ... without a gap or a repeat across all chunks. The highest
seq found must reach ``min_seq`` (typically the seq an earlier host acknowledged in its
``acked.json``): then no acknowledged record was lost. A record cut short at the very end of
the newest chunk is a write in progress (or one a crash interrupted before its fsync); it is
accepted only with ``allow_torn_tail``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from marslib.app.records import chunk_name, list_chunks, scan_chunk


class VerifyFailed(Exception):
    """The data set is damaged; ``report`` has the counts up to the damage."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def verify_data(data_dir: Path, min_seq: int = 0,
                allow_torn_tail: bool = False) -> dict[str, Any]:
    """Counts of a sound data set, or VerifyFailed naming the chunk file and offset."""
    t0 = time.monotonic()
    hosts: dict[str, int] = {}
    report: dict[str, Any] = {"records": 0, "bytes": 0, "chunks": 0, "first_seq": None,
                              "last_seq": 0, "hosts": hosts, "torn_tail": None}

    def fail(message: str, chunk: str | None = None, offset: int | None = None) -> VerifyFailed:
        report.update(error=message, chunk=chunk, offset=offset,
                      seconds=round(time.monotonic() - t0, 3))
        return VerifyFailed(message, report)

    if not data_dir.is_dir():
        if min_seq > 0:
            raise fail(f"{data_dir} does not exist: no records at all, but --min-seq "
                       f"{min_seq} were acknowledged")
        report["seconds"] = round(time.monotonic() - t0, 3)
        return report
    chunks = list_chunks(data_dir)  # the newest chunk is the last one listed now
    expect = 1
    prev_index = -1
    for pos, (index, path) in enumerate(chunks):
        if index != prev_index + 1:
            missing = chunk_name(prev_index + 1)
            raise fail(f"{missing} is missing (the next chunk is {path.name})", missing, 0)
        prev_index = index
        data = path.read_bytes()
        scan, gap = scan_chunk(path, data, hosts, expect_seq=expect)
        report["chunks"] += 1
        report["records"] += scan.records
        report["bytes"] += scan.good_end
        if scan.records:
            if report["first_seq"] is None:
                report["first_seq"] = scan.first_seq
            report["last_seq"] = scan.last_seq
            expect = scan.last_seq + 1
        if gap is not None:
            raise fail(f"{path.name} offset {scan.good_end}: {gap}", path.name, scan.good_end)
        if scan.error is not None:
            err = scan.error
            newest = pos == len(chunks) - 1
            if newest and scan.torn_tail():
                if not allow_torn_tail:
                    raise fail(f"{path.name} offset {err.offset}: torn record at the end of the "
                               f"newest chunk ({err.reason}); pass --allow-torn-tail while "
                               "the writer runs", path.name, err.offset)
                report["torn_tail"] = {"chunk": path.name, "offset": err.offset,
                                       "bytes": scan.size - err.offset, "reason": err.reason}
            else:
                raise fail(f"{path.name} offset {err.offset}: bad record after seq "
                           f"{expect - 1}: {err.reason}", path.name, err.offset)
    if report["last_seq"] < min_seq:
        lost = min_seq - report["last_seq"]
        raise fail(f"the last record is seq {report['last_seq']} but seq {min_seq} was "
                   f"acknowledged: {lost} acknowledged record(s) lost")
    seconds = time.monotonic() - t0
    report["seconds"] = round(seconds, 3)
    report["mb_per_s"] = round(report["bytes"] / 1e6 / seconds, 1) if seconds > 0 else None
    return report
