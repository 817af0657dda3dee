"""The logger in-process on a real device: group commit, sorted writeback, overlay reads,
recovery from the saved position, torn tails, damage, rotation, a full /mars."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, BlockDev, needs_root

from marslib.device import Device
from marslib.errors import DeviceError, LogCorrupt
from marslib.formats.logrecord import LogRecord, encode, seal_commit
from marslib.formats.versionlink import VersionLink
from marslib.layout import MarsPaths
from marslib.logger import Logger, LoggerConfig
from marslib.meta import MetaStore
from marslib.position import LogPosition

HOST = "h1"


class Setup:
    def __init__(self, root: Path, dev: BlockDev) -> None:
        self.paths = MarsPaths(root, root.parent / "run")
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.meta = MetaStore(self.paths.root)
        self.dev = dev
        if self.meta.get(f"resource-r0/replay-{HOST}") is None:
            self.meta.set(f"resource-r0/replay-{HOST}", LogPosition(1, 0, 0, HOST).encode())
        self.paths.resource_dir("r0").mkdir(exist_ok=True)

    def logger(self, **cfg: object) -> Logger:
        return Logger("r0", HOST, self.paths, self.meta, Device(self.dev.path),
                      LoggerConfig(**cfg))  # type: ignore[arg-type]

    def logfile(self, number: int = 1) -> Path:
        return self.paths.logfile("r0", number, HOST)

    def write_log(self, records: list[LogRecord], number: int = 1) -> Path:
        """Append ``records`` as the primary does: each one a group commit of its own."""
        path = self.logfile(number)
        with open(path, "ab") as f:
            for r in records:
                f.write(seal_commit(encode(r), f.tell(), 1))
        return path


@pytest.fixture
def setup(tmp_path: Path, blockdev: BlockDev) -> Iterator[Setup]:
    yield Setup(tmp_path / "mars", blockdev)


def block(value: int, size: int = 4096) -> bytes:
    return bytes([value]) * size


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


U = 64 * 4096


def test_write_read_and_writeback(setup: Setup) -> None:
    async def go() -> None:
        lg = setup.logger()
        await lg.start()
        await asyncio.gather(*(lg.write(i * 4096, block(i + 1)) for i in range(64)))
        await lg.write(U + 10, b"unaligned bytes")
        assert await lg.read(0, 4096) == block(1)
        got = await lg.read(4096 * 5 - 3, 6)
        assert got == block(5)[:3] + block(6)[:3]
        assert (await lg.read(U, 40))[10:25] == b"unaligned bytes"
        # many reads at once (the sync's): the same data, in the order asked
        ranges = [(U, 40), (4096 * 5 - 3, 6), (0, 4096), *((i * 4096, 4096) for i in range(9))]
        assert await lg.read_many(ranges) == [await lg.read(o, n) for o, n in ranges]
        assert await lg.read_many([]) == []
        st = lg.status()
        assert st.writes == 65
        assert 1 <= st.commits < 65, "concurrent writes were not grouped into commits"
        await lg.stop()
        lg.device.close()
    run(go())
    data = setup.dev.read(0, 65 * 4096)
    assert data[U + 10 : U + 25] == b"unaligned bytes" and data[U : U + 10] == bytes(10)
    assert data[:U] == b"".join(block(i + 1) for i in range(64))


def test_sorted_writeback_merges_and_skips_superseded(setup: Setup) -> None:
    async def go() -> Logger:
        lg = setup.logger()
        await lg.start()
        # one batch: 100 adjacent blocks in reverse order, block 7 rewritten 50 times
        writes = [lg.write(i * 4096, block(i % 250 + 1)) for i in reversed(range(100))]
        writes += [lg.write(7 * 4096, block(200 + j % 50)) for j in range(50)]
        await asyncio.gather(*writes)
        await lg.stop()
        lg.device.close()
        return lg
    lg = run(go())
    assert lg.stats.writes == 150
    # all of it fits one merged 1 MiB chunk per writeback round: far fewer device writes
    assert lg.stats.device_writes <= lg.stats.writeback_rounds * 2
    assert lg.stats.writeback_bytes <= 100 * 4096 * lg.stats.writeback_rounds
    assert setup.dev.read(7 * 4096, 4096) == block(200 + 49)


def test_arrival_order_writes_every_version(setup: Setup) -> None:
    async def go() -> Logger:
        lg = setup.logger(writeback_order="arrival")
        await lg.start()
        await asyncio.gather(*(lg.write(0, block(j + 1)) for j in range(20)))
        await lg.stop()
        lg.device.close()
        return lg
    lg = run(go())
    assert lg.stats.device_writes >= 20
    assert setup.dev.read(0, 4096) == block(20)


def test_recovery_replays_only_after_the_saved_position(setup: Setup) -> None:
    recs = [LogRecord(seq=i, offset=(i - 1) * 4096, data=block(i)) for i in range(1, 11)]
    path = setup.write_log(recs)
    after5 = sum(len(encode(r)) for r in recs[:5])
    setup.meta.set(f"resource-r0/replay-{HOST}", LogPosition(1, after5, 5, HOST).encode())

    async def go() -> None:
        lg = setup.logger()
        report = await lg.start()
        assert report.records_replayed == 5 and report.torn_tail is None
        await lg.write(100 * 4096, block(99))
        await lg.stop()
        lg.device.close()
    run(go())
    data = setup.dev.read(0, 10 * 4096)
    assert data[: 5 * 4096] == bytes(5 * 4096), "records before the saved position replayed"
    assert data[5 * 4096 :] == b"".join(block(i) for i in range(6, 11))
    # the new write continued the sequence in the same logfile
    tail = LogPosition.decode(setup.meta.get(f"resource-r0/replay-{HOST}") or "")
    assert tail.seq == 11 and tail.number == 1 and tail.offset == path.stat().st_size


@pytest.mark.parametrize("cut", [1, 20, 52, 60, 4000])
def test_torn_tail_is_cut_and_reported(setup: Setup, cut: int) -> None:
    recs = [LogRecord(seq=i, offset=i * 4096, data=block(i)) for i in range(1, 4)]
    path = setup.write_log(recs)
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(encode(LogRecord(seq=4, offset=0, data=block(4)))[:cut])

    async def go() -> None:
        lg = setup.logger()
        report = await lg.start()
        assert report.torn_tail and f"offset {good}" in report.torn_tail
        assert report.records_replayed == 3
        assert path.stat().st_size == good
        await lg.write(0, block(44))
        await lg.stop()
        lg.device.close()
    run(go())
    assert setup.dev.read(0, 4096) == block(44)
    assert setup.dev.read(4096, 3 * 4096) == block(1) + block(2) + block(3)


def test_zero_filled_tail_is_reserved_space_not_a_torn_write(setup: Setup) -> None:
    path = setup.write_log([LogRecord(seq=1, offset=0, data=block(1))])
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(9000))  # what a crash leaves of the appender's zero-filled space

    async def go() -> None:
        lg = setup.logger()
        report = await lg.start()
        assert report.torn_tail is None and report.records_replayed == 1
        assert (lg.status().log_end or "").endswith(f",{good},1")
        await lg.write(4096, block(2))
        await lg.stop()
        lg.device.close()
    run(go())
    # a clean stop cuts the reserved space: the file ends with its last record
    from marslib.logfile import valid_end
    assert path.stat().st_size == valid_end(path) > good


def test_damage_inside_the_log_is_refused_not_cut(setup: Setup) -> None:
    recs = [LogRecord(seq=i, offset=i * 4096, data=block(i)) for i in range(1, 4)]
    path = setup.write_log(recs)
    raw = bytearray(path.read_bytes())
    second = len(encode(recs[0]))
    raw[second + 100] ^= 0x40  # payload of record 2
    path.write_bytes(raw)
    lg = setup.logger()
    with pytest.raises(LogCorrupt) as exc:
        run(lg.start())
    assert exc.value.offset == second and "damage" in str(exc.value)
    assert path.read_bytes() == bytes(raw), "a damaged log must not be cut"
    lg.device.close()


def test_sequence_gap_is_refused(setup: Setup) -> None:
    setup.write_log([LogRecord(seq=s, offset=0, data=block(s)) for s in (1, 2, 4)])
    lg = setup.logger()
    with pytest.raises(LogCorrupt, match="sequence gap"):
        run(lg.start())
    lg.device.close()


def test_record_beyond_device_is_refused(setup: Setup) -> None:
    size = Device(setup.dev.path).size
    setup.write_log([LogRecord(seq=1, offset=size, data=block(1))])
    lg = setup.logger()
    with pytest.raises(DeviceError, match="beyond the end"):
        run(lg.start())
    lg.device.close()


def test_rotation_version_links_and_recovery_across_logfiles(setup: Setup) -> None:
    async def go() -> None:
        lg = setup.logger(max_logfile_size=64 << 10)
        await lg.start()
        for i in range(100):
            await lg.write((i % 40) * 4096, block(i % 250 + 1))
        name = await lg.rotate()
        assert name.startswith("log-")
        await lg.stop()
        lg.device.close()
    run(go())
    files = setup.paths.logfiles("r0")
    assert len(files) >= 6
    links = {}
    for number, host, _ in files[:-1]:
        value = setup.meta.get(f"resource-r0/version-{number:09d}-{host}")
        assert value, f"no version link for logfile {number}"
        links[number] = VersionLink.decode(number, host, value)
    numbers = sorted(links)
    for a, b in zip(numbers, numbers[1:], strict=False):
        assert links[b].prev_digest == links[a].digest, "version links do not chain"
    expected = setup.dev.read(0, 40 * 4096)
    # forget the saved position: recovery replays every logfile, result is identical
    setup.meta.delete(f"resource-r0/replay-{HOST}")

    async def again() -> None:
        lg = setup.logger()
        report = await lg.start()
        assert report.records_replayed == 100 and len(report.logfiles_read) == len(files)
        assert await lg.read(0, 40 * 4096) == expected
        await lg.stop()
        lg.device.close()
    run(again())


def test_io_beyond_the_end(setup: Setup) -> None:
    async def go() -> None:
        lg = setup.logger()
        await lg.start()
        with pytest.raises(OSError) as exc:
            await lg.write(lg.size - 100, block(1))
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as exc:
            await lg.read(lg.size, 1)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError) as exc:
            await lg.read_many([(0, 4096), (lg.size - 10, 11)])
        assert exc.value.errno == errno.EINVAL
        await lg.stop()
        lg.device.close()
    run(go())


@pytest.fixture
def small_mars(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB ext4 filesystem as /mars, mounted from a loop device."""
    if not IS_ROOT:
        pytest.skip("needs root to mount a small filesystem")
    image = tmp_path / "mars.img"
    mnt = tmp_path / "small-mars"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@needs_root
