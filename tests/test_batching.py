"""The batched data path: one socket read is one batch, group commits are written several
at once and acknowledged in log order, and nothing of that loosens what is durable.

- a batch that mixes writes, reads of the blocks being written, flush, FUA and trim;
- a batch that spans a rotation;
- the commit pipeline: results in order when writes finish out of order, a failure
  reported for the failed commit and every later one, the log rolled back;
- recovery of a log whose last commits were in flight together (format 1.2): an
  incomplete commit followed by a complete one written beside it is a torn tail, not
  damage; a commit written after the bad one was durable still proves damage.
"""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BlockDev, wait_until
from test_logger import Setup, block
from test_nbd_server import LoopThread, RawClient

from marslib.committer import CommitPipeline
from marslib.errors import LogCorrupt
from marslib.formats import logrecord
from marslib.logfile import DIRECT_BLOCK, LogAppender, LogScanner, judge_stop
from marslib.nbd import protocol as p
from marslib.nbd.server import start_nbd_server
from marslib.resource import LoggerBackend

EXPORT = "r0"


@dataclass
class Export:
    lt: LoopThread
    setup: Setup
    path: str
    logger: object = None
    server: object = None

    def start(self, **cfg: object) -> None:
        lg = self.setup.logger(**cfg)
        self.lt.run(lg.start())
        self.logger = lg
        self.server = self.lt.run(start_nbd_server(self.path, EXPORT, LoggerBackend(lg)))

    def stop(self) -> None:
        self.lt.run(self.server.close())  # type: ignore[attr-defined]
        self.lt.run(self.logger.stop())  # type: ignore[attr-defined]
        self.logger.device.close()  # type: ignore[attr-defined]


@pytest.fixture
def export(tmp_path: Path, blockdev: BlockDev) -> Iterator[Export]:
    sock_dir = tempfile.mkdtemp(prefix="nbdb-")  # a unix socket path must stay short
    lt = LoopThread()
    exp = Export(lt, Setup(tmp_path / "mars", blockdev), os.path.join(sock_dir, "r0.nbd"))
    try:
        yield exp
    finally:
        if exp.server is not None:
            try:
                exp.stop()
            except Exception:
                pass
        lt.stop()
        os.rmdir(sock_dir)


def request(command: int, handle: int, offset: int, length: int, data: bytes = b"",
            flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, command, handle, offset,
                       length) + data


