"""The fetch path's bulk data handling: bytes in flight, in-place frame parsing, sendfile.

- The fetcher keeps ``window_bytes`` requested against a server whose replies are held
  back, and appends replies released out of order strictly in order; how much it keeps
  in flight follows the reply rate (``FetchPace``); a silent primary is redialled.
- The oldest reply, missing while the rest of the window is here, is asked for again; a
  disk that stalls holds up the link only after ``store_ahead`` bytes (``CopyAppender``).
- Connections take the congestion control marsd was told to use.
- :class:`FrameReader` gives the same frames (and errors) as ``FrameParser`` whatever the
  pieces the bytes arrive in.
- A :class:`FileReply` puts exactly the requested range of its file on the wire; one that
  cannot be served whole, or a malformed frame, ends that connection and no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import loopback_ips

from marslib import fetch
from marslib.errors import MarsError
from marslib.fetch import (
    MIN_WINDOW,
    REQUEST_BYTES,
    STORE_AHEAD_MAX,
    STORE_AHEAD_MIN,
    WINDOW_BYTES,
    WRITEOUT_BYTES,
    CopyAppender,
    Fetcher,
    FetchPace,
    FetchService,
)
from marslib.formats.frame import MAGIC, Frame, FrameError, FrameParser, FrameType, encode_frame
from marslib.layout import MarsPaths
from marslib.net.conn import (
    CONGESTION_ENV,
    RTO_MAX_MS,
    TCP_RTO_MAX_MS,
    ConnectionClosed,
    FileReply,
    FrameReader,
    PeerBundle,
    Reply,
    available_congestion_controls,
    check_congestion_control,
    connect,
    encode_head,
    serve,
)
from marslib.net.handshake import PeerInfo
from marslib.position import LogPosition

UUID = "3c1bdf25-7a0e-4c55-9a3b-2f4b1f6c0d11"
SECRET = b"0123456789abcdef" * 2
HOST = "alpha"
GUARD = 30.0  # seconds: a hung test fails instead of hanging (nothing waits this long)


# ------------------------------------------------------------------ helpers
def _frames() -> list[Frame]:
    rng = random.Random(7)
    return [
        Frame(FrameType.PING, {"rid": 1}),
        Frame(FrameType.FETCH_REQ, {"rid": 2, "resource": "r0", "logfile": "log-1"}),
        Frame(FrameType.FETCH_DATA, {"rid": 3, "offset": 0}, rng.randbytes(1)),
        Frame(FrameType.FETCH_DATA, {}, rng.randbytes(300)),
        Frame(FrameType.SYNC_DATA, {"rid": 4, "pad": "x" * 150}, rng.randbytes(37)),
        Frame(FrameType.FETCH_DATA, {"rid": 5}, b""),
        Frame(FrameType.FETCH_DATA, {"rid": 6}, rng.randbytes(1000)),
        Frame(FrameType.PONG, {"rid": 7}),
    ]


def _same(a: list[Frame], b: list[Frame]) -> None:
    assert [(f.type, f.header, bytes(f.payload), f.version) for f in a] == \
        [(f.type, f.header, bytes(f.payload), f.version) for f in b]


def _stream(frames: list[Frame]) -> bytes:
    return b"".join(encode_frame(f) for f in frames)


def run(coro: Awaitable[None]) -> None:
    async def guarded() -> None:
        await asyncio.wait_for(coro, GUARD)
    asyncio.run(guarded())


async def _server(handler: Callable[[Frame, PeerInfo], Awaitable[Reply]]
                  ) -> tuple[asyncio.Server, str, int]:
    ip = loopback_ips(1)[0]
    server = await serve(ip, 0, handler, host=HOST, uuid=UUID, secret=SECRET, channel="fetch")
    port = server.sockets[0].getsockname()[1]
    return server, ip, port


def _bundle(ip: str, port: int, size: int = 2) -> PeerBundle:
    return PeerBundle("primary", lambda: (ip, port), host="beta", uuid=UUID, secret=SECRET,
                      channel="fetch", size=size)


# ------------------------------------------------------------------ FrameReader
@pytest.mark.parametrize("head_size", [64, 200, 1 << 16])
def test_reader_equals_parser_on_every_split(head_size: int) -> None:
    frames = _frames()
    data = _stream(frames)
    _same(FrameParser().feed(data), frames)
    # one piece, byte by byte, and cut in two at every byte
    _same(FrameReader(head_size=head_size).feed(data), frames)
    reader = FrameReader(head_size=head_size)
    got = [f for i in range(len(data)) for f in reader.feed(data[i:i + 1])]
    _same(got, frames)
    for cut in range(1, len(data)):
        reader = FrameReader(head_size=head_size)
        got = reader.feed(data[:cut]) + reader.feed(data[cut:])
        _same(got, frames)


def test_reader_receives_a_big_payload_in_place() -> None:
    payload = random.Random(3).randbytes(3 << 20)
    frames = [Frame(FrameType.FETCH_DATA, {"rid": 1}, payload), Frame(FrameType.PONG, {})]
    data = _stream(frames)
    reader = FrameReader()
    pieces = [data[:5000], data[5000:70000], data[70000:]]
    got = [f for piece in pieces for f in reader.feed(piece)]
    _same(got, frames)
    assert isinstance(got[0].payload, bytearray)  # the buffer the socket wrote into
    # and the kernel is offered the whole rest of the payload in one buffer
    reader = FrameReader()
    reader.feed(data[:100])
    assert len(reader.get_buffer()) == len(data) - 100 - len(encode_frame(frames[1]))


def test_reader_grows_for_a_header_bigger_than_its_buffer() -> None:
    frames = [Frame(FrameType.META_PUSH, {"items": ["k" * 50] * 40}, b"abc"),
              Frame(FrameType.PING, {})]
    data = _stream(frames)
    for cut in range(1, len(data)):
        reader = FrameReader(head_size=64)
        _same(reader.feed(data[:cut]) + reader.feed(data[cut:]), frames)


def _prefix(hlen: int, plen: int, magic: int = MAGIC) -> bytes:
    return struct.pack("<IHHII", magic, 1, int(FrameType.PING), hlen, plen)


@pytest.mark.parametrize("garbage", [
    _prefix(2, 0, magic=0xDEADBEEF) + b"{}",
    _prefix(2, 1 << 30) + b"{}",
    _prefix(5, 0) + b"{nope",
    _prefix(2, 0) + b"[]",
    _prefix(2, 0) + b"\xff\xfe",
])
def test_reader_refuses_what_the_parser_refuses(garbage: bytes) -> None:
    good = encode_frame(Frame(FrameType.PING, {"rid": 1}))
    with pytest.raises(FrameError):
        FrameParser().feed(good + garbage)
    reader = FrameReader()
    with pytest.raises(FrameError):
        reader.feed(good + garbage)
    assert [f.get("rid") for f in reader.frames] == [1]  # what came before it stands


def test_encode_head_is_the_start_of_the_whole_frame() -> None:
    frame = Frame(FrameType.FETCH_DATA, {"rid": 9, "offset": 4096}, b"x" * 70000)
    whole = encode_frame(frame)
    head = encode_head(frame.type, frame.header, len(frame.payload))
    assert whole == head + frame.payload


# ------------------------------------------------------------------ sendfile
def test_file_reply_sends_exactly_the_requested_range(tmp_path: Path) -> None:
    content = random.Random(5).randbytes(3 << 20)
    path = tmp_path / "log"
    path.write_bytes(content)
    ranges = [(0, 0), (0, 1), (1, 4095), (4097, 1 << 20), (123457, (2 << 20) + 3),
              (len(content) - 10, 10), (0, len(content))]

    async def handler(frame: Frame, peer: PeerInfo) -> Reply:
        off, n = int(frame.get("offset")), int(frame.get("length"))
        if frame.get("plain"):
            return Frame(FrameType.SYNC_DATA, {"offset": off}, content[off:off + n])
        return FileReply(FrameType.SYNC_DATA, {"offset": off}, path, off, n)

    async def main() -> None:
        server, ip, port = await _server(handler)
        bundle = _bundle(ip, port, size=1)  # one connection: frames must not interleave
        try:
            asks = [{"offset": o, "length": n, "plain": i % 3 == 2}
                    for i, (o, n) in enumerate(ranges * 2)]
            replies = await asyncio.gather(*(
                bundle.request(Frame(FrameType.SYNC_READ_REQ, a)) for a in asks))
            for a, reply in zip(asks, replies, strict=True):
                assert reply.get("offset") == a["offset"]
                assert bytes(reply.payload) == content[a["offset"]:a["offset"] + a["length"]]
            assert bundle.connections == 1
        finally:
            bundle.close()
            server.close()
    run(main())


def test_a_file_shorter_than_promised_ends_that_connection_only(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"y" * 1000)

    async def handler(frame: Frame, peer: PeerInfo) -> Reply:
        n = int(frame.get("length"))
        return FileReply(FrameType.SYNC_DATA, {}, path, 0, n)

    async def main() -> None:
        server, ip, port = await _server(handler)
        bad, good = _bundle(ip, port, size=1), _bundle(ip, port, size=1)
        try:
            with pytest.raises(ConnectionError):
                await bad.request(Frame(FrameType.SYNC_READ_REQ, {"length": 5000}))
            reply = await good.request(Frame(FrameType.SYNC_READ_REQ, {"length": 1000}))
            assert bytes(reply.payload) == b"y" * 1000
        finally:
            bad.close()
            good.close()
            server.close()
    run(main())


def test_a_malformed_frame_ends_that_connection_only() -> None:
    async def handler(frame: Frame, peer: PeerInfo) -> Reply:
        return Frame(FrameType.STATUS, {"ok": True})

    async def main() -> None:
        server, ip, port = await _server(handler)
        try:
            conn = await connect(ip, port, host="beta", uuid=UUID, secret=SECRET,
                                 channel="fetch")
            conn.transport.write(_prefix(2, 0, magic=0xDEADBEEF) + b"{}")
            with pytest.raises(ConnectionClosed):
                await conn.recv()  # the server closed it
            bundle = _bundle(ip, port)
            try:
                reply = await bundle.request(Frame(FrameType.STATUS_REQ, {}))
                assert reply.get("ok") is True
            finally:
                bundle.close()
        finally:
            server.close()
    run(main())


# ------------------------------------------------------------------ the fetch window
class StillLog:
    """A primary's logger that has written ``end`` bytes of one logfile and stops."""

    def __init__(self, end: LogPosition) -> None:
        self.log_end = end

    async def wait_growth(self, timeout: float) -> None:
        await asyncio.sleep(timeout)


