"""Fast full sync (port 7779): make a replica's device equal to the primary's by comparing
block checksums and copying only the blocks that differ, while the primary keeps writing.

Before the first block, the replica's replay position is set to the primary's log end
(P0); after the last block, ``syncpos-HOST`` records the primary's log end then (P1).
Blocks copied in between may be newer than P0; replaying the log from P0 overwrites
them in order, and once the replay has passed P1 the replica is consistent. Progress is
saved in ``syncstatus-HOST`` as ``DONE_BYTES/SIZE`` so that a broken sync resumes.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from marslib.checksum import crc32c
from marslib.device import Device
from marslib.formats.frame import Frame, FrameType
from marslib.layout import check_resource_name
from marslib.meta import MetaStore
from marslib.net.conn import PeerBundle, RemoteError
from marslib.net.handshake import PeerInfo
from marslib.pausing import PauseSwitch
from marslib.position import LogPosition
from marslib.schema import SYNC_DONE, ResourceKeys, SyncResult, SyncStatus
from marslib.status import FullSyncStatus

log = logging.getLogger(__name__)

BLOCK_SIZE = 64 << 10
BLOCKS_PER_REQUEST = 256  # 16 MiB of device per checksum request
WINDOWS_IN_FLIGHT = 4
MAX_READ = 16 << 20


def block_sums(data: bytes | bytearray | memoryview, block_size: int) -> list[int]:
    view = memoryview(data)
    return [crc32c(view[i : i + block_size], 0) for i in range(0, len(view), block_size)]


class SyncSource(Protocol):
    """What the sync service needs of a primary's logger: the Logger itself, or marsd's
    proxy of one in a worker process. A proxy's ``log_end`` may lag the real one but is
    never older than the end when the last ``read`` through it returned."""

    @property
    def log_end(self) -> LogPosition | None: ...

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...


class SyncService:
    """The primary's side: checksums and data of its newest state (log overlay included)."""

    def __init__(self, loggers: Callable[[str], SyncSource | None]) -> None:
        self.loggers = loggers
        self.bytes_served = 0

    def _logger(self, frame: Frame) -> SyncSource:
        name = check_resource_name(str(frame.get("resource", "")))
        logger = self.loggers(name)
        if logger is None:
            raise RuntimeError(f"resource {name} is not primary on this host")
        return logger

    async def handle(self, frame: Frame, peer: PeerInfo) -> Frame:
        logger = self._logger(frame)
        if frame.type == FrameType.STATUS_REQ:
            end = logger.log_end
            return Frame(FrameType.STATUS, {"log_end": end.encode() if end else None,
                                            "size": logger.size})
        if frame.type == FrameType.SYNC_SUMS_REQ:
            offset = int(frame.get("offset", 0))
            bs = int(frame.get("block_size", BLOCK_SIZE))
            count = int(frame.get("count", 1))
            if bs <= 0 or bs > (8 << 20) or count <= 0 or bs * count > 256 << 20:
                raise ValueError(f"bad checksum request: {count} blocks of {bs}")
            length = min(bs * count, logger.size - offset)
            data = await logger.read(offset, length)
            sums = await asyncio.to_thread(block_sums, data, bs)
            return Frame(FrameType.SYNC_SUMS, {"offset": offset, "block_size": bs},
                         struct.pack(f"<{len(sums)}I", *sums))
        if frame.type == FrameType.SYNC_DIFF_REQ:
            # one read: compare with the asker's checksums, send only what differs
            offset = int(frame.get("offset", 0))
            bs = int(frame.get("block_size", BLOCK_SIZE))
            count = int(frame.get("count", 1))
            if bs <= 0 or bs > (8 << 20) or count <= 0 or bs * count > MAX_READ:
                raise ValueError(f"bad diff request: {count} blocks of {bs}")
            theirs = struct.unpack(f"<{len(frame.payload) // 4}I", frame.payload)
            length = min(bs * count, logger.size - offset)
            data = await logger.read(offset, length)
            ours = await asyncio.to_thread(block_sums, data, bs)
            blocks = [i for i, s in enumerate(ours) if i >= len(theirs) or theirs[i] != s]
            view = memoryview(data)
            payload = b"".join(bytes(view[i * bs : (i + 1) * bs]) for i in blocks)
            self.bytes_served += len(payload)
            return Frame(FrameType.SYNC_DIFF, {"offset": offset, "block_size": bs,
                                               "blocks": blocks}, payload)
        if frame.type == FrameType.SYNC_READ_REQ:
            offset = int(frame.get("offset", 0))
            length = int(frame.get("length", 0))
            if length <= 0 or length > MAX_READ:
                raise ValueError(f"bad read request of {length} bytes")
            data = await logger.read(offset, length)
            self.bytes_served += len(data)
            return Frame(FrameType.SYNC_DATA, {"offset": offset}, bytes(data))
        return Frame(FrameType.ERROR, {"error": f"unexpected frame {frame.type} on sync"})


