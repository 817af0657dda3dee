"""Online verify: compare a secondary's device with the primary's, block by block, while
the application writes (``marsadm verify``).

The primary's checksums of a window (at most 16 MiB) come with the log position P its data
reflects (``SyncClient.remote_sums``). The secondary reads the same window while replay
batches are held off (:meth:`marslib.replay.Replayer.quiesced`), so its data is exactly
the state at its replay position Q. A block the log wrote between the two positions may
differ only because one side is ahead: those blocks are *touched*, taken from a header
index of the local logs (:class:`marslib.logscan.TouchIndex`), and compared again later,
up to ``RETRY_PASSES`` more times; one that is being written every time is reported as
*unsettled*, never as different. A block that differs and that no record between P and Q
wrote differs for real. When the index cannot vouch for the range (a logfile went, a
copy was cut by a refetch, the local log does not reach P in time), every differing block
of the window is retried.

Progress: ``verifystatus-HOST`` = ``DONE/SIZE`` (a prefix of the device, as a full sync
does), saved every 0.5 s after the verify's state file
``/mars/resource-R/verify-HOST.json`` was written durably with every list so far, so that
a verify killed at any point resumes at DONE and loses nothing. At the end:
``verifyresult-HOST``, ``verifydiff-HOST`` (the first ranges), ``verifystatus=done``.

With ``repair`` the differing blocks are then copied from the primary: replay held off,
``verifystatus=repairing`` (durable; the replica is not consistent while it is set),
``syncpos-HOST`` := the primary's log end, the blocks copied (``SyncClient.copy_blocks``),
``syncpos-HOST`` := the primary's log end after the copy. Replay then goes on from Q and
rewrites every later write in order, and the replica is consistent once it has passed
syncpos (as after a full sync). A crash while repairing redoes the copy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from marslib.blockset import BlockSet
from marslib.device import Device
from marslib.durable import write_file_durably
from marslib.errors import DeviceError
from marslib.eventwait import wait_set
from marslib.fetch import Fetcher
from marslib.layout import MarsPaths, parse_logfile_name
from marslib.logscan import TouchIndex
from marslib.meta import MAX_VALUE_LEN, MetaStore
from marslib.net.conn import RemoteError
from marslib.position import LogPosition
from marslib.replay import Replayer
from marslib.schema import (
    ON,
    ResourceKeys,
    VerifyDiff,
    VerifyResult,
    VerifyStatus,
    is_primary_host,
)
from marslib.status import OnlineVerifyStatus
from marslib.sync import (
    BLOCK_SIZE,
    SUMS_WINDOW,
    SyncClient,
    all_or_cancel,
    block_runs,
    device_block_sums,
)

log = logging.getLogger(__name__)

WINDOW = SUMS_WINDOW  # one checksum request: one position on the primary
WINDOWS_IN_FLIGHT = 8  # the primary's read of one overlaps the local read of another
RETRY_PASSES = 5  # more comparisons of a block that was being written
RETRY_SPAN_BLOCKS = 256  # a retry compares runs of at most this many blocks at once
RETRY_GAP_BLOCKS = 16  # retried blocks this close are compared in one run
SAVE_EVERY = 0.5  # seconds between saves of the progress
COVER_TIMEOUT = 30.0  # seconds a window waits for the local log to reach the primary's P
WAIT_PRIMARY = 5.0  # seconds between looks while the primary cannot be verified against
CATCH_UP_WAIT = 10.0  # before a retry pass: at most this long for replay to reach the last P
RESTART_AFTER = 10.0  # seconds before a verify that failed unexpectedly starts again
LOGGED_BLOCKS = 16  # differing blocks named in marsd's log (all are in the result)
STATE_VERSION = 1
# fault injection for tests: the secondary kills itself (SIGKILL, its whole process group)
# once this many windows were compared (one at a time) and DONE moved, right after saving
# the progress
FAULT_KILL_AFTER = "MARS_FAULT_VERIFY_KILL_AFTER"

PHASE_COMPARE, PHASE_RETRY, PHASE_REPAIR, PHASE_FINISHED = (
    "compare", "retry", "repair", "finished")

T = TypeVar("T")


def state_path(paths: MarsPaths, resource: str, host: str) -> Path:
    """The verify's state file: ``/mars/resource-R/verify-HOST.json``."""
    return paths.resource_dir(resource) / f"verify-{host}.json"