class HeldReplies:
    """Wraps a FetchService: every request waits until the test releases it; counts the
    requests waiting at once."""

    def __init__(self, service: FetchService) -> None:
        self.service = service
        self.gates: dict[int, asyncio.Event] = {}  # offset -> its release
        self.again: dict[int, asyncio.Event] = {}  # offset -> release of a repeated request
        self.asked: list[tuple[int, int]] = []  # (offset, max_len) in arrival order
        self.waiting = 0
        self.most = 0
        self.hold = True  # False: answer at once
        self.changed = asyncio.Condition()

    async def handle(self, frame: Frame, peer: PeerInfo) -> Reply:
        offset = int(frame.get("offset"))
        repeated = any(off == offset for off, _ in self.asked)
        gate = (self.again if repeated else self.gates).setdefault(offset, asyncio.Event())
        async with self.changed:
            self.asked.append((offset, int(frame.get("max_len"))))
            self.waiting += 1
            self.most = max(self.most, self.waiting)
            self.changed.notify_all()
        if self.hold:
            await gate.wait()
        async with self.changed:
            self.waiting -= 1
            self.changed.notify_all()
        return await self.service.handle(frame, peer)

    def release(self, offset: int) -> None:
        self.gates.setdefault(offset, asyncio.Event()).set()

    def end(self, task: asyncio.Task[None], bundle: PeerBundle, server: asyncio.Server
            ) -> None:
        """A test's end: every request answered, the fetcher stopped, all closed."""
        for off, _ in self.asked:
            self.release(off)
        task.cancel()
        bundle.close()
        server.close()

    def release_again(self, offset: int) -> None:
        """Answer the request for ``offset`` asked again (not the first)."""
        self.again.setdefault(offset, asyncio.Event()).set()

    async def wait_for(self, cond: Callable[[], bool]) -> None:
        async with self.changed:
            await self.changed.wait_for(cond)


