"""The control channel over a unix stream socket: requests with replies, and events.

Both ends are the same class. A request gets a number and waits for the reply naming
it; incoming requests run concurrently, each in its own task, and their replies go out in
the order they finish. Every frame carries the sender's Lamport clock, which the
receiver's clock witnesses. A frame that cannot be parsed, or the socket closing, ends
:meth:`Channel.run` with the reason; every request still waiting then fails with
:class:`ChannelClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

from marslib.errors import MarsError
from marslib.meta import LamportClock
from marslib.worker import messages
from marslib.worker.messages import Envelope, Failure, Message, ProtocolError

log = logging.getLogger(__name__)

STREAM_LIMIT = 1 << 20


class ChannelClosed(MarsError):
    """The other side went away (or was dropped) before it answered."""


class RemoteFailure(MarsError):
    """The other side could not do what it was asked; ``kind`` names its exception."""

    def __init__(self, error: str, kind: str) -> None:
        super().__init__(error)
        self.kind = kind


RequestHandler = Callable[[Message], Awaitable[Message]]
EventHandler = Callable[[Message], None]


class Channel:
    """One end of a control channel.

    ``on_request`` answers a request (its exceptions become a :class:`Failure` reply);
    ``on_event`` takes messages that want no reply. ``log`` names the two ends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 clock: LamportClock, on_request: RequestHandler,
                 on_event: EventHandler | None = None, peer: str = "the other side",
                 log: logging.LoggerAdapter[logging.Logger] | logging.Logger = log) -> None:
        self.reader = reader
        self.writer = writer
        self.clock = clock
        self.on_request = on_request
        self.on_event = on_event
        self.log = log
        self.peer = peer  # who is at the other end, for messages
        self.closed = asyncio.Event()
        self.reason = ""
        self.broken = False  # dropped for a malformed message
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- sending
    def _write(self, msg: Message, *, id: int = 0, re: int = 0) -> None:
        if self.closed.is_set():
            raise ChannelClosed(f"control channel closed: {self.reason}")
        self.writer.writelines(messages.encode(msg, id=id, re=re, clock=self.clock.tick()))

    def send(self, msg: Message) -> None:
        """An event: no reply."""
        self._write(msg)

    async def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and return the reply; raise :class:`RemoteFailure` for a
        :class:`Failure` reply, :class:`ChannelClosed` if the channel ends first and
        TimeoutError after ``timeout`` seconds."""
        rid = next(self._ids)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            self._write(msg, id=rid)
            await self.writer.drain()
            reply = await asyncio.wait_for(fut, timeout)
        except ConnectionError as exc:
            raise ChannelClosed(f"control channel closed: {self.reason or exc}") from None
        finally:
            self._waiting.pop(rid, None)
        if isinstance(reply, Failure):
            raise RemoteFailure(reply.error, reply.kind)
        return reply

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    # ---------------------------------------------------------------- receiving
    async def run(self) -> str:
        """Read frames until the channel ends; return why it ended."""
        try:
            while True:
                try:
                    prefix = await self.reader.readexactly(messages.PREFIX_LEN)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise ProtocolError(f"the channel ended inside a frame "
                                            f"({len(exc.partial)} bytes)") from None
                    return self._end(f"{self.peer} closed the channel")
                hlen, plen = messages.parse_prefix(prefix)
                try:
                    header = await self.reader.readexactly(hlen)
                    payload = await self.reader.readexactly(plen) if plen else b""
                except asyncio.IncompleteReadError:
                    raise ProtocolError("the channel ended inside a frame") from None
                env, msg = messages.decode(header, payload)
                self.clock.witness(env.clock)
                self._dispatch(env, msg)
        except ProtocolError as exc:
            return self._end(f"malformed message: {exc}", error=True)
        except ConnectionError as exc:
            return self._end(f"connection error: {exc}")
        except asyncio.CancelledError:
            self._end("closed")
            raise

    def _dispatch(self, env: Envelope, msg: Message | None) -> None:
        if env.re:
            fut = self._waiting.get(env.re)
            if msg is None:
                msg = Failure(f"reply of unknown type {env.type!r}", "ProtocolError")
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        if env.id:
            task = asyncio.create_task(self._answer(env, msg), name=f"answer-{env.type}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if msg is None:
            self.log.debug("control channel: ignoring an event of unknown type %r", env.type)
        elif self.on_event is not None:
            self.on_event(msg)

    async def _answer(self, env: Envelope, msg: Message | None) -> None:
        reply: Message
        if msg is None:
            reply = Failure(f"unknown request type {env.type!r}", "UsageError")
        else:
            try:
                reply = await self.on_request(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reply = Failure(str(exc) or type(exc).__name__, type(exc).__name__)
        if self.closed.is_set():
            return
        try:
            self._write(reply, re=env.id)
            await self.writer.drain()
        except (ConnectionError, ChannelClosed):
            pass

    # ------------------------------------------------------------------ closing
    def _end(self, reason: str, error: bool = False) -> str:
        if not self.closed.is_set():
            self.reason = reason
            self.broken = error
            self.closed.set()
            if error:
                self.log.error("control channel dropped: %s", reason)
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ChannelClosed(f"control channel closed: {reason}"))
            for task in self._tasks:
                task.cancel()
            self.writer.close()
        return self.reason

    def close(self, reason: str = "closed by this side") -> None:
        self._end(reason)
