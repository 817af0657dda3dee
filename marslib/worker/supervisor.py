"""marsd's side of the resource workers: start them, talk to them, notice when they end.

:class:`WorkerPrimary` and :class:`WorkerSecondary` are the handles marsd keeps for a
resource whose data path runs in a worker process (:mod:`marslib.worker.process`). A
primary's :class:`LoggerProxy` gives marsd's fetch and sync services, the space check and
``log-rotate`` the surface of the Logger: ``log_end``, ``size`` and ``emergency`` as the
worker last sent them (every reply carries them, and the worker pushes them when the log
grows), everything else as requests.

A worker that ends without being stopped (killed, crashed, or dropped by marsd for a
malformed message, then killed) is reported through ``on_exit``: marsd records the
error and starts the resource again after its retry delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import marslib
from marslib import __version__
from marslib.errors import MarsError
from marslib.eventwait import wait_set
from marslib.layout import MarsPaths
from marslib.logger import LoggerConfig
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.secondary import NetConfig
from marslib.status import ResourceStatus
from marslib.sync import ReadBlockOps
from marslib.worker.channel import STREAM_LIMIT, Channel, ChannelClosed, RemoteFailure
from marslib.worker.messages import (
    READ_CHUNK,
    Ack,
    Diff,
    DiffData,
    Emergency,
    Hello,
    Message,
    Read,
    ReadData,
    Refresh,
    Refreshed,
    Rotate,
    Rotated,
    SpaceLevel,
    Start,
    Started,
    State,
    StatePush,
    StatusReply,
    StatusRequest,
    Stop,
    Sums,
    SumsData,
)

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 60.0  # a busy host may take long to start a Python process
STATUS_TIMEOUT = 5.0  # then status shows the last figures and says the worker is slow
HOUSEKEEPING_TIMEOUT = 30.0  # refresh and space-level requests of marsd's main loop
EXIT_WAIT = 30.0  # after its channel closed, a worker gets this long to exit


def worker_command(fd: int, resource: str, host: str, log_level: str) -> list[str]:
    """The command line of a worker: this interpreter, this copy of marslib."""
    return [sys.executable, "-P", "-m", "marslib.worker", "--fd", str(fd),
            "--parent", str(os.getpid()), "--resource", resource, "--host", host,
            "--log-level", log_level]


def worker_env() -> dict[str, str]:
    """marsd's environment, with the directory this marslib was imported from first, so
    that the worker runs the same code as marsd (a test double, an older release)."""
    here = str(Path(marslib.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "did not exit"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class WorkerHandle:
    """A resource running in a worker process; the role-specific parts are subclasses."""

    role: ClassVar[str] = ""

    def __init__(self, name: str, host: str, paths: MarsPaths, meta: MetaStore, *,
                 log_level: str = "INFO",
                 on_exit: Callable[[WorkerHandle], None] | None = None) -> None:
        self.name = name
        self.host = host
        self.paths = paths
        self.meta = meta
        self.log_level = log_level
        self.on_exit = on_exit
        self.log = logging.LoggerAdapter(log, {"resource": name, "host": host})
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.exited: str | None = None  # how the worker ended (on its own unless stopping)
        self.returncode: int | None = None
        self._stopping = False
        self._hello: asyncio.Future[Hello] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._last_status = ResourceStatus(role=self.role)

    @property
    def worker_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start_message(self) -> Start:
        return Start(self.role, self.name, self.host, str(self.paths.root),
                     str(self.paths.run_dir))

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the worker and the resource in it; MarsError with the worker's message
        (the same as in-process) if it cannot start."""
        await self._spawn()
        try:
            reply = await self.request(self.start_message())
        except ChannelClosed:
            await self._ended()
            raise MarsError(f"its worker (pid {self.worker_pid}) {self.exited}") from None
        except MarsError:
            self._stopping = True  # a failed start: the worker exits by itself
            await self._ended()
            raise
        if isinstance(reply, Started):
            self._last_status = ResourceStatus.from_json(reply.status)
        self.log.info("running as %s in worker pid %d", self.role, self.worker_pid)

    async def _spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # from the event loop's thread: the worker's PR_SET_PDEATHSIG follows the
            # thread that forked it
            self.proc = subprocess.Popen(
                worker_command(child.fileno(), self.name, self.host, self.log_level),
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=worker_env())
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=STREAM_LIMIT)
        self._hello = asyncio.get_running_loop().create_future()
        self.channel = Channel(reader, writer, clock=self.meta.clock,
                               on_request=self._on_request, on_event=self._on_event,
                               peer="the worker", log=self.log)
        self._watch = asyncio.create_task(self._watch_channel(), name=f"worker-{self.name}")
        closed = asyncio.create_task(self.channel.closed.wait())
        waits: set[asyncio.Future[Any]] = {self._hello, closed}
        try:
            await asyncio.wait(waits, timeout=HELLO_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if not self._hello.done():
            if not self.channel.closed.is_set():
                self.channel.close(f"no hello within {HELLO_TIMEOUT:.0f} s")
                self.proc.kill()
            await self._ended()
            raise MarsError(f"its worker (pid {self.proc.pid}) did not start: {self.exited}")
        hello = self._hello.result()
        if hello.version != __version__:
            self.log.warning("worker pid %d runs marslib %s, marsd %s", hello.pid,
                             hello.version, __version__)

    async def _watch_channel(self) -> None:
        assert self.channel is not None and self.proc is not None
        reason = await self.channel.run()
        if self.channel.broken and self.proc.poll() is None:
            self.log.error("killing worker pid %d: it sent a malformed message", self.proc.pid)
            self.proc.kill()
        try:
            self.returncode = await asyncio.to_thread(self.proc.wait, EXIT_WAIT)
        except subprocess.TimeoutExpired:
            self.log.error("worker pid %d did not exit within %.0f s of closing its channel: "
                           "killing it", self.proc.pid, EXIT_WAIT)
            self.proc.kill()
            self.returncode = await asyncio.to_thread(self.proc.wait)
        self.exited = describe_exit(self.returncode)
        if self.channel.broken:
            self.exited += f" after a {reason}"
        if self._hello is not None and not self._hello.done():
            self._hello.cancel()
        self._closed()
        if not self._stopping:
            self.log.error("worker pid %d %s", self.proc.pid, self.exited)
            if self.on_exit is not None:
                self.on_exit(self)

    async def _ended(self) -> None:
        """Wait until the worker has exited and is reaped."""
        if self._watch is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._watch)

    async def _stop(self, msg: Stop) -> None:
        self._stopping = True
        try:
            await self.request(msg)
        except MarsError as exc:
            self.log.warning("stopping worker pid %s: %s", self.worker_pid, exc)
        await self._ended()

    # ----------------------------------------------------------------- messages
    async def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Ask the worker; the state every reply carries is taken in on the way."""
        if self.channel is None:
            raise MarsError(f"resource {self.name}: no worker")
        reply = await self.channel.request(msg, timeout)
        if isinstance(reply, State):
            self._apply(reply)
        return reply

    async def _on_request(self, msg: Message) -> Message:
        if isinstance(msg, StatePush):
            self._apply(msg)
            return Ack()
        raise MarsError(f"marsd does not take {msg.TYPE} requests")

    def _on_event(self, msg: Message) -> None:
        if isinstance(msg, Hello) and self._hello is not None and not self._hello.done():
            self._hello.set_result(msg)

    def _apply(self, state: State) -> None:
        """Take in the resource's state as the worker sent it."""

    def _closed(self) -> None:
        """The worker is gone: wake whoever waits on it."""

    async def status(self) -> ResourceStatus:
        """The resource's live figures, asked now; the last ones if the worker is slow."""
        try:
            reply = await self.request(StatusRequest(), timeout=STATUS_TIMEOUT)
            assert isinstance(reply, StatusReply)
            st = self._last_status = ResourceStatus.from_json(reply.status)
        except TimeoutError:
            st = dataclasses.replace(
                self._last_status, worker_error=f"worker pid {self.worker_pid} did not "
                f"answer within {STATUS_TIMEOUT:.0f} s: figures may be old")
        except MarsError as exc:
            st = dataclasses.replace(self._last_status, worker_error=str(exc))
        return dataclasses.replace(st, worker_pid=self.worker_pid)