def two_hosts(tmp_path: Path, size: int, seed: int) -> tuple[MarsPaths, MarsPaths, bytes,
                                                            LogPosition]:
    """A primary's state root holding logfile 1 of ``size`` random bytes (complete), and an
    empty secondary's: (primary, secondary, content, the primary's log end)."""
    content = random.Random(seed).randbytes(size)
    primary = MarsPaths(tmp_path / "a", tmp_path / "a-run")
    primary.resource_dir("r0").mkdir(parents=True)
    end = LogPosition(1, size, 99, HOST)
    primary.logfile("r0", 1, HOST).write_bytes(content)
    secondary = MarsPaths(tmp_path / "b", tmp_path / "b-run")
    secondary.resource_dir("r0").mkdir(parents=True)
    return primary, secondary, content, end


def test_fetcher_keeps_its_window_in_flight_and_appends_in_order(tmp_path: Path) -> None:
    size = WINDOW_BYTES + 3 * REQUEST_BYTES + 12345
    primary, secondary, content, end = two_hosts(tmp_path, size, 11)
    per_window = WINDOW_BYTES // REQUEST_BYTES

    async def main() -> None:
        log = StillLog(end)
        held = HeldReplies(FetchService(primary, lambda _: log))
        server, ip, port = await _server(held.handle)
        bundle = _bundle(ip, port)
        # (no hedging for silence here: the test holds replies as long as it likes)
        fetcher = Fetcher("r0", "beta", secondary, bundle, end.logfile, hedge_silence=GUARD)
        task = asyncio.create_task(fetcher.run())
        try:
            # first a long poll from 0: it learns the primary's end
            await held.wait_for(lambda: held.waiting == 1)
            held.release(0)
            # then the window: per_window requests at once, no more
            await held.wait_for(lambda: len(held.asked) == 1 + per_window
                                and held.waiting == per_window)
            firsts = [off for off, _ in held.asked[1:]]
            assert firsts == [REQUEST_BYTES * (i + 1) for i in range(per_window)]
            assert all(n == REQUEST_BYTES for _, n in held.asked[1:])
            # released newest first: nothing can be appended before the oldest is here;
            # with the rest of the window here, its connection is the slow one: the oldest
            # is asked for once more, and that frees no room
            for off in reversed(firsts[1:]):
                held.release(off)
            await held.wait_for(lambda: held.waiting == 2)
            assert held.asked[-1] == (firsts[0], REQUEST_BYTES) and fetcher.hedges == 1
            assert fetcher.received_end == REQUEST_BYTES
            while fetcher.local_end < REQUEST_BYTES:
                await fetcher.progress.wait()
            assert fetcher.local_end == REQUEST_BYTES
            assert len(held.asked) == 2 + per_window  # none of them freed room
            # the second ask is answered first: its reply is taken, the first still waits
            held.release_again(firsts[0])
            while fetcher.local_end < REQUEST_BYTES + per_window * REQUEST_BYTES:
                await fetcher.progress.wait()
            assert held.waiting >= 1 and not held.gates[firsts[0]].is_set()
            # the rest: answered as they come
            held.hold = False
            for off, _ in held.asked:
                held.release(off)
            while fetcher.local_end < size:
                await fetcher.progress.wait()
            assert held.most == per_window
            asked = [off for off, _ in held.asked]
            del asked[len(asked) - 1 - asked[::-1].index(firsts[0])]  # the second ask
            assert asked == sorted(asked) and len(set(asked)) == len(asked)
            assert fetcher.hedges == 1
            assert secondary.logfile("r0", 1, HOST).read_bytes() == content
            assert fetcher.bytes_fetched == size
        finally:
            held.end(task, bundle, server)
    run(main())


