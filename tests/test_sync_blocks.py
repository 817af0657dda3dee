"""Block-set sync: BlockSet, a sync restricted to a set, the fallback for an older
primary, copy_blocks, the primary's written-blocks scan, the position of its checksums,
damaged frames, and a sync resumed after a fault-injected kill."""

from __future__ import annotations

import asyncio
import os
import random
import re
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HostPair, needs_libnbd, state_at, wait_in_sync, wait_until

from marslib import blockset
from marslib import sync as sync_mod
from marslib.blockset import BlockSet
from marslib.device import Device
from marslib.formats.frame import Frame, FrameType
from marslib.layout import MarsPaths
from marslib.logger import Logger, LoggerConfig
from marslib.logscan import written_blocks
from marslib.meta import MetaStore
from marslib.net.conn import Connection, PeerBundle, RemoteError, connect, serve
from marslib.net.handshake import PeerInfo
from marslib.position import LogPosition
from marslib.schema import ResourceKeys, SyncResult, SyncStatus
from marslib.sync import (
    BLOCK_SIZE,
    BLOCKS_PER_REQUEST,
    FAULT_KILL_AFTER,
    BlockBudget,
    SyncClient,
    SyncService,
    block_sums,
)

BS = BLOCK_SIZE
WINDOW = BS * BLOCKS_PER_REQUEST
SIZE = 4 * WINDOW  # 64 MiB: four windows
UUID = "9f1c2e4a-test-sync-blocks"
SECRET = b"sync-blocks-test-secret-0123456789"
KEYS = ResourceKeys("r0")


