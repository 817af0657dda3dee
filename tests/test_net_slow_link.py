"""A request over a link that has slowed to a crawl: its reply is waited for as long as
bytes keep arriving (a full sync's 16 MiB windows over a few Mbit/s take minutes), and a
peer that sends nothing at all still fails the request after the timeout.

A proxy between client and server forwards the server's bytes in small slices; the
request's timeout is far shorter than the whole reply takes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from marslib.formats.frame import Frame, FrameType
from marslib.net.conn import PeerBundle, PeerInfo, serve

UUID = "00000000-0000-4000-8000-000000000001"
SECRET = b"s" * 32
REPLY_BYTES = 2 << 20


async def answer_big(frame: Frame, peer: PeerInfo) -> Frame:
    return Frame(FrameType.STATUS, {"size": REPLY_BYTES}, b"x" * REPLY_BYTES)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               slice_bytes: int | None, pause: float) -> None:
    """Copy reader to writer; with ``slice_bytes``, at most that many per ``pause``."""
    try:
        while data := await reader.read(slice_bytes or 1 << 20):
            writer.write(data)
            await writer.drain()
            if slice_bytes:
                await asyncio.sleep(pause)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def proxy(upstream: int, down: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                             Awaitable[None]]) -> AsyncIterator[int]:
    """A TCP proxy to ``upstream``: requests pass as they are, the replies through
    ``down``. Yields the proxy's port."""
    async def client(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pump(c_reader, s_writer, None, 0), down(s_reader, c_writer))

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def request_through(down: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                         Awaitable[None]], timeout: float,
                          handler: Callable[[Frame, PeerInfo], Awaitable[Frame]] = answer_big
                          ) -> Frame:
    server = await serve("127.0.0.1", 0, handler, host="alpha", uuid=UUID, secret=SECRET,
                         channel="sync")
    port = server.sockets[0].getsockname()[1]
    try:
        async with proxy(port, down) as via:
            bundle = PeerBundle("alpha", lambda: ("127.0.0.1", via), host="beta", uuid=UUID,
                                secret=SECRET, channel="sync", size=1)
            try:
                return await bundle.request(Frame(FrameType.STATUS_REQ, {}), timeout=timeout)
            finally:
                bundle.close()
    finally:
        server.close()


def test_a_slow_reply_is_waited_for_while_bytes_arrive() -> None:
    # 2 MiB in 32 KiB slices 0.05 s apart: about 3.2 s, against a timeout of 1 s
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pump(reader, writer, 32 << 10, 0.05)

    started = time.monotonic()
    reply = asyncio.run(request_through(slow, timeout=1.0))
    took = time.monotonic() - started
    assert reply.get("size") == REPLY_BYTES and len(reply.payload) == REPLY_BYTES
    assert took > 1.0, "the reply came faster than the timeout: the test proves nothing"


def test_a_silent_peer_still_fails_after_the_timeout() -> None:
    """The peer is connected but never answers: no byte arrives, the request fails."""
    async def never(frame: Frame, peer: PeerInfo) -> Frame:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def as_is(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await pump(reader, writer, None, 0)

    started = time.monotonic()
    with pytest.raises(ConnectionError, match="sync request to alpha"):
        asyncio.run(asyncio.wait_for(request_through(as_is, timeout=0.5, handler=never), 30))
    assert time.monotonic() - started < 25, "the silent peer was waited for far too long"