def test_the_fetcher_starts_the_writeback_of_what_it_stored_as_it_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fetched bytes are not left dirty in the page cache until the logfile's fsync: the
    writeback of every WRITEOUT_BYTES is started while the fetch goes on."""
    size = 3 * WRITEOUT_BYTES + 5 * REQUEST_BYTES // 2
    primary, secondary, content, end = two_hosts(tmp_path, size, 5)
    started: list[tuple[int, int]] = []
    real = fetch.start_writeback

    def recorded(fd: int, offset: int, length: int) -> None:
        if length:
            started.append((offset, length))
        real(fd, offset, length)  # the kernel call itself must take these arguments

    monkeypatch.setattr(fetch, "start_writeback", recorded)

    async def main() -> None:
        log = StillLog(end)
        server, ip, port = await _server(FetchService(primary, lambda _: log).handle)
        bundle = _bundle(ip, port)
        fetcher = Fetcher("r0", "beta", secondary, bundle, end.logfile)
        task = asyncio.create_task(fetcher.run())
        try:
            while fetcher.local_end < size:
                await fetcher.progress.wait()
        finally:
            task.cancel()
            bundle.close()
            server.close()

    run(main())
    assert secondary.logfile("r0", 1, HOST).read_bytes() == content
    # one range after another from byte 0, each at least WRITEOUT_BYTES, up to less than
    # WRITEOUT_BYTES before the end (the rest goes with the fsync of the finished logfile)
    assert started and started[0][0] == 0, started
    for (o1, n1), (o2, _) in zip(started, started[1:], strict=False):
        assert o1 + n1 == o2, started
    assert all(n >= WRITEOUT_BYTES for _, n in started), started
    covered = started[-1][0] + started[-1][1]
    assert size - WRITEOUT_BYTES < covered <= size, (covered, size)


def test_a_request_whose_connection_stays_silent_is_asked_for_again(
        tmp_path: Path) -> None:
    """One request in flight at a time (nothing can arrive ahead of it): when its
    connection has brought nothing for ``hedge_silence`` although the bytes are known to
    be there, the same bytes are asked for again, and that reply is taken."""
    size = 3 * REQUEST_BYTES
    primary, secondary, content, end = two_hosts(tmp_path, size, 17)

    async def main() -> None:
        log = StillLog(end)
        held = HeldReplies(FetchService(primary, lambda _: log))
        for off in range(0, size + 1, REQUEST_BYTES):
            held.release_again(off)  # a repeated request is answered at once
        server, ip, port = await _server(held.handle)
        bundle = _bundle(ip, port)
        fetcher = Fetcher("r0", "beta", secondary, bundle, end.logfile,
                          window_bytes=REQUEST_BYTES, hedge_silence=0.2)
        task = asyncio.create_task(fetcher.run())
        try:
            await held.wait_for(lambda: held.waiting == 1)
            held.release(0)  # the long poll: the fetcher learns the end
            while fetcher.local_end < size:
                await fetcher.progress.wait()
            assert secondary.logfile("r0", 1, HOST).read_bytes() == content
            # the two requests after the long poll: each asked twice, the first ask of
            # each still held by the server
            assert fetcher.hedges == 2
            firsts = [off for off, _ in held.asked]
            assert firsts[:5] == [0, REQUEST_BYTES, REQUEST_BYTES, 2 * REQUEST_BYTES,
                                  2 * REQUEST_BYTES], firsts
            assert all(off == size for off in firsts[5:]), firsts  # then long polls
            assert held.waiting >= 2
        finally:
            held.end(task, bundle, server)
    run(main())


def test_a_request_given_up_keeps_its_connection_busy_until_its_reply_came() -> None:
    """The peer still sends the reply of a request the caller gave up on (the other reply
    of a hedged fetch came first): new requests go to the other connection meanwhile."""
    gate = asyncio.Event()
    asked: list[int] = []

    async def handler(frame: Frame, peer: PeerInfo) -> Reply:
        asked.append(int(frame.get("n")))
        if frame.get("n") == 1:
            await gate.wait()
        return Frame(FrameType.STATUS, {"n": frame.get("n")})

    async def main() -> None:
        server, ip, port = await _server(handler)
        bundle = _bundle(ip, port, size=2)
        try:
            assert (await bundle.request(Frame(FrameType.STATUS_REQ, {"n": 0}))).get("n") == 0
            slow = asyncio.create_task(bundle.request(Frame(FrameType.STATUS_REQ, {"n": 1})))
            while asked[-1:] != [1]:
                await asyncio.sleep(0.01)
            slow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await slow
            assert bundle.in_flight == 1  # its reply is still to come
            # the others go to the idle connection, not behind the reply still coming
            for n in range(2, 6):
                reply = await bundle.request(Frame(FrameType.STATUS_REQ, {"n": n}), timeout=GUARD)
                assert reply.get("n") == n
            assert bundle.connections == 2
            gate.set()
            while bundle.in_flight:  # the late reply arrives and frees its connection
                await asyncio.sleep(0.01)
        finally:
            bundle.close()
            server.close()
    run(main())


def test_the_reader_says_when_a_payload_is_coming_in() -> None:
    frame = Frame(FrameType.FETCH_DATA, {"rid": 4}, b"z" * 100_000)
    data = encode_frame(frame)
    reader = FrameReader(head_size=256)
    assert not reader.in_frame
    reader.feed(data[:300])
    assert reader.in_frame  # header here, payload not
    got = reader.feed(data[300:])
    assert not reader.in_frame and len(got) == 1
    assert PeerBundle("p", lambda: None, host="beta", uuid=UUID, secret=SECRET,
                      channel="fetch").silence(1, 0.0) is None  # no such request waiting


class HeldStores:
    """Stands in for ``fetch._store``: every write waits until the test opens the gate
    (in the writing thread, as a disk stall would); counts the writes begun."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.begun = threading.Semaphore(0)  # released once per write begun
        self.real = fetch._store

    def __call__(self, fd: int, data: bytes | bytearray | memoryview, offset: int,
                 writeout_from: int) -> None:
        self.begun.release()
        if not self.gate.wait(GUARD):
            raise TimeoutError("the test never opened the gate")
        self.real(fd, data, offset, writeout_from)