def test_full_mars_switches_to_emergency_mode_and_loses_nothing(small_mars: Path,
                                                                blockdev: BlockDev) -> None:
    st = Setup(small_mars / "mars", blockdev)
    filler = small_mars / "filler"
    free = os.statvfs(small_mars).f_bavail * os.statvfs(small_mars).f_frsize
    with open(filler, "wb") as f:
        f.write(bytes(free - (2 << 20)))

    async def go() -> None:
        lg = st.logger()
        await lg.start()
        model = bytearray(64 * 65536)
        for i in range(200):  # about 12 MiB into 2 MiB of free space
            data = os.urandom(65536)
            await lg.write((i % 64) * 65536, data)  # never refused
            model[(i % 64) * 65536 : (i % 64 + 1) * 65536] = data
        assert lg.emergency and lg.stats.direct_writes > 0
        assert st.meta.get(f"resource-r0/actual-{HOST}/emergency") == "1"
        assert st.meta.get(f"resource-r0/actual-{HOST}/error", "").startswith("emergency")
        assert await lg.read(0, len(model)) == model
        before = lg.status().logfile
        filler.unlink()  # room again: log in a new logfile after a history gap
        await lg.leave_emergency()
        assert not lg.emergency and lg.status().logfile != before
        assert st.meta.get("resource-r0/history-gap") == str(lg._number)
        await lg.write(0, block(7))
        model[:4096] = block(7)
        await lg.stop()
        lg.device.close()
        lg2 = st.logger()
        report = await lg2.start()
        assert report.torn_tail is None, "a refused batch left bytes in the log"
        assert await lg2.read(0, len(model)) == model
        await lg2.stop()
        lg2.device.close()
    run(go())
    assert st.dev.read(0, 4096) == block(7)


