"""Damage versus a torn tail: what recovery refuses, what it may cut, and a primary that
restarts under fetching secondaries.

- A log that ends before a position this host recorded as durable is damage (refused).
- A flipped byte in the last acknowledged record is damage (refused), while an
  incomplete last group commit is a torn tail (cut).
- The scanner ends when its file shrinks under it; the fetch server never scans on the
  event loop nor serves a logfile that recovery is still changing.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    NBD_CLIENT,
    REPO,
    SYSTEM_PYTHON,
    BlockDev,
    MarsHost,
    loopback_ips,
    nbd_client,
    needs_libnbd,
    wait_in_sync,
)

from marslib import logfile
from marslib.device import Device
from marslib.errors import LogCorrupt
from marslib.fetch import FetchService
from marslib.formats import logrecord
from marslib.formats.frame import Frame, FrameType
from marslib.formats.logrecord import LogRecord, encode, seal_commit
from marslib.layout import MarsPaths
from marslib.logfile import LogAppender, LogScanner, StopKind
from marslib.logger import Logger, LoggerConfig
from marslib.meta import MetaStore
from marslib.position import LogPosition

HOST = "h1"


def block(value: int, size: int = 4096) -> bytes:
    return bytes([value]) * size


class Site:
    """A state root and a device for one in-process logger."""

    def __init__(self, root: Path, dev: BlockDev) -> None:
        self.paths = MarsPaths(root, root.parent / "run")
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.paths.resource_dir("r0").mkdir(exist_ok=True)
        self.meta = MetaStore(self.paths.root)
        self.meta.set(f"resource-r0/replay-{HOST}", LogPosition(1, 0, 0, HOST).encode())
        self.dev = dev

    def logger(self) -> Logger:
        return Logger("r0", HOST, self.paths, self.meta, Device(self.dev.path), LoggerConfig())

    @property
    def log(self) -> Path:
        return self.paths.logfile("r0", 1, HOST)

    def crash_after_writes(self, values: list[int] | list[list[int]]) -> None:
        """Acknowledged writes, then kill -9 of the process that made them: no clean stop,
        so the reserved zeros stay and the position is wherever the writeback left it.
        ``values`` are written one after the other, each its own group commit; a nested
        list is written at once (one commit)."""
        batches = [v if isinstance(v, list) else [v] for v in values]
        code = f"""