def test_a_stalled_disk_holds_up_the_link_only_after_store_ahead_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the writes to the local copy wait for the disk, the fetch goes on receiving
    up to ``store_ahead`` bytes beyond them (plus what is in flight then), no further;
    once the disk goes on, the copy is complete and in order."""
    size = STORE_AHEAD_MAX + WINDOW_BYTES + 4 * REQUEST_BYTES + 777
    primary, secondary, content, end = two_hosts(tmp_path, size, 13)
    stores = HeldStores()
    monkeypatch.setattr(fetch, "_store", stores)

    async def main() -> None:
        log = StillLog(end)
        held = HeldReplies(FetchService(primary, lambda _: log))
        held.hold = False
        server, ip, port = await _server(held.handle)
        bundle = _bundle(ip, port)
        fetcher = Fetcher("r0", "beta", secondary, bundle, end.logfile)
        task = asyncio.create_task(fetcher.run())

        def asked_end() -> int:
            return max((off + n for off, n in held.asked), default=0)

        try:
            # all answered, all received, nothing in flight: the fetch waits for the disk
            # (every reply taken signals progress, the last one among them)
            while not (held.waiting == 0 and asked_end() > STORE_AHEAD_MIN
                       and fetcher.received_end == asked_end()):
                await fetcher.progress.wait()
            assert fetcher.local_end == 0  # not one write ended
            assert stores.begun.acquire(blocking=False)  # the first is stuck in its thread
            assert STORE_AHEAD_MIN < fetcher.received_end \
                <= STORE_AHEAD_MAX + WINDOW_BYTES + REQUEST_BYTES
            assert fetcher.received_end < size  # the room ran out, not the log
            stores.gate.set()
            while fetcher.local_end < size:
                await fetcher.progress.wait()
            assert secondary.logfile("r0", 1, HOST).read_bytes() == content
            assert fetcher.bytes_fetched == size
            # each byte asked for once (two connections: they may arrive out of order)
            ranges = sorted(held.asked)
            assert all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(ranges, ranges[1:],
                                                                  strict=False)), ranges
        finally:
            stores.gate.set()
            task.cancel()
            bundle.close()
            server.close()
    run(main())


def test_the_appender_writes_in_order_and_stops_when_the_copy_is_cut(
        tmp_path: Path) -> None:
    path = tmp_path / "copy"
    pieces = [random.Random(i).randbytes(1000 + i) for i in range(4)]

    async def main() -> None:
        # all of it, in order, each reported once it is written
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        seen: list[tuple[int, int]] = []

        def stored(first: int, n: int) -> bool:
            seen.append((first, n))
            assert path.stat().st_size == first + n  # written before it is reported
            return True

        copy = CopyAppender(fd, 0, stored)
        offset = 0
        for piece in pieces:
            copy.put(offset, piece)
            offset += len(piece)
        with pytest.raises(ValueError):
            copy.put(offset + 1, b"x")  # a gap is refused
        await copy.drain()
        copy.close()
        assert path.read_bytes() == b"".join(pieces)
        assert [f for f, _ in seen] == [0, 1000, 2001, 3003] and copy.waiting == 0
        with pytest.raises(OSError):
            os.fstat(fd)  # closed

        # the copy no longer wants them after the second: the rest is dropped
        path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        calls: list[int] = []

        def cut(first: int, n: int) -> bool:
            calls.append(first)
            return len(calls) < 2

        copy = CopyAppender(fd, 0, cut)
        offset = 0
        for piece in pieces:
            copy.put(offset, piece)
            offset += len(piece)
        await copy.drain()
        assert copy.stopped and copy.waiting == 0 and copy.error is None
        assert calls == [0, 1000]
        copy.close()
        assert path.read_bytes() == pieces[0] + pieces[1]

        # a write that fails: its error is kept, nothing after it is tried
        fd = os.open(path, os.O_RDONLY)
        copy = CopyAppender(fd, 0, stored)
        copy.put(0, pieces[0])
        copy.put(len(pieces[0]), pieces[1])
        await copy.drain()
        assert copy.stopped and isinstance(copy.error, OSError)
        copy.close()
    run(main())


def test_closing_the_appender_during_a_write_closes_the_descriptor_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write cannot be taken back from its thread: the descriptor stays open until it
    ended (never reused under it), and the bytes it wrote are not reported."""
    stores = HeldStores()
    monkeypatch.setattr(fetch, "_store", stores)
    path = tmp_path / "copy"

    async def main() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        reported: list[int] = []
        copy = CopyAppender(fd, 0, lambda first, n: reported.append(first) is None)
        copy.put(0, b"a" * 4096)
        copy.put(4096, b"b" * 4096)
        await asyncio.to_thread(stores.begun.acquire)  # the first write is in its thread
        copy.close()
        os.fstat(fd)  # still open
        running = copy._running
        assert running is not None
        stores.gate.set()
        await running  # its callbacks, the close among them, ran before this resumes
        with pytest.raises(OSError):
            os.fstat(fd)
        assert reported == [] and copy.fd == -1
        assert path.read_bytes() == b"a" * 4096  # written; the second never started
    run(main())


