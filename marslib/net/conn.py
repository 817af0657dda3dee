"""Authenticated framed TCP connections: dial, serve, and a bundle of connections per peer.

Every exchange after the handshake is a request frame carrying ``rid`` answered by one
reply frame with the same ``rid``. A server handles the requests of a connection
concurrently; a malformed frame closes that connection only.

Bulk data is moved with as few copies and system calls as the kernel allows: a frame's
payload is received straight into a buffer of its own size (:class:`FrameReader`, one
``recv_into`` for whatever the socket holds of it), and a reply that is a range of a file
(:class:`FileReply`, the fetch port's log data) is sent with ``sendfile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from marslib.errors import MarsError
from marslib.formats.frame import (
    MAGIC,
    MAX_HEADER_LEN,
    MAX_PAYLOAD_LEN,
    PREFIX_LEN,
    PROTO_VERSION,
    Frame,
    FrameError,
    FrameType,
    encode_frame,
)
from marslib.net.handshake import Handshake, HandshakeError, PeerInfo, check_secret, restore_hint

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
HEAD_BUFFER = 64 << 10  # prefixes, headers and small payloads are read in pieces this big
SEPARATE_PAYLOAD = 64 << 10  # a payload at least this big is written without joining it
_PREFIX = struct.Struct("<IHHII")  # the frame prefix of formats/frame.py
_PAYLOAD_LEN_AT = PREFIX_LEN - 4  # where the prefix holds the payload length


class ConnectionClosed(ConnectionError):
    pass


# ------------------------------------------------------------------ frames in
class FrameReader:
    """Sans-I/O frame parser that receives payloads in place (the same frames as
    :class:`marslib.formats.frame.FrameParser`, and the same FrameErrors).

    ``get_buffer()`` says where the next bytes from the socket go, ``buffer_updated(n)``
    that ``n`` of them arrived; complete frames queue up in ``frames``. Prefixes, headers
    and small payloads land in a head buffer and are copied out; a payload that does not
    fit there gets a buffer of exactly its size, which becomes the frame's payload, so the
    bulk of it is written once, by the kernel.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD_LEN, head_size: int = HEAD_BUFFER) -> None:
        self.max_payload = max_payload
        self.frames: deque[Frame] = deque()
        self._head = bytearray(head_size)
        self._start = 0  # unparsed bytes of the head buffer: [_start, _end)
        self._end = 0
        self._body: bytearray | None = None  # a big payload being received in place
        self._got = 0
        self._frame = Frame(0)  # the frame that the big payload belongs to

    @property
    def in_frame(self) -> bool:
        """Whether a frame's big payload is coming in: its header is here, the rest not."""
        return self._body is not None

    def get_buffer(self) -> memoryview:
        if self._body is not None:
            return memoryview(self._body)[self._got:]
        if self._start:
            left = self._end - self._start
            self._head[:left] = self._head[self._start:self._end]
            self._start, self._end = 0, left
        if self._end == len(self._head):  # a header bigger than the head buffer
            bigger = bytearray(2 * len(self._head))
            bigger[: self._end] = self._head[: self._end]
            self._head = bigger
        return memoryview(self._head)[self._end:]

    def buffer_updated(self, n: int) -> None:
        if self._body is not None:
            self._got += n
            if self._got == len(self._body):
                f = self._frame
                self.frames.append(Frame(f.type, f.header, self._body, f.version))
                self._body = None
            return
        self._end += n
        self._parse()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Take ``data`` (copied into the reader's buffers) and return the frames
        completed by it."""
        view = memoryview(data)
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            del buf
            view = view[n:]
            self.buffer_updated(n)
        frames = list(self.frames)
        self.frames.clear()
        return frames

    def _parse(self) -> None:
        head = self._head
        while self._end - self._start >= PREFIX_LEN:
            start = self._start
            magic, version, ftype, hlen, plen = _PREFIX.unpack_from(head, start)
            if magic != MAGIC:
                raise FrameError(f"bad frame magic {magic:#010x}")
            if hlen > MAX_HEADER_LEN or plen > self.max_payload:
                raise FrameError(f"oversized frame (header {hlen}, payload {plen} bytes)")
            body_at = start + PREFIX_LEN + hlen
            have = self._end - body_at
            if have < plen and (have < 0 or PREFIX_LEN + hlen + plen <= len(head)):
                return  # more to come, and there is room for it (made by get_buffer)
            header = _decode_header(head[start + PREFIX_LEN : body_at])
            if have >= plen:
                payload = bytes(head[body_at : body_at + plen])
                self._start = body_at + plen
                self.frames.append(Frame(ftype, header, payload, version))
                continue
            # a big payload: the part already here, then the rest straight into place
            body = bytearray(plen)
            body[:have] = head[body_at : self._end]
            self._start = self._end = 0
            self._body, self._got, self._frame = body, have, Frame(ftype, header, b"", version)
            return


def _decode_header(raw: bytes | bytearray) -> dict[str, Any]:
    try:
        header = json.loads(bytes(raw) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not a JSON object")
    return header


# ------------------------------------------------------------------ frames out
def encode_head(frame_type: int, header: dict[str, Any], payload_len: int,
                version: int = PROTO_VERSION) -> bytes:
    """Prefix and header of a frame whose ``payload_len`` payload bytes follow
    separately (byte for byte the start of :func:`encode_frame` of the whole frame)."""
    if payload_len > MAX_PAYLOAD_LEN:
        raise ValueError("frame too large")
    head = bytearray(encode_frame(Frame(frame_type, header, b"", version)))
    struct.pack_into("<I", head, _PAYLOAD_LEN_AT, payload_len)
    return bytes(head)


_scratch = threading.local()


def _open_read_ahead(path: Path, offset: int, length: int) -> BinaryIO:
    """Open ``path`` and bring the range into the page cache (in a thread, so that
    ``sendfile`` on the event loop does not wait for the disk: log data written with
    O_DIRECT is not cached)."""
    f = open(path, "rb", buffering=0)
    try:
        buf = getattr(_scratch, "buf", None)
        if buf is None:
            buf = _scratch.buf = memoryview(bytearray(1 << 20))
        while length > 0:
            n = os.preadv(f.fileno(), [buf[: min(length, len(buf))]], offset)
            if n <= 0:
                break
            offset += n
            length -= n
    except BaseException:
        f.close()
        raise
    return f


@dataclass
class FileReply:
    """A reply frame whose payload is ``length`` bytes of the file ``path`` from
    ``offset``, sent with ``sendfile``, never read into Python. It reads like a
    :class:`Frame`; ``payload`` reads the range (for callers in the same process)."""

    type: int
    header: dict[str, Any]
    path: Path
    offset: int
    length: int
    version: int = PROTO_VERSION

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)

    @property
    def payload(self) -> bytes:
        with open(self.path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), self.length, self.offset)


Reply = Frame | FileReply
Handler = Callable[[Frame, PeerInfo], Awaitable[Reply]]


# ------------------------------------------------------------------ the connection
# TCP_RTO_MAX_MS (Linux 6.15, linux/tcp.h): the most a retransmission timeout may back
# off to. During an outage or a link that collapsed, TCP doubles its timeout with every
# retransmission (up to 120 s by default) and, when the link comes back, sits idle until
# the timer fires: the lag it has to catch up grows by that much (1.3 s seen in the lab).
# Capped at the smallest value the kernel takes, a connection tries again at least every
# second. Older kernels refuse the option; they keep their default.
TCP_RTO_MAX_MS = getattr(socket, "TCP_RTO_MAX_MS", 44)
RTO_MAX_MS = 1000

# The TCP congestion control of marslib's own connections (``marsd --tcp-congestion``,
# which sets it for its workers too): empty keeps the host's default. After a collapsed
# link came back, BBR (version 1, as in Linux) kept the rate it had measured meanwhile
# and its PROBE_RTT dropped a busy connection to 4 packets for 200 ms; cubic came out
# with the window the losses had cut to 2-3 packets. Which catches up sooner depends on
# the link (docs/replication.md).
CONGESTION_ENV = "MARS_TCP_CONGESTION"


def available_congestion_controls() -> list[str]:
    try:
        return Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    except OSError:
        return []


def check_congestion_control(name: str) -> None:
    """MarsError unless this host's kernel lets a connection use congestion control
    ``name`` (available, and allowed to this process)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        raise MarsError(f"TCP congestion control {name!r} cannot be used here: "
                        f"{exc.strerror}; available: "
                        f"{' '.join(available_congestion_controls()) or 'unknown'} (one "
                        f"that is not in net.ipv4.tcp_allowed_congestion_control needs "
                        f"CAP_NET_ADMIN)") from exc
    finally:
        probe.close()


def _tune_socket(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, RTO_MAX_MS)
    if congestion := os.environ.get(CONGESTION_ENV):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        except OSError as exc:  # checked when marsd started: a module unloaded since?
            log.warning("TCP congestion control %r refused: %s", congestion, exc.strerror)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FrameProtocol(asyncio.BufferedProtocol):
    """asyncio's side of a connection: frames in through a :class:`FrameReader`, flow
    control out. A malformed frame aborts the connection; ``next_frame`` then raises it
    (after the good frames before it)."""

    def __init__(self, max_payload: int,
                 on_made: Callable[[FrameProtocol], None] | None = None) -> None:
        self.reader = FrameReader(max_payload)
        self.on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None
        self.last_received: float | None = None  # time.monotonic() of the last bytes in
        self._wakeup = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _tune_socket(transport.get_extra_info("socket"))
        if self.on_made is not None:
            self.on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.last_received = time.monotonic()
        try:
            self.reader.buffer_updated(nbytes)
        except FrameError as exc:
            self._fail(exc)
            return
        if self.reader.frames:
            self._wakeup.set()

    def eof_received(self) -> bool:
        self._fail(ConnectionClosed("the peer closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionClosed(f"connection lost: {exc}" if exc else "connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wakeup.set()
        self._can_write.set()
        if isinstance(exc, FrameError) and self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionClosed(str(self.error or "connection closed"))
        self.transport.write(data)

    async def next_frame(self) -> Frame:
        frames = self.reader.frames
        while not frames:
            if self.error is not None:
                raise self.error
            self._wakeup.clear()
            await self._wakeup.wait()
        return frames.popleft()

    async def drain(self) -> None:
        await self._can_write.wait()
        if self.transport is None or self.transport.is_closing():
            raise ConnectionClosed(str(self.error or "connection closed"))


class Connection:
    """One authenticated connection; ``peer`` says who is at the other end."""

    def __init__(self, protocol: FrameProtocol, peer: PeerInfo) -> None:
        assert protocol.transport is not None
        self.protocol = protocol
        self.transport: asyncio.Transport = protocol.transport
        self.peer = peer
        self.address: tuple[str, int] | None = None  # where it was dialled (client side)
        self._send_lock = asyncio.Lock()
        self.bytes_out = 0

    async def send(self, frame: Reply, written: Callable[[], None] | None = None) -> None:
        """Send ``frame`` whole: frames never interleave, and go out in the order of the
        calls. A :class:`FileReply` is read ahead while the replies before it are sent;
        one whose range cannot be sent whole breaks the framing: the connection is
        closed and ConnectionError raised (the peer's requests on it fail at once).
        ``written`` (a plain frame's) is called once the frame is handed to the transport
        whole, before waiting for room: from then on the peer will get all of it."""
        if isinstance(frame, FileReply):
            # read ahead now, send in turn (the lock serves in the order of asking)
            ahead = asyncio.ensure_future(asyncio.to_thread(
                _open_read_ahead, frame.path, frame.offset, frame.length))
            try:
                async with self._send_lock:
                    try:
                        f = await ahead
                    except OSError as exc:
                        self.close()
                        raise ConnectionClosed(f"{frame.path}: {exc}") from None
                    await self._send_file(frame, f)
            finally:
                if not ahead.done():
                    ahead.cancel()  # (the thread's file is closed when it is dropped)
                elif not ahead.cancelled() and ahead.exception() is None:
                    ahead.result().close()
            return
        async with self._send_lock:
            payload = frame.payload
            if len(payload) < SEPARATE_PAYLOAD:
                data = encode_frame(frame)
                self.protocol.write(data)
                self.bytes_out += len(data)
            else:
                head = encode_head(frame.type, frame.header, len(payload), frame.version)
                self.protocol.write(head)
                self.protocol.write(payload)
                self.bytes_out += len(head) + len(payload)
            if written is not None:
                written()
            await self.protocol.drain()

    async def _send_file(self, reply: FileReply, f: BinaryIO) -> None:
        head = encode_head(reply.type, reply.header, reply.length, reply.version)
        sent = 0
        try:
            self.protocol.write(head)
            if reply.length:
                loop = asyncio.get_running_loop()
                sent = await loop.sendfile(self.transport, f, reply.offset, reply.length)
        except RuntimeError as exc:  # the transport closed meanwhile
            raise ConnectionClosed(str(exc)) from None
        self.bytes_out += len(head) + sent
        if sent != reply.length:
            self.close()
            raise ConnectionClosed(f"{reply.path}: {sent} of {reply.length} bytes from "
                                   f"{reply.offset} were there to send")
        await self.protocol.drain()

    async def recv(self) -> Frame:
        return await self.protocol.next_frame()

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


async def _handshake(protocol: FrameProtocol, hs: Handshake, max_payload: int) -> Connection:
    protocol.reader.max_payload = 1 << 16
    for f in hs.start():
        protocol.write(encode_frame(f))
    await protocol.drain()
    while not hs.done:
        try:
            frame = await protocol.next_frame()
        except ConnectionClosed:
            raise HandshakeError("peer closed the connection during the handshake") from None
        try:
            replies = hs.receive(frame)
        except HandshakeError as exc:
            if exc.reply is not None:
                protocol.write(encode_frame(exc.reply))
                await protocol.drain()
            raise
        for f in replies:
            protocol.write(encode_frame(f))
        await protocol.drain()
    protocol.reader.max_payload = max_payload
    assert hs.peer is not None
    return Connection(protocol, hs.peer)


async def connect(address: str, port: int, *, host: str, uuid: str, secret: bytes,
                  channel: str, timeout: float = HANDSHAKE_TIMEOUT,
                  max_payload: int = 64 << 20) -> Connection:
    """Dial ``address:port`` and authenticate; raise OSError or HandshakeError (MarsError
    for an empty secret, before dialling)."""
    hs = Handshake("client", host, uuid, secret, channel)

    async def go() -> Connection:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(
            lambda: FrameProtocol(max_payload), address, port)
        try:
            return await _handshake(protocol, hs, max_payload)
        except BaseException:
            transport.close()
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
    clients: set[asyncio.Task[None]] = set()

    async def on_client(protocol: FrameProtocol) -> None:
        assert protocol.transport is not None
        transport = protocol.transport
        where = transport.get_extra_info("peername")
        try:
            conn = await asyncio.wait_for(
                _handshake(protocol, Handshake("server", host, uuid, secret, channel),
                           max_payload), HANDSHAKE_TIMEOUT)
        except (HandshakeError, FrameError, TimeoutError, OSError) as exc:
            lg.warning("%s port: refused connection from %s: %s", channel, where, exc)
            transport.close()
            return
        lg.debug("%s port: %s connected from %s", channel, conn.peer.host, where)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(frame: Frame) -> None:
            reply: Reply
            try:
                reply = await handler(frame, conn.peer)
            except Exception as exc:  # a bug or bad request: tell the peer, keep serving
                lg.exception("%s port: request %s from %s failed", channel, frame.type,
                             conn.peer.host)
                reply = Frame(FrameType.ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            reply.header.setdefault("rid", frame.get("rid"))
            try:
                await conn.send(reply)
            except (ConnectionError, OSError) as exc:
                lg.debug("%s port: reply to %s not sent: %s", channel, conn.peer.host, exc)

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
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # marsd is stopping: end this connection quietly
        finally:
            for task in tasks:
                task.cancel()
            conn.close()

    def made(protocol: FrameProtocol) -> None:
        task = asyncio.create_task(on_client(protocol))
        clients.add(task)
        task.add_done_callback(clients.discard)

    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FrameProtocol(max_payload, made), bind, port,
                                    reuse_address=True)


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
        # requests given up on before their reply came (a hedged fetch took the other
        # reply): the peer still sends those replies, so their connections stay busy
        # with them until they arrive
        self._orphans: dict[int, Connection] = {}
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

    @property
    def in_flight(self) -> int:
        """Requests sent whose replies have not arrived yet, given up on or not."""
        return sum(self._busy.values())

    @property
    def last_received(self) -> float | None:
        """When bytes last came in on any of the connections (``time.monotonic()``)."""
        times = [c.protocol.last_received for c in self._conns
                 if c.protocol.last_received is not None]
        return max(times) if times else None

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
                rid = int(frame.get("rid") or 0)
                fut = self._waiting.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                elif self._orphans.pop(rid, None) is conn and conn in self._busy:
                    self._busy[conn] -= 1
        except (ConnectionError, OSError, FrameError) as exc:
            self.last_error = f"{self.channel} connection to {self.peer} lost: {exc}"
        finally:
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        conn.close()
        if conn in self._conns:
            self._conns.remove(conn)
        self._busy.pop(conn, None)
        for rid in [r for r, c in self._orphans.items() if c is conn]:
            del self._orphans[rid]
        if not self._conns:
            self.connected_since = None
        for rid, owner in list(self._owner.items()):
            if owner is conn:
                del self._owner[rid]
                fut = self._waiting.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError(self.last_error or "connection lost"))

    def silence(self, rid: int, since: float) -> tuple[float, bool] | None:
        """For request ``rid`` still waiting for its reply: how long its connection has
        received nothing (``since`` at the earliest, a ``time.monotonic()``: when the
        request was made), and whether that connection is in the middle of a reply's
        payload (the peer is sending: its bytes stopped coming). None if ``rid`` is not
        waiting here."""
        conn = self._owner.get(rid)
        if conn is None:
            return None
        heard = max(conn.protocol.last_received or 0.0, since)
        return time.monotonic() - heard, conn.protocol.reader.in_frame

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
        sent: list[bool] = []
        try:
            await conn.send(frame, written=lambda: sent.append(True))
            reply = await _reply_while_bytes_arrive(conn, fut, timeout)
        except (OSError, TimeoutError) as exc:
            self._drop(conn)
            raise ConnectionError(f"{self.channel} request to {self.peer}: {exc}") from None
        finally:
            self._waiting.pop(rid, None)
            self._owner.pop(rid, None)
            if sent and not fut.done() and conn in self._busy:
                self._orphans[rid] = conn  # its reply is still on its way: busy until then
            elif conn in self._busy:
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
    asked = time.monotonic()
    while True:
        heard = max(asked, conn.protocol.last_received or asked)
        remaining = heard + timeout - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no byte from {conn.peer.host} for {timeout:g} s")
        try:
            async with asyncio.timeout(remaining):
                return await asyncio.shield(fut)
        except TimeoutError:
            continue


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
