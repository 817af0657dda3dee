"""Replay batches wait for more of their bytes: GATHER_BYTES while the fetch is far
behind, STEADY_BYTES when it has everything (each batch costs a durable position write
and a device flush), never longer than GATHER_MAX_S or STEADY_MAX_S.

A real Replayer applies a real logfile to a file device; the fetcher is a stand-in that
reveals the logfile a megabyte at a time, as replies of the real one do."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from marslib import replay
from marslib.device import Device
from marslib.formats.logrecord import LogRecord, encode, seal_commit
from marslib.layout import MarsPaths
from marslib.meta import MetaStore
from marslib.replay import Replayer
from marslib.schema import ResourceKeys

MiB = 1 << 20
RECORD = 256 << 10
RECORDS = 160  # 40 MiB of data
LOGFILE = "log-000000001-alpha"


class RevealingFetcher:
    """What the Replayer asks of a fetcher, for one logfile that it reveals step by step."""

    def __init__(self, size: int) -> None:
        self.logfile = LOGFILE
        self.size = size
        self.local_end = 0
        self.remote_end = size
        self.diverged = None
        self.progress = asyncio.Event()

    def complete_end(self, name: str) -> int | None:
        return self.local_end if name == self.logfile else None

    def is_finished(self, name: str) -> bool:
        return False

    def reveal(self, nbytes: int, *, caught_up: bool) -> None:
        self.local_end = min(self.size, self.local_end + nbytes)
        if caught_up:
            self.remote_end = self.local_end  # the primary has nothing more (yet)
        ev, self.progress = self.progress, asyncio.Event()
        ev.set()


def pattern(i: int) -> bytes:
    return bytes([i % 251 + 1]) * RECORD


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.paths = MarsPaths(tmp_path / "mars", tmp_path / "run")
        self.paths.resource_dir("r0").mkdir(parents=True)
        self.meta = MetaStore(self.paths.root)
        self.meta.set(ResourceKeys("r0").replay("beta"), f"{LOGFILE},0,0")
        path = self.paths.resource_dir("r0") / LOGFILE
        with open(path, "wb") as f:
            for i in range(RECORDS):
                rec = LogRecord(seq=i + 1, offset=i * RECORD, data=pattern(i))
                f.write(seal_commit(encode(rec), f.tell(), 1))
        self.log_size = path.stat().st_size
        self.image = tmp_path / "dev.img"
        self.image.write_bytes(bytes(RECORDS * RECORD))
        self.device = Device(str(self.image), buffered=True)

    def replayer(self, fetcher: RevealingFetcher) -> Replayer:
        return Replayer("r0", "beta", self.paths, self.meta, self.device,
                        fetcher)  # type: ignore[arg-type]

    def device_holds_every_record(self) -> bool:
        data = self.image.read_bytes()
        return all(data[i * RECORD:(i + 1) * RECORD] == pattern(i) for i in range(RECORDS))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    s.device.close()


async def until(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    """Wait (on the event loop, the replay's threads go on) until ``cond()``."""
    for _ in range(200_000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never: {what}")


def run_replay(setup: Setup, feed) -> Replayer:  # type: ignore[no-untyped-def]
    fetcher = RevealingFetcher(setup.log_size)
    rp = setup.replayer(fetcher)

    async def scenario() -> None:
        task = asyncio.create_task(rp.run())
        try:
            await feed(fetcher, rp)
            await until(lambda: rp.position.offset == setup.log_size, "everything applied")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    return rp


def test_while_the_fetch_is_behind_a_batch_waits_for_gather_bytes(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "GATHER_MAX_S", 3600.0)  # only the bytes decide here

    async def feed(f: RevealingFetcher, rp: Replayer) -> None:
        while f.local_end < f.size:
            f.reveal(MiB, caught_up=False)  # the primary's end stays far ahead
            end = f.local_end
            # the replay either applies this megabyte or waits for more of it
            await until(lambda end=end: rp.position.offset > end - RECORD - 4096 or rp.gathering,
                        f"the replay takes the bytes up to {end} or gathers")
        f.reveal(0, caught_up=True)

    rp = run_replay(setup, feed)
    assert setup.device_holds_every_record()
    assert rp.stats.records == RECORDS
    # 40 MiB revealed a megabyte at a time: batches of 16 MiB or more (the last one when
    # the fetch had everything), never one per megabyte
    assert 2 <= rp.stats.batches <= setup.log_size // replay.GATHER_BYTES + 1, rp.stats


def test_a_fetch_that_has_everything_gathers_steady_bytes(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "STEADY_MAX_S", 3600.0)  # only the bytes decide here

    async def feed(f: RevealingFetcher, rp: Replayer) -> None:
        while f.local_end < f.size:
            f.reveal(MiB, caught_up=True)  # each megabyte is all the primary has
            end = f.local_end
            await until(lambda end=end: rp.position.offset > end - RECORD - 4096
                        or rp.gathering, f"the replay takes the bytes up to {end} or gathers")
        # the rest (less than STEADY_BYTES) goes when its time is up
        monkeypatch.setattr(replay, "STEADY_MAX_S", 0.0)
        f.reveal(0, caught_up=True)

    rp = run_replay(setup, feed)
    assert setup.device_holds_every_record()
    assert 2 <= rp.stats.batches <= setup.log_size // replay.STEADY_BYTES + 1, rp.stats


def test_without_gathering_every_fetched_megabyte_is_a_batch(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the gathering saves: with no wait at all, a batch per fetched megabyte."""
    monkeypatch.setattr(replay, "STEADY_MAX_S", 0.0)

    async def feed(f: RevealingFetcher, rp: Replayer) -> None:
        while f.local_end < f.size:
            f.reveal(MiB, caught_up=True)
            end = f.local_end
            await until(lambda end=end: rp.position.offset > end - RECORD - 4096,
                        f"the records up to {end} applied")

    rp = run_replay(setup, feed)
    assert setup.device_holds_every_record()
    assert rp.stats.batches >= setup.log_size // MiB - 1, rp.stats


def test_a_batch_waits_no_longer_than_gather_max_s(setup: Setup,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "GATHER_MAX_S", 0.05)
    monkeypatch.setattr(replay, "STEADY_MAX_S", 0.05)

    async def feed(f: RevealingFetcher, rp: Replayer) -> None:
        f.reveal(2 * MiB, caught_up=False)  # far behind, and then nothing for a while
        await until(lambda: rp.stats.records >= 7, "the records of 2 MiB applied anyway")
        f.reveal(f.size, caught_up=True)

    run_replay(setup, feed)
    assert setup.device_holds_every_record()