def test_crash_after_rotations_under_concurrent_writers(setup: Setup) -> None:
    """Rotations while writes are queued must record the last durable seq, or recovery
    finds a sequence gap (a bug the kill -9 test once caught)."""
    async def go() -> bytes:
        lg = setup.logger(max_logfile_size=16 << 10, position_interval=0.0)
        await lg.start()

        async def worker(w: int) -> None:
            for i in range(25):
                await lg.write(((w * 25 + i) % 64) * 4096, block((w * 25 + i) % 250 + 1))
        await asyncio.gather(*(worker(w) for w in range(8)))
        expected = bytes(await lg.read(0, 64 * 4096))
        # crash: no drain, no final position save
        for task in lg._tasks:
            task.cancel()
        await asyncio.gather(*lg._tasks, return_exceptions=True)
        assert lg._appender is not None
        lg._appender.close()
        lg.device.close()
        return expected

    expected = run(go())
    assert len(setup.paths.logfiles("r0")) > 5

    async def recover() -> None:
        lg = setup.logger()
        await lg.start()
        assert await lg.read(0, 64 * 4096) == expected
        await lg.stop()
        lg.device.close()
    run(recover())


def test_rotation_with_queued_writes_keeps_the_durable_seq(setup: Setup) -> None:
    async def go() -> None:
        lg = setup.logger()
        await lg.start()
        await lg.write(0, block(1))  # seq 1, durable
        async with lg._exclusive():  # hold the committer: writes 2..5 stay queued
            tasks = [asyncio.create_task(lg.write(i * 4096, block(i))) for i in range(2, 6)]
            while lg.status().queued_writes != 4:
                await asyncio.sleep(0.001)
            await lg._rotate_locked()
            end = lg._log_end
            assert end is not None and end.offset == 0 and end.seq == 1
        await asyncio.gather(*tasks)
        assert lg._log_end is not None and lg._log_end.seq == 5
        await lg.stop()
        lg.device.close()
    run(go())
