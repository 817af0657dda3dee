"""Fast full sync (port 7779): make a replica's device equal to the primary's by comparing
block checksums and copying only the blocks that differ, while the primary keeps writing.

Before the first block, the replica's replay position is set to the primary's log end
(P0); the primary starts a new logfile first (``STATUS_REQ{rotate}``), so P0 is byte 0 of
it and the fetch after the sync starts exactly where the replay starts. After the last
block, ``syncpos-HOST`` records the primary's log end then (P1). Blocks copied in between
may be newer than P0; replaying the log from P0 overwrites them in order, and once the
replay has passed P1 the replica is consistent. Progress is saved in ``syncstatus-HOST``
as ``DONE_BYTES/SIZE`` so that a broken sync resumes.

A sync may be restricted to a :class:`marslib.blockset.BlockSet` (a resync after a known
divergence: only the blocks either side wrote since the fork can differ). Windows without
a block of the set are skipped, and the others compare only the set's blocks
(``SYNC_DIFF_SET_REQ``); a primary that predates this makes it a full sync, reported in
:attr:`SyncClient.dropped`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import signal
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from marslib.blockset import BlockSet
from marslib.checksum import crc32c
from marslib.device import MAX_IO, Device
from marslib.formats.frame import Frame, FrameType
from marslib.layout import MarsPaths, check_resource_name
from marslib.logscan import WrittenBlocks, written_blocks
from marslib.meta import MetaStore, MetaValue
from marslib.net.conn import PeerBundle, RemoteError
from marslib.net.handshake import PeerInfo
from marslib.pausing import PauseSwitch
from marslib.position import LogPosition
from marslib.schema import SYNC_DONE, ResourceKeys, SyncResult, SyncStatus
from marslib.status import FullSyncStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

BLOCK_SIZE = 64 << 10
BLOCKS_PER_REQUEST = 256  # 16 MiB of device per checksum request
WINDOWS_IN_FLIGHT = 8
# blocks of windows in flight at once: 8 whole windows, or many more windows of a sparse
# block set (a resync's few blocks per window would otherwise wait on round trips)
BLOCKS_IN_FLIGHT = WINDOWS_IN_FLIGHT * BLOCKS_PER_REQUEST
IO_WAYS = 4  # threads reading the local blocks of one window, and writing its copies
# listed blocks that a window of a sparse set gathers at most: several such requests in
# flight keep both hosts' disks, the channel and the link busy at once
SET_REQUEST_BLOCKS = 32
MAX_READ = 16 << 20
SUMS_WINDOW = 16 << 20  # a SYNC_SUMS reply carries a position for at most this much
# "v" of the frames added after the first release, by what the primary must know:
# 1: SYNC_DIFF_SET_REQ and SYNC_WRITTEN_REQ; 2: a SYNC_DIFF_SET_REQ window wider than
# MAX_READ, up to SET_SPAN_MAX (its listed blocks still MAX_READ at most). A primary answers
# a "v" above its own FRAME_VERSION as a frame it does not know.
FRAME_VERSION = 2
SET_VERSION = 1
WIDE_SET_VERSION = 2
SET_SPAN_MAX = 1 << 30  # bytes of device one request of a sparse block set may span
WRITTEN_TIMEOUT = 600.0  # the primary's scan of its logs may take a while
# fault injection for tests: the replica kills itself (SIGKILL, its whole process group)
# once this many windows were compared and DONE moved, right after saving the progress;
# until then the windows go one at a time, in order, a MAX_READ each
FAULT_KILL_AFTER = "MARS_FAULT_SYNC_KILL_AFTER"
UNSUPPORTED = "unexpected frame"  # how an older peer answers a frame it does not know


def block_sums(data: bytes | bytearray | memoryview, block_size: int) -> list[int]:
    view = memoryview(data)
    return [crc32c(view[i : i + block_size], 0) for i in range(0, len(view), block_size)]


def pack_sums(sums: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(sums)}I", *sums)


def unpack_sums(payload: bytes | bytearray | memoryview) -> tuple[int, ...]:
    if len(payload) % 4:
        raise ValueError(f"checksums of {len(payload)} bytes: not a multiple of 4")
    return struct.unpack(f"<{len(payload) // 4}I", payload)


def device_block_sums(device: Device, offset: int, length: int, block_size: int) -> list[int]:
    """The crc32c of each block of ``device`` in ``[offset, offset+length)``, read in
    pieces of half the largest I/O; no copy of the data leaves the device's aligned
    buffer. Blocking: call it in a thread."""
    step = max(block_size, (MAX_IO // 2) // block_size * block_size)
    sums: list[int] = []
    for start in range(offset, offset + length, step):
        view = device.pread_view(start, min(step, offset + length - start))
        sums.extend(block_sums(view, block_size))
    return sums


def block_runs(indexes: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending block indexes as runs ``(first, count)`` of adjacent ones."""
    runs: list[tuple[int, int]] = []
    for i in indexes:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _check_window(offset: int, block_size: int, count: int, size: int,
                  span_max: int = MAX_READ) -> None:
    if block_size <= 0 or block_size > (8 << 20) or count <= 0 or \
            block_size * count > span_max or offset < 0 or offset % block_size \
            or offset >= max(size, 1):
        raise ValueError(f"bad window: {count} blocks of {block_size} at {offset}")