import asyncio, os, signal
from pathlib import Path
from marslib.device import Device
from marslib.layout import MarsPaths
from marslib.logger import Logger
from marslib.meta import MetaStore
async def go():
    paths = MarsPaths(Path({str(self.paths.root)!r}), Path({str(self.paths.run_dir)!r}))
    lg = Logger("r0", {HOST!r}, paths, MetaStore(paths.root), Device({self.dev.path!r}))
    await lg.start()
    slot = 0
    for batch in {batches!r}:
        await asyncio.gather(*(lg.write((slot + i) * 4096, bytes([v]) * 4096)
                               for i, v in enumerate(batch)))
        slot += len(batch)
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(go())
"""
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ,
                             "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert out.returncode == -9, f"the writer did not die by kill -9: {out}"

    def forget_position(self) -> None:
        """Recovery then reads the whole log (as after a crash before the first save)."""
        self.meta.set(f"resource-r0/replay-{HOST}", LogPosition(1, 0, 0, HOST).encode())

    def records(self) -> list[tuple[int, int, LogRecord]]:
        return list(LogScanner(self.log))

    def recover(self) -> logfile.StopVerdict | Exception:
        lg = self.logger()
        try:
            report = asyncio.run(lg.start())
        except LogCorrupt as exc:
            return exc
        finally:
            lg.device.close()
        return logfile.StopVerdict(True, report.torn_tail or "")


@pytest.fixture
def site(tmp_path: Path, blockdev: BlockDev) -> Iterator[Site]:
    yield Site(tmp_path / "mars", blockdev)


def flip(path: Path, offset: int) -> bytes:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(raw)
    return bytes(raw)


# ------------------------------------------------------------------ the format
def test_every_group_commit_ends_with_a_sealed_marker(tmp_path: Path) -> None:
    app = LogAppender(tmp_path / "log")
    batches = [[1, 2, 3], [4], [5, 6]]
    for batch in batches:
        app.append([encode(LogRecord(seq=s, offset=0, data=block(s, 100))) for s in batch])
    app.close()
    recs = list(LogScanner(tmp_path / "log"))
    commits = [(at, rec) for at, _, rec in recs if rec.is_commit]
    assert [rec.seq for _, rec in commits] == [3, 4, 6]
    starts = [recs[0][0], recs[3][0], recs[4][0]]
    assert [rec.commit_start for _, rec in commits] == starts
    assert [rec.commit_records for _, rec in commits] == [3, 1, 2]
    assert all(rec.format_version == 0x0102 for _, _, rec in recs)


def test_a_format_1_0_record_is_read_and_counts_as_committed() -> None:
    old = encode(LogRecord(seq=7, offset=4096, data=b"old", format_version=0x0100))
    assert len(old) == logrecord.HEADER_V1_LEN + 3
    rec, _ = logrecord.decode(old)
    assert bytes(rec.data) == b"old" and not rec.has_commit_marks and not rec.is_commit
    with pytest.raises(ValueError, match="no commit marks"):
        seal_commit(old, 0, 1)


# ------------------------------------------------- hole: bit rot in the last record
@pytest.mark.parametrize("where", ["payload", "stamp", "length"])
def test_bit_rot_in_the_last_acknowledged_record_is_refused(site: Site, where: str) -> None:
    site.crash_after_writes([1, 2, 3, 4])
    site.forget_position()
    at, end, last = site.records()[-1]
    assert last.is_commit and last.seq == 4
    offset = {"payload": end - 100, "stamp": at + 20, "length": at + 40}[where]
    damaged = flip(site.log, offset)
    result = site.recover()
    assert isinstance(result, LogCorrupt), f"acknowledged write cut as a torn tail: {result}"
    assert result.offset == at and "damage" in str(result)
    assert "marsadm primary --force r0" in str(result)
    assert site.log.read_bytes() == damaged, "a damaged log must not be cut"


def test_damage_before_a_later_complete_commit_is_refused(site: Site) -> None:
    site.crash_after_writes([1, 2, 3, 4])
    site.forget_position()
    at, end, _ = site.records()[1]
    raw = bytearray(site.log.read_bytes())
    first_sector = (at // 512 + 1) * 512
    raw[first_sector:first_sector + 512] = bytes(512)  # as if that sector never landed
    site.log.write_bytes(raw)
    result = site.recover()
    assert isinstance(result, LogCorrupt) and "was acknowledged" in str(result)
    assert site.log.read_bytes() == bytes(raw)


def test_an_incomplete_last_commit_is_a_torn_tail_and_cut(site: Site) -> None:
    # one commit of three records: the writes are queued before the committer runs
    site.crash_after_writes([[1], [2, 3, 4]])
    site.forget_position()
    recs = site.records()
    assert [r.commit_records for _, _, r in recs if r.is_commit] == [1, 3]
    raw = bytearray(site.log.read_bytes())
    # a sector in the middle of the last commit never reached the disk, its marker did
    sector = (recs[2][0] // 512 + 1) * 512
    raw[sector:sector + 512] = bytes(512)
    site.log.write_bytes(raw)
    result = site.recover()
    assert isinstance(result, logfile.StopVerdict) and result.torn, result
    assert "unwritten sector" in result.reason
    # the first commit stays; nothing of the torn one was acknowledged
    assert [r.seq for _, _, r in site.records()] == [1, 2]
    assert site.log.stat().st_size == recs[1][1]
    assert site.dev.read(0, 4096) == block(1)


def test_a_last_record_cut_short_is_a_torn_tail(site: Site) -> None:
    site.crash_after_writes([1, 2])
    site.forget_position()
    at, end, _ = site.records()[-1]
    raw = site.log.read_bytes()[:end - 1000]  # the last sectors of the record never landed
    site.log.write_bytes(raw + bytes(1 << 20))
    result = site.recover()
    assert isinstance(result, logfile.StopVerdict) and result.torn, result
    assert [r.seq for _, _, r in site.records()] == [1]


# --------------------------------------------- hole: a log cut below a durable position
def test_a_log_cut_below_the_saved_replay_position_is_refused(site: Site) -> None:
    site.crash_after_writes(list(range(1, 11)))
    lg = site.logger()  # a clean recovery records the whole log as applied
    asyncio.run(lg.start())
    lg.device.close()
    saved = LogPosition.decode(site.meta.get(f"resource-r0/replay-{HOST}") or "")
    recs = site.records()
    assert saved.offset == recs[-1][1]
    middle = recs[5][0] + 2000  # inside record 6, below the saved position
    with open(site.log, "r+b") as f:
        f.truncate(middle)
    before = site.log.read_bytes()
    result = site.recover()
    assert isinstance(result, LogCorrupt), f"a cut log was accepted: {result}"
    text = str(result)
    assert f"recorded offset {saved.offset}" in text and "missing" in text
    assert "copy it back" in text
    assert site.log.read_bytes() == before, "nothing may be appended after a fragment"


def test_a_log_shorter_than_its_version_link_is_refused(site: Site) -> None:
    async def go() -> None:
        lg = site.logger()
        await lg.start()
        for i in range(1, 6):
            await lg.write(i * 4096, block(i))
        await lg.rotate()
        await lg.write(0, block(9))
        await lg.stop()
        lg.device.close()
    asyncio.run(go())
    site.forget_position()  # only the version link of logfile 1 remains as a fact
    recs = site.records()
    with open(site.log, "r+b") as f:
        f.truncate(recs[2][1])  # a clean record boundary, but short of the link's end
    result = site.recover()
    assert isinstance(result, LogCorrupt) and "missing" in str(result)


# ------------------------------------------------------- hole: scanner and fetch
def test_the_scanner_ends_when_its_file_shrinks(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfile, "READ_CHUNK", 8192)
    path = tmp_path / "log"
    app = LogAppender(path)
    for s in range(1, 9):
        app.append([encode(LogRecord(seq=s, offset=0, data=block(s)))])
    valid = app.size
    os.close(app.fd)  # a crash: the reserved zeros stay
    assert path.stat().st_size > valid
    scanner = LogScanner(path)
    seen: list[int] = []
    done = threading.Event()

    def scan() -> None:
        for _, _, rec in scanner:
            if not seen:
                os.truncate(path, valid)  # recovery releases the reserved space
            seen.append(rec.seq)
        done.set()

    worker = threading.Thread(target=scan, daemon=True)
    worker.start()
    assert done.wait(60), "the scanner never ended after its file shrank"
    assert scanner.stop is not None and scanner.stop.kind is StopKind.CHANGED
    assert seen and seen == list(range(1, len(seen) + 1))


def test_the_scanner_reads_on_while_its_file_grows(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A secondary's copy grows while its replayer scans it: that is no damage."""
    monkeypatch.setattr(logfile, "READ_CHUNK", 8192)
    path = tmp_path / "log"
    app = LogAppender(path, prealloc=0)
    for s in range(1, 9):
        app.append([encode(LogRecord(seq=s, offset=0, data=block(s)))])
    first_end = app.size
    scanner = LogScanner(path, limit=first_end)
    seen = []
    for _, _, rec in scanner:
        if not seen:  # the fetcher appends more while the scan runs
            app.append([encode(LogRecord(seq=9, offset=0, data=block(9)))])
        seen.append(rec.seq)
    app.close()
    assert seen == list(range(1, 9))
    assert scanner.stop is not None and scanner.stop.clean and scanner.stop.offset == first_end


