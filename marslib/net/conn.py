"""Authenticated framed TCP connections: dial, serve, and a bundle of connections per peer.

Every exchange after the handshake is a request frame carrying ``rid`` answered by one
reply frame with the same ``rid``. A server handles the requests of a connection
concurrently; a malformed frame closes that connection only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from marslib.errors import MarsError
from marslib.formats.frame import Frame, FrameError, FrameParser, FrameType, encode_frame
from marslib.net.handshake import Handshake, HandshakeError, PeerInfo, check_secret, restore_hint

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
READ_CHUNK = 1 << 20

Handler = Callable[[Frame, PeerInfo], Awaitable[Frame]]


class ConnectionClosed(ConnectionError):
    pass


def _tune_socket(sock: socket.socket | None) -> None:
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Connection:
    """One authenticated connection; ``peer`` says who is at the other end."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 parser: FrameParser, pending: list[Frame], peer: PeerInfo) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = parser
        self._pending = pending
        self.peer = peer
        self.address: tuple[str, int] | None = None  # where it was dialled (client side)
        self._send_lock = asyncio.Lock()
        self.bytes_in = 0
        self.bytes_out = 0

    async def send(self, frame: Frame) -> None:
        data = encode_frame(frame)
        async with self._send_lock:
            self.writer.write(data)
            await self.writer.drain()
        self.bytes_out += len(data)

    async def recv(self) -> Frame:
        while not self._pending:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                raise ConnectionClosed(f"connection to {self.peer.host} closed")
            self.bytes_in += len(data)
            self._pending.extend(self.parser.feed(data))
        return self._pending.pop(0)

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     hs: Handshake, max_payload: int) -> Connection:
    parser = FrameParser(max_payload=1 << 16)
    pending: list[Frame] = []
    for f in hs.start():
        writer.write(encode_frame(f))
    await writer.drain()
    while not hs.done:
        while not pending:
            data = await reader.read(65536)
            if not data:
                raise HandshakeError("peer closed the connection during the handshake")
            pending.extend(parser.feed(data))
        try:
            replies = hs.receive(pending.pop(0))
        except HandshakeError as exc:
            if exc.reply is not None:
                writer.write(encode_frame(exc.reply))
                await writer.drain()
            raise
        for f in replies:
            writer.write(encode_frame(f))
        await writer.drain()
    parser.max_payload = max_payload
    assert hs.peer is not None
    return Connection(reader, writer, parser, pending, hs.peer)


async def connect(address: str, port: int, *, host: str, uuid: str, secret: bytes,
                  channel: str, timeout: float = HANDSHAKE_TIMEOUT,
                  max_payload: int = 64 << 20) -> Connection:
    """Dial ``address:port`` and authenticate; raise OSError or HandshakeError (MarsError
    for an empty secret, before dialling)."""
    hs = Handshake("client", host, uuid, secret, channel)

    async def go() -> Connection:
        reader, writer = await asyncio.open_connection(address, port, limit=READ_CHUNK * 2)
        _tune_socket(writer.get_extra_info("socket"))
        try:
            return await _handshake(reader, writer, hs, max_payload)
        except BaseException:
            writer.close()
            raise
    return await asyncio.wait_for(go(), timeout)