# ---------------------------------------------------------------- BlockSet
def test_blockset_matches_a_plain_set_of_indexes() -> None:
    rng = random.Random(7)
    size = 1000 * BS + 12345  # a short last block
    bset, ref = BlockSet(size, BS), set()
    for _ in range(300):
        off = rng.randrange(-BS, size + BS)
        length = rng.choice([1, 100, BS, 3 * BS + 7, 40 * BS, rng.randrange(1, 200 * BS)])
        bset.add_range(off, length)
        end = min(off + length, size)
        if off < end:
            ref.update(range(max(off, 0) // BS, (end - 1) // BS + 1))
    assert list(bset) == sorted(ref) and bset.count == len(ref)
    assert bset.nbytes == sum(min(BS, size - i * BS) for i in ref)
    for _ in range(300):
        off = rng.randrange(0, size)
        length = rng.randrange(1, 300 * BS)
        end = min(off + length, size)
        want = sorted(i for i in ref if off // BS <= i <= (end - 1) // BS)
        assert bset.indices_in(off, length) == want
        assert bset.any_in(off, length) == bool(want)
        runs = bset.runs_in(off, length)
        assert [i for f, n in runs for i in range(f, f + n)] == want
        assert all(a[0] + a[1] < b[0] for a, b in zip(runs, runs[1:], strict=False))
    other = BlockSet(size, BS)
    other.add(999)
    other.add(1000)
    assert (bset | other).count == len(ref | {999, 1000})
    assert 1000 in bset.union(other) and 1001 not in bset.union(other)
    with pytest.raises(ValueError):
        bset.update(BlockSet(size + 1, BS))


def test_blockset_round_trip_is_compact_and_refuses_damage(tmp_path: Path) -> None:
    size = 1 << 30  # 16384 blocks: a 2 KiB bitmap
    bset = BlockSet(size, BS)
    for i in random.Random(1).sample(range(size // BS), 164):  # 1 %
        bset.add(i)
    data = bset.encode()
    assert BlockSet.decode(data) == bset
    assert len(data) < 1200, f"{len(data)} bytes for 164 of 16384 blocks"
    assert len(BlockSet(size, BS).encode()) < 64
    path = tmp_path / "resync-blocks"
    assert BlockSet.load(path) is None
    bset.save(path)
    assert BlockSet.load(path) == bset
    bad_magic = b"X" + data[1:]
    newer = data[:4] + struct.pack("<H", blockset.VERSION + 1) + data[6:]
    wrong_count = data[:20] + struct.pack("<Q", 165) + data[28:]
    huge = data[:12] + struct.pack("<Q", 1 << 62) + data[20:]
    for damaged, why in ((bad_magic, "magic"), (newer, "version"), (wrong_count, "holds"),
                         (data[:-5], "decompress"), (data[:10], "header"),
                         (huge, "geometry")):
        with pytest.raises(ValueError, match=why):
            BlockSet.decode(damaged)
    # a frame claiming a bigger bitmap than the geometry allows is refused before use
    bigger = data[:blockset.HEADER_LEN] + __import__("zstandard").ZstdCompressor().compress(
        bytes(4096))
    with pytest.raises(ValueError, match="claims"):
        BlockSet.decode(bigger)


# ------------------------------------------------------------- in-process rig
class Rig:
    """A primary's Logger served by a SyncService on loopback, and a replica's
    SyncClient over a PeerBundle: the real protocol, no marsd."""

    def __init__(self, tmp: Path, size: int = SIZE) -> None:
        self.size = size
        self.paths_a = MarsPaths(tmp / "a", tmp / "a-run")
        self.paths_b = MarsPaths(tmp / "b", tmp / "b-run")
        for p in (self.paths_a, self.paths_b):
            p.resource_dir("r0").mkdir(parents=True)
        self.meta_a = MetaStore(self.paths_a.root)
        self.meta_b = MetaStore(self.paths_b.root)
        self.meta_a.set(KEYS.replay("alpha"), LogPosition(1, 0, 0, "alpha").encode())
        self.img_a, self.img_b = tmp / "a.img", tmp / "b.img"
        for img in (self.img_a, self.img_b):
            with open(img, "wb") as f:
                f.truncate(size)
        self.requests: list[Frame] = []

    async def start(self, service: type[SyncService] = SyncService) -> None:
        self.logger = Logger("r0", "alpha", self.paths_a, self.meta_a,
                             Device(str(self.img_a), buffered=True), LoggerConfig())
        await self.logger.start()
        self.service = service(lambda name: self.logger if name == "r0" else None,
                               self.paths_a)
        inner = self.service.handle

        async def counted(frame: Frame, peer: PeerInfo) -> Frame:
            self.requests.append(frame)
            return await inner(frame, peer)

        self.server = await serve("127.0.0.1", 0, counted, host="alpha", uuid=UUID,
                                  secret=SECRET, channel="sync")
        self.port = self.server.sockets[0].getsockname()[1]
        self.bundle = PeerBundle("primary", lambda: ("127.0.0.1", self.port), host="beta",
                                 uuid=UUID, secret=SECRET, channel="sync")
        self.dev_b = Device(str(self.img_b), buffered=True)
        self.client = SyncClient("r0", "beta", self.meta_b, self.dev_b, self.size,
                                 self.bundle)

    async def stop(self) -> None:
        self.bundle.close()
        self.server.close()
        await self.server.wait_closed()
        # Logger.stop cancels its writeback task; on Python 3.11 asyncio.wait_for swallows
        # a cancel that comes in the same step as the wake-up it waits for, and the task
        # then never ends: let the writeback take its last wake-up first
        lg = self.logger
        while lg._writeback_wake.is_set() or lg._applied != lg.log_end:
            await asyncio.sleep(0.01)
        await self.logger.stop()
        self.logger.device.close()
        self.dev_b.close()

    async def primary_block(self, i: int) -> bytes:
        return bytes(await self.logger.read(i * BS, BS))

    def replica_block(self, i: int) -> bytes:
        with open(self.img_b, "rb") as f:
            f.seek(i * BS)
            return f.read(BS)

    def types(self) -> list[int]:
        return [f.type for f in self.requests]

    async def connect(self) -> Connection:
        return await connect("127.0.0.1", self.port, host="beta", uuid=UUID, secret=SECRET,
                             channel="sync")


def rig_run(tmp_path: Path, scenario: Callable[[Rig], Awaitable[None]],
            service: type[SyncService] = SyncService) -> None:
    async def go() -> None:
        rig = Rig(tmp_path)
        await rig.start(service)
        try:
            await scenario(rig)
        finally:
            await rig.stop()
    asyncio.run(go())


def random_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BS)


DIFFERING = [3, 10, 300, 700, 900]  # windows 0, 0, 1, 2, 3


async def diverge(rig: Rig) -> None:
    """The primary writes blocks DIFFERING (the replica keeps zeros there)."""
    for i in DIFFERING:
        await rig.logger.write(i * BS, random_block(i))


def only(*indexes: int) -> BlockSet:
    out = BlockSet(SIZE, BS)
    for i in indexes:
        out.add(i)
    return out


class SetPrimary(SyncService):
    """A primary of the release that brought block sets, in windows of 16 MiB only."""

    async def handle(self, frame: Frame, peer: PeerInfo) -> Frame:
        if frame.type == FrameType.SYNC_DIFF_SET_REQ and frame.get("v") != 1:
            return Frame(FrameType.ERROR, {"error": f"unexpected frame {frame.type} on sync"})
        return await super().handle(frame, peer)


class OldPrimary(SyncService):
    """A primary of the release before block sets: it knows neither new frame."""

    async def handle(self, frame: Frame, peer: PeerInfo) -> Frame:
        if frame.type in (FrameType.SYNC_DIFF_SET_REQ, FrameType.SYNC_WRITTEN_REQ):
            return Frame(FrameType.ERROR, {"error": f"unexpected frame {frame.type} on sync"})
        return await super().handle(frame, peer)


# --------------------------------------------------------------- the sync
def test_windows_in_flight_share_a_budget_of_blocks() -> None:
    """Sparse windows go many at once, whole ones a few at a time, and a window bigger
    than the budget still goes, alone."""
    async def go() -> tuple[int, int, list[int]]:
        budget = BlockBudget(10)
        held = {"blocks": 0, "windows": 0, "most_blocks": 0, "most_windows": 0}
        order: list[int] = []

        async def window(n: int) -> None:
            async with budget.take(n):
                held["blocks"] += min(n, 10)
                held["windows"] += 1
                held["most_blocks"] = max(held["most_blocks"], held["blocks"])
                held["most_windows"] = max(held["most_windows"], held["windows"])
                await asyncio.sleep(0.001)
                order.append(n)
                held["blocks"] -= min(n, 10)
                held["windows"] -= 1

        await asyncio.gather(*(window(1) for _ in range(10)))
        sparse = held["most_windows"]
        held["most_windows"] = 0
        await asyncio.gather(*(window(n) for n in (4, 4, 4, 50, 4)))
        assert budget.free == 10
        return sparse, held["most_blocks"], order

    sparse, most_blocks, order = asyncio.run(go())
    assert sparse == 10  # ten one-block windows at once
    assert most_blocks <= 10  # never more blocks than the budget
    assert sorted(order[-5:]) == [4, 4, 4, 4, 50]  # the big window went too


def test_restricted_sync_copies_only_the_set_while_the_devices_differ_elsewhere(
        tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        await diverge(rig)
        before = rig.logger.log_end
        assert before is not None and before.offset > 0
        await rig.client.run(only(3, 10, 300, 301))  # 301: equal on both sides
        for i in (3, 10, 300, 301):
            assert rig.replica_block(i) == await rig.primary_block(i), f"block {i}"
        for i in (700, 900):  # outside the set: left alone although they differ
            assert rig.replica_block(i) != await rig.primary_block(i), f"block {i} copied"
        # the whole device in one request: few blocks, however wide apart
        sets = [f for f in rig.requests if f.type == FrameType.SYNC_DIFF_SET_REQ]
        assert [(f.get("offset"), f.get("count"), f.get("v")) for f in sets] == \
            [(0, 4 * BLOCKS_PER_REQUEST, 2)]
        assert FrameType.SYNC_DIFF_REQ not in rig.types()
        result = SyncResult.decode(rig.meta_b.get(KEYS.syncresult("beta")))
        assert result is not None and (result.compared, result.copied) == (4 * BS, 3 * BS)
        assert SyncStatus.decode(rig.meta_b.get(KEYS.syncstatus("beta"))).finished
        assert rig.client.dropped is None
        # the primary rotated at the sync's start: the replay starts at byte 0 of a new
        # logfile, where the fetch starts
        p0 = LogPosition.decode(rig.meta_b.get(KEYS.replay("beta")) or "")
        assert (p0.number, p0.offset) == (before.number + 1, 0)
        assert rig.logger.log_end is not None and rig.logger.log_end.number == p0.number

    rig_run(tmp_path, scenario)


def test_a_primary_without_wide_windows_gets_them_a_window_at_a_time(tmp_path: Path
                                                                     ) -> None:
    async def scenario(rig: Rig) -> None:
        await diverge(rig)
        await rig.client.run(only(3, 10, 300, 700))
        for i in (3, 10, 300, 700):
            assert rig.replica_block(i) == await rig.primary_block(i), f"block {i}"
        assert rig.replica_block(900) != await rig.primary_block(900)  # not in the set
        sets = [(f.get("offset") // WINDOW, f.get("v")) for f in rig.requests
                if f.type == FrameType.SYNC_DIFF_SET_REQ]
        assert sets == [(0, 2), (0, 1), (1, 1), (2, 1)]  # refused once, then narrow
        assert rig.client.dropped is None and not rig.client.wide_sets
        result = SyncResult.decode(rig.meta_b.get(KEYS.syncresult("beta")))
        assert result is not None and (result.compared, result.copied) == (4 * BS, 4 * BS)

    rig_run(tmp_path, scenario, SetPrimary)


def test_set_windows_grow_while_their_blocks_are_few() -> None:
    size = 64 * WINDOW  # 1 GiB
    sparse = BlockSet(size, BS)
    for i in (5, 300, 40 * BLOCKS_PER_REQUEST + 7, 64 * BLOCKS_PER_REQUEST - 1):
        sparse.add(i)
    assert sync_mod.set_windows(sparse, 0, size, wide=True) == \
        [(0, size, [5, 300, 40 * BLOCKS_PER_REQUEST + 7, 64 * BLOCKS_PER_REQUEST - 1])]
    narrow = sync_mod.set_windows(sparse, 0, size, wide=False)
    assert [(o // WINDOW, n) for o, n, _ in narrow] == [(w, WINDOW) for w in range(64)]
    assert [idx for _, _, idx in narrow if idx] == [[5], [44], [7], [255]]
    # from a resume point on; a full window of the set closes the wide one before it
    dense = BlockSet(size, BS)
    for i in [3, *range(2 * BLOCKS_PER_REQUEST, 3 * BLOCKS_PER_REQUEST), 3 * 256 + 1]:
        dense.add(i)
    got = sync_mod.set_windows(dense, WINDOW, size, wide=True)
    assert [(o // WINDOW, n // WINDOW, len(idx)) for o, n, idx in got] == \
        [(1, 1, 0), (2, 1, 256), (3, 61, 1)]  # block 3 lies before the resume point
    assert sum(n for _, n, _ in got) == size - WINDOW  # no gaps, nothing beyond the end
    # a sparse set of many blocks: a few blocks per request, several requests
    many = BlockSet(size, BS)
    for i in range(0, 64 * BLOCKS_PER_REQUEST, 97):
        many.add(i)
    got = sync_mod.set_windows(many, 0, size, wide=True)
    assert 1 < len(got) < 64
    assert all(len(idx) <= sync_mod.SET_REQUEST_BLOCKS for _, _, idx in got)
    assert sum(len(idx) for _, _, idx in got) == many.count
    # no window spans more than SET_SPAN_MAX
    huge = 3 * sync_mod.SET_SPAN_MAX
    assert [n for _, n, _ in sync_mod.set_windows(BlockSet(huge, BS), 0, huge, True)] == \
        [sync_mod.SET_SPAN_MAX] * 3


def test_an_older_primary_makes_it_a_full_sync_reported(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        await diverge(rig)
        await rig.client.run(only(3, 300))
        assert rig.client.dropped and "predates" in rig.client.dropped
        for i in DIFFERING:  # all of them: a full comparison
            assert rig.replica_block(i) == await rig.primary_block(i), f"block {i}"
        assert FrameType.SYNC_DIFF_SET_REQ in rig.types()
        assert rig.types().count(FrameType.SYNC_DIFF_REQ) == 4
        result = SyncResult.decode(rig.meta_b.get(KEYS.syncresult("beta")))
        assert result is not None and (result.compared, result.copied) == (SIZE, 5 * BS)
        found = await rig.client.written_on_primary(LogPosition(1, 0, 0, "alpha"), None)
        assert found.missing == "the primary predates log-based resync"

    rig_run(tmp_path, scenario, OldPrimary)


def test_a_plan_gets_p0_and_a_resume_keeps_done_and_p0(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        await diverge(rig)
        calls: list[tuple[LogPosition, bool]] = []

        async def plan(p0: LogPosition, fresh: bool) -> BlockSet | None:
            calls.append((p0, fresh))
            return only(3, 10, 700)

        # an interrupted sync: two windows done, P0 kept
        kept = LogPosition(1, 100, 1, "alpha")
        rig.meta_b.set(KEYS.replay("beta"), kept.encode())
        rig.meta_b.set(KEYS.syncstatus("beta"), SyncStatus(2 * WINDOW, SIZE).encode())
        await rig.client.run(plan=plan)
        assert calls == [(kept, False)]
        assert rig.replica_block(700) == await rig.primary_block(700)
        assert rig.replica_block(3) == bytes(BS), "a window before DONE was synced again"
        assert rig.types().count(FrameType.SYNC_DIFF_SET_REQ) == 1
        assert LogPosition.decode(rig.meta_b.get(KEYS.replay("beta")) or "") == kept
        # from zero: P0 is taken (the primary rotates) and handed over as fresh
        rig.meta_b.set(KEYS.syncstatus("beta"), SyncStatus(0, SIZE).encode())
        await rig.client.run(plan=plan)
        p0, fresh = calls[-1]
        assert fresh and p0.offset == 0 and p0.number == 2
        assert rig.replica_block(3) == await rig.primary_block(3)
        assert rig.replica_block(300) == bytes(BS)  # not in the plan's set

    rig_run(tmp_path, scenario)


def test_a_rotating_primary_sends_its_link_of_the_closed_logfile_along(
        tmp_path: Path) -> None:
    """The loser of a resync needs the primary's version link of the logfile before P0
    to tell its stale logfiles from the primary's history: it comes with the rotation's
    reply, not a metadata push later."""
    async def scenario(rig: Rig) -> None:
        await rig.logger.write(0, random_block(1))
        key = KEYS.version_link(1, "alpha")
        assert rig.meta_b.get(key) is None
        p0 = await rig.client.primary_position(rotate=True)
        assert (p0.number, p0.offset) == (2, 0)
        theirs, ours = rig.meta_a.read(key), rig.meta_b.read(key)
        assert theirs is not None and theirs.value is not None
        assert ours == theirs  # the primary's own value and stamp
        # a reply at the start of a logfile rotates nothing and sends no link
        await rig.client.primary_position(rotate=True)
        assert rig.meta_b.read(KEYS.version_link(2, "alpha")) is None
        # what is not this resource's version link is ignored
        for bad in (["resource-r0/primary", "alpha", 1], [key, None, 1], "x",
                    ["resource-r1/version-000000001-alpha", "v", 1], [key, "v", "1"]):
            rig.client._take_link(bad)
        assert rig.meta_b.get("resource-r0/primary") is None
        assert rig.meta_b.read(key) == theirs

    rig_run(tmp_path, scenario)


def test_copy_blocks_is_one_pass_without_replay_keys(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        await diverge(rig)
        result = await rig.client.copy_blocks(only(10, 11, 900))
        assert (result.compared, result.copied) == (3 * BS, 2 * BS)
        assert rig.replica_block(10) == await rig.primary_block(10)
        assert rig.replica_block(900) == await rig.primary_block(900)
        assert rig.replica_block(3) == bytes(BS)
        for key in (KEYS.replay("beta"), KEYS.syncstatus("beta"), KEYS.syncpos("beta")):
            assert rig.meta_b.get(key) is None, key
        assert FrameType.STATUS_REQ not in rig.types()

    rig_run(tmp_path, scenario)


def test_the_primary_scans_its_own_logs_for_written_blocks(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        await rig.logger.write(0, random_block(1))
        since = rig.logger.log_end
        assert since is not None
        await diverge(rig)
        await rig.logger.write(5 * BS - 10, b"edge" * 5)  # blocks 4 and 5
        p0 = await rig.client.primary_position(rotate=True)
        await rig.logger.write(2 * BS, random_block(2))  # after P0: not asked for
        found = await rig.client.written_on_primary(since, p0)
        assert found.complete, found.reason
        assert list(found.blocks) == sorted([*DIFFERING, 4, 5])
        local = written_blocks(rig.paths_a, "r0", since, p0, BS, SIZE)
        assert found.blocks == local.blocks and found.records == local.records == 6

    rig_run(tmp_path, scenario)


def test_read_at_and_the_sums_position_match_the_log_under_concurrent_writes(
        tmp_path: Path) -> None:
    region = 16 * BS

    async def scenario(rig: Rig) -> None:
        stop = asyncio.Event()
        rng = random.Random(3)

        async def writer() -> None:
            n = 0
            while not stop.is_set():
                batch = []
                for _ in range(8):
                    n += 1
                    off = rng.randrange(region // 4096) * 4096
                    batch.append(rig.logger.write(off, random.Random(n).randbytes(4096)))
                await asyncio.gather(*batch)

        writers = [asyncio.create_task(writer()) for _ in range(2)]
        samples: list[tuple[bytes, LogPosition]] = []
        sums: list[tuple[bytes, LogPosition]] = []
        bundle_sums = rig.client.remote_sums
        try:
            while len(samples) < 25:
                buf, pos = await rig.logger.read_at(0, region)
                assert pos is not None
                samples.append((bytes(buf), pos))
                got, spos = await bundle_sums(0, region)
                sums.append((struct.pack(f"<{len(got)}I", *got), spos))
        finally:
            stop.set()
            await asyncio.gather(*writers)
        assert len({p for _, p in samples}) > 5, "the log did not move between samples"
        for buf, pos in samples:
            want = state_at(rig.paths_a.root, pos, region)
            assert buf == want, f"read_at data is not the state at {pos.encode()}"
        for packed, pos in sums:
            want = state_at(rig.paths_a.root, pos, region)
            assert packed == struct.pack("<16I", *block_sums(want, BS)), pos.encode()

    rig_run(tmp_path, scenario)


def test_read_at_is_not_fooled_by_a_writeback_round_during_the_read(tmp_path: Path) -> None:
    """A generation that begins after the read started and is written back and dropped
    before it ended: its data reached the device after the read passed, and it is no
    longer in the maps. read_at must not return the newer position with the older data."""
    import threading

    async def scenario(rig: Rig) -> None:
        lg = rig.logger
        x, y = 5 * BS, 9 * BS

        async def drained() -> None:
            while not (lg._applied == lg.log_end and len(lg._maps) == 1
                       and not len(lg._active)):
                await asyncio.sleep(0.01)

        await lg.write(x, b"A" * BS)
        await drained()
        real = lg.device.pread
        passed, proceed = threading.Event(), threading.Event()
        calls = [0]

        def slow_pread(offset: int, length: int) -> bytearray:
            calls[0] += 1
            data = real(offset, length)
            if calls[0] == 1:  # the first read has passed the blocks: hold it there
                passed.set()
                proceed.wait(30)
            return data

        lg.device.pread = slow_pread  # type: ignore[method-assign]
        reading = asyncio.create_task(lg.read_at(0, 16 * BS))
        await asyncio.to_thread(passed.wait, 30)
        await lg.write(y, b"C" * BS)  # the generation in the read's snapshot
        await drained()
        await lg.write(x, b"B" * BS)  # a later generation, written back and dropped
        await drained()
        proceed.set()
        buf, pos = await reading
        lg.device.pread = real  # type: ignore[method-assign]
        assert pos == lg.log_end
        assert bytes(buf[x : x + 4]) == b"BBBB", "data older than the position"
        assert bytes(buf[y : y + 4]) == b"CCCC"
        assert calls[0] >= 2

    rig_run(tmp_path, scenario)


def test_damaged_frames_get_errors_or_close_one_connection_only(tmp_path: Path) -> None:
    async def ask(conn: Connection, ftype: int, header: dict[str, Any],
                  payload: bytes = b"") -> Frame:
        await conn.send(Frame(ftype, {"rid": 1, "resource": "r0", **header}, payload))
        return await asyncio.wait_for(conn.recv(), 10)

    async def scenario(rig: Rig) -> None:
        await diverge(rig)
        conn = await rig.connect()
        four = struct.pack("<I", 0)
        set_req = FrameType.SYNC_DIFF_SET_REQ
        for header, payload, why in (
                ({"offset": 0, "blocks": [5, 3]}, four * 2, "bad block list"),
                ({"offset": 0, "blocks": [256]}, four, "bad block list"),
                ({"offset": 0, "blocks": [True]}, four, "bad block list"),
                ({"offset": 0, "blocks": "abc"}, four, "no block list"),
                ({"offset": 0, "blocks": [1, 2]}, four, "checksums for 2 blocks"),
                ({"offset": 7, "blocks": [1]}, four, "bad window"),
                ({"offset": SIZE, "blocks": [1]}, four, "bad window"),
                ({"offset": 0, "blocks": [1], "count": 10 ** 6}, four, "bad window"),
                ({"offset": 0, "blocks": [1], "count": 10 ** 6, "v": 2}, four, "bad window"),
                ({"offset": 0, "blocks": list(range(300)), "count": 1024, "v": 2},
                 b"\0" * 1200, "at most"),
                ({"offset": 0, "blocks": [1], "v": 3}, four, "unexpected frame")):
            reply = await ask(conn, set_req, header, payload)
            assert reply.type == FrameType.ERROR and why in reply.get("error"), (header, reply)
        for header, why in (({"since": "garbage"}, "invalid log position"),
                            ({"since": "log-000000001-alpha,0,0", "size": -1}, "bad"),
                            ({"since": "log-000000001-alpha,0,0", "size": SIZE,
                              "v": "x"}, "unexpected frame")):
            reply = await ask(conn, FrameType.SYNC_WRITTEN_REQ, header)
            assert reply.type == FrameType.ERROR and why in reply.get("error"), (header, reply)
        # still served on the same connection
        reply = await ask(conn, set_req, {"offset": 0, "blocks": [3]}, four)
        assert reply.type == FrameType.SYNC_DIFF and reply.get("blocks") == [3]
        # garbage instead of a frame: this connection is closed, nothing else
        conn.transport.write(b"this is no frame at all, not even close" * 4)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(conn.recv(), 10)
        await rig.client.run(only(3))
        assert rig.replica_block(3) == await rig.primary_block(3)

    rig_run(tmp_path, scenario)


class LyingPrimary(SyncService):
    """Answers block-set requests with blocks that were not asked for."""

    async def handle(self, frame: Frame, peer: PeerInfo) -> Frame:
        if frame.type == FrameType.SYNC_DIFF_SET_REQ:
            return Frame(FrameType.SYNC_DIFF, {"offset": frame.get("offset"),
                                               "blocks": [0, 1]}, bytes(2 * BS))
        return await super().handle(frame, peer)


def test_a_damaged_reply_is_an_error_not_a_write(tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        await diverge(rig)
        with pytest.raises(RemoteError, match="not asked for"):
            await rig.client.copy_blocks(only(3))
        assert rig.replica_block(0) == bytes(BS) and rig.replica_block(3) == bytes(BS)
        # and the retrying sync does not write them either: it keeps asking
        task = asyncio.create_task(rig.client.run(only(3)))
        await asyncio.sleep(0)
        try:
            while rig.types().count(FrameType.SYNC_DIFF_SET_REQ) < 3:
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
        assert rig.replica_block(0) == bytes(BS)

    rig_run(tmp_path, scenario, LyingPrimary)


# ------------------------------------------------------------- with marsd
@pytest.fixture
def big_pair(tmp_path: Path) -> Iterator[HostPair]:
    p = HostPair(tmp_path, size=256 << 20)  # 16 windows
    p.a.serve(p.dev_a.path)
    p.b.join_cluster_of(p.a)
    yield p
    p.close()


@needs_libnbd
def test_a_sync_killed_by_fault_injection_resumes_and_ends_identical(big_pair: HostPair
                                                                     ) -> None:
    from conftest import nbd_client
    a, b = big_pair.a, big_pair.b
    for i in range(0, 256, 9):  # some differing blocks all over the device
        nbd_client(a.nbd_uri("r0"), "pwrite", str(i << 20), f"{i:02x}" * 4096)
    b.stop()
    b.env[FAULT_KILL_AFTER] = "2"
    b.start()
    b.marsadm("join-resource", "r0", big_pair.dev_b.path)
    assert b.proc is not None
    wait_until(lambda: b.proc is not None and b.proc.poll() is not None,
               "the fault-injected kill of beta's marsd", timeout=120)
    assert "fault injection: killing this process group after" in b.logtail(200)
    st = SyncStatus.decode(os.readlink(b.root / "resource-r0" / "syncstatus-beta"))
    assert st is not None and 0 < st.done < st.size, st
    del b.env[FAULT_KILL_AFTER]
    b.proc = None
    b.start()
    b.marsadm("wait-resource", "r0", "sync-off", "--timeout", "300")
    m = re.findall(r"full sync resumes at (\d+)", b.logtail(400))
    assert m and int(m[-1]) == st.done, "the sync started over instead of resuming"
    wait_in_sync(a, b)
    b.marsadm("pause-replay", "r0")
    assert big_pair.dev_a.read() == big_pair.dev_b.read(), "devices differ after the resume"


@needs_libnbd
def test_checksums_from_a_worker_carry_the_position_they_reflect(tmp_path: Path) -> None:
    from conftest import NBD_CLIENT, SYSTEM_PYTHON, WriterLines

    from marslib.net.conn import read_secret
    pair = HostPair(tmp_path)
    try:
        a = pair.a
        a.serve(pair.dev_a.path)  # marsd runs r0 in a worker process
        writer = WriterLines(__import__("subprocess").Popen(
            [SYSTEM_PYTHON, str(NBD_CLIENT), a.nbd_uri("r0"), "writer", "5", "8", "256",
             str(BS), "30"], stdout=-1, stderr=-1, text=True))
        writer.wait_acks(50, "before asking")
        uuid = MetaStore(a.root).get("uuid") or ""
        secret = read_secret(a.root / "secret")

        async def ask() -> list[tuple[bytes, LogPosition]]:
            bundle = PeerBundle("alpha", lambda: (a.ip, 7779), host="beta", uuid=uuid,
                                secret=secret, channel="sync")
            out = []
            try:
                for _ in range(8):
                    reply = await bundle.request(Frame(FrameType.SYNC_SUMS_REQ, {
                        "resource": "r0", "offset": 0, "block_size": BS, "count": 256}))
                    out.append((bytes(reply.payload),
                                LogPosition.decode(reply.get("position"))))
                    await asyncio.sleep(0.05)
            finally:
                bundle.close()
            return out

        samples = asyncio.run(ask())
        writer.writer.send_signal(2)
        writer.finish()
        assert len({p for _, p in samples}) > 3, "the log did not move between samples"
        for packed, pos in samples:
            want = state_at(a.root, pos, WINDOW)
            assert packed == struct.pack("<256I", *block_sums(want, BS)), pos.encode()
    finally:
        pair.close()