def byte_ranges(blocks: BlockSet) -> list[tuple[int, int]]:
    """The set's blocks as byte ranges ``(offset, length)`` of adjacent blocks (the last
    block of the device may be short)."""
    bs = blocks.block_size
    return [(first * bs, min(count * bs, blocks.size - first * bs))
            for first, count in blocks.runs_in(0, blocks.size)]


def diff_value(ranges: list[tuple[int, int]]) -> str:
    """The ``verifydiff-HOST`` value: as many of the first ranges as fit a tree value."""
    diff = VerifyDiff.of(ranges)
    while len(diff.encode()) > MAX_VALUE_LEN:
        keep = len(diff.ranges) - 1
        diff = VerifyDiff(tuple(ranges[:keep]), len(ranges) - keep)
    return diff.encode()


def covered(fetcher: Fetcher, pos: LogPosition) -> bool:
    """The local copy of the log holds every record up to ``pos``."""
    parsed = parse_logfile_name(fetcher.logfile)
    if parsed is None:
        return False
    return (parsed[0], fetcher.local_end) >= (pos.number, pos.offset)


@dataclass
class VerifyState:
    """What a verify has found so far: kept in the state file, so that a resume loses
    nothing. Blocks are 64 KiB device blocks."""

    size: int
    block_size: int = BLOCK_SIZE
    repair: bool = False
    phase: str = PHASE_COMPARE
    done: int = 0  # the first pass has compared every window below this offset
    compared: int = 0  # bytes compared, retries included
    differ: BlockSet = field(default_factory=lambda: BlockSet(0))  # real differences
    retry: set[int] = field(default_factory=set)  # blocks written while compared
    touched: int = 0  # blocks put on the retry list (each time)
    window_retries: int = 0  # windows the log index could not vouch for
    passes: int = 0  # retry passes finished
    seconds: float = 0.0  # spent before this run (a resumed verify)
    resumed_at: int = 0  # DONE when this verify was resumed (0: it was not)
    repaired: int = 0  # bytes copied by the repair
    synced_at: str | None = None  # syncpos-HOST when it started: a resync since voids it

    def __post_init__(self) -> None:
        if self.differ.size != self.size or self.differ.block_size != self.block_size:
            self.differ = BlockSet(self.size, self.block_size)

    def block_bytes(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    @property
    def unsettled_bytes(self) -> int:
        return sum(self.block_bytes(i) for i in self.retry)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "size": self.size, "block_size": self.block_size,
            "repair": self.repair, "phase": self.phase, "done": self.done,
            "compared": self.compared,
            "differ": base64.b64encode(self.differ.encode()).decode(),
            "differing_bytes": self.differ.nbytes,
            "retry": block_runs(sorted(self.retry)), "touched": self.touched,
            "window_retries": self.window_retries, "passes": self.passes,
            "seconds": round(self.seconds, 3), "resumed_at": self.resumed_at,
            "repaired": self.repaired, "synced_at": self.synced_at,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> VerifyState:
        """ValueError if ``obj`` is no state this release wrote."""
        try:
            if obj.get("version") != STATE_VERSION:
                raise ValueError(f"state version {obj.get('version')}")
            differ = BlockSet.decode(base64.b64decode(obj["differ"], validate=True))
            retry = {i for first, count in obj["retry"] for i in range(first, first + count)}
            state = cls(size=int(obj["size"]), block_size=int(obj["block_size"]),
                        repair=bool(obj["repair"]), phase=str(obj["phase"]),
                        done=int(obj["done"]), compared=int(obj["compared"]), differ=differ,
                        retry=retry, touched=int(obj["touched"]),
                        window_retries=int(obj["window_retries"]), passes=int(obj["passes"]),
                        seconds=float(obj["seconds"]), resumed_at=int(obj["resumed_at"]),
                        repaired=int(obj["repaired"]), synced_at=obj.get("synced_at"))
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"damaged verify state: {exc!r}") from None
        if (differ.size, differ.block_size) != (state.size, state.block_size) or \
                state.phase not in (PHASE_COMPARE, PHASE_RETRY, PHASE_REPAIR, PHASE_FINISHED):
            raise ValueError("damaged verify state: inconsistent fields")
        return state