def test_fetch_waits_for_recovery_and_serves_only_complete_commits(tmp_path: Path) -> None:
    paths = MarsPaths(tmp_path / "mars", tmp_path / "run")
    paths.resource_dir("r0").mkdir(parents=True)
    path = paths.logfile("r0", 1, HOST)
    app = LogAppender(path)
    app.append([encode(LogRecord(seq=1, offset=0, data=block(1)))])
    committed = app.size
    # an incomplete commit after it: records without their marker
    os.pwrite(app.fd, encode(LogRecord(seq=2, offset=0, data=block(2))), committed)
    os.close(app.fd)
    recovering = {"r0"}
    service = FetchService(paths, lambda _: None, lambda name: name in recovering)
    request = Frame(FrameType.FETCH_REQ, {"resource": "r0", "logfile": path.name,
                                          "offset": 0, "max_len": 1 << 20, "wait": 0.3})

    async def ask() -> Frame:
        return await service.handle(request, None)  # type: ignore[arg-type]
    reply = asyncio.run(ask())
    assert reply.get("recovering") and not reply.payload, "served while recovering"
    recovering.clear()
    reply = asyncio.run(ask())
    assert reply.get("end") == committed and len(reply.payload) == committed


# ------------------------------------------- the same holes through marsd itself
def wait_for(cond: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fua_write(host: MarsHost, offset: int, data: bytes) -> None:
    nbd_client(host.nbd_uri("r0"), "pwrite", str(offset), data.hex(), "fua")


@needs_libnbd
def test_marsd_refuses_a_log_cut_below_its_replay_position(tmp_path: Path) -> None:
    dev = BlockDev(tmp_path / "a.img", 16 << 20)
    h = MarsHost(tmp_path / "a", "alpha", loopback_ips(1)[0])
    try:
        h.serve(dev.path)
        for i in range(1, 9):
            fua_write(h, i * 4096, block(i))
        meta = MetaStore(h.root)
        key = f"resource-r0/replay-{h.name}"
        wait_for(lambda: meta.get(key) == h.status()["log_end"],
                 "the writeback to save the whole log as applied")
        h.kill9()
        log = sorted((h.root / "resource-r0").glob("log-*"))[-1]
        recs = list(LogScanner(log))
        with open(log, "r+b") as f:
            f.truncate(recs[4][0] + 1000)
        before = log.read_bytes()
        h.start()
        err_key = f"resource-r0/actual-{h.name}/error"
        wait_for(lambda: meta.get(err_key), "marsd to refuse the resource")
        err = meta.get(err_key) or ""
        assert "missing" in err and log.name in err, err
        view = h.marsadm("view", "r0")
        assert "missing" in str(view)
        assert log.read_bytes() == before, "marsd appended after a fragment"
    finally:
        h.stop()
        dev.close()


@needs_libnbd
@pytest.mark.parametrize("cycles", [12, pytest.param(100, marks=pytest.mark.soak)])
def test_primary_killed_and_restarted_under_fetching_secondaries(tmp_path: Path,
                                                                 cycles: int) -> None:
    """Each restart recovers while two secondaries keep asking for the log: marsd must
    answer its control socket and the secondaries end identical to the primary."""
    ips = loopback_ips(3)
    devs = [BlockDev(tmp_path / f"{n}.img", 32 << 20) for n in "abc"]
    hosts = [MarsHost(tmp_path / n, n, ip) for n, ip in zip(("a", "b", "c"), ips,
                                                                strict=True)]
    a, b, c = hosts
    try:
        a.serve(devs[0].path, "--max-logfile-size", str(1 << 20))
        b.join(a, devs[1].path)
        c.join(a, devs[2].path)
        for cycle in range(cycles):
            wait_for(lambda: a.status().get("log_end"), "the primary to serve r0 again")
            w = subprocess.Popen([SYSTEM_PYTHON, str(NBD_CLIENT), a.nbd_uri("r0"), "writer",
                                  str(cycle + 1), "8", "64", "65536", "30"],
                                 stdout=subprocess.PIPE, text=True)
            assert w.stdout is not None
            acked = 0
            for line in w.stdout:  # kill once the writer has writes acknowledged
                acked += line.startswith("A ")
                if acked >= 50:
                    break
            assert acked >= 50, f"cycle {cycle}: the writer ended early"
            a.kill9()
            w.wait(timeout=60)
            a.start(*["--max-logfile-size", str(1 << 20)])
            assert a.status() is not None  # the control socket answers after recovery
            a.marsadm("view", "r0", timeout=30)
        wait_in_sync(a, b, timeout=120)
        wait_in_sync(a, c, timeout=120)
        for h in (b, c):
            h.marsadm("pause-replay", "r0")
        a.marsadm("down", "r0")
        assert devs[1].read() == devs[0].read() == devs[2].read()
    finally:
        for h in hosts:
            h.stop()
        for d in devs:
            d.close()
