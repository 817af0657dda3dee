"""A user-space WAN emulator for TCP: one-way delay and throughput storms (no netem here).

Runs inside a lab host's network namespace. ``iptables -t nat -A OUTPUT ... -j REDIRECT``
sends the host's outgoing connections to the proxy; it recovers the original destination
with ``SO_ORIGINAL_DST``, connects there with ``SO_MARK`` set (the REDIRECT rule skips
marked packets) and relays both directions. Every chunk waits in a timestamped queue until
its one-way delay has passed, so the delay adds latency without limiting throughput. During
a storm a path is paced to its base rate divided by the storm factor.

The configuration (JSON, re-read on SIGHUP, applied to open connections too)::

    {"paths": {"10.77.0.12": {"delay": 0.025,
                              "storms": [{"factor": 100, "duration": 2, "period": 10,
                                          "base_bps": 100e6, "start": 1700000000.0}]}}}

Run as ``python -m marslib.lab.wanproxy --config FILE --port PORT --mark MARK``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("marslib.lab.wanproxy")

SO_ORIGINAL_DST = 80
CHUNK = 256 << 10
PACED_CHUNK = 16 << 10
QUEUE_LIMIT = 64 << 20


@dataclass(frozen=True)
class Storm:
    """Every ``period`` seconds (from ``start``), ``duration`` seconds at base_bps/factor."""

    factor: float
    duration: float
    period: float
    base_bps: float
    start: float

    def rate_at(self, now: float) -> float | None:
        """The paced rate in bit/s if a burst is on at wall-clock ``now``, else None."""
        if (now - self.start) % self.period < self.duration:
            return self.base_bps / self.factor
        return None


@dataclass(frozen=True)
class PathConfig:
    delay: float = 0.0
    storms: tuple[Storm, ...] = ()
    rate_bps: float | None = None  # the path's bottleneck (tbf), to size the queue

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PathConfig:
        rate = obj.get("rate_bps")
        return cls(float(obj.get("delay", 0.0)), tuple(Storm(**s) for s in obj.get("storms", [])),
                   float(rate) if rate else None)

    @property
    def queue_limit(self) -> int:
        """Bytes held per direction: the bandwidth-delay product plus slack, so that a
        sender feels the path's rate instead of filling a huge buffer in the proxy."""
        if self.rate_bps is None:
            return QUEUE_LIMIT
        return max(1 << 20, min(QUEUE_LIMIT, int(self.rate_bps / 8 * (self.delay + 0.02))))

    def storm_rate(self, now: float) -> float | None:
        rates = [r for s in self.storms if (r := s.rate_at(now)) is not None]
        return min(rates) if rates else None


@dataclass
class Pacer:
    """A shared pace for one path and direction: ``n`` bytes take n*8/rate seconds."""

    next_free: float = 0.0

    async def consume(self, nbytes: int, rate_bps: float) -> None:
        now = time.monotonic()
        start = max(now, self.next_free)
        self.next_free = start + nbytes * 8 / rate_bps
        await asyncio.sleep(self.next_free - now)


@dataclass
class Proxy:
    config_path: Path
    mark: int
    paths: dict[str, PathConfig] = field(default_factory=dict)
    pacers: dict[tuple[str, str], Pacer] = field(default_factory=dict)
    connections: int = 0

    def reload(self) -> None:
        try:
            raw = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as exc:
            log.error("wanproxy: cannot read %s: %s; keeping the old config", self.config_path, exc)
            return
        self.paths = {ip: PathConfig.from_json(p) for ip, p in raw.get("paths", {}).items()}
        log.info("wanproxy: config %s", {ip: (p.delay, len(p.storms)) for ip, p in
                                         self.paths.items()})

    def path(self, ip: str) -> PathConfig:
        return self.paths.get(ip, PathConfig())

    async def handle(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        raw = client.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        ip = socket.inet_ntoa(packed)
        self.connections += 1
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        upstream.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(upstream, (ip, port)), 30)
        except (OSError, TimeoutError) as exc:
            log.info("wanproxy: connect %s:%d failed: %s", ip, port, exc)
            _reset(client)
            upstream.close()
            self.connections -= 1
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps = [asyncio.create_task(self._pump(client, upstream, ip, "out")),
                 asyncio.create_task(self._pump(upstream, client, ip, "in"))]
        try:
            done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)  # before the fds close
            if any(not t.cancelled() and t.exception() is not None for t in done):
                _reset(client)
                _reset(upstream)
        finally:
            for task in pumps:
                task.cancel()
            client.close()
            upstream.close()
            self.connections -= 1

    async def _pump(self, src: socket.socket, dst: socket.socket, ip: str, way: str) -> None:
        """Relay src to dst, each chunk after the path's current one-way delay."""
        loop = asyncio.get_running_loop()
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        queued = 0
        more = asyncio.Event()
        room = asyncio.Event()
        room.set()
        eof = False
        pacer = self.pacers.setdefault((ip, way), Pacer())

        async def reader() -> None:
            nonlocal queued, eof
            try:
                while True:
                    await room.wait()
                    data = await loop.sock_recv(src, CHUNK)
                    if not data:
                        return
                    queue.append((time.monotonic(), data))
                    queued += len(data)
                    if queued >= self.path(ip).queue_limit:
                        room.clear()
                    more.set()
            finally:
                eof = True
                more.set()

        async def writer() -> None:
            nonlocal queued
            while True:
                if not queue:
                    if eof:
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                        return
                    more.clear()
                    await more.wait()
                    continue
                stamp, data = queue.popleft()
                wait = stamp + self.path(ip).delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                for off in range(0, len(data), PACED_CHUNK):
                    rate = self.path(ip).storm_rate(time.time())
                    if rate is None:
                        await loop.sock_sendall(dst, data[off:])
                        break
                    piece = data[off:off + PACED_CHUNK]
                    await pacer.consume(len(piece), rate)
                    await loop.sock_sendall(dst, piece)
                queued -= len(data)
                if queued < self.path(ip).queue_limit:
                    room.set()

        read_task = asyncio.create_task(reader())
        try:
            await writer()
        finally:
            read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await read_task
        if read_task.done() and not read_task.cancelled() and read_task.exception():
            raise read_task.exception()  # type: ignore[misc]


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) so the peer sees a failure, not a clean end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def serve(proxy: Proxy, port: int, ready: Path | None) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    listener.setblocking(False)
    proxy.reload()
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if ready is not None:
        ready.write_text("ready\n")
    log.info("wanproxy: listening on 127.0.0.1:%d", port)
    tasks: set[asyncio.Task[None]] = set()

    async def accept() -> None:
        while True:
            client, _ = await loop.sock_accept(listener)
            client.setblocking(False)
            task = asyncio.create_task(proxy.handle(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.create_task(accept())
    await stop.wait()
    acceptor.cancel()
    for t in list(tasks):
        t.cancel()
    listener.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mark", type=lambda s: int(s, 0), required=True)
    parser.add_argument("--ready", type=Path, help="write this file once listening")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(Proxy(args.config, args.mark), args.port, args.ready))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