@dataclass
class SyncProgress:
    done: int = 0  # bytes compared (a prefix of the device)
    size: int = 0
    copied: int = 0  # bytes of differing blocks copied
    started: float = 0.0

    @property
    def rate(self) -> float:
        secs = max(time.monotonic() - self.started, 1e-6)
        return self.done / secs



class SyncClient:
    """The replica's side of a fast full sync from the primary."""

    def __init__(self, resource: str, host: str, meta: MetaStore, device: Device, size: int,
                 bundle: PeerBundle, block_size: int = BLOCK_SIZE) -> None:
        self.resource = resource
        self.host = host
        self.meta = meta
        self.device = device
        self.bundle = bundle
        self.block_size = block_size
        self.progress = SyncProgress(size=size, started=time.monotonic())
        self.diff_supported = True
        self._switch = PauseSwitch()
        self.keys = ResourceKeys(resource)
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})

    def _save(self, done: int, size: int) -> None:
        self.meta.set(self.keys.syncstatus(self.host), SyncStatus(done, size).encode())

    async def _status(self) -> LogPosition:
        reply = await self.bundle.request(Frame(FrameType.STATUS_REQ,
                                                {"resource": self.resource}))
        value = reply.get("log_end")
        if not value:
            raise RemoteError("the primary has no log end yet")
        return LogPosition.decode(str(value))

    @property
    def paused(self) -> bool:
        return self._switch.paused

    def pause(self) -> None:
        self._switch.pause()

    def resume(self) -> None:
        self._switch.resume()

    async def run(self) -> None:
        """Sync until done, retrying through network trouble; returns when consistent
        data is on the device up to the log position recorded in syncpos."""
        while True:
            try:
                await self._run_once()
                return
            except (ConnectionError, RemoteError) as exc:
                self.log.warning("sync interrupted: %s; resuming at %d", exc,
                                 self.progress.done)
                await asyncio.sleep(1.0)

    async def _run_once(self) -> None:
        state = SyncStatus.decode(self.meta.get(self.keys.syncstatus(self.host)))
        if state is not None and state.finished:
            state = None  # as before: "done" here means start over
        size = self.progress.size
        if state is None or state.size != size or state.done == 0:
            p0 = await self._status()
            self.meta.set(self.keys.replay(self.host), p0.encode(), durable=True)
            self._save(0, size)
            done = 0
            self.log.info("full sync of %d bytes starts; log replay will start at %s",
                          size, p0.encode())
        else:
            done = state.done
            self.log.info("full sync resumes at %d of %d bytes", done, size)
        self.progress.done = done
        window = self.block_size * BLOCKS_PER_REQUEST
        finished: set[int] = set()
        sem = asyncio.Semaphore(WINDOWS_IN_FLIGHT)
        saved_at = time.monotonic()

        async def one(offset: int) -> None:
            async with sem:
                await self._switch.wait()
                await self._sync_window(offset, min(window, size - offset))
            finished.add(offset)

        offsets = list(range(done, size, window))
        tasks = [asyncio.create_task(one(o)) for o in offsets]
        try:
            for task in asyncio.as_completed(tasks):
                await task
                while self.progress.done in finished:
                    finished.discard(self.progress.done)
                    self.progress.done = min(self.progress.done + window, size)
                if time.monotonic() - saved_at > 0.5:
                    await asyncio.to_thread(self.device.flush)
                    self._save(self.progress.done, size)
                    saved_at = time.monotonic()
        finally:
            for task in tasks:
                task.cancel()
            if self.progress.done < size:
                await asyncio.to_thread(self.device.flush)
                self._save(self.progress.done, size)
        await asyncio.to_thread(self.device.flush)
        p1 = await self._status()
        self.meta.set(self.keys.syncpos(self.host), p1.encode())
        self.meta.set(self.keys.synced_size(self.host), str(size))
        self.meta.set(self.keys.syncstatus(self.host), SYNC_DONE, durable=True)
        # what this sync moved, for operators and playbooks (view: members' last_sync)
        seconds = time.monotonic() - self.progress.started if self.progress.started else 0.0
        self.meta.set(self.keys.syncresult(self.host),
                      SyncResult(size, self.progress.copied, seconds).encode())
        self.log.info("full sync done: %d bytes compared, %d copied; consistent once "
                      "replayed past %s", size, self.progress.copied, p1.encode())

    async def _sync_window(self, offset: int, length: int) -> None:
        if self.diff_supported:
            try:
                await self._sync_window_diff(offset, length)
                return
            except RemoteError as exc:
                if "unexpected frame" not in str(exc):
                    raise
                self.diff_supported = False  # an older primary: checksums, then reads
                self.log.info("the primary predates one-read sync; using checksums + reads")
        await self._sync_window_two_step(offset, length)

    async def _sync_window_diff(self, offset: int, length: int) -> None:
        """Send our checksums; the primary answers with the blocks that differ."""
        bs = self.block_size
        count = -(-length // bs)
        local = await asyncio.to_thread(lambda: block_sums(self.device.pread(offset, length),
                                                           bs))
        reply = await self.bundle.request(Frame(FrameType.SYNC_DIFF_REQ, {
            "resource": self.resource, "offset": offset, "block_size": bs, "count": count},
            struct.pack(f"<{len(local)}I", *local)))
        blocks = [int(i) for i in reply.get("blocks", [])]
        data = memoryview(reply.payload)
        pos = 0
        writes: list[tuple[int, memoryview]] = []
        for i in blocks:
            start = offset + i * bs
            n = min(bs, offset + length - start)
            writes.append((start, data[pos : pos + n]))
            pos += n
        if pos != len(data):
            raise RemoteError(f"sync diff at {offset}: {len(data)} bytes for {len(blocks)} "
                              "blocks")

        def apply() -> None:
            run_start, run = -1, bytearray()
            for start, chunk in writes:  # merge adjacent blocks into one device write
                if run and run_start + len(run) == start:
                    run += chunk
                    continue
                if run:
                    self.device.pwrite(run_start, run)
                run_start, run = start, bytearray(chunk)
            if run:
                self.device.pwrite(run_start, run)

        await asyncio.to_thread(apply)
        self.progress.copied += pos

    async def _sync_window_two_step(self, offset: int, length: int) -> None:
        bs = self.block_size
        count = -(-length // bs)
        def local_window() -> list[int]:
            return block_sums(self.device.pread(offset, length), bs)

        local_task = asyncio.create_task(asyncio.to_thread(local_window))  # meanwhile: remote
        try:
            remote = await self.bundle.request(Frame(FrameType.SYNC_SUMS_REQ, {
                "resource": self.resource, "offset": offset, "block_size": bs, "count": count}))
        except BaseException:
            local_task.cancel()
            raise
        remote_sums = struct.unpack(f"<{len(remote.payload) // 4}I", remote.payload)
        local_sums = await local_task
        runs: list[tuple[int, int]] = []  # (first block, number of blocks) that differ
        for i, (a, b) in enumerate(zip(local_sums, remote_sums, strict=False)):
            if a != b:
                if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] * bs < MAX_READ:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((i, 1))

        async def copy(first: int, n: int) -> None:
            start = offset + first * bs
            want = min(n * bs, offset + length - start)
            reply = await self.bundle.request(Frame(FrameType.SYNC_READ_REQ, {
                "resource": self.resource, "offset": start, "length": want}))
            data = reply.payload
            if len(data) != want:
                raise RemoteError(f"sync read at {start} returned {len(data)} of {want} bytes")
            await asyncio.to_thread(self.device.pwrite, start, data)
            self.progress.copied += want

        await asyncio.gather(*(copy(f, n) for f, n in runs))

    def status(self) -> FullSyncStatus:
        p = self.progress
        return FullSyncStatus(
            sync_done=p.done, sync_size=p.size, sync_copied=p.copied,
            sync_rate=round(p.rate), sync_paused=self.paused,
            sync_eta=round((p.size - p.done) / p.rate, 1) if p.rate > 0 else None,
        )
