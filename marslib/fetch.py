"""Log replication: secondaries pull logfiles from the primary (port 7778).

The server side answers FETCH_REQ with the bytes of a local logfile, never past what is
durable, waiting a little (long poll) when the reader is already at the end. The client
side (``Fetcher``) keeps a local copy of each logfile growing strictly by appending, with
several requests of ``REQUEST_BYTES`` in flight over a bundle of connections while it is
behind. How much is in flight follows the rate the replies come in at
(:class:`FetchPace`): up to ``WINDOW_BYTES`` (after a link outage at 1 Gbit/s a few MiB
in flight leave the link idle whenever either side waits for a CPU), about a quarter of
a second of transfer, at least ``MIN_WINDOW``. A request waits as long as bytes keep
coming. The data of a reply is sent from the logfile with ``sendfile``
(:class:`marslib.net.conn.FileReply`), received in place and written as it arrived, by
a :class:`CopyAppender` in a thread: the window counts from what was received, so a
write that waits for the disk (the replay's flush on the same filesystem) holds up the
link only once about half a second of transfer (``FetchPace.store_ahead``) waits to be
written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from marslib.durable import fsync_dir, start_writeback
from marslib.formats.frame import Frame, FrameType
from marslib.layout import MarsPaths, check_resource_name, parse_logfile_name
from marslib.logfile import valid_end
from marslib.net.conn import FileReply, PeerBundle, RemoteError, Reply
from marslib.net.handshake import PeerInfo
from marslib.pausing import PauseSwitch
from marslib.position import LogPosition
from marslib.status import FetchStatus

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # what a request asks for when it does not say (older fetchers)
MAX_CHUNK = 8 << 20  # the most one reply carries
REQUEST_BYTES = 1 << 20  # the most per request: a reply is written to disk while it is still
#                          in the CPU cache (4 MiB replies cost about 3x the pwrite CPU)
WINDOW_BYTES = 16 << 20  # the most requested and not yet received while behind
# the fetched bytes go to the page cache; their writeback is started every WRITEOUT_BYTES
# (no wait, no flush), so that the fsync at the end of a logfile does not push out up to
# --max-logfile-size at once and stall every other writer of the disk for a while
WRITEOUT_BYTES = 8 << 20
MIN_WINDOW = 4 << 20  # the least in flight while behind (what a 100 Mbit/s link needs)
# received and not yet written to the local copy: the most before no more is requested is
# STORE_SECONDS of transfer at the reply rate, between STORE_AHEAD_MIN and STORE_AHEAD_MAX
# (a disk that stalls for a replay batch's flush on the same filesystem then holds up the
# writes, not the link; the memory it takes grows with the rate, that is with the link
# all fetchers of a host share)
STORE_SECONDS = 0.5
STORE_AHEAD_MIN = 16 << 20
STORE_AHEAD_MAX = 64 << 20
WINDOW_SECONDS = 0.25  # in flight: about this long a transfer at the recent reply rate
MAX_WAIT = 10.0
# the oldest request's connection silent so long while it carries data: ask again elsewhere
# (its retransmission timer may have backed off to a second while the link was down)
HEDGE_SILENCE = 0.5
HEDGE_CHECK = 0.1  # how often the oldest request's connection is looked at meanwhile
STALL_TIMEOUT = MAX_WAIT + 30  # no byte from the primary for so long while waiting: redial
NOT_YET = -2  # a logfile newer than its logger's end as last reported: wait for the report


def next_logfile(paths: MarsPaths, resource: str, name: str) -> str | None:
    """The name of the first local logfile after ``name``."""
    parsed = parse_logfile_name(name)
    if parsed is None:
        return None
    for number, _, path in paths.logfiles(resource):
        if number > parsed[0]:
            return path.name
    return None


class GrowingLog(Protocol):
    """What the fetch service needs of a primary's logger: the Logger itself, or marsd's
    proxy of one in a worker process (whose ``log_end`` may lag, never lead)."""

    @property
    def log_end(self) -> LogPosition | None: ...

    async def wait_growth(self, timeout: float) -> None: ...


class FetchService:
    """Serves local logfiles to fetching secondaries."""

    def __init__(self, paths: MarsPaths, loggers: Callable[[str], GrowingLog | None],
                 recovering: Callable[[str], bool] = lambda _: False) -> None:
        self.paths = paths
        self.loggers = loggers
        self.recovering = recovering  # a resource whose logger is recovering its log
        self.bytes_served = 0
        self._valid_ends: dict[tuple[str, int, int], int] = {}

    async def _durable_end(self, resource: str, name: str, path: Path,
                           nxt: str | None) -> int:
        """How much of logfile ``name`` may be served; ``nxt`` is the logfile after it,
        looked for *before* this is called."""
        logger = self.loggers(resource)
        end = logger.log_end if logger is not None else None
        if end is not None and nxt is None:
            if end.logfile == name:
                return end.offset
            parsed = parse_logfile_name(name)
            if parsed is not None and parsed[0] > end.number:
                # the logger moved on and has not told us yet (a worker's push under way):
                # nothing of it is known to be durable
                return NOT_YET
        try:
            st = path.stat()
        except FileNotFoundError:
            return -1
        if nxt:
            # finished logfiles are cut to their exact end before the next one exists; a
            # logger's end may lag (a worker's), the file size does not
            return st.st_size
        # the newest logfile without its logger (primary down, or a secondary here): it
        # may hold reserved zeros or a torn commit after a crash; serve only complete
        # commits, scanned off the event loop
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._valid_ends:
            end_offset = await asyncio.to_thread(valid_end, path)
            try:
                again = path.stat()
            except FileNotFoundError:
                return -1
            if (again.st_size, again.st_mtime_ns) != key[1:]:
                return min(end_offset, again.st_size)  # changing under us: do not keep it
            self._valid_ends = {key: end_offset}
        return self._valid_ends[key]

    def _next_logfile(self, resource: str, name: str) -> str | None:
        """The logfile after ``name`` here, without listing the directory while the
        logger writes ``name``: whatever it rotates to, its end is not past ``name``
        before it says so (its reported end may lag, never lead)."""
        logger = self.loggers(resource)
        end = logger.log_end if logger is not None else None
        if end is not None and end.logfile == name:
            return None
        return next_logfile(self.paths, resource, name)

    async def handle(self, frame: Frame, peer: PeerInfo) -> Reply:
        if frame.type != FrameType.FETCH_REQ:
            return Frame(FrameType.ERROR, {"error": f"unexpected frame {frame.type} on fetch"})
        resource = check_resource_name(str(frame.get("resource", "")))
        name = str(frame.get("logfile", ""))
        if parse_logfile_name(name) is None:
            return Frame(FrameType.ERROR, {"error": f"invalid logfile name {name!r}"})
        offset = int(frame.get("offset", 0))
        max_len = max(0, min(int(frame.get("max_len", CHUNK)), MAX_CHUNK))
        wait = max(0.0, min(float(frame.get("wait", 0)), MAX_WAIT))
        path = self.paths.resource_dir(resource) / name
        deadline = time.monotonic() + wait
        while self.recovering(resource):
            # recovery may still cut the newest logfile: nothing is served from it yet
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Frame(FrameType.FETCH_DATA, {"logfile": name, "offset": offset,
                                                    "end": offset, "finished": False,
                                                    "next": None, "recovering": True})
            await asyncio.sleep(min(0.1, remaining))
        while True:
            # the next logfile first: once it exists, this one is finished, and its end is
            # the file's size (a logger's end read before that could be short of it)
            nxt = self._next_logfile(resource, name)
            end = await self._durable_end(resource, name, path, nxt)
            remaining = deadline - time.monotonic()
            if end == NOT_YET:
                if remaining <= 0:
                    return Frame(FrameType.FETCH_DATA, {"logfile": name, "offset": offset,
                                                        "end": offset, "finished": False,
                                                        "next": None})
            elif end < 0:
                return Frame(FrameType.FETCH_DATA, {"logfile": name, "missing": True,
                                                    "next": nxt})
            finished = nxt is not None
            if end != NOT_YET and (offset < end or finished or remaining <= 0):
                break
            logger = self.loggers(resource)
            log_end = logger.log_end if logger is not None else None
            asked = parse_logfile_name(name)
            if logger is not None and log_end is not None and asked is not None \
                    and asked[0] >= log_end.number:
                await logger.wait_growth(remaining)
            else:
                await asyncio.sleep(min(0.2, remaining))
        if offset > end:
            # the asker holds more of this logfile than we do: its history forked from ours
            return Frame(FrameType.FETCH_DATA, {"logfile": name, "offset": offset, "end": end,
                                                "finished": finished, "next": nxt,
                                                "diverged": True})
        length = min(max_len, end - offset)
        self.bytes_served += length
        header = {"logfile": name, "offset": offset, "end": end, "finished": finished,
                  "next": nxt}
        if not length:
            return Frame(FrameType.FETCH_DATA, header)
        return FileReply(FrameType.FETCH_DATA, header, path, offset, length)


@dataclass
class FetchPace:
    """How much to have in flight while behind: ``WINDOW_SECONDS`` of the rate replies
    came in at while requests stayed in flight (a pipeline kept busy measures the link,
    or whatever else is slower), between ``window_min`` and ``window_max``. Starts at the
    most; times are ``time.monotonic()``."""

    window_max: int = WINDOW_BYTES
    window_min: int = MIN_WINDOW
    rate: float = 0.0  # bytes per second
    _since: float | None = None  # the last reply, if more were in flight after it

    def __post_init__(self) -> None:
        self.window_min = min(self.window_min, self.window_max)
        self.rate = self.rate or self.window_max / WINDOW_SECONDS

    @property
    def window(self) -> int:
        return int(max(min(self.rate * WINDOW_SECONDS, self.window_max), self.window_min))

    @property
    def store_ahead(self) -> int:
        """Received bytes that may wait to be written before no more is requested."""
        return int(max(min(self.rate * STORE_SECONDS, STORE_AHEAD_MAX), STORE_AHEAD_MIN))

    def reply(self, nbytes: int, now: float, more_in_flight: bool) -> None:
        """A reply of ``nbytes`` was taken at ``now``; ``more_in_flight``: requests are
        still out after it."""
        if self._since is not None and nbytes:
            seen = nbytes / max(now - self._since, 1e-3)
            self.rate = 0.75 * self.rate + 0.25 * seen
        self._since = now if more_in_flight else None


@dataclass
class InFlight:
    """A request of the fetch in flight: its task, how many bytes it asked for, its frame
    (whose ``rid`` the bundle sets when it sends it), whether it asked for bytes known to
    be there (not a long poll at the end), when it was issued."""

    task: asyncio.Task[Frame]
    length: int
    frame: Frame
    bulk: bool
    issued: float = field(default_factory=time.monotonic)


def _taken_ahead(pending: dict[int, InFlight]) -> int:
    """Bytes asked for by the requests in flight whose replies are already here."""
    return sum(f.length for f in pending.values()
               if f.task.done() and not f.task.cancelled() and f.task.exception() is None)


class CopyAppender:
    """Writes the fetched replies of one logfile to its local copy strictly in order, in
    a thread, while the fetch goes on receiving.

    ``put`` hands over the bytes that follow what was handed over before; ``stored(first,
    n)`` is called on the event loop once they are in the page cache, and returns False
    when the copy no longer wants them (a refetch cut it, the fetch moved on): the bytes
    still waiting are then dropped and the appender stops. A write that fails keeps its
    OSError in ``error`` and stops the appender too. ``close`` stops it and closes the
    file descriptor, right away or as soon as the write running in a thread ends (a
    thread cannot be cancelled, and it must not write into a descriptor reused since)."""

    def __init__(self, fd: int, start: int, stored: Callable[[int, int], bool]) -> None:
        self.fd = fd
        self.end = start  # where the next bytes handed over go
        self.waiting = 0  # bytes handed over and not yet written
        self.error: OSError | None = None
        self.stopped = False
        self._stored = stored
        self._written_out = start  # the writeback of the bytes before it has been started
        self._queue: deque[tuple[int, bytes | bytearray | memoryview]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._running: asyncio.Future[None] | None = None  # the write in its thread
        self._changed = asyncio.Event()  # set when a write ended or the appender stopped

    def put(self, first: int, data: bytes | bytearray | memoryview) -> None:
        if first != self.end:
            raise ValueError(f"bytes at {first} handed over, the copy goes on at {self.end}")
        if self.stopped:
            return
        self._queue.append((first, data))
        self.end += len(data)
        self.waiting += len(data)
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def wait_room(self, most: int) -> None:
        """Until at most ``most`` bytes wait to be written, or the appender stopped."""
        while self.waiting > most and not self.stopped:
            self._changed.clear()
            await self._changed.wait()

    async def drain(self) -> None:
        """Until everything handed over is written, or the appender stopped."""
        await self.wait_room(0)

    async def _run(self) -> None:
        try:
            while self._queue and not self.stopped:
                first, data = self._queue[0]
                end = first + len(data)
                writeout = end - self._written_out >= WRITEOUT_BYTES
                self._running = asyncio.get_running_loop().run_in_executor(
                    None, _store, self.fd, data, first, self._written_out if writeout else end)
                try:
                    await asyncio.shield(self._running)
                except asyncio.CancelledError:
                    self.close()
                    raise
                except OSError as exc:
                    self.error = exc
                    self._stop()
                    break
                if self.stopped:
                    break  # closed meanwhile: written, but no longer accounted
                if writeout:
                    self._written_out = end
                self._queue.popleft()
                self.waiting -= len(data)
                if not self._stored(first, len(data)):
                    self._stop()
                self._changed.set()
        finally:
            self._task = None

    def _stop(self) -> None:
        self.stopped = True
        self._queue.clear()
        self.waiting = 0
        self._changed.set()

    def close(self) -> None:
        """Drop what still waits; close the descriptor now, or after the running write."""
        self._stop()
        running = self._running
        if running is not None and not running.done():
            running.add_done_callback(lambda _: self._close_fd())
        else:
            self._close_fd()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Fetcher:
    """Keeps local copies of the primary's logfiles up to date (runs on a secondary)."""

    def __init__(self, resource: str, host: str, paths: MarsPaths, bundle: PeerBundle,
                 start_logfile: str, parallel: int = 2, window_bytes: int = WINDOW_BYTES,
                 request_bytes: int = REQUEST_BYTES,
                 stall_timeout: float = STALL_TIMEOUT,
                 hedge_silence: float = HEDGE_SILENCE) -> None:
        self.resource = resource
        self.host = host
        self.paths = paths
        self.bundle = bundle
        self.logfile = start_logfile
        self.parallel = max(1, parallel)  # connections (the bundle's size)
        self.request_bytes = max(1, min(request_bytes, MAX_CHUNK))
        self.pace = FetchPace(max(window_bytes, self.request_bytes))
        self.stall_timeout = stall_timeout  # no byte from the primary so long: redial
        self.hedge_silence = hedge_silence  # see _stalled
        self._background: set[asyncio.Task[None]] = set()
        self.local_end = self._local_size(start_logfile)  # complete bytes of self.logfile
        self._copy: CopyAppender | None = None  # the writer of self.logfile's copy
        self.remote_end = -1  # the primary's durable end of self.logfile, as last seen
        self.remote_finished = False
        self.bytes_fetched = 0
        self.started = time.monotonic()
        self.last_contact = time.monotonic()  # the primary's last answer
        self.progress = asyncio.Event()  # set (and replaced) when local logfiles grow
        self._pausing = PauseSwitch()
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})
        self._restart = False
        self.refetches: dict[tuple[str, int], int] = {}
        self.hedges = 0  # requests asked for again on another connection (see _take)
        self.diverged: tuple[str, int] | None = None  # (logfile, primary's end) on a fork

    def _path(self, name: str) -> Path:
        return self.paths.resource_dir(self.resource) / name

    def _local_size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def received_end(self) -> int:
        """Bytes of self.logfile received: written to the copy, or handed to its writer."""
        return self._copy.end if self._copy is not None else self.local_end

    def complete_end(self, name: str) -> int | None:
        """How much of local logfile ``name`` is complete, or None if it is not fetched
        by this fetcher (finished earlier: the whole file is complete)."""
        return self.local_end if name == self.logfile else None

    def is_finished(self, name: str) -> bool:
        """Whether local logfile ``name`` is complete and will not grow."""
        parsed, cur = parse_logfile_name(name), parse_logfile_name(self.logfile)
        if parsed is None or cur is None:
            return False
        return parsed[0] < cur[0]

    @property
    def paused(self) -> bool:
        return self._pausing.paused

    def pause(self) -> None:
        self._pausing.pause()

    def resume(self) -> None:
        self._pausing.resume()

    def refetch_from(self, name: str, offset: int) -> int:
        """Throw away local bytes of ``name`` from ``offset`` (they failed a check) and fetch
        them again; return how often this place was refetched."""
        if name != self.logfile:
            self.logfile = name
        with open(self._path(name), "r+b") as f:
            f.truncate(offset)
        self.local_end = offset
        self._restart = True
        key = (name, offset)
        self.refetches[key] = self.refetches.get(key, 0) + 1
        return self.refetches[key]

    def _signal(self) -> None:
        ev, self.progress = self.progress, asyncio.Event()
        ev.set()

    async def run(self) -> None:
        while True:
            await self._pausing.wait()
            try:
                await self._step()
            except (ConnectionError, RemoteError) as exc:
                self.log.info("fetch from primary: %s; retrying", exc)
                await asyncio.sleep(1.0)
            except OSError as exc:  # local trouble, e.g. /mars full: keep trying
                self.log.error("fetch: cannot store %s: %s", self.logfile, exc.strerror)
                await asyncio.sleep(2.0)

    def _ask(self, offset: int, max_len: int, wait: float) -> InFlight:
        """Send a request for ``[offset, offset + max_len)`` (a long poll of up to ``wait``
        seconds at the end) on the least busy connection."""
        frame = Frame(FrameType.FETCH_REQ, {
            "resource": self.resource, "logfile": self.logfile, "offset": offset,
            "max_len": max_len, "wait": wait})
        # a generous timeout: a reply queued behind others on a slow link may take long;
        # a silent primary is noticed by _take
        task = asyncio.create_task(self.bundle.request(frame, timeout=10 * STALL_TIMEOUT))
        return InFlight(task, max_len, frame, bulk=wait == 0)

    def _stalled(self, flight: InFlight) -> bool:
        """Whether the connection of ``flight`` has received nothing for ``hedge_silence``
        while it is known to carry data: in the middle of a reply, or the request asked
        for bytes the primary had already reported durable."""
        rid = flight.frame.header.get("rid")
        quiet = self.bundle.silence(int(rid), flight.issued) if rid is not None else None
        return quiet is not None and quiet[0] >= self.hedge_silence and (quiet[1] or
                                                                          flight.bulk)

    async def _take(self, first: int, pending: dict[int, InFlight]) -> Frame:
        """The reply for the oldest request in flight, at ``first`` (taken out of
        ``pending``), as long as bytes keep coming from the primary; after ``stall_timeout``
        without any (since it was issued at the earliest): ConnectionError, the connections
        dropped.

        Its connection is the slow one when the replies for at least half the window after
        it are already here (its congestion window still small after an outage, or its
        rate estimate from a collapsed link), or when it has received nothing for
        HEDGE_SILENCE while known to carry data (waiting for a retransmission timer that
        backed off while the link was down). Then the same bytes are asked for once more,
        on the least busy connection, and whichever reply comes first is taken."""
        oldest = pending.pop(first)
        waiting = {oldest.task}
        hedged = self.bundle.size < 2  # nowhere else to ask
        try:
            while True:
                later = {f.task for off, f in pending.items() if not f.task.done()}
                done, _ = await asyncio.wait(
                    waiting | later, timeout=min(1.0 if hedged else HEDGE_CHECK,
                                                 self.stall_timeout),
                    return_when=asyncio.FIRST_COMPLETED)
                for task in done & waiting:
                    waiting.discard(task)
                    if not task.cancelled() and task.exception() is None:
                        return task.result()
                    if not waiting:
                        return task.result()  # raises its error
                if not hedged and (_taken_ahead(pending) >= max(self.pace.window // 2,
                                                                2 * self.request_bytes)
                                   or self._stalled(oldest)):
                    waiting.add(self._ask(first, oldest.length, 0.0).task)
                    hedged = True
                    self.hedges += 1
                heard = max(self.bundle.last_received or 0.0, oldest.issued)
                if time.monotonic() - heard > self.stall_timeout:
                    self.bundle.close()
                    raise ConnectionError(
                        f"nothing from the primary for {self.stall_timeout:g} s")
        finally:
            for task in waiting:
                task.cancel()  # (done already, or no longer wanted)

    async def _step(self) -> None:
        """Fetch the current logfile: up to ``pace.window`` bytes requested beyond what was
        received while behind, one long poll when caught up; replies are handed to the
        copy's appender strictly in order. The requests in flight always ask for
        ``[received_end, next_off)``."""
        self._restart = False
        name = self.logfile
        pending: dict[int, InFlight] = {}
        next_off = self.local_end
        pace = self.pace
        fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)

        def stored(first: int, n: int) -> bool:
            if self._restart or name != self.logfile or self.local_end != first:
                return False  # a refetch cut the copy meanwhile: it starts over from its end
            self.local_end += n
            self.bytes_fetched += n
            self._signal()
            return True

        copy = self._copy = CopyAppender(fd, self.local_end, stored)
        try:
            while not self._restart and name == self.logfile and not self.paused:
                if copy.error is not None:
                    raise copy.error
                if copy.stopped:
                    return
                # only bytes known to be durable on the primary are asked for in bulk
                while next_off - copy.end < pace.window and next_off < self.remote_end \
                        and copy.waiting < pace.store_ahead:
                    n = min(self.request_bytes, self.remote_end - next_off)
                    pending[next_off] = self._ask(next_off, n, 0.0)
                    next_off += n
                if not pending:
                    if next_off < self.remote_end:  # behind, and the disk behind too
                        await copy.wait_room(pace.store_ahead - 1)
                        continue
                    pending[next_off] = self._ask(next_off, self.request_bytes, 5.0)
                first = min(pending)
                reply = await self._take(first, pending)
                self.last_contact = time.monotonic()
                pace.reply(len(reply.payload), self.last_contact, bool(pending))
                if self._restart or name != self.logfile:
                    return
                if reply.get("diverged"):
                    self.diverged = (name, int(reply.get("end", -1)))
                    self.log.error("%s: this host holds %d bytes, the primary's copy ends at "
                                   "%s: the histories forked", name, self.local_end,
                                   reply.get("end"))
                    self._signal()
                    await asyncio.sleep(2.0)
                    return
                self.diverged = None  # the (possibly new) primary's copy goes on from here
                if reply.get("missing"):
                    nxt = reply.get("next")
                    if nxt and copy.end == 0:
                        self.log.info("%s is gone on the primary; continuing with %s", name,
                                      nxt)
                        await self._switch(str(nxt))
                        return
                    await asyncio.sleep(1.0)
                    return
                data = reply.payload
                if int(reply.get("offset", -1)) != copy.end:
                    return  # out of step (cannot happen with in-order appends): start over
                if data:
                    copy.put(first, data)
                self.remote_end = max(self.remote_end, int(reply.get("end", self.remote_end)))
                self.remote_finished = bool(reply.get("finished"))
                self._signal()
                if next_off < copy.end:
                    next_off = copy.end
                if self.remote_finished and copy.end >= self.remote_end and not pending:
                    await copy.drain()
                    if copy.error is not None:
                        raise copy.error
                    if copy.stopped:
                        return
                    nxt = reply.get("next")
                    if nxt:
                        # durable in the background: the next logfile need not wait
                        bg = asyncio.create_task(asyncio.to_thread(self._sync_file, name))
                        self._background.add(bg)
                        bg.add_done_callback(self._background.discard)
                        await self._switch(str(nxt))
                    return
            if self.paused and not self._restart and name == self.logfile:
                await copy.drain()  # what was received is kept
        finally:
            for flight in pending.values():
                flight.task.cancel()
            copy.close()
            self._copy = None

    async def _switch(self, name: str) -> None:
        # the copy's name survives a crash of this host before anything is fetched into
        # it; the directory's fsync may wait for the disk: not on the event loop
        before = self.logfile
        await asyncio.to_thread(_create_durably, self._path(name))
        if self._restart or self.logfile != before:
            return  # a refetch moved the fetch meanwhile: it goes on from there
        self.logfile = name
        self.local_end = self._local_size(name)
        self.remote_end = -1
        self.remote_finished = False
        self._signal()

    def _sync_file(self, name: str) -> None:
        fd = os.open(self._path(name), os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def status(self) -> FetchStatus:
        secs = max(time.monotonic() - self.started, 1e-6)
        return FetchStatus(
            fetch_logfile=self.logfile,
            fetch_local_end=self.local_end,
            fetch_remote_end=self.remote_end,
            fetch_bytes=self.bytes_fetched,
            fetch_rate=round(self.bytes_fetched / secs),
            fetch_paused=self.paused,
            fetch_connections=self.bundle.connections,
            fetch_error=self.bundle.last_error,
            fetch_contact_age=round(time.monotonic() - self.last_contact, 1),
            fetch_hedges=self.hedges,
        )


def _create_durably(path: Path) -> None:
    if not path.exists():
        path.touch()
        fsync_dir(path.parent)


def _store(fd: int, data: bytes | bytearray | memoryview, offset: int,
           writeout_from: int) -> None:
    """pwrite all of ``data`` (as received, no copy) at ``offset``; then start the
    writeback of the file from ``writeout_from`` to the end of ``data``."""
    view = memoryview(data)
    end = offset + len(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    start_writeback(fd, writeout_from, end - writeout_from)