def test_connections_back_off_at_most_a_second_between_retransmissions() -> None:
    probe = socket.socket()
    try:
        probe.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, RTO_MAX_MS)
    except OSError:
        pytest.skip("this kernel has no TCP_RTO_MAX_MS (Linux 6.15 and later)")
    finally:
        probe.close()
    assert _dialled_option(TCP_RTO_MAX_MS) == RTO_MAX_MS


def _dialled_option(option: int, buflen: int = 0) -> Any:
    """TCP option ``option`` of a connection dialled to a server (both ends are a
    FrameProtocol, which tunes its socket when connected)."""
    seen: list[Any] = []

    async def handler(frame: Frame, peer: PeerInfo) -> Reply:
        return Frame(FrameType.PONG, {})

    async def main() -> None:
        server, ip, port = await _server(handler)
        try:
            conn = await connect(ip, port, host="beta", uuid=UUID, secret=SECRET,
                                 channel="fetch")
            try:
                assert conn.protocol.transport is not None
                ours = conn.protocol.transport.get_extra_info("socket")
                seen.append(ours.getsockopt(socket.IPPROTO_TCP, option, buflen) if buflen
                            else ours.getsockopt(socket.IPPROTO_TCP, option))
            finally:
                conn.close()
        finally:
            server.close()

    run(main())
    return seen[0]