class LoggerProxy:
    """The primary's Logger as marsd sees it (the surface of
    :class:`marslib.worker.handle.PrimaryLog`)."""

    def __init__(self, worker: WorkerPrimary) -> None:
        self._worker = worker
        self.log_end: LogPosition | None = None
        self.size = 0
        self.emergency = False
        self._grew = asyncio.Event()

    def apply(self, state: State) -> None:
        if state.log_end:
            try:
                pos = LogPosition.decode(state.log_end)
            except ValueError as exc:
                self._worker.log.warning("worker sent a bad log end: %s", exc)
            else:
                cur = self.log_end
                # the durable end only grows; replies and pushes may cross
                if cur is None or (pos.number, pos.offset) > (cur.number, cur.offset):
                    self.log_end = pos
                    self.wake()
        if state.size:
            self.size = state.size
        self.emergency = state.emergency

    def wake(self) -> None:
        grew, self._grew = self._grew, asyncio.Event()
        grew.set()

    async def wait_growth(self, timeout: float) -> None:
        """Return when the log grows (as pushed by the worker), or after ``timeout``."""
        await wait_set(self._grew, timeout)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """The newest data (log overlay included); big reads in pieces of READ_CHUNK."""
        if length <= READ_CHUNK:
            reply = await self._worker.request(Read(offset, length))
            assert isinstance(reply, ReadData)
            return reply.payload
        parts: list[bytes | bytearray] = []
        for start in range(offset, offset + length, READ_CHUNK):
            n = min(READ_CHUNK, offset + length - start)
            reply = await self._worker.request(Read(start, n))
            assert isinstance(reply, ReadData)
            parts.append(reply.payload)
        return b"".join(parts)

    async def read_at(self, offset: int, length: int
                      ) -> tuple[bytes | bytearray, LogPosition | None]:
        """Like :meth:`read` (at most READ_CHUNK), and the log position the data reflects
        (the worker samples its state right after the read, with no wait in between)."""
        if length > READ_CHUNK:
            raise ValueError(f"read_at of {length} bytes: at most {READ_CHUNK} at once")
        reply = await self._worker.request(Read(offset, length))
        assert isinstance(reply, ReadData)
        return reply.payload, _position(reply.log_end)

    async def block_sums(self, offset: int, length: int, block_size: int
                         ) -> tuple[bytes, LogPosition | None]:
        """The crc32c of each block, taken in the worker (see marslib.sync.BlockOps);
        the position is None for more than READ_CHUNK at once."""
        if length > READ_CHUNK:
            step = READ_CHUNK // block_size * block_size
            parts = [(await self.block_sums(o, min(step, offset + length - o), block_size))[0]
                     for o in range(offset, offset + length, step)]
            return b"".join(parts), None
        try:
            reply = await self._worker.request(Sums(offset, length, block_size))
        except RemoteFailure as exc:
            if "unknown request type" not in str(exc):
                raise
            return await ReadBlockOps(self).block_sums(offset, length, block_size)
        assert isinstance(reply, SumsData)
        return bytes(reply.payload), _position(reply.position)

    async def diff_blocks(self, offset: int, length: int, block_size: int, theirs: bytes,
                          blocks: list[int] | None) -> tuple[list[int], bytes]:
        """The blocks that differ from the asker's checksums and their data, compared in
        the worker (see marslib.sync.BlockOps): only those cross the channel. A window of
        listed blocks may be wider than READ_CHUNK; what is read is not."""
        if (length if blocks is None else len(blocks) * block_size) > READ_CHUNK:
            return await ReadBlockOps(self).diff_blocks(offset, length, block_size, theirs,
                                                        blocks)
        try:
            reply = await self._worker.request(Diff(offset, length, block_size, blocks,
                                                    theirs))
        except RemoteFailure as exc:
            if "unknown request type" not in str(exc):
                raise
            return await ReadBlockOps(self).diff_blocks(offset, length, block_size, theirs,
                                                        blocks)
        assert isinstance(reply, DiffData)
        return list(reply.blocks), bytes(reply.payload)

    async def rotate(self) -> str:
        reply = await self._worker.request(Rotate())
        assert isinstance(reply, Rotated)
        return reply.logfile

    async def enter_emergency(self, reason: str) -> None:
        await self._worker.request(Emergency(True, reason))

    async def leave_emergency(self) -> None:
        await self._worker.request(Emergency(False))


