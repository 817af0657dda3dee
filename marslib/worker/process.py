"""A resource worker: the data path of one resource in a process of its own.

marsd starts ``python -m marslib.worker --fd N --parent PID --resource R --host H`` with
one end of a socketpair as descriptor N: the control channel
(:mod:`marslib.worker.messages`). The worker

1. asks the kernel to kill it when marsd dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``,
   ``kill -9`` of marsd included) and exits at once if marsd is already gone;
2. sends :class:`Hello` and waits for :class:`Start`;
3. takes ``RUN_DIR/R.lock`` (``flock``): a worker of the same resource that is still on its
   way out (marsd was killed, the kernel is tearing the old worker down) holds it until
   its last write has landed, so two processes never touch one log or device;
4. starts the resource exactly as marsd does in-process
   (:mod:`marslib.worker.local`: ``Logger.start`` recovers the log) and replies
   :class:`Started`, or :class:`Failure` and exits;
5. answers marsd's requests and pushes :class:`StatePush` when the log grows or the
   phase changes (one push in flight, at most one every ``PUSH_INTERVAL``);
6. on :class:`Stop` stops the resource, replies :class:`Stopped` and exits 0; when the
   channel ends (marsd gone, or it dropped the channel) or on SIGTERM it stops the
   resource (at most ``STOP_ON_LOSS`` seconds) and exits 1. SIGINT is ignored: marsd
   stops its workers itself.

The worker opens its own MetaStore on the same state root and writes the keys the
resource writes in-process (replay position, version links, open-count, is-primary,
error, emergency, ...); its Lamport clock follows marsd's through every frame.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from marslib import __version__, eventloop, schema
from marslib.errors import MarsError, UsageError
from marslib.eventwait import wait_set
from marslib.layout import MarsPaths
from marslib.logger import LoggerConfig
from marslib.logsetup import setup_logging
from marslib.malloc_tuning import tune_malloc
from marslib.meta import LamportClock, MetaStore
from marslib.net.conn import read_secret
from marslib.secondary import NetConfig
from marslib.sync import SET_SPAN_MAX, ReadBlockOps, check_block_indexes
from marslib.worker.channel import STREAM_LIMIT, Channel, ChannelClosed, RemoteFailure
from marslib.worker.local import LocalPrimary, LocalSecondary
from marslib.worker.messages import (
    READ_CHUNK,
    Diff,
    DiffData,
    Done,
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
    StatePush,
    StatusReply,
    StatusRequest,
    Stop,
    Stopped,
    Sums,
    SumsData,
)

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PUSH_INTERVAL = 0.002  # at most one state push per this many seconds
STATE_POLL = 0.5  # changes without a wake-up (emergency entered on ENOSPC) show this late
LOCK_WAIT = 60.0
STOP_ON_LOSS = 30.0


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` (marsd) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise MarsError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent:  # marsd died before the line above took effect
        raise MarsError(f"marsd (pid {parent}) is gone")


def lock_path(paths: MarsPaths, resource: str) -> Path:
    return paths.run_dir / f"{resource}.lock"


class Worker:
    """Serves one resource over the control channel ``sock``."""

    def __init__(self, sock: socket.socket, resource: str, host: str) -> None:
        self.sock = sock
        self.name = resource
        self.host = host
        self.clock = LamportClock()
        self.log = logging.LoggerAdapter(log, {"resource": resource, "host": host})
        self.res: LocalPrimary | LocalSecondary | None = None
        self.channel: Channel | None = None
        self.finished = asyncio.Event()  # stopped (or failed to start): exit
        self.exit_code = 0
        self._changed = asyncio.Event()  # a secondary's phase changed
        self._pusher: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._lock_fd = -1

    async def run(self) -> int:
        reader, writer = await asyncio.open_unix_connection(sock=self.sock, limit=STREAM_LIMIT)
        self.channel = Channel(reader, writer, clock=self.clock, on_request=self.handle,
                               peer="marsd", log=self.log)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._terminate)
        self.channel.send(Hello(__version__, os.getpid()))
        reading = asyncio.create_task(self.channel.run(), name="channel")
        finished = asyncio.create_task(self.finished.wait())
        await asyncio.wait([reading, finished], return_when=asyncio.FIRST_COMPLETED)
        if finished.done():
            await self.channel.drain()
            self.channel.close("the worker exits")
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            return self.exit_code
        finished.cancel()
        self.log.warning("control channel to marsd ended (%s): stopping and exiting",
                         reading.result())
        await self._stop_on_loss()
        return 1

    def _terminate(self) -> None:
        self.log.warning("SIGTERM: stopping and exiting")
        self.exit_code = 1
        task = asyncio.create_task(self._stop_on_loss())
        task.add_done_callback(lambda _: self.finished.set())

    async def _stop_on_loss(self) -> None:
        if self.res is None:
            return
        try:
            await asyncio.wait_for(self._stop(), STOP_ON_LOSS)
        except TimeoutError:
            self.log.error("not stopped within %.0f s: exiting anyway (recovery replays the "
                           "log at the next start)", STOP_ON_LOSS)
        except Exception as exc:
            self.log.error("stopping failed: %s", exc)

    # ----------------------------------------------------------------- requests
    async def handle(self, msg: Message) -> Message:
        if isinstance(msg, Start):
            return await self._start(msg)
        res = self.res
        if res is None:
            raise UsageError(f"{msg.TYPE}: resource {self.name} is not started in this worker")
        if isinstance(msg, StatusRequest):
            return StatusReply(**self.state(), status=(await res.status()).to_json())
        if isinstance(msg, Stop):
            try:
                await self._stop(msg.end_marker)
            finally:
                self.finished.set()  # stopped or not, the worker exits after the reply
            return Stopped(**self.state())
        if isinstance(msg, Refresh):
            try:
                await res.refresh(msg.size)
            except RuntimeError as exc:
                return Refreshed(**self.state(), grow_error=str(exc))
            return Refreshed(**self.state())
        if isinstance(msg, SpaceLevel):
            if isinstance(res, LocalSecondary):
                await res.set_space_level(msg.level)
            return Done(**self.state())
        logger = res.logger if isinstance(res, LocalPrimary) else None
        if logger is None:
            raise MarsError(f"resource {self.name} is not running as primary on {self.host}")
        if isinstance(msg, Read):
            data = await logger.read(msg.offset, msg.length)
            return ReadData(**self.state(), payload=data)
        if isinstance(msg, Sums):
            _check_window(msg.offset, msg.length, msg.block_size)
            sums, pos = await ReadBlockOps(logger).block_sums(msg.offset, msg.length,
                                                              msg.block_size)
            return SumsData(**self.state(), position=pos.encode() if pos else None,
                            payload=sums)
        if isinstance(msg, Diff):
            _check_window(msg.offset, msg.length, msg.block_size,
                          READ_CHUNK if msg.blocks is None else SET_SPAN_MAX)
            listed = None if msg.blocks is None else \
                check_block_indexes(msg.blocks, -(-msg.length // msg.block_size))
            if listed is not None and len(listed) * msg.block_size > READ_CHUNK:
                raise UsageError(f"{len(listed)} blocks listed: at most {READ_CHUNK} bytes")
            blocks, data = await ReadBlockOps(logger).diff_blocks(
                msg.offset, msg.length, msg.block_size, bytes(msg.payload), listed)
            return DiffData(**self.state(), blocks=blocks, payload=data)
        if isinstance(msg, Rotate):
            name = await logger.rotate()
            return Rotated(**self.state(), logfile=name)
        if isinstance(msg, Emergency):
            if msg.enter:
                await logger.enter_emergency(msg.reason)
            else:
                await logger.leave_emergency()
            return Done(**self.state())
        raise UsageError(f"a worker does not take {msg.TYPE} requests")

    def state(self) -> dict[str, Any]:
        """The fields of :class:`marslib.worker.messages.State` as of now."""
        res = self.res
        if isinstance(res, LocalPrimary):
            lg = res.logger
            if lg is None:
                return {}
            return {"log_end": lg.log_end.encode() if lg.log_end else None,
                    "emergency": lg.emergency, "size": lg.size}
        if isinstance(res, LocalSecondary):
            return {"phase": res.phase, "error": res.error, "size": res.size}
        return {}

    async def _start(self, msg: Start) -> Message:
        if self.res is not None or self._lock_fd >= 0:
            raise UsageError(f"resource {self.name} is already started in this worker")
        try:
            paths = MarsPaths(Path(msg.root), Path(msg.run_dir))
            meta = MetaStore(paths.root, clock=self.clock)
            await self._take_lock(paths)
            res: LocalPrimary | LocalSecondary
            if msg.role == "primary":
                res = LocalPrimary(msg.resource, msg.host, paths, meta,
                                   _known(LoggerConfig, msg.logger))
            elif msg.role == "secondary":
                net = _known(NetConfig, {**msg.net, "uuid": meta.get(schema.UUID) or "",
                                         "secret": read_secret(paths.secret)})
                res = LocalSecondary(msg.resource, msg.host, paths, meta, net)
                res.resource.on_change = self._changed.set
            else:
                raise UsageError(f"unknown role {msg.role!r}")
            await res.start()
        except BaseException:
            self.exit_code = 1
            self.finished.set()  # the Failure reply goes out first, then the worker exits
            raise
        self.res = res
        await asyncio.sleep(0)  # a secondary's task takes its first phase
        self._pusher = asyncio.create_task(self._push_state(), name="push-state")
        return Started(**self.state(), status=(await res.status()).to_json())

    async def _take_lock(self, paths: MarsPaths) -> None:
        path = lock_path(paths, self.name)
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise MarsError(f"another process still holds {path} (a worker of "
                                    f"resource {self.name} that did not exit) after "
                                    f"{LOCK_WAIT:.0f} s") from None
                if not waited:
                    self.log.info("waiting for the previous worker to release %s", path)
                    waited = True
                await asyncio.sleep(0.05)
        self._lock_fd = fd

    async def _stop(self, end_marker: bool = False) -> None:
        """Stop the resource once, whoever asks first (marsd, SIGTERM, a lost channel)."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop_once(end_marker))
        await asyncio.shield(self._stopping)

    async def _stop_once(self, end_marker: bool) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pusher
        if self.res is None:
            return
        if isinstance(self.res, LocalPrimary):
            await self.res.stop(end_marker=end_marker)
        else:
            await self.res.stop()

    # ------------------------------------------------------------------- pushes
    async def _push_state(self) -> None:
        """Tell marsd when the state changes: the log grew (fetchers of secondaries wait
        for that), emergency mode, a secondary's phase. One push in flight, the newest
        state each time, so a burst of commits costs a few pushes."""
        assert self.channel is not None
        sent: dict[str, Any] = {}
        while True:
            now = self.state()
            if now != sent:
                try:
                    await self.channel.request(StatePush(**now))
                except ChannelClosed:
                    return
                except RemoteFailure as exc:
                    self.log.error("marsd refused a state push (%s): no more pushes", exc)
                    return
                sent = now
                await asyncio.sleep(PUSH_INTERVAL)
                continue
            res = self.res
            logger = res.logger if isinstance(res, LocalPrimary) else None
            if logger is not None:
                await logger.wait_growth(STATE_POLL)
            else:
                await wait_set(self._changed, STATE_POLL)
                self._changed.clear()