def replies(client: RawClient, reads: dict[int, int], count: int
            ) -> list[tuple[int, int, bytes]]:
    """``count`` replies in the order they came: (handle, error, data)."""
    out = []
    for _ in range(count):
        magic, error, handle = struct.unpack(">IIQ", client.recv_exact(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        data = client.recv_exact(reads[handle]) if handle in reads and not error else b""
        out.append((handle, error, data))
    return out


def test_a_batch_of_writes_reads_flush_fua_and_trim(export: Export) -> None:
    export.start()
    client = RawClient(export.path, EXPORT)
    assert client.write(1, 0, block(1)) == 0
    batch = b"".join([
        request(p.CMD_WRITE, 10, 0, 4096, block(2)),
        request(p.CMD_READ, 11, 0, 4096),  # the block being written: old or new, whole
        request(p.CMD_FLUSH, 12, 0, 0),
        request(p.CMD_WRITE, 13, 4096, 4096, block(3), flags=p.CMD_FLAG_FUA),
        request(p.CMD_TRIM, 14, 8192, 4096),
        request(p.CMD_READ, 15, 4096, 4096),
        request(p.CMD_WRITE, 16, 12288, 4096, block(4)),
        request(p.CMD_TRIM, 17, 16384, 4096, flags=p.CMD_FLAG_FUA),
    ])
    client.sock.sendall(batch)  # one send: the server reads it as one batch (or a few)
    got = replies(client, {11: 4096, 15: 4096}, 8)
    by_handle = {h: (err, data) for h, err, data in got}
    assert sorted(by_handle) == [10, 11, 12, 13, 14, 15, 16, 17]
    assert all(err == 0 for err, _ in by_handle.values()), got
    assert by_handle[11][1] in (block(1), block(2))
    assert by_handle[15][1] in (bytes(4096), block(3))
    order = [h for h, _, _ in got]
    assert order.index(12) > order.index(10), "the flush answered before the write before it"
    for handle, offset, want in ((20, 0, block(2)), (21, 4096, block(3)),
                                 (22, 8192, bytes(4096)), (23, 12288, block(4))):
        assert client.read(handle, offset, 4096) == (0, want)
    client.close()
    export.stop()
    export.server = None
    # recovery replays what was acknowledged
    export.start()
    client = RawClient(export.path, EXPORT)
    for handle, offset, want in ((30, 0, block(2)), (31, 4096, block(3)),
                                 (32, 12288, block(4))):
        assert client.read(handle, offset, 4096) == (0, want)
    client.close()


def test_a_bad_request_in_a_batch_fails_alone(export: Export) -> None:
    export.start()
    client = RawClient(export.path, EXPORT)
    size = client.size
    batch = b"".join([
        request(p.CMD_WRITE, 1, 0, 4096, block(7)),
        request(p.CMD_WRITE, 2, size - 2048, 4096, block(8)),  # past the end
        request(p.CMD_READ, 3, size, 4096),  # past the end
        request(p.CMD_WRITE, 4, 4096, 4096, block(9)),
    ])
    client.sock.sendall(batch)
    got = {h: err for h, err, _ in replies(client, {3: 4096}, 4)}
    assert got[1] == 0 and got[4] == 0
    assert got[2] == p.ENOSPC and got[3] == p.EINVAL
    assert client.read(5, 0, 8192) == (0, block(7) + block(9))
    client.close()


def test_a_batch_spanning_a_rotation(export: Export) -> None:
    export.start(max_logfile_size=64 << 10)
    client = RawClient(export.path, EXPORT)
    for round_ in range(3):
        batch = b"".join(request(p.CMD_WRITE, 100 * round_ + i, i * 4096, 4096,
                                 block(round_ * 40 + i + 1)) for i in range(40))
        client.sock.sendall(batch)  # 160 KiB: past the 64 KiB limit within a batch
        got = replies(client, {}, 40)
        assert all(err == 0 for _, err, _ in got)
    client.close()
    setup = export.setup
    wait_until(lambda: len(setup.paths.logfiles("r0")) >= 3, "the log rotated")
    export.stop()
    export.server = None
    seqs = [rec.seq for _, _, path in setup.paths.logfiles("r0")
            for _, _, rec in LogScanner(path) if rec.data_len]
    assert seqs == list(range(seqs[0], seqs[0] + 120)), "records lost or out of order"
    export.start(max_logfile_size=64 << 10)
    client = RawClient(export.path, EXPORT)
    for i in range(40):
        assert client.read(1000 + i, i * 4096, 4096) == (0, block(80 + i + 1))
    client.close()


# ------------------------------------------------------------- the commit pipeline
@dataclass
class FakeJob:
    name: str
    gate: threading.Event = field(default_factory=threading.Event)
    fail: bool = False

    def write(self) -> None:
        assert self.gate.wait(10), f"{self.name} never released"
        if self.fail:
            raise OSError(5, f"{self.name} failed")


class PipelineRig:
    def __init__(self, depth: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.jobs: list[FakeJob] = []
        self.results: list[tuple[list[str], object, object]] = []
        self.rolled_back: list[str] = []
        self.fail_names: set[str] = set()
        self.pipe: CommitPipeline[str, FakeJob, str] = CommitPipeline(
            "test-commit", prepare=self.prepare, complete=lambda job: job.name if job else "",
            rollback=lambda job: self.rolled_back.append(job.name), done=self.done,
            can_overlap=lambda: True, loop=self.loop, depth=depth)

    def prepare(self, batches: list[str], overlapping: bool) -> FakeJob:
        job = FakeJob("+".join(batches), fail="+".join(batches) in self.fail_names)
        self.jobs.append(job)
        return job

    def done(self, batches: list[str], result: object, error: object) -> None:
        self.results.append((batches, result, error))

    def spin_until(self, what: str, cond) -> None:  # type: ignore[no-untyped-def]
        async def wait() -> None:
            while not cond():
                await asyncio.sleep(0.001)
        self.loop.run_until_complete(asyncio.wait_for(wait(), 10))

    def close(self) -> None:
        for job in self.jobs:
            job.gate.set()
        self.pipe.stop()
        self.loop.close()


@pytest.fixture
def setup(tmp_path: Path, blockdev: BlockDev) -> Iterator[Setup]:
    yield Setup(tmp_path / "mars", blockdev)


@pytest.fixture
def rig() -> Iterator[PipelineRig]:
    r = PipelineRig(depth=3)
    yield r
    r.close()


def test_commits_in_flight_are_acknowledged_in_log_order(rig: PipelineRig) -> None:
    for name in ("a", "b", "c"):
        rig.pipe.put(name)
        rig.spin_until(f"{name} started", lambda n=name: any(j.name == n for j in rig.jobs))
    assert [j.name for j in rig.jobs] == ["a", "b", "c"], "the three were not in flight"
    rig.jobs[2].gate.set()  # c is durable first, then b: nothing may be acknowledged
    rig.jobs[1].gate.set()
    rig.spin_until("c and b back", lambda: rig.pipe._in_flight == 1)
    rig.loop.run_until_complete(asyncio.sleep(0.01))
    assert rig.results == []
    rig.jobs[0].gate.set()
    rig.spin_until("all delivered", lambda: len(rig.results) == 3)
    assert [r[0] for r in rig.results] == [["a"], ["b"], ["c"]]
    assert all(err is None for _, _, err in rig.results)
    assert rig.pipe.idle


def test_a_failed_commit_fails_every_later_one_and_rolls_back(rig: PipelineRig) -> None:
    rig.fail_names = {"b"}
    for name in ("a", "b", "c"):
        rig.pipe.put(name)
        rig.spin_until(f"{name} started", lambda n=name: any(j.name == n for j in rig.jobs))
    rig.jobs[2].gate.set()  # c written fine, but after b: it must not be acknowledged
    rig.jobs[1].gate.set()  # b fails
    rig.spin_until("b and c back", lambda: rig.pipe._in_flight == 1)
    rig.pipe.put("d")  # queued behind the failure: not started
    rig.loop.run_until_complete(asyncio.sleep(0.02))
    assert len(rig.jobs) == 3
    rig.jobs[0].gate.set()
    rig.spin_until("delivered", lambda: len(rig.results) == 2)
    assert rig.results[0] == (["a"], "a", None)
    failed, result, error = rig.results[1]
    assert failed == ["b", "c"] and result is None and isinstance(error, OSError)
    assert rig.rolled_back == ["b"]
    assert rig.pipe.queued() == ["d"]  # the loop decides: here it resumes
    rig.pipe.resume()
    rig.spin_until("d started", lambda: len(rig.jobs) == 4)
    rig.jobs[3].gate.set()
    rig.spin_until("d delivered", lambda: len(rig.results) == 3)
    assert rig.results[2] == (["d"], "d", None)


# ------------------------------------------------ the log of commits in flight together
def write_commits(path: Path, commits: list[tuple[list[tuple[int, bytes]], int, bool]],
                  first_seq: int = 1) -> list[tuple[int, int]]:
    """Write commits as the pipeline lays them out: (writes, durable_end or -1 for 'the
    commit's own start', padded) each; return each commit's (start, end)."""
    spans = []
    pos = 0
    seq = first_seq
    with open(path, "wb") as f:
        for writes, durable, align in commits:
            chunks, total = logrecord.encode_commit(writes, seq, pos, 1,
                                                    None if durable < 0 else durable, align)
            f.write(b"".join(bytes(c) for c in chunks))
            spans.append((pos, pos + total))
            pos += total
            seq += len(writes)
        f.write(bytes(DIRECT_BLOCK * 4))  # the zero-filled reserve
    return spans


def marker_of(span: tuple[int, int]) -> int:
    """Where the marker (last record) of a commit of two 4 KiB writes begins."""
    return span[0] + logrecord.HEADER_V1_2_LEN + 4096


def zero_sector_at(path: Path, at: int) -> None:
    """The sector holding ``at`` never reached the disk (it reads as zeros)."""
    raw = bytearray(path.read_bytes())
    sector = at - at % 512
    raw[sector:sector + 512] = bytes(512)
    path.write_bytes(bytes(raw))


def flip_bit_at(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


def scan_stop(path: Path):  # type: ignore[no-untyped-def]
    scanner = LogScanner(path)
    for _ in scanner:
        pass
    assert scanner.stop is not None
    return scanner.stop


W = [(i * 4096, bytes([i + 1]) * 4096) for i in range(6)]


def test_an_incomplete_commit_beside_a_later_complete_one_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "log"
    # commit 1 durable; 2 and 3 were in flight together (3 written when the log was
    # durable to the end of 1): power failed before 2 was complete
    spans = write_commits(path, [(W[:2], -1, True), (W[2:4], -1, True), (W[4:], 0, True)])
    spans_fixed = write_commits(path, [(W[:2], -1, True), (W[2:4], -1, True),
                                       (W[4:], spans[1][0], True)])
    assert spans_fixed == spans and spans[1][0] % DIRECT_BLOCK == 0
    zero_sector_at(path, marker_of(spans[1]))  # 2's marker and the end of its first write
    stop = scan_stop(path)
    assert stop.offset == spans[1][0]
    verdict = judge_stop(path, stop)
    assert verdict.torn, verdict.reason
    assert "in flight" in verdict.reason


def test_a_commit_written_after_the_bad_one_was_durable_proves_damage(tmp_path: Path) -> None:
    path = tmp_path / "log"
    spans = write_commits(path, [(W[:2], -1, True), (W[2:4], -1, True), (W[4:], -1, True)])
    # commit 3 was written when 2 was already durable (durable_end = its own start)
    flip_bit_at(path, marker_of(spans[1]) + 20)  # bit rot in 2's marker: 3 must prove it
    verdict = judge_stop(path, scan_stop(path))
    assert not verdict.torn
    assert "was written after it was durable" in verdict.reason


def test_bit_rot_beside_commits_in_flight_is_damage_when_no_sector_is_lost(
        tmp_path: Path) -> None:
    path = tmp_path / "log"
    spans = write_commits(path, [(W[:2], -1, True), (W[2:4], -1, True), (W[4:], 0, True)])
    write_commits(path, [(W[:2], -1, True), (W[2:4], -1, True), (W[4:], spans[1][0], True)])
    flip_bit_at(path, marker_of(spans[1]) + 20)  # every sector written, one bit flipped
    verdict = judge_stop(path, scan_stop(path))
    assert not verdict.torn, verdict.reason
    assert "every sector up to the next commit" in verdict.reason


def test_recovery_cuts_commits_that_were_in_flight_beside_a_torn_one(setup: Setup) -> None:
    path = setup.logfile(1)
    spans = write_commits(path, [(W[:2], -1, True), (W[2:4], -1, True), (W[4:], 0, True)])
    write_commits(path, [(W[:2], -1, True), (W[2:4], -1, True), (W[4:], spans[1][0], True)])
    zero_sector_at(path, marker_of(spans[1]))

    async def go() -> None:
        lg = setup.logger()
        report = await lg.start()
        assert report.records_replayed == 2 and report.torn_tail
        assert await lg.read(0, 8192) == W[0][1] + W[1][1]
        assert await lg.read(2 * 4096, 4 * 4096) == bytes(4 * 4096)
        await lg.stop()
        lg.device.close()
    asyncio.run(go())
    assert path.stat().st_size == spans[1][0]


def test_recovery_refuses_damage_proven_by_a_later_commit(setup: Setup) -> None:
    path = setup.logfile(1)
    spans = write_commits(path, [(W[:2], -1, True), (W[2:4], -1, True), (W[4:], -1, True)])
    flip_bit_at(path, marker_of(spans[1]) + 20)
    raw = path.read_bytes()

    async def go() -> None:
        lg = setup.logger()
        with pytest.raises(LogCorrupt, match="acknowledged"):
            await lg.start()
        lg.device.close()
    asyncio.run(go())
    assert path.read_bytes()[: spans[2][1]] == raw[: spans[2][1]], "recovery changed it"


def test_direct_appender_completes_out_of_order_in_order(tmp_path: Path) -> None:
    app = LogAppender(tmp_path / "log")
    assert app.direct, "this filesystem has no O_DIRECT: the test needs a real one"
    commits = []
    for i in range(3):
        chunks, total = logrecord.encode_commit([W[i]], i + 1, app.reserved, 1, app.size,
                                                True)
        commits.append(app.prepare(chunks, total))
        assert app.can_overlap
    for c in reversed(commits):  # finish last first
        c.write()
    assert app.complete(commits[2]) == 0 and app.complete(commits[1]) == 0
    assert app.complete(commits[0]) == commits[2].end
    app.close()
    recs = [rec for _, _, rec in LogScanner(tmp_path / "log")]
    assert [r.seq for r in recs] == [1, 2, 3]
    assert [bytes(r.data) for r in recs] == [W[i][1] for i in range(3)]
    assert all(r.is_commit for r in recs)
