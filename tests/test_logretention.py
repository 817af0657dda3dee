"""Logfile retention (marslib/logretention.py): which logfiles may go, when the active one
is due for rotation, and marsd's ``log-delete`` and ``cron`` that act on it. The age of a
logfile is its first record's stamp, so a logfile written all the time still rotates."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SYSTEM_PYTHON, BlockDev, MarsHost, WriterLines, needs_libnbd, wait_until

from marslib import control
from marslib.errors import UsageError
from marslib.formats import logrecord
from marslib.formats.logrecord import LogRecord
from marslib.layout import MarsPaths, logfile_name
from marslib.logfile import LogAppender, first_record_stamp
from marslib.logretention import (
    applied_logfiles,
    deletable_logfiles,
    delete_logfiles,
    rotation_due,
)
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import ResourceKeys

R = ResourceKeys("r0")


@pytest.fixture
def tree(tmp_path: Path) -> tuple[MetaStore, MarsPaths]:
    paths = MarsPaths(tmp_path / "mars", tmp_path / "run")
    paths.resource_dir("r0").mkdir(parents=True)
    return MetaStore(paths.root), paths


def make_logfiles(paths: MarsPaths, numbers: range, host: str = "alpha") -> None:
    for n in numbers:
        paths.logfile("r0", n, host).write_bytes(b"x" * (100 * n))


def test_deletable_logfiles_are_those_every_member_has_applied(
        tree: tuple[MetaStore, MarsPaths]) -> None:
    meta, paths = tree
    make_logfiles(paths, range(1, 6))
    assert deletable_logfiles(meta, paths, "r0") == []  # no member has a position yet
    meta.set(R.replay("alpha"), LogPosition(5, 100, 40, "alpha").encode())
    meta.set(R.replay("beta"), LogPosition(3, 0, 20, "alpha").encode())
    assert [p.name for p in deletable_logfiles(meta, paths, "r0")] == \
        [logfile_name(1, "alpha"), logfile_name(2, "alpha")]  # the slowest member: beta
    meta.delete(R.replay("beta"))  # left the resource: only alpha counts
    assert [p.name for p in deletable_logfiles(meta, paths, "r0")] == \
        [logfile_name(n, "alpha") for n in range(1, 5)]
    meta.set(R.replay("alpha"), LogPosition(9, 0, 90, "alpha").encode())
    names = [p.name for p in deletable_logfiles(meta, paths, "r0")]
    assert logfile_name(5, "alpha") not in names, "the newest logfile never goes"
    meta.set(R.replay("gamma"), "garbage")  # a damaged value counts as missing
    assert len(deletable_logfiles(meta, paths, "r0")) == 4


def test_applied_logfiles_ignore_the_other_members(tree: tuple[MetaStore, MarsPaths]) -> None:
    _, paths = tree
    make_logfiles(paths, range(1, 4))
    got = applied_logfiles(paths, "r0", LogPosition(3, 10, 7, "alpha"))
    assert [p.name for p in got] == [logfile_name(1, "alpha"), logfile_name(2, "alpha")]


def test_delete_logfiles_frees_their_bytes(tree: tuple[MetaStore, MarsPaths]) -> None:
    _, paths = tree
    make_logfiles(paths, range(1, 4))
    doomed = [paths.logfile("r0", 1, "alpha"), paths.logfile("r0", 2, "alpha")]
    assert delete_logfiles(doomed, "r0") == 300
    assert [p.name for _, _, p in paths.logfiles("r0")] == [logfile_name(3, "alpha")]
    assert delete_logfiles(doomed, "r0") == 0  # gone already


def test_rotation_due_by_size_or_by_the_age_of_the_first_record() -> None:
    pos = LogPosition(4, 1000, 9, "alpha")
    now = 10_000.0
    assert rotation_due(pos, now - 5, now, rotate_size=2000, rotate_age=60) is None
    assert "bytes" in (rotation_due(pos, now - 5, now, rotate_size=1000, rotate_age=60) or "")
    assert "old" in (rotation_due(pos, now - 60, now, rotate_size=2000, rotate_age=60) or "")
    assert rotation_due(pos, None, now, rotate_size=2000, rotate_age=0) is None  # no record
    empty = LogPosition(4, 0, 9, "alpha")
    assert rotation_due(empty, now - 1e6, now, rotate_size=0, rotate_age=0) is None


def test_first_record_stamp_reads_the_first_header(tmp_path: Path) -> None:
    path = tmp_path / logfile_name(1, "alpha")
    assert first_record_stamp(path) is None  # no such file
    app = LogAppender(path, direct=False)
    try:
        assert first_record_stamp(path) is None  # empty
        stamps = (1_700_000_000_123_456_789, 1_800_000_000_000_000_000)
        for i, stamp in enumerate(stamps):
            app.append([logrecord.encode(LogRecord(seq=i + 1, offset=4096 * i,
                                                   data=b"d" * 4096, stamp_ns=stamp))])
    finally:
        app.close()
    assert first_record_stamp(path) == stamps[0]
    zeros = tmp_path / logfile_name(2, "alpha")
    zeros.write_bytes(bytes(8192))  # reserved space, no record yet
    assert first_record_stamp(zeros) is None


# ------------------------------------------------------------------ marsd
# an application that writes one block every 0.1 s and says "A n" for each acknowledgement
BUSY = """
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n = 0
while True:
    n += 1
    h.pwrite(n.to_bytes(8, "little") * 512, 4096 * (n % 64))
    print(f"A {n}", flush=True)
    time.sleep(0.1)