def test_connections_use_the_congestion_control_marsd_was_told(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """MARS_TCP_CONGESTION (set by ``marsd --tcp-congestion`` for itself and its workers)
    reaches every connection; a name the kernel does not offer is refused with the ones
    it does."""
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    others = [n for n in available_congestion_controls() if n != default]
    if not others:
        pytest.skip(f"this kernel offers no congestion control but {default}")
    with pytest.raises(MarsError, match="available: .*" + others[0]):
        check_congestion_control("no-such-congestion-control")
    check_congestion_control(others[0])
    monkeypatch.setenv(CONGESTION_ENV, others[0])
    name = _dialled_option(socket.TCP_CONGESTION, 16)
    assert name.rstrip(b"\0").decode() == others[0]


def test_marsd_refuses_a_congestion_control_the_kernel_does_not_offer(
        tmp_path: Path) -> None:
    marsd = Path(sys.executable).parent / "marsd"
    proc = subprocess.run(
        [str(marsd), "--root", str(tmp_path / "mars"), "--run-dir", str(tmp_path / "run"),
         "--host", "alpha", "--metrics", "off", "--tcp-congestion", "no-such-one"],
        capture_output=True, text=True, timeout=GUARD)
    assert proc.returncode == 1
    assert "TCP congestion control 'no-such-one' cannot be used here" in proc.stderr
    assert not (tmp_path / "run" / "marsd.sock").exists()


def test_fetch_service_answers_with_the_file_range(tmp_path: Path) -> None:
    paths = MarsPaths(tmp_path / "a", tmp_path / "a-run")
    paths.resource_dir("r0").mkdir(parents=True)
    content = os.urandom(10000)
    paths.logfile("r0", 1, HOST).write_bytes(content)
    log = StillLog(LogPosition(1, 8000, 5, HOST))
    service = FetchService(paths, lambda _: log)

    async def ask(offset: int, max_len: int) -> Reply:
        return await service.handle(Frame(FrameType.FETCH_REQ, {
            "resource": "r0", "logfile": log.log_end.logfile, "offset": offset,
            "max_len": max_len}), PeerInfo("beta", "0", 1, "fetch", {}))

    reply = asyncio.run(ask(100, 1 << 20))
    assert isinstance(reply, FileReply)
    assert (reply.offset, reply.length) == (100, 7900)  # the logger's end, not the file's
    assert reply.payload == content[100:8000]
    assert json.loads(json.dumps(reply.header))["end"] == 8000
    assert not reply.get("finished")


def test_pace_follows_the_rate_of_a_busy_pipeline() -> None:
    pace = FetchPace()
    assert pace.window == WINDOW_BYTES
    # 125 KB/s (a 1 Mbit/s link): the least
    t = 0.0
    for _ in range(40):
        t += 2.0
        pace.reply(250_000, t, more_in_flight=True)
    assert pace.window == MIN_WINDOW
    assert pace.store_ahead == STORE_AHEAD_MIN
    # idle time (nothing in flight) is not mistaken for a slow link, nor is a long poll
    pace.reply(1000, t + 1, more_in_flight=False)
    rate = pace.rate
    pace.reply(1000, t + 60, more_in_flight=True)
    assert pace.rate == rate
    # the link is back at 1 Gbit/s: the window opens again within a few MiB of replies
    t += 60
    for _ in range(12):
        t += 0.005
        pace.reply(1 << 20, t, more_in_flight=True)
    assert pace.window == WINDOW_BYTES
    assert pace.store_ahead == STORE_AHEAD_MAX
    # 40 MB/s: a quarter of a second of it in flight, half a second may wait for the disk
    for _ in range(40):
        t += 0.025
        pace.reply(1_000_000, t, more_in_flight=True)
    assert 9.5e6 < pace.window < 10.5e6
    assert 19e6 < pace.store_ahead < 21e6


def test_a_silent_primary_is_redialled(tmp_path: Path) -> None:
    """After ``stall_timeout`` without a byte from the primary the fetcher drops its
    connections (the server sees its request cancelled) and asks again on a new one."""
    paths = MarsPaths(tmp_path / "b", tmp_path / "b-run")
    paths.resource_dir("r0").mkdir(parents=True)
    name = LogPosition(1, 0, 0, HOST).logfile

    async def main() -> None:
        dropped = asyncio.Event()
        asked = asyncio.Event()

        async def silent(frame: Frame, peer: PeerInfo) -> Reply:
            asked.set()
            try:
                await asyncio.Event().wait()  # never answers, sends nothing
            except asyncio.CancelledError:
                dropped.set()  # its connection was closed
                raise
            raise AssertionError("unreachable")

        server, ip, port = await _server(silent)
        bundle = _bundle(ip, port)
        fetcher = Fetcher("r0", "beta", paths, bundle, name, stall_timeout=0.5)
        task = asyncio.create_task(fetcher.run())
        try:
            await asyncio.wait_for(asked.wait(), GUARD)
            dialled = bundle.reconnects
            await asyncio.wait_for(dropped.wait(), GUARD)
            asked.clear()
            await asyncio.wait_for(asked.wait(), GUARD)
            assert bundle.reconnects > dialled
        finally:
            task.cancel()
            bundle.close()
            server.close()
    run(main())