def _check_window(offset: int, length: int, block_size: int, most: int = READ_CHUNK) -> None:
    if offset < 0 or not 0 < length <= most or not 0 < block_size <= 8 << 20:
        raise UsageError(f"bad checksum window {offset}+{length} in blocks of {block_size}")


def _known(cls: Any, fields: dict[str, Any]) -> Any:
    """``cls(**fields)`` with the fields ``cls`` does not have left out (a newer marsd)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in names})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marslib.worker",
                                     description="one resource of marsd (started by marsd)")
    parser.add_argument("--fd", type=int, required=True, help="the control channel")
    parser.add_argument("--parent", type=int, required=True, help="marsd's pid")
    parser.add_argument("--resource", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.host, args.log_level, prog="marsd-worker")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: marsd stops us
    try:
        die_with_parent(args.parent)
    except MarsError as exc:
        log.error("%s: not starting", exc, extra={"resource": args.resource})
        return 1
    tune_malloc()
    os.set_inheritable(args.fd, False)
    sock = socket.socket(fileno=args.fd)
    try:
        # marsd's choice of event loop reaches us through MARS_EVENT_LOOP
        return eventloop.run(Worker(sock, args.resource, args.host).run())
    except Exception:
        log.exception("worker failed", extra={"resource": args.resource})
        return 1


if __name__ == "__main__":
    sys.exit(main())