"""


@pytest.fixture
def busy(host: MarsHost, blockdev: BlockDev) -> Iterator[WriterLines]:
    host.serve(blockdev.path)
    proc = subprocess.Popen([SYSTEM_PYTHON, "-c", BUSY, host.nbd_uri("r0")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = WriterLines(proc)
    yield lines
    proc.kill()
    proc.wait()


def ask(host: MarsHost, cmd: str, **args: object) -> dict:  # type: ignore[type-arg]
    return control.request(host.run_dir / "marsd.sock", cmd, **args)


@needs_libnbd
def test_cron_rotates_a_busy_logfile_by_the_age_of_its_first_record(
        host: MarsHost, busy: WriterLines) -> None:
    busy.wait_acks(3, "the application")
    first = LogPosition.decode(host.status()["log_end"])
    path = host.root / "resource-r0" / first.logfile
    stamp = first_record_stamp(path)
    assert stamp is not None
    big = 1 << 30
    # fresh: nothing to do for an age of 60 s
    reply = ask(host, "cron", rotate_size=big, rotate_age=60, dry_run=True)
    assert "would_rotate" not in reply["actions"].get("r0", {}), reply
    # the first record grows old while the application keeps writing (every append
    # refreshes the file's ctime, which is what cron measured before)
    wait_until(lambda: time.time() - stamp / 1e9 >= 1.0, "the first record is 1 s old")
    busy.wait_acks(busy.acks + 2, "the application after the first second")
    dry = ask(host, "cron", rotate_size=big, rotate_age=1.0, dry_run=True)
    assert dry["actions"]["r0"]["would_rotate"] == first.logfile
    assert LogPosition.decode(host.status()["log_end"]).number == first.number
    reply = ask(host, "cron", rotate_size=big, rotate_age=1.0, dry_run=False)
    action = reply["actions"]["r0"]
    assert action["rotated_to"] == logfile_name(first.number + 1, "alpha"), reply
    assert "old" in action["reason"]
    # the new logfile is fresh: an age of 30 s leaves it alone
    busy.wait_acks(busy.acks + 2, "the application in the new logfile")
    again = ask(host, "cron", rotate_size=big, rotate_age=30, dry_run=True)
    assert "would_rotate" not in again["actions"].get("r0", {}), again
    # cron deletes the old logfile once this (only) member has applied past it (the
    # rotating call itself may have done it already)
    wait_until(lambda: ask(host, "cron", rotate_size=big, rotate_age=3600)["ok"]
               and not path.exists(), "cron deletes the rotated logfile")
    second = logfile_name(first.number + 1, "alpha")
    assert [p.name for p in sorted(path.parent.glob("log-*"))] == [second]

    # log-delete: the logfile before a rotation, once applied; never the newest
    third = ask(host, "log-rotate", resource="r0")["logfile"]
    wait_until(lambda: ask(host, "log-delete", resource="r0", dry_run=True)["deleted"]
               == [second], f"{second} becomes deletable")
    old = path.parent / second
    size = old.stat().st_size  # finished at rotation: its records, no reserve
    assert ask(host, "log-delete", resource="r0", dry_run=True)["bytes_freed"] == size
    assert old.exists()
    gone = ask(host, "log-delete", resource="r0", dry_run=False)
    assert gone["deleted"] == [second] and gone["bytes_freed"] == size
    assert [p.name for p in sorted(path.parent.glob("log-*"))] == [third]
    assert ask(host, "log-delete", resource="r0", dry_run=False)["deleted"] == []


@needs_libnbd
def test_log_delete_refuses_a_bad_resource_name(host: MarsHost, blockdev: BlockDev) -> None:
    host.serve(blockdev.path)
    with pytest.raises(UsageError, match="invalid resource name"):
        ask(host, "log-delete", resource="../etc", dry_run=True)
    assert os.path.isdir(host.root / "resource-r0")