def narrow_windows(offset: int, length: int, block_size: int, idx: list[int] | None = None
                   ) -> list[tuple[int, int, list[int] | None]]:
    """``[offset, offset + length)`` as windows of BLOCKS_PER_REQUEST blocks (the last
    one may be shorter), each with its part of ``idx``, ascending block indexes relative
    to ``offset``, made relative to the window (None: no set)."""
    base = block_size * BLOCKS_PER_REQUEST
    out: list[tuple[int, int, list[int] | None]] = []
    for o in range(offset, offset + length, base):
        first = (o - offset) // block_size
        part = None
        if idx is not None:
            lo = bisect.bisect_left(idx, first)
            hi = bisect.bisect_left(idx, first + BLOCKS_PER_REQUEST)
            part = [i - first for i in idx[lo:hi]]
        out.append((o, min(base, offset + length - o), part))
    return out


def set_windows(blocks: BlockSet, start: int, size: int, wide: bool
                ) -> list[tuple[int, int, list[int]]]:
    """The windows a sync restricted to ``blocks`` goes through from ``start`` (a window
    boundary) on: ``(offset, length, indexes)``, the indexes of the set's blocks relative
    to the window; they cover ``[start, size)`` without gaps. Each window is one or more
    of :func:`narrow_windows`; with ``wide``, as many as fit while their listed blocks are
    at most SET_REQUEST_BLOCKS and the window at most SET_SPAN_MAX, so that a sparse set
    takes few requests."""
    bs = blocks.block_size
    mine = [i - start // bs for i in blocks.indices_in(start, size - start)]
    out: list[tuple[int, int, list[int]]] = []
    for o, n, part in narrow_windows(start, size - start, bs, mine):
        assert part is not None
        if out and wide:
            first, length, idx = out[-1]
            if len(idx) + len(part) <= SET_REQUEST_BLOCKS and length + n <= SET_SPAN_MAX:
                idx.extend(i + (o - first) // bs for i in part)
                out[-1] = (first, length + n, idx)
                continue
        out.append((o, n, part))
    return out


def check_block_indexes(blocks: object, count: int) -> list[int]:
    """``blocks`` as window-relative block indexes: a non-empty list of ints, ascending,
    unique, below ``count``; ValueError otherwise."""
    if not isinstance(blocks, list) or not blocks:
        raise ValueError("no block list")
    out: list[int] = []
    for i in blocks:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count or \
                (out and i <= out[-1]):
            raise ValueError(f"bad block list: {str(blocks)[:80]}")
        out.append(i)
    return out


class SyncSource(Protocol):
    """What the sync service needs of a primary's logger: the Logger itself, or marsd's
    proxy of one in a worker process. A proxy's ``log_end`` may lag the real one but is
    never older than the end when the last ``read`` through it returned."""

    @property
    def log_end(self) -> LogPosition | None: ...

    @property
    def size(self) -> int: ...

    @property
    def emergency(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    async def read_at(self, offset: int, length: int
                      ) -> tuple[bytes | bytearray, LogPosition | None]: ...

    async def rotate(self) -> str: ...


@runtime_checkable
class BlockOps(Protocol):
    """Checksums and comparisons of a primary's newest data. marsd's proxy of a worker
    does them in the worker, so that only checksums and differing blocks cross the
    control channel; :class:`ReadBlockOps` does them over any :class:`SyncSource`."""

    async def block_sums(self, offset: int, length: int, block_size: int
                         ) -> tuple[bytes, LogPosition | None]:
        """The packed crc32c of each block of ``[offset, offset + length)`` and the log
        position the data reflects (None: not known)."""

    async def diff_blocks(self, offset: int, length: int, block_size: int, theirs: bytes,
                          blocks: list[int] | None) -> tuple[list[int], bytes]:
        """Compare the asker's packed checksums ``theirs`` with the window
        ``[offset, offset + length)``: of every block (``blocks`` None) or of the listed
        window-relative blocks (one checksum each). Return the blocks that differ and
        their data, back to back."""


@runtime_checkable
class ManyReads(Protocol):
    """A source that reads many ranges at once, in a few threads (the Logger)."""

    async def read_many(self, reads: list[tuple[int, int]]) -> list[bytearray]: ...


class ReadBlockOps:
    """:class:`BlockOps` by reading through a source (in the process that holds it)."""

    def __init__(self, source: SyncSource) -> None:
        self.source = source

    async def block_sums(self, offset: int, length: int, block_size: int
                         ) -> tuple[bytes, LogPosition | None]:
        data, pos = await self.source.read_at(offset, length)
        sums = await asyncio.to_thread(lambda: pack_sums(block_sums(data, block_size)))
        return sums, pos

    async def diff_blocks(self, offset: int, length: int, block_size: int, theirs: bytes,
                          blocks: list[int] | None) -> tuple[list[int], bytes]:
        bs = block_size
        their_sums = unpack_sums(theirs)
        if blocks is None:
            data = await self.source.read(offset, length)
            pieces = [data]
            listed = list(range(-(-length // bs)))
        else:
            if len(their_sums) != len(blocks):
                raise ValueError(f"{len(their_sums)} checksums for {len(blocks)} blocks")
            runs = block_runs(blocks)
            starts = [offset + first * bs for first, _ in runs]
            lengths = [min(n * bs, offset + length - s) for s, (_, n) in zip(starts, runs,
                                                                            strict=True)]
            ranges = list(zip(starts, lengths, strict=True))
            if isinstance(self.source, ManyReads):
                pieces = list(await self.source.read_many(ranges))
            else:
                pieces = list(await asyncio.gather(*(self.source.read(s, n)
                                                     for s, n in ranges)))
            listed = blocks

        def compare() -> tuple[list[int], bytes]:
            views: list[memoryview] = []  # each listed block's data, in order
            for data in pieces:
                view = memoryview(data)
                views.extend(view[i : i + bs] for i in range(0, len(view), bs))
            differ: list[int] = []
            out: list[memoryview] = []
            for k, (idx, view) in enumerate(zip(listed, views, strict=True)):
                if k >= len(their_sums) or crc32c(view, 0) != their_sums[k]:
                    differ.append(idx)
                    out.append(view)
            return differ, b"".join(out)

        return await asyncio.to_thread(compare)


def block_ops(source: SyncSource) -> BlockOps:
    return source if isinstance(source, BlockOps) else ReadBlockOps(source)


class SyncService:
    """The primary's side: checksums and data of its newest state (log overlay included),
    and which blocks its logs wrote (``paths``: its state root; None: it does not say)."""

    def __init__(self, loggers: Callable[[str], SyncSource | None],
                 paths: MarsPaths | None = None) -> None:
        self.loggers = loggers
        self.paths = paths
        self.bytes_served = 0

    def _logger(self, frame: Frame) -> SyncSource:
        name = check_resource_name(str(frame.get("resource", "")))
        logger = self.loggers(name)
        if logger is None:
            raise RuntimeError(f"resource {name} is not primary on this host")
        return logger

    def _closed_link(self, frame: Frame, closed: LogPosition) -> list[object] | None:
        """This primary's version link of the logfile it just closed, as ``[key, value,
        stamp]``: the secondary needs it at once (the metadata push brings it later)."""
        if self.paths is None:
            return None
        key = ResourceKeys(str(frame.get("resource"))).version_link(closed.number,
                                                                    closed.host)
        mv = MetaStore(self.paths.root).read(key)
        return None if mv is None or mv.value is None else mv.to_wire()

    @staticmethod
    def _unexpected(frame: Frame) -> Frame:
        return Frame(FrameType.ERROR, {"error": f"{UNSUPPORTED} {frame.type} (version "
                                                f"{frame.get('v')}) on sync"})

    async def handle(self, frame: Frame, peer: PeerInfo) -> Frame:
        if frame.type in (FrameType.SYNC_DIFF_SET_REQ, FrameType.SYNC_WRITTEN_REQ):
            version = frame.get("v", 1)
            if not isinstance(version, int) or version > FRAME_VERSION:
                return self._unexpected(frame)
        if frame.type == FrameType.SYNC_WRITTEN_REQ:
            return await self._written(frame)
        logger = self._logger(frame)
        if frame.type == FrameType.STATUS_REQ:
            end = logger.log_end
            # not if already at the start of a logfile (a retried request), nor in
            # emergency mode (writes bypass the log), nor before the log is known
            header: dict[str, object] = {}
            if frame.get("rotate") is True and not logger.emergency and end is not None \
                    and end.offset > 0:
                await logger.rotate()
                header["link"] = self._closed_link(frame, end)
            end = logger.log_end
            header.update(log_end=end.encode() if end else None, size=logger.size)
            return Frame(FrameType.STATUS, header)
        if frame.type == FrameType.SYNC_SUMS_REQ:
            offset = int(frame.get("offset", 0))
            bs = int(frame.get("block_size", BLOCK_SIZE))
            count = int(frame.get("count", 1))
            if bs <= 0 or bs > (8 << 20) or count <= 0 or bs * count > 256 << 20 \
                    or not 0 <= offset < logger.size:
                raise ValueError(f"bad checksum request: {count} blocks of {bs} at {offset}")
            length = min(bs * count, logger.size - offset)
            ops = block_ops(logger)
            if length <= SUMS_WINDOW:
                sums, pos = await ops.block_sums(offset, length, bs)
            else:  # an old asker's big window: no single position for it
                step = SUMS_WINDOW // bs * bs
                parts = [(await ops.block_sums(o, min(step, offset + length - o), bs))[0]
                         for o in range(offset, offset + length, step)]
                sums, pos = b"".join(parts), None
            header = {"offset": offset, "block_size": bs}
            if pos is not None:
                header["position"] = pos.encode()
            return Frame(FrameType.SYNC_SUMS, header, sums)
        if frame.type == FrameType.SYNC_DIFF_REQ:
            # one read: compare with the asker's checksums, send only what differs
            count = int(frame.get("count", 1))
            return await self._diff(frame, logger, count, None)
        if frame.type == FrameType.SYNC_DIFF_SET_REQ:
            # the same for the listed blocks of the window only
            count = frame.get("count", BLOCKS_PER_REQUEST)
            if not isinstance(count, int) or isinstance(count, bool):
                raise ValueError(f"bad block count {count!r}")
            return await self._diff(frame, logger, count, frame.get("blocks"),
                                    wide=frame.get("v") == WIDE_SET_VERSION)
        if frame.type == FrameType.SYNC_READ_REQ:
            offset = int(frame.get("offset", 0))
            length = int(frame.get("length", 0))
            if length <= 0 or length > MAX_READ:
                raise ValueError(f"bad read request of {length} bytes")
            data = await logger.read(offset, length)
            self.bytes_served += len(data)
            return Frame(FrameType.SYNC_DATA, {"offset": offset}, bytes(data))
        return Frame(FrameType.ERROR, {"error": f"{UNSUPPORTED} {frame.type} on sync"})

    async def _diff(self, frame: Frame, logger: SyncSource, count: int,
                    listed: object, wide: bool = False) -> Frame:
        """Answer SYNC_DIFF_REQ (``listed`` None: every block of the window) or
        SYNC_DIFF_SET_REQ (the listed window-relative blocks; ``wide``: the window may
        span SET_SPAN_MAX) with the blocks that differ from the asker's checksums."""
        offset = int(frame.get("offset", 0))
        bs = int(frame.get("block_size", BLOCK_SIZE))
        _check_window(offset, bs, count, logger.size,
                      SET_SPAN_MAX if wide and listed is not None else MAX_READ)
        count = min(count, -(-(logger.size - offset) // bs))
        blocks: list[int] | None = None
        if listed is not None:
            blocks = check_block_indexes(listed, count)
            if len(blocks) * bs > MAX_READ:
                raise ValueError(f"{len(blocks)} blocks of {bs} listed: at most {MAX_READ} "
                                 "bytes")
            if len(frame.payload) != 4 * len(blocks):
                raise ValueError(f"{len(frame.payload)} bytes of checksums for {len(blocks)} "
                                 "blocks")
        length = min(bs * count, logger.size - offset)
        differ, payload = await block_ops(logger).diff_blocks(offset, length, bs,
                                                              bytes(frame.payload), blocks)
        self.bytes_served += len(payload)
        return Frame(FrameType.SYNC_DIFF, {"offset": offset, "block_size": bs,
                                           "blocks": differ}, payload)

    async def _written(self, frame: Frame) -> Frame:
        """Which blocks this host's logs of the resource wrote in (since, until]."""
        if self.paths is None:
            return self._unexpected(frame)
        name = check_resource_name(str(frame.get("resource", "")))
        since = LogPosition.decode(str(frame.get("since", "")))
        until_value = frame.get("until")
        until = LogPosition.decode(str(until_value)) if until_value else None
        bs = int(frame.get("block_size", BLOCK_SIZE))
        size = int(frame.get("size", 0))
        if bs <= 0 or bs > (8 << 20) or size <= 0 or -(-size // bs) > (1 << 32):
            raise ValueError(f"bad written-blocks request: size {size}, block size {bs}")
        found = await asyncio.to_thread(written_blocks, self.paths, name, since, until, bs,
                                        size)
        return Frame(FrameType.SYNC_WRITTEN, {
            "count": found.blocks.count, "records": found.records, "missing": found.missing,
            "gap": found.gap, "log_bytes": found.log_bytes}, found.blocks.encode())


@dataclass
class SyncProgress:
    done: int = 0  # bytes of the device passed (a prefix)
    size: int = 0
    copied: int = 0  # bytes of differing blocks copied
    compared: int = 0  # bytes of blocks compared (all of ``done`` unless restricted)
    started: float = 0.0

    @property
    def rate(self) -> float:
        secs = max(time.monotonic() - self.started, 1e-6)
        return self.done / secs


@dataclass(frozen=True)
class CopyResult:
    """What :meth:`SyncClient.copy_blocks` did, in bytes."""

    compared: int
    copied: int


class _SetUnsupported(Exception):
    """The primary does not compare block sets (it predates them)."""


# called with P0 and whether it was just taken (True) or kept from an interrupted sync
Planner = Callable[[LogPosition, bool], Awaitable[BlockSet | None]]


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
        self.set_supported = True
        self.wide_sets = True  # the primary takes set windows wider than MAX_READ
        self.dropped: str | None = None  # why a restricted sync became a full one
        self.blocks: BlockSet | None = None  # the restriction of the current run
        self._switch = PauseSwitch()
        self.keys = ResourceKeys(resource)
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})
        self.windows_done = 0
        kill_after = os.environ.get(FAULT_KILL_AFTER)
        self._kill_after = int(kill_after) if kill_after else None
        if self._kill_after is not None:
            self.log.warning("fault injection: %s=%s", FAULT_KILL_AFTER, kill_after)

    def _save(self, done: int, size: int, durable: bool = False) -> None:
        self.meta.set(self.keys.syncstatus(self.host), SyncStatus(done, size).encode(),
                      durable=durable)

    async def _status(self, rotate: bool = False) -> LogPosition:
        header: dict[str, object] = {"resource": self.resource}
        if rotate:
            header["rotate"] = True
        reply = await self.bundle.request(Frame(FrameType.STATUS_REQ, header))
        self._take_link(reply.get("link"))
        value = reply.get("log_end")
        if not value:
            raise RemoteError("the primary has no log end yet")
        try:
            return LogPosition.decode(str(value))
        except ValueError as exc:
            raise RemoteError(f"the primary sent a bad log end: {exc}") from None

    def _take_link(self, item: object) -> None:
        """Merge the version link a rotating primary sent along (its own key, value and
        stamp, as its metadata push would bring them; anything else is ignored)."""
        if item is None:
            return
        try:
            mv = MetaValue.from_wire(item)
            if mv.value is None or not mv.key.startswith(self.keys.version_prefix()) \
                    or ResourceKeys.parse_version_link(mv.key) is None:
                raise ValueError(f"not a version link of {self.resource}: {item!r}"[:200])
            self.meta.merge(mv)
        except (ValueError, TypeError) as exc:
            self.log.warning("ignoring the primary's version link: %s", exc)

    async def primary_position(self, rotate: bool = False) -> LogPosition:
        """The primary's log end; with ``rotate`` after it started a new logfile (byte 0
        of it, unless in emergency mode or from a primary that predates this)."""
        return await self._status(rotate)

    @property
    def paused(self) -> bool:
        return self._switch.paused

    def pause(self) -> None:
        self._switch.pause()

    def resume(self) -> None:
        self._switch.resume()

    async def run(self, blocks: BlockSet | None = None, plan: Planner | None = None) -> None:
        """Sync until done, retrying through network trouble; returns when consistent
        data is on the device up to the log position recorded in syncpos.

        ``blocks`` restricts the sync to a set of blocks: every other block must already
        be equal on both sides at P0 (a resync after a known divergence). ``plan``, if
        given, is asked for that set instead, each time the sync (re)starts: with P0,
        durable in ``replay-HOST`` by then, and whether P0 was just taken (a set saved
        for an older P0 is stale then); None from it means a full sync.

        Each call starts new counters (``progress``) and forgets what an earlier one found
        out about the primary (``dropped``)."""
        self.progress = SyncProgress(size=self.progress.size, started=time.monotonic())
        self.dropped = None
        self.diff_supported = self.set_supported = self.wide_sets = True
        while True:
            try:
                await self._run_once(blocks, plan)
                return
            except (ConnectionError, RemoteError) as exc:
                self.log.warning("sync interrupted: %s; resuming at %d", exc,
                                 self.progress.done)
                await asyncio.sleep(1.0)

    async def _run_once(self, blocks: BlockSet | None, plan: Planner | None) -> None:
        state = SyncStatus.decode(self.meta.get(self.keys.syncstatus(self.host)))
        if state is not None and state.finished:
            state = None  # as before: "done" here means start over
        size = self.progress.size
        kept = _position(self.meta.get(self.keys.replay(self.host)))
        if state is not None and plan is not None and kept is None:
            state = None  # the plan needs P0, and it is gone: start over
        if state is None or state.size != size or state.done == 0:
            p0 = await self._status(rotate=True)
            self.meta.set(self.keys.replay(self.host), p0.encode(), durable=True)
            self._save(0, size)
            done = 0
            fresh = True
            self.log.info("full sync of %d bytes starts; log replay will start at %s",
                          size, p0.encode())
        else:
            done = state.done
            fresh = False
            self.log.info("full sync resumes at %d of %d bytes", done, size)
        if plan is not None:
            if not fresh:
                assert kept is not None
                p0 = kept
            blocks = await plan(p0, fresh)
        if blocks is not None and (blocks.size, blocks.block_size) != (size,
                                                                       self.block_size):
            raise ValueError(f"a block set of {blocks.size} bytes in blocks of "
                             f"{blocks.block_size} cannot restrict a sync of {size}")
        if blocks is not None and not self.set_supported:
            blocks = None
        self.blocks = blocks
        if blocks is not None:
            self.log.info("the sync compares %d blocks (%d bytes) of the set only",
                          blocks.count, blocks.nbytes)
        self.progress.done = done
        try:
            await self._windows(done, size, blocks, track=True)
        except _SetUnsupported:
            self.dropped = "the primary predates block-set sync: full comparison"
            self.log.warning("%s from %d bytes on", self.dropped, self.progress.done)
            self.blocks = None
            await self._windows(self.progress.done, size, None, track=True)
        await asyncio.to_thread(self.device.flush)
        p1 = await self._status()
        self.meta.set(self.keys.syncpos(self.host), p1.encode())
        self.meta.set(self.keys.synced_size(self.host), str(size))
        # what this sync moved, for operators and playbooks (view: members' last_sync),
        # before "done": whoever waits for "done" finds the figures with it
        seconds = time.monotonic() - self.progress.started if self.progress.started else 0.0
        compared = self.progress.compared if self.blocks is not None else size
        self.meta.set(self.keys.syncresult(self.host),
                      SyncResult(compared, self.progress.copied, seconds).encode())
        self.meta.set(self.keys.syncstatus(self.host), SYNC_DONE, durable=True)
        self.log.info("full sync done: %d bytes compared, %d copied; consistent once "
                      "replayed past %s", compared, self.progress.copied, p1.encode())

    async def copy_blocks(self, blocks: BlockSet) -> CopyResult:
        """Make the blocks of ``blocks`` equal to the primary's newest data, in one pass:
        compared, and copied where they differ. Nothing else: no replay position, no
        progress in the tree (the caller holds the replay and sets ``syncpos``)."""
        if (blocks.size, blocks.block_size) != (self.progress.size, self.block_size):
            raise ValueError("the block set does not match the device")
        compared, copied = self.progress.compared, self.progress.copied
        budget = BlockBudget(BLOCKS_IN_FLIGHT)

        async def one(offset: int, length: int, idx: list[int]) -> None:
            async with budget.take(len(idx)):
                await self._switch.wait()
                try:
                    await self._sync_window_set(offset, length, idx)
                except _SetUnsupported:  # the whole window, a MAX_READ at a time
                    for o, n, _ in narrow_windows(offset, length, self.block_size):
                        await self._sync_window(o, n)

        windows = set_windows(blocks, 0, self.progress.size, self.wide_sets)
        await all_or_cancel([one(*w) for w in windows if w[2]])
        await asyncio.to_thread(self.device.flush)
        return CopyResult(self.progress.compared - compared, self.progress.copied - copied)

    async def _windows(self, done: int, size: int, blocks: BlockSet | None,
                       track: bool) -> None:
        """Compare (and copy) the windows from ``done`` on; advance and save DONE."""
        bs = self.block_size
        # with the fault injection, narrow windows one at a time, in order: the kill then
        # lands between two of them, with DONE in the middle of the device
        in_order = self._kill_after is not None
        windows: list[tuple[int, int, list[int] | None]] = []
        if blocks is None:
            windows.extend(narrow_windows(done, size - done, bs))
        else:
            windows.extend(set_windows(blocks, done, size, self.wide_sets and not in_order))
        ends = {offset: offset + length for offset, length, _ in windows}
        finished: set[int] = set()
        budget = BlockBudget(1 if in_order else BLOCKS_IN_FLIGHT)
        saved_at = time.monotonic()

        async def one(offset: int, length: int, idx: list[int] | None) -> None:
            async with budget.take(-(-length // bs) if idx is None else len(idx)):
                await self._switch.wait()
                if idx is None:
                    await self._sync_window(offset, length)
                else:
                    await self._sync_window_set(offset, length, idx)
            finished.add(offset)

        work = [w for w in windows if w[2] is None or w[2]]
        finished.update(o for o, _, idx in windows if idx == [])  # nothing of the set there
        tasks = [asyncio.create_task(one(*w)) for w in work]

        def advance() -> None:
            while self.progress.done in finished:
                finished.discard(self.progress.done)
                self.progress.done = ends[self.progress.done]

        try:
            advance()  # leading windows with nothing to do
            for task in asyncio.as_completed(tasks):
                await task
                self.windows_done += 1
                advance()
                if self._kill_after is not None and self.windows_done >= self._kill_after \
                        and self.progress.done > done:
                    await asyncio.to_thread(self.device.flush)
                    self._save(self.progress.done, size, durable=True)
                    self.log.warning("fault injection: killing this process group after "
                                     "%d windows, at %d bytes", self.windows_done,
                                     self.progress.done)
                    os.killpg(0, signal.SIGKILL)
                if track and time.monotonic() - saved_at > 0.5:
                    await asyncio.to_thread(self.device.flush)
                    self._save(self.progress.done, size)
                    saved_at = time.monotonic()
        finally:
            for task in tasks:
                task.cancel()
            if track and self.progress.done < size:
                await asyncio.to_thread(self.device.flush)
                self._save(self.progress.done, size)

    async def _sync_window(self, offset: int, length: int) -> None:
        if self.diff_supported:
            try:
                await self._sync_window_diff(offset, length)
                return
            except RemoteError as exc:
                if UNSUPPORTED not in str(exc):
                    raise
                self.diff_supported = False  # an older primary: checksums, then reads
                self.log.info("the primary predates one-read sync; using checksums + reads")
        await self._sync_window_two_step(offset, length)

    def _local_sums(self, offset: int, length: int) -> list[int]:
        """The crc32c of each block of the local window (in a thread)."""
        return device_block_sums(self.device, offset, length, self.block_size)

    def _local_sums_of(self, offset: int, length: int, idx: list[int]) -> list[int]:
        """The crc32c of the listed window-relative blocks only."""
        bs = self.block_size
        step_blocks = max(1, (MAX_IO // 2) // bs)
        sums: list[int] = []
        for first, n in block_runs(idx):
            while n > 0:
                take = min(n, step_blocks)
                start = offset + first * bs
                view = self.device.pread_view(start, min(take * bs, offset + length - start))
                sums.extend(block_sums(view, bs))
                first += take
                n -= take
        return sums

    async def _sync_window_diff(self, offset: int, length: int) -> None:
        """Send our checksums; the primary answers with the blocks that differ."""
        bs = self.block_size
        count = -(-length // bs)
        local = await asyncio.to_thread(self._local_sums, offset, length)
        reply = await self.bundle.request(Frame(FrameType.SYNC_DIFF_REQ, {
            "resource": self.resource, "offset": offset, "block_size": bs, "count": count},
            pack_sums(local)))
        await self._apply_diff(offset, length, reply, None)
        self.progress.compared += length

    async def _sync_window_set(self, offset: int, length: int, idx: list[int]) -> None:
        """Send the checksums of the listed blocks only; the primary answers with those
        of them that differ. A window wider than MAX_READ goes in one request if the
        primary takes it, else a MAX_READ at a time."""
        if not idx:
            return
        if not self.set_supported:
            raise _SetUnsupported()
        bs = self.block_size
        wide = length > MAX_READ
        if wide and not self.wide_sets:
            for o, n, part in narrow_windows(offset, length, bs, idx):
                assert part is not None
                await self._sync_window_set(o, n, part)
            return
        parts = await asyncio.gather(*(asyncio.to_thread(self._local_sums_of, offset, length, p)
                                       for p in _shares(idx, IO_WAYS)))
        local = [crc for part in parts for crc in part]
        try:
            reply = await self.bundle.request(Frame(FrameType.SYNC_DIFF_SET_REQ, {
                "v": WIDE_SET_VERSION if wide else SET_VERSION, "resource": self.resource,
                "offset": offset, "block_size": bs, "count": -(-length // bs),
                "blocks": idx}, pack_sums(local)))
        except RemoteError as exc:
            if UNSUPPORTED not in str(exc):
                raise
            if wide:
                self.wide_sets = False
                self.log.info("the primary takes block-set windows of %d bytes at most",
                              MAX_READ)
                await self._sync_window_set(offset, length, idx)
                return
            self.set_supported = False
            raise _SetUnsupported() from None
        await self._apply_diff(offset, length, reply, idx)
        self.progress.compared += sum(min(bs, offset + length - (offset + i * bs))
                                      for i in idx)

    async def _apply_diff(self, offset: int, length: int, reply: Frame,
                          asked: list[int] | None) -> None:
        """Write the differing blocks of a SYNC_DIFF reply, adjacent ones merged."""
        bs = self.block_size
        count = -(-length // bs)
        try:
            if reply.type != FrameType.SYNC_DIFF or reply.get("offset") != offset:
                raise ValueError(f"a {reply.type} reply for offset {reply.get('offset')}")
            raw = reply.get("blocks", [])
            blocks = check_block_indexes(raw, count) if raw else []
            if asked is not None and not set(blocks) <= set(asked):
                raise ValueError("blocks that were not asked for")
        except (ValueError, TypeError) as exc:
            raise RemoteError(f"sync diff at {offset}: bad reply: {exc}") from None
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

        def apply(share: list[tuple[int, memoryview]]) -> None:
            run_start, run = -1, bytearray()
            for start, chunk in share:  # merge adjacent blocks into one device write
                if run and run_start + len(run) == start:
                    run += chunk
                    continue
                if run:
                    self.device.pwrite(run_start, run)
                run_start, run = start, bytearray(chunk)
            if run:
                self.device.pwrite(run_start, run)

        if writes:
            await asyncio.gather(*(asyncio.to_thread(apply, share)
                                   for share in _shares(writes, IO_WAYS)))
        self.progress.copied += pos

    async def _sync_window_two_step(self, offset: int, length: int) -> None:
        bs = self.block_size
        count = -(-length // bs)
        local_task = asyncio.create_task(asyncio.to_thread(self._local_sums, offset, length))
        try:
            remote = await self.bundle.request(Frame(FrameType.SYNC_SUMS_REQ, {
                "resource": self.resource, "offset": offset, "block_size": bs, "count": count}))
        except BaseException:
            local_task.cancel()
            raise
        try:
            remote_sums = unpack_sums(remote.payload)
        except ValueError as exc:
            local_task.cancel()
            raise RemoteError(f"sync sums at {offset}: {exc}") from None
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
        self.progress.compared += length

    # ------------------------------------------------------------ other questions
    async def remote_sums(self, offset: int, length: int) -> tuple[list[int], LogPosition]:
        """The primary's crc32c of each block of ``[offset, offset + length)`` (at most
        16 MiB, ``offset`` block-aligned) and the log position its data reflects."""
        bs = self.block_size
        if length <= 0 or length > SUMS_WINDOW or offset % bs:
            raise ValueError(f"bad checksum window {offset}+{length}")
        reply = await self.bundle.request(Frame(FrameType.SYNC_SUMS_REQ, {
            "resource": self.resource, "offset": offset, "block_size": bs,
            "count": -(-length // bs)}))
        value = reply.get("position")
        if not value:
            raise RemoteError("the primary predates verify: its checksums carry no log "
                              "position")
        try:
            sums = list(unpack_sums(reply.payload))
            pos = LogPosition.decode(str(value))
        except ValueError as exc:
            raise RemoteError(f"sync sums at {offset}: bad reply: {exc}") from None
        if len(sums) != -(-length // bs):
            raise RemoteError(f"sync sums at {offset}: {len(sums)} checksums for "
                              f"{-(-length // bs)} blocks")
        return sums, pos

    async def written_on_primary(self, since: LogPosition, until: LogPosition | None
                                 ) -> WrittenBlocks:
        """The blocks the primary's logs wrote after ``since`` up to ``until``, by its
        own header scan (``SYNC_WRITTEN_REQ``). A primary that predates this gives a
        result with ``missing`` saying so."""
        size = self.progress.size
        header: dict[str, object] = {
            "v": SET_VERSION, "resource": self.resource, "since": since.encode(),
            "until": until.encode() if until is not None else None,
            "block_size": self.block_size, "size": size}
        try:
            reply = await self.bundle.request(Frame(FrameType.SYNC_WRITTEN_REQ, header),
                                              timeout=WRITTEN_TIMEOUT)
        except RemoteError as exc:
            if UNSUPPORTED not in str(exc):
                raise
            return WrittenBlocks(BlockSet(size, self.block_size),
                                 missing="the primary predates log-based resync")
        try:
            blocks = BlockSet.decode(reply.payload)
            if (blocks.size, blocks.block_size) != (size, self.block_size):
                raise ValueError(f"a set of {blocks.size} bytes in blocks of "
                                 f"{blocks.block_size}")
            missing, gap = reply.get("missing"), reply.get("gap")
            return WrittenBlocks(blocks, records=int(reply.get("records", 0)),
                                 log_bytes=int(reply.get("log_bytes", 0)),
                                 missing=str(missing) if missing else None,
                                 gap=str(gap) if gap else None)
        except (ValueError, TypeError) as exc:
            raise RemoteError(f"the primary's written-blocks answer is damaged: {exc}"
                              ) from None

    def status(self) -> FullSyncStatus:
        p = self.progress
        return FullSyncStatus(
            sync_done=p.done, sync_size=p.size, sync_copied=p.copied,
            sync_rate=round(p.rate), sync_paused=self.paused,
            sync_eta=round((p.size - p.done) / p.rate, 1) if p.rate > 0 else None,
        )


def _position(value: str | None) -> LogPosition | None:
    try:
        return LogPosition.decode(value) if value else None
    except ValueError:
        return None


def _shares(items: list[T], ways: int) -> list[list[T]]:
    """``items`` in at most ``ways`` consecutive slices of about equal length."""
    n = max(1, min(ways, len(items)))
    step = -(-len(items) // n)
    return [items[i : i + step] for i in range(0, len(items), step)]


class BlockBudget:
    """How many blocks the windows in flight may hold together: a window takes its
    blocks (at most the whole budget) before it starts and gives them back when done."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def take(self, blocks: int) -> AsyncIterator[None]:
        n = max(1, min(blocks, self.total))
        async with self._cond:
            await self._cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            async with self._cond:
                self.free += n
                self._cond.notify_all()


async def all_or_cancel(coros: list[Awaitable[None]]) -> None:
    """Run ``coros`` concurrently; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        for task in asyncio.as_completed(tasks):
            await task
    finally:
        for task in tasks:
            task.cancel()