async def serve(bind: str, port: int, handler: Handler, *, host: str, uuid: str,
                secret: bytes, channel: str, logger: logging.LoggerAdapter | None = None,
                max_payload: int = 64 << 20) -> asyncio.Server:
    """Accept authenticated connections on ``bind:port``; answer each request frame
    with ``handler(frame, peer)``. Bad peers and bad frames close their connection only.
    A secret that breaks the rule (:func:`check_secret`) raises MarsError: nothing listens."""
    check_secret(secret, f"the {channel} port of {host}")
    lg = logger or logging.LoggerAdapter(log, {})

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _tune_socket(writer.get_extra_info("socket"))
        where = writer.get_extra_info("peername")
        try:
            conn = await asyncio.wait_for(
                _handshake(reader, writer, Handshake("server", host, uuid, secret, channel),
                           max_payload), HANDSHAKE_TIMEOUT)
        except (HandshakeError, FrameError, TimeoutError, OSError) as exc:
            lg.warning("%s port: refused connection from %s: %s", channel, where, exc)
            writer.close()
            return
        lg.debug("%s port: %s connected from %s", channel, conn.peer.host, where)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(frame: Frame) -> None:
            try:
                reply = await handler(frame, conn.peer)
            except Exception as exc:  # a bug or bad request: tell the peer, keep serving
                lg.exception("%s port: request %s from %s failed", channel, frame.type,
                             conn.peer.host)
                reply = Frame(FrameType.ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            reply.header.setdefault("rid", frame.get("rid"))
            try:
                await conn.send(reply)
            except (ConnectionError, OSError):
                pass

        try:
            while True:
                frame = await conn.recv()
                if frame.type == FrameType.PING:
                    await conn.send(Frame(FrameType.PONG, {"rid": frame.get("rid")}))
                    continue
                task = asyncio.create_task(answer(frame))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except FrameError as exc:
            lg.warning("%s port: malformed frame from %s, closing: %s", channel,
                       conn.peer.host, exc)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # marsd is stopping: end this connection quietly
        finally:
            for task in tasks:
                task.cancel()
            conn.close()

    return await asyncio.start_server(on_client, bind, port, reuse_address=True,
                                      limit=READ_CHUNK * 2)


class RemoteError(Exception):
    """The peer answered a request with ERROR."""


class PeerBundle:
    """Up to ``size`` connections to one peer on one channel, redialled with backoff.

    ``request`` sends a frame on the least busy connection and returns the reply.
    A secret that breaks the rule (:func:`check_secret`) raises MarsError at once.
    """

    def __init__(self, peer: str, address: Callable[[], tuple[str, int] | None], *,
                 host: str, uuid: str, secret: bytes, channel: str, size: int = 2) -> None:
        check_secret(secret, f"the {channel} connections of {host} to {peer}")
        self.peer = peer
        self.address = address
        self.host = host
        self.uuid = uuid
        self.secret = secret
        self.channel = channel
        self.size = max(1, min(size, 8))
        self._conns: list[Connection] = []
        self._waiting: dict[int, asyncio.Future[Frame]] = {}
        self._owner: dict[int, Connection] = {}
        self._busy: dict[Connection, int] = {}
        self._rids = itertools.count(1)
        self._dial_lock = asyncio.Lock()
        self._backoff = 0.1
        self._next_dial = 0.0
        self.connected_since: float | None = None
        self.last_error: str | None = None
        self.reconnects = 0
        self.log = logging.LoggerAdapter(log, {"host": host})

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def _dial(self) -> Connection:
        loop = asyncio.get_running_loop()
        async with self._dial_lock:
            if len(self._conns) >= self.size:
                return min(self._conns, key=lambda c: self._busy.get(c, 0))
            delay = self._next_dial - loop.time()
            if delay > 0:
                if self._conns:
                    return min(self._conns, key=lambda c: self._busy.get(c, 0))
                await asyncio.sleep(delay)
            addr = self.address()
            if addr is None:
                raise ConnectionError(f"no address known for {self.peer}")
            try:
                conn = await connect(addr[0], addr[1], host=self.host, uuid=self.uuid,
                                     secret=self.secret, channel=self.channel)
            except (OSError, HandshakeError, TimeoutError, FrameError) as exc:
                self._next_dial = loop.time() + self._backoff
                self._backoff = min(self._backoff * 2, 10.0)
                self.last_error = f"{self.channel} connection to {self.peer}: {exc}"
                raise ConnectionError(self.last_error) from None
            self._backoff = 0.1
            self.last_error = None
            conn.address = addr
            if not self._conns:
                self.connected_since = loop.time()
            self.reconnects += 1
            self._conns.append(conn)
            self._busy[conn] = 0
            asyncio.create_task(self._reader(conn))
            return conn

    async def _pick(self) -> Connection:
        addr = self.address()
        for conn in [c for c in self._conns if c.address != addr]:
            # the peer moved (a new primary): connections to the old address must go
            self.last_error = f"{self.channel}: {self.peer} is now at {addr}"
            self._drop(conn)
        idle = [c for c in self._conns if self._busy.get(c, 0) == 0]
        if idle:
            return idle[0]
        if len(self._conns) < self.size:
            try:
                return await self._dial()
            except ConnectionError:
                if not self._conns:
                    raise
        return min(self._conns, key=lambda c: self._busy.get(c, 0))

    async def _reader(self, conn: Connection) -> None:
        try:
            while True:
                frame = await conn.recv()
                fut = self._waiting.pop(int(frame.get("rid") or 0), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        except (ConnectionError, OSError, FrameError) as exc:
            self.last_error = f"{self.channel} connection to {self.peer} lost: {exc}"
        finally:
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        conn.close()
        if conn in self._conns:
            self._conns.remove(conn)
        self._busy.pop(conn, None)
        if not self._conns:
            self.connected_since = None
        for rid, owner in list(self._owner.items()):
            if owner is conn:
                del self._owner[rid]
                fut = self._waiting.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError(self.last_error or "connection lost"))

    async def request(self, frame: Frame, timeout: float = 60.0) -> Frame:
        """Send ``frame`` and return its reply. ``timeout`` bounds silence, not size: the
        request fails once ``timeout`` seconds pass in which the connection delivers no
        byte at all (a dead or stuck peer), so a large reply over a link that has slowed to
        a crawl is waited for as long as it keeps coming."""
        conn = await self._pick()
        rid = next(self._rids)
        frame.header["rid"] = rid
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._owner[rid] = conn
        self._busy[conn] = self._busy.get(conn, 0) + 1
        try:
            await conn.send(frame)
            reply = await _reply_while_bytes_arrive(conn, fut, timeout)
        except (OSError, TimeoutError) as exc:
            self._drop(conn)
            raise ConnectionError(f"{self.channel} request to {self.peer}: {exc}") from None
        finally:
            self._waiting.pop(rid, None)
            self._owner.pop(rid, None)
            if conn in self._busy:
                self._busy[conn] -= 1
        if reply.type == FrameType.ERROR:
            raise RemoteError(str(reply.get("error")))
        return reply

    def close(self) -> None:
        for conn in list(self._conns):
            self._drop(conn)


async def _reply_while_bytes_arrive(conn: Connection, fut: asyncio.Future[Frame],
                                    timeout: float) -> Frame:
    """``fut``'s result; TimeoutError only after ``timeout`` seconds without a byte on
    ``conn`` (bytes of other replies on it count: they show the peer and the link live)."""
    seen = conn.bytes_in
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            if conn.bytes_in == seen:
                raise
            seen = conn.bytes_in


def read_secret(path: Any) -> bytes:
    """The cluster secret from the file ``path``; MarsError (saying how to restore it) if
    the file is missing, unreadable, empty or too short."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise MarsError(f"{path} is missing: this host has no cluster secret; "
                        f"{restore_hint(path)}") from None
    except OSError as exc:
        raise MarsError(f"{path}: cannot read the cluster secret: {exc.strerror}; "
                        f"{restore_hint(path)}") from None
    return check_secret(raw.strip(), path, path)