def load_state(path: Path) -> VerifyState | None:
    """The state saved at ``path``; None if there is none or it cannot be read."""
    try:
        return VerifyState.from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        log.warning("verify state %s cannot be used: %s", path, exc)
        return None


@dataclass(frozen=True)
class WindowResult:
    """One comparison of ``[offset, offset + length)``, block by block."""

    equal: list[int]
    differ: list[int]  # differ, and nothing wrote them between the two positions
    touched: list[int]  # differ, and were written between them (or no index says not)
    whole_window: bool  # the index could not vouch for the range: all differing touched


class VerifyClient:
    """The secondary's side of one online verify (resumed from the state file when
    ``verifystatus-HOST`` says it was under way)."""

    def __init__(self, resource: str, host: str, paths: MarsPaths, meta: MetaStore,
                 device: Device, syncer: SyncClient, fetcher: Fetcher, replayer: Replayer,
                 block_size: int = BLOCK_SIZE) -> None:
        self.resource = resource
        self.host = host
        self.paths = paths
        self.meta = meta
        self.device = device
        self.syncer = syncer
        self.fetcher = fetcher
        self.replayer = replayer
        self.block_size = block_size
        self.size = syncer.progress.size
        self.keys = ResourceKeys(resource)
        self.path = state_path(paths, resource, host)
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})
        self.state = VerifyState(self.size, block_size)
        self.error: str | None = None
        self.started = time.monotonic()
        self.done_at_start = 0
        self.windows_done = 0
        self.index: TouchIndex | None = None
        self._index_lock = asyncio.Lock()
        self._floors: dict[int, LogPosition] = {}  # window id: replay position before it
        self._newest_p: LogPosition | None = None  # the newest primary position compared at
        self._next_id = 0
        self._io: set[asyncio.Future[Any]] = set()  # device reads in threads
        self._lost_repair = False  # a repair was cut short and its list is gone
        self._logged_blocks = 0
        self._save_lock = asyncio.Lock()
        self._saving: asyncio.Future[None] | None = None  # a save in the background
        kill_after = os.environ.get(FAULT_KILL_AFTER)
        self._kill_after = int(kill_after) if kill_after else None
        if self._kill_after is not None:
            self.log.warning("fault injection: %s=%s", FAULT_KILL_AFTER, kill_after)

    # ---------------------------------------------------------------- running
    async def run(self) -> None:
        """Verify until done (or repaired), waiting through network trouble and a primary
        that cannot be verified against; returns after ``verifystatus=done``."""
        if not self._load():
            return
        self.index = self._new_index()  # before any window: none reaches back past it
        while True:
            try:
                await self._primary_checks()
                if self._lost_repair:
                    await self._after_lost_repair()
                await self._run_once()
                return
            except (ConnectionError, RemoteError, OSError, DeviceError) as exc:
                self.error = f"{type(exc).__name__}: {exc}" if not isinstance(
                    exc, RemoteError) else str(exc)
                self.log.warning("verify interrupted: %s; going on at %d", self.error,
                                 self.state.done)
                await asyncio.sleep(1.0)

    def _load(self) -> bool:
        """Start or resume as ``verifystatus-HOST`` asks; False: nothing to do."""
        asked = VerifyStatus.decode(self.meta.get(self.keys.verifystatus(self.host)))
        if asked is None or asked.finished:
            return False
        saved = load_state(self.path)
        if asked.repairing and (saved is None or saved.size != self.size or saved.phase
                                not in (PHASE_REPAIR, PHASE_FINISHED)):
            # the copy may have been cut short, and which blocks were to be copied is
            # unknown: consistent again once replayed past the primary's end now (no block
            # copied before can reflect more), and a new verify finds the rest
            self.log.error("the verify was repairing, and its list of differences (%s) is "
                           "gone: verifying again from the start, with repair", self.path)
            self._lost_repair = True
            self.state = VerifyState(self.size, self.block_size, repair=True)
        elif asked.repairing:
            assert saved is not None
            self.state = saved
            self.state.phase = PHASE_REPAIR  # the copy is redone: it may be incomplete
            self.log.warning("the repair of %d differing blocks was interrupted: copying "
                             "them again", saved.differ.count)
        elif asked.done > 0 and saved is not None and saved.size == self.size and \
                saved.repair == asked.repair and saved.done >= asked.done and \
                saved.phase != PHASE_FINISHED and saved.synced_at == self._synced_at():
            self.state = saved
            self.state.resumed_at = saved.done
            self.log.info("verify resumes at %d of %d bytes (%d differing blocks, %d to "
                          "retry so far)", saved.done, self.size, saved.differ.count,
                          len(saved.retry))
        else:
            if asked.done > 0:
                self.log.warning("verify at %d bytes, but its state file is missing or "
                                 "stale, or the replica was resynced since: starting over",
                                 asked.done)
            if asked.size and asked.size != self.size:
                self.log.warning("verify asked for %d bytes, the resource has %d: verifying "
                                 "%d", asked.size, self.size, self.size)
            self.state = VerifyState(self.size, self.block_size, repair=asked.repair,
                                     synced_at=self._synced_at())
            self.log.info("verify of %d bytes against the primary starts%s", self.size,
                          " (differences are repaired)" if asked.repair else "")
        self.done_at_start = self.state.done
        self.started = time.monotonic()
        return True

    def _synced_at(self) -> str | None:
        return self.meta.get(self.keys.syncpos(self.host))

    def _primary_emergency(self) -> bool:
        primary = self.meta.get(self.keys.primary)
        return is_primary_host(primary) and \
            self.meta.get(self.keys.actual(str(primary), "emergency")) == ON

    async def _primary_checks(self) -> None:
        """Wait while the primary cannot be verified against: none, or in emergency mode
        (its device then has writes that no log holds)."""
        while True:
            primary = self.meta.get(self.keys.primary)
            if not is_primary_host(primary) or primary == self.host:
                self.error = "the resource has no primary to verify against: waiting"
            elif self._primary_emergency():
                self.error = (f"the primary {primary} is in emergency mode (writes bypass "
                              "its log): waiting")
            else:
                return
            await asyncio.sleep(WAIT_PRIMARY)

    async def _run_once(self) -> None:
        st = self.state
        if st.phase == PHASE_COMPARE:
            await self._first_pass()
            st.phase = PHASE_RETRY
            await self._save(durable=True)
        if st.phase == PHASE_RETRY:
            await self._retry_passes()
            st.phase = PHASE_REPAIR if st.repair and st.differ.count else PHASE_FINISHED
            await self._save(durable=True)
        if st.phase == PHASE_REPAIR:
            await self._repair()
            st.phase = PHASE_FINISHED
        await self._finish()

    # ------------------------------------------------------------- comparing
    def _new_index(self) -> TouchIndex:
        return TouchIndex(self.paths, self.resource, self.replayer.position, self.block_size)

    async def _first_pass(self) -> None:
        """Compare every window from DONE on, WINDOWS_IN_FLIGHT at once; DONE moves over
        the windows finished in order, and is saved every SAVE_EVERY seconds."""
        st = self.state
        size = self.size
        finished: set[int] = set()
        saved_at = time.monotonic()

        async def one(offset: int) -> None:
            self._take(await self._compare(offset, min(WINDOW, size - offset)))
            finished.add(offset)

        offsets = iter(range(st.done, size, WINDOW))
        pending: set[asyncio.Future[None]] = set()
        # a fault-injected kill comes after exactly that many windows: one at a time then
        in_flight = 1 if self._kill_after is not None else WINDOWS_IN_FLIGHT
        try:
            while True:
                for offset in offsets:
                    pending.add(asyncio.ensure_future(one(offset)))
                    if len(pending) >= in_flight:
                        break
                if not pending:
                    return
                ended, pending = await asyncio.wait(pending,
                                                    return_when=asyncio.FIRST_COMPLETED)
                for task in ended:
                    task.result()  # a window's failure ends the pass (the caller retries)
                self.windows_done += len(ended)
                self.error = None
                while st.done in finished:
                    finished.discard(st.done)
                    st.done = min(st.done + WINDOW, size)
                if self._kill_after is not None and self.windows_done >= self._kill_after \
                        and st.done > self.done_at_start:
                    await self._save(durable=True)
                    self.log.warning("fault injection: killing this process group after "
                                     "%d windows, at %d bytes", self.windows_done, st.done)
                    os.killpg(0, signal.SIGKILL)
                if time.monotonic() - saved_at > SAVE_EVERY:
                    self._save_soon()
                    saved_at = time.monotonic()
        finally:
            for task in pending:
                task.cancel()
            if self._saving is not None:
                await asyncio.wait([self._saving])  # (a failure is logged: _saved)

    async def _retry_passes(self) -> None:
        """Compare the blocks that were being written again, up to RETRY_PASSES times."""
        st = self.state
        sem = asyncio.Semaphore(WINDOWS_IN_FLIGHT)

        async def one(offset: int, length: int) -> None:
            async with sem:
                result = await self._compare(offset, length)
            self._take(result, only=st.retry)

        while st.retry and st.passes < RETRY_PASSES:
            await self._replay_reaches(self._newest_p)
            spans = self._retry_spans(sorted(st.retry))
            self.log.info("verify pass %d: %d blocks that were being written, in %d runs",
                          st.passes + 1, len(st.retry), len(spans))
            await all_or_cancel([one(o, n) for o, n in spans])
            st.passes += 1
            await self._save(durable=True)
        if st.retry:
            self.log.warning("verify: %d blocks were being written at every comparison: "
                             "unsettled (not reported as different)", len(st.retry))

    async def _replay_reaches(self, pos: LogPosition | None) -> None:
        """Wait (a while, not while replay is paused) until the replica has replayed up to
        ``pos``: a replica catching up has most blocks written between its position and
        the primary's, and would find them busy again at once."""
        deadline = time.monotonic() + CATCH_UP_WAIT
        while pos is not None and not self.replayer.paused and \
                time.monotonic() < deadline:
            q = self.replayer.position
            if (q.number, q.offset) >= (pos.number, pos.offset):
                return
            await asyncio.sleep(0.05)

    def _retry_spans(self, blocks: list[int]) -> list[tuple[int, int]]:
        """Byte ranges to compare again: runs of the blocks, nearby ones merged."""
        bs = self.block_size
        spans: list[tuple[int, int]] = []  # (first block, last block)
        for i in blocks:
            if spans and i - spans[-1][1] <= RETRY_GAP_BLOCKS and \
                    i - spans[-1][0] < RETRY_SPAN_BLOCKS:
                spans[-1] = (spans[-1][0], i)
            else:
                spans.append((i, i))
        return [(first * bs, min((last + 1) * bs, self.size) - first * bs)
                for first, last in spans]

    def _take(self, result: WindowResult, only: set[int] | None = None) -> None:
        """Record a comparison; ``only``: the blocks it was made for (the others of the
        range were settled before)."""
        st = self.state
        for i in result.equal:
            st.retry.discard(i)
        for i in result.differ:
            if only is None or i in only:
                st.retry.discard(i)
                if i not in st.differ:
                    st.differ.add(i)
                    self._logged_blocks += 1
                    if self._logged_blocks <= LOGGED_BLOCKS:
                        self.log.warning("verify: block %d (%d+%d) differs from the "
                                         "primary's%s", i, i * self.block_size,
                                         st.block_bytes(i), "" if self._logged_blocks <
                                         LOGGED_BLOCKS else " (the result lists the others)")
        for i in result.touched:
            if only is None or i in only:
                st.retry.add(i)
                st.touched += 1
        if result.whole_window:
            st.window_retries += 1

    async def _compare(self, offset: int, length: int) -> WindowResult:
        """Compare ``[offset, offset + length)`` (at most one window) once."""
        wid = self._next_id
        self._next_id += 1
        self._floors[wid] = self.replayer.position  # P and Q are both at or after it
        remote = asyncio.ensure_future(self.syncer.remote_sums(offset, length))
        local = asyncio.ensure_future(self._local_sums(offset, length))
        try:
            (sums_p, p), (sums_q, q, redoing) = await asyncio.gather(remote, local)
            if self._newest_p is None or p > self._newest_p:
                self._newest_p = p
            self.state.compared += length
            first = offset // self.block_size
            equal: list[int] = []
            differing: list[int] = []
            for k, (a, b) in enumerate(zip(sums_p, sums_q, strict=True)):
                (equal if a == b else differing).append(first + k)
            if not differing:
                return WindowResult(equal, [], [], False)
            # the primary's writes bypass its log in emergency mode: nothing to compare at
            touched = None if redoing or self._primary_emergency() else \
                await self._touched(p, q, offset, length)
            if touched is None:
                return WindowResult(equal, [], differing, True)
            busy = set(touched)
            return WindowResult(equal, [i for i in differing if i not in busy],
                                [i for i in differing if i in busy], False)
        except BaseException:
            remote.cancel()
            local.cancel()
            raise
        finally:
            del self._floors[wid]
            self._forget_old()

    async def _local_sums(self, offset: int, length: int
                          ) -> tuple[list[int], LogPosition, bool]:
        """The checksums of the local window, read between replay batches; the replay
        position they reflect; whether a batch a crash interrupted is still to be redone
        (then they reflect no position)."""
        async with self.replayer.quiesced() as q:
            redoing = self.replayer.redoing
            sums = await self._in_thread(self._read_sums, offset, length)
        return sums, q, redoing

    def _read_sums(self, offset: int, length: int) -> list[int]:
        return device_block_sums(self.device, offset, length, self.block_size)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread that :meth:`wait_io` can wait for after a cancel."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._io.add(fut)
        fut.add_done_callback(self._io.discard)
        return await asyncio.shield(fut)

    async def wait_io(self, timeout: float) -> None:
        """Wait for device reads still running in threads (after a cancel)."""
        if self._io:
            await asyncio.wait(set(self._io), timeout=timeout)

    async def _touched(self, p: LogPosition, q: LogPosition, offset: int, length: int
                       ) -> list[int] | None:
        """The blocks of the range that records ending between P and Q wrote; None if the
        local log does not reach P in time or the index cannot vouch for the range."""
        deadline = time.monotonic() + COVER_TIMEOUT
        while not covered(self.fetcher, p):
            if time.monotonic() > deadline:
                self.error = ("the local log does not reach the primary's position in time "
                              "(fetch paused or far behind): comparing again later")
                self.log.info("verify: the local log did not reach the primary's %s within "
                              "%.0f s: the window at %d is compared again later", p.encode(),
                              COVER_TIMEOUT, offset)
                return None
            await wait_set(self.fetcher.progress, 0.5)
        async with self._index_lock:
            assert self.index is not None
            await asyncio.to_thread(self.index.update)
            if self.index.problem is not None:
                self.log.warning("verify: the log index stopped (%s): starting it over at %s",
                                 self.index.problem, self.replayer.position.encode())
                self.index = self._new_index()
                return None
            return self.index.touched(p, q, offset, length)

    def _forget_old(self) -> None:
        """Drop what the index holds from before every window still being compared."""
        if self.index is None:
            return
        floor = min(self._floors.values(), default=self.replayer.position)
        self.index.forget_before(floor)

    # ------------------------------------------------------------- repairing
    async def _after_lost_repair(self) -> None:
        """``syncpos-HOST`` := the primary's log end now; then the verify starts over."""
        end = await self.syncer.primary_position()
        self.meta.set(self.keys.syncpos(self.host), end.encode(), durable=True)
        self.state.synced_at = end.encode()
        await self._save(durable=True)  # repairing no more: DONE/SIZE,repair
        self._lost_repair = False
        self.log.warning("verify: consistent again once replayed past %s; verifying from "
                         "the start", end.encode())

    async def _repair(self) -> None:
        st = self.state
        await self._save(durable=True)  # the list first: a crash from here redoes the copy
        self.meta.set(self.keys.verifystatus(self.host), VerifyStatus(
            repair=True, repairing=True).encode(), durable=True)
        self.log.warning("verify: repairing %d differing blocks (%d bytes) from the primary; "
                         "not consistent until replayed past the new syncpos",
                         st.differ.count, st.differ.nbytes)
        async with self.replayer.device_held() as q:
            before = await self.syncer.primary_position()
            self.meta.set(self.keys.syncpos(self.host), before.encode(), durable=True)
            copied = await self.syncer.copy_blocks(st.differ)
            after = await self.syncer.primary_position()
            self.meta.set(self.keys.syncpos(self.host), after.encode(), durable=True)
        st.repaired = copied.copied
        self.log.info("verify: repaired %d bytes; replay goes on from %s, consistent once "
                      "past %s", copied.copied, q.encode(), after.encode())

    # ------------------------------------------------------------- progress
    @property
    def seconds(self) -> float:
        return self.state.seconds + time.monotonic() - self.started

    async def _save(self, durable: bool = False) -> None:
        """The state file (always durably: the lists must survive what the key says),
        then DONE as of that file in ``verifystatus-HOST`` (``durable``: that too).
        One save at a time, in order."""
        async with self._save_lock:
            st = self.state
            data = json.dumps({**st.to_json(), "seconds": round(self.seconds, 3)}).encode()
            value = VerifyStatus(st.done, self.size, repair=st.repair).encode() \
                if st.phase in (PHASE_COMPARE, PHASE_RETRY) else None
            await asyncio.to_thread(write_file_durably, self.path, data)
            if value is not None:
                self.meta.set(self.keys.verifystatus(self.host), value, durable=durable)

    def _save_soon(self) -> None:
        """A save in the background (the windows go on meanwhile), unless one runs."""
        if self._saving is None or self._saving.done():
            self._saving = asyncio.ensure_future(self._save())
            self._saving.add_done_callback(self._saved)

    def _saved(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.log.warning("verify: progress not saved: %s", fut.exception())

    async def _finish(self) -> None:
        st = self.state
        st.phase = PHASE_FINISHED
        ranges = byte_ranges(st.differ)
        seconds = self.seconds
        result = VerifyResult(st.done, st.differ.nbytes, len(ranges), st.unsettled_bytes,
                              st.repaired, seconds)
        data = {**st.to_json(), "seconds": round(seconds, 3), "ranges": ranges,
                "unsettled": block_runs(sorted(st.retry))}
        await asyncio.to_thread(write_file_durably, self.path, json.dumps(data).encode())
        self.meta.set(self.keys.verifyresult(self.host), result.encode())
        if ranges:
            self.meta.set(self.keys.verifydiff(self.host), diff_value(ranges))
        else:  # no value for "none" (an empty one cannot be stored): a fresh tombstone
            self.meta.set(self.keys.verifydiff(self.host), diff_value([(0, 0)]))
            self.meta.delete(self.keys.verifydiff(self.host))
        self.meta.set(self.keys.verifystatus(self.host), VerifyStatus(finished=True).encode(),
                      durable=True)
        self.error = None
        self.log.info("verify done in %.1f s: %d bytes compared, %d bytes in %d ranges "
                      "differ, %d unsettled, %d repaired", seconds, st.done,
                      st.differ.nbytes, len(ranges), st.unsettled_bytes, st.repaired)

    def status(self) -> OnlineVerifyStatus:
        st = self.state
        secs = max(time.monotonic() - self.started, 1e-6)
        rate = (st.done - self.done_at_start) / secs
        return OnlineVerifyStatus(
            verify_done=st.done, verify_size=self.size, verify_compared=st.compared,
            verify_differing=st.differ.nbytes, verify_unsettled=st.unsettled_bytes,
            verify_touched=st.touched, verify_pass=st.passes + (st.phase == PHASE_RETRY),
            verify_rate=round(rate), verify_repair=st.repair,
            verify_eta=round((self.size - st.done) / rate, 1) if rate > 0 else None,
            verify_repairing=st.phase == PHASE_REPAIR, verify_resumed_at=st.resumed_at,
            verify_error=self.error)


class VerifyRunner:
    """Starts, resumes and stops a secondary's online verify as ``verifystatus-HOST``
    asks (:meth:`follow`, called whenever the secondary follows its switches)."""

    def __init__(self, resource: str, host: str, paths: MarsPaths, meta: MetaStore) -> None:
        self.resource = resource
        self.host = host
        self.paths = paths
        self.meta = meta
        self.key = ResourceKeys(resource).verifystatus(host)
        self.client: VerifyClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed_at = 0.0
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})

    def asked(self) -> VerifyStatus | None:
        return VerifyStatus.decode(self.meta.get(self.key))

    @property
    def repairing(self) -> bool:
        """A repair is under way or was interrupted: the replica is not consistent."""
        st = self.asked()
        return st is not None and st.repairing

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def follow(self, device: Device | None, syncer: SyncClient | None,
               fetcher: Fetcher | None, replayer: Replayer | None,
               replaying: bool = True) -> None:
        """Start (or resume) the verify the tree asks for once the secondary replays
        (``replaying``: fetch and replay run); cancel it when the request is gone."""
        st = self.asked()
        wanted = st is not None and st.running
        if not wanted:
            if self.running and (self.client is None or self.client.state.phase
                                 != PHASE_FINISHED):
                self.log.info("verify request withdrawn: stopping the verify")
                assert self._task is not None
                self._task.cancel()
            return
        if self.running or not replaying or None in (device, syncer, fetcher, replayer):
            return
        if self._failed_at and time.monotonic() - self._failed_at < RESTART_AFTER:
            return
        assert device is not None and syncer is not None and fetcher is not None \
            and replayer is not None
        self.client = VerifyClient(self.resource, self.host, self.paths, self.meta, device,
                                   syncer, fetcher, replayer)
        self._task = asyncio.create_task(self.client.run(), name=f"verify-{self.resource}")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._failed_at = time.monotonic()
            if self.client is not None:
                self.client.error = f"{type(exc).__name__}: {exc} (starting again in " \
                                    f"{RESTART_AFTER:.0f} s)"
            self.log.error("verify failed: %s", exc, exc_info=exc)

    def status(self) -> OnlineVerifyStatus | None:
        """The running verify's figures (and of one that stopped on an error)."""
        if self.client is None:
            return None
        if self.running or self.client.error:
            return self.client.status()
        return None

    async def stop(self) -> None:
        task = self._task
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # the caller is being cancelled, not only the verify
        except Exception:  # failed (logged by _ended)
            pass
        if self.client is not None:
            await self.client.wait_io(10.0)