def _position(value: str | None) -> LogPosition | None:
    if not value:
        return None
    try:
        return LogPosition.decode(value)
    except ValueError:
        return None


class WorkerPrimary(WorkerHandle):
    """A primary (device, logger, NBD export) in a worker process."""

    role = "primary"

    def __init__(self, name: str, host: str, paths: MarsPaths, meta: MetaStore,
                 config: LoggerConfig, **kw: Any) -> None:
        super().__init__(name, host, paths, meta, **kw)
        self.config = config
        self.proxy = LoggerProxy(self)
        self._running = False

    def start_message(self) -> Start:
        return dataclasses.replace(super().start_message(),
                                   logger=dataclasses.asdict(self.config))

    async def start(self) -> None:
        await super().start()
        self._running = True

    @property
    def logger(self) -> LoggerProxy | None:
        """None unless the worker runs (then the fetch service reads the logfiles as those
        of a primary that is down)."""
        return self.proxy if self._running and self.exited is None else None

    def _apply(self, state: State) -> None:
        self.proxy.apply(state)

    def _closed(self) -> None:
        self._running = False
        self.proxy.wake()

    async def stop(self, end_marker: bool = False) -> None:
        await self._stop(Stop(end_marker=end_marker))

    async def refresh(self, size: int) -> None:
        reply = await self.request(Refresh(size), timeout=HOUSEKEEPING_TIMEOUT)
        if isinstance(reply, Refreshed) and reply.grow_error:
            raise RuntimeError(reply.grow_error)


class WorkerSecondary(WorkerHandle):
    """A secondary (sync, fetch, replay) in a worker process."""

    role = "secondary"

    def __init__(self, name: str, host: str, paths: MarsPaths, meta: MetaStore,
                 net: NetConfig, **kw: Any) -> None:
        super().__init__(name, host, paths, meta, **kw)
        self.net = net
        self.phase = "starting"
        self.error: str | None = None
        self.size = 0

    def start_message(self) -> Start:
        net = {k: v for k, v in dataclasses.asdict(self.net).items()
               if k not in ("secret", "uuid")}  # the worker reads both from /mars
        return dataclasses.replace(super().start_message(), net=net)

    def _apply(self, state: State) -> None:
        if state.phase:
            self.phase = state.phase
        self.error = state.error
        if state.size:
            self.size = state.size

    async def stop(self) -> None:
        await self._stop(Stop())

    async def refresh(self, size: int) -> None:
        await self.request(Refresh(size), timeout=HOUSEKEEPING_TIMEOUT)

    async def set_space_level(self, level: int) -> None:
        await self.request(SpaceLevel(level), timeout=HOUSEKEEPING_TIMEOUT)
