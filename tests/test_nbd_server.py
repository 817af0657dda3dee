"""The asyncio NBD server against real clients: nbdsh, nbdinfo, nbdcopy, qemu-img, qemu-io, fio.

The server runs in this process on an event loop in a background thread; the clients run as
subprocesses, and a raw-socket client checks what the real ones never send.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from marslib.errors import Refused
from marslib.nbd import NbdServer, start_nbd_server
from marslib.nbd import protocol as p

EXPORT = "res1"
SIZE = 16 << 20
T = TypeVar("T")
log = logging.getLogger(__name__)

# nbdsh is a python3 script that imports Debian's python3-libnbd: run the system python.
TOOL_ENV = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))


class MemoryBackend:
    """An export held in a bytearray, with counters and optional gates to hold requests."""

    def __init__(self, size: int = SIZE, read_only: bool = False) -> None:
        self.data = bytearray(size)
        self.read_only = read_only
        self.flushes = 0
        self.fua_writes = 0
        self.trims: list[tuple[int, int]] = []
        self.active = 0
        self.max_active = 0
        self.write_gate: asyncio.Event | None = None
        self.read_delays: dict[int, asyncio.Event] = {}  # offset -> event to wait for
        self.fail_write: BaseException | None = None

    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        gate = self.read_delays.get(offset)
        if gate is not None:
            await gate.wait()
        return bytes(memoryview(self.data)[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.write_gate is not None:
                await self.write_gate.wait()
            if self.fail_write is not None:
                raise self.fail_write
            self.data[offset : offset + len(data)] = data
            self.fua_writes += fua
        finally:
            self.active -= 1

    async def flush(self) -> None:
        self.flushes += 1

    async def trim(self, offset: int, length: int) -> None:
        self.trims.append((offset, length))


class LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Served:
    """A running server with its backend."""

    lt: LoopThread
    server: NbdServer
    backend: MemoryBackend
    path: str
    counts: list[int]

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{EXPORT}?socket={self.path}"

    def open_count(self) -> int:
        return self.lt.call(lambda: self.server.open_count)

    def wait_closed(self, timeout: float = 5) -> None:
        """Wait until every client is gone (disconnects finish asynchronously)."""
        deadline = time.monotonic() + timeout
        while self.lt.call(lambda: self.server.client_count or self.server.open_count):
            assert time.monotonic() < deadline, "clients did not go away"
            time.sleep(0.01)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # tmp_path can exceed the 107 bytes a unix socket path may have
    path = tempfile.mkdtemp(prefix="nbdt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve(sock_dir: str, backend: MemoryBackend, name: str = "nbd.sock") -> Iterator[Served]:
    lt = LoopThread()
    path = os.path.join(sock_dir, name)
    server = lt.run(start_nbd_server(path, EXPORT, backend))
    counts: list[int] = []
    server.on_open_count_change = counts.append
    try:
        yield Served(lt, server, backend, path, counts)
    finally:
        lt.run(server.close())
        lt.stop()


@pytest.fixture
def srv(sock_dir: str) -> Iterator[Served]:
    yield from serve(sock_dir, MemoryBackend())


@pytest.fixture
def ro_srv(sock_dir: str) -> Iterator[Served]:
    backend = MemoryBackend(read_only=True)
    backend.data[:5] = b"magic"
    yield from serve(sock_dir, backend, "ro.sock")


def need(tool: str) -> str:
    path = shutil.which(tool, path=TOOL_ENV["PATH"])
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def need_nbdsh() -> str:
    path = need("nbdsh")
    probe = subprocess.run(
        ["python3", "-c", "import nbd"], env=TOOL_ENV, capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip("nbdsh needs the python3 nbd module (Debian python3-libnbd)")
    return path


def run(*argv: str, check: bool = True, env: dict[str, str] | None = None) -> Any:
    result = subprocess.run(argv, env=env or TOOL_ENV, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{argv} failed with {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def nbdsh(uri: str, code: str, check: bool = True) -> Any:
    return run(need_nbdsh(), "-u", uri, "-c", code, check=check)


# --- a raw client for what real clients never send --------------------------------------------
class RawClient:
    """A blocking NBD client speaking raw bytes."""

    def __init__(self, path: str, export: str = EXPORT, go: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        greeting = self.recv_exact(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        self.size = 0
        if go:
            name = export.encode()
            data = struct.pack(">I", len(name)) + name + b"\0\0"
            self.sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, len(data)) + data)
            while True:
                _, _, rep, length = struct.unpack(">QIII", self.recv_exact(20))
                payload = self.recv_exact(length)
                if rep == p.REP_INFO and payload[:2] == b"\0\0":
                    self.size = struct.unpack(">Q", payload[2:10])[0]
                if rep == p.REP_ACK:
                    break
                assert rep == p.REP_INFO, payload

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def send(self, command: int, handle: int, offset: int, length: int, data: bytes = b"") -> None:
        hdr = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, command, handle, offset, length)
        self.sock.sendall(hdr + data)

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return error, handle, data

    def write(self, handle: int, offset: int, data: bytes) -> int:
        self.send(p.CMD_WRITE, handle, offset, len(data), data)
        error, got, _ = self.reply()
        assert got == handle
        return error

    def read(self, handle: int, offset: int, length: int) -> tuple[int, bytes]:
        self.send(p.CMD_READ, handle, offset, length)
        error, got, data = self.reply(length)
        assert got == handle
        return error, data

    def is_closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


# --- real clients ---------------------------------------------------------------------------
def test_nbdsh_write_read_flush_trim_size(srv: Served) -> None:
    pattern = bytes(range(256)) * 64
    out = nbdsh(
        srv.uri,
        f"h.pwrite({pattern!r}, 8192)\n"
        "h.pwrite(b'fua!', 100, nbd.CMD_FLAG_FUA)\n"
        "h.flush()\n"
        "h.trim(4096, 1 << 20)\n"
        "print(h.get_size())\n"
        "print(h.pread(16384, 8192).hex())\n"
        "print(h.can_flush(), h.can_fua(), h.can_trim(), h.can_multi_conn(), h.is_read_only())\n",
    ).stdout.split()
    assert out[0] == str(SIZE)
    assert bytes.fromhex(out[1]) == pattern
    assert out[2:] == ["True"] * 4 + ["False"]
    srv.wait_closed()
    assert srv.backend.data[8192 : 8192 + len(pattern)] == pattern
    assert srv.backend.data[100:104] == b"fua!"
    assert srv.backend.fua_writes == 1
    assert srv.backend.flushes >= 1
    assert srv.backend.trims == [(1 << 20, 4096)]  # nbdsh's trim takes (count, offset)


def test_nbdsh_sees_an_error_for_past_end_and_read_only(srv: Served, ro_srv: Served) -> None:
    # strict mode off: libnbd sends what it would refuse itself, so the server answers
    out = nbdsh(
        srv.uri,
        "h.set_strict_mode(0)\n"
        "try:\n"
        f"    h.pread(2, {SIZE - 1})\n"
        "except nbd.Error as e:\n"
        "    print('read', e.errno)\n"
        "print('after', bytes(h.pread(2, 0)))\n",
    ).stdout
    assert "read EINVAL" in out  # libnbd names the errno
    assert "after b'\\x00\\x00'" in out
    out = nbdsh(
        ro_srv.uri,
        "h.set_strict_mode(0)\n"
        "print(h.is_read_only(), bytes(h.pread(5, 0)))\n"
        "try:\n"
        "    h.pwrite(b'x', 0)\n"
        "except nbd.Error as e:\n"
        "    print('write', e.errno)\n",
    ).stdout
    assert "True b'magic'" in out
    assert "write EPERM" in out
    assert ro_srv.backend.data[:5] == b"magic"


def test_nbdinfo_reports_size_and_flags(srv: Served) -> None:
    need("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", srv.uri).stdout)
    [export] = info["exports"]
    assert export["export-name"] == EXPORT
    assert export["export-size"] == SIZE
    assert export["can_flush"] and export["can_fua"] and export["can_trim"]
    assert export["can_multi_conn"] and not export["is_read_only"]
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 << 20
    listing = run("nbdinfo", "--list", f"nbd+unix://?socket={srv.path}").stdout
    assert f'export="{EXPORT}"' in listing


def test_wrong_export_name_is_a_clear_client_error(srv: Served) -> None:
    need("nbdinfo")
    uri = f"nbd+unix:///wrong-resource?socket={srv.path}"
    result = run("nbdinfo", uri, check=False)
    assert result.returncode != 0
    assert "wrong-resource" in result.stderr
    assert "No such file" in result.stderr  # libnbd's rendering of NBD_REP_ERR_UNKNOWN
    debug = run("nbdinfo", uri, check=False, env=dict(TOOL_ENV, LIBNBD_DEBUG="1"))
    assert "exports only 'res1'" in debug.stderr  # our message reaches the client
    assert srv.open_count() == 0


def test_nbdcopy_in_and_out(srv: Served, sock_dir: str) -> None:
    need("nbdcopy")
    src = Path(sock_dir, "src.img")
    content = os.urandom(SIZE)
    src.write_bytes(content)
    run("nbdcopy", str(src), srv.uri)
    srv.wait_closed()
    assert bytes(srv.backend.data) == content
    dst = Path(sock_dir, "dst.img")
    run("nbdcopy", srv.uri, str(dst))
    assert dst.read_bytes() == content
    srv.wait_closed()
    assert srv.counts and srv.counts[-1] == 0


def test_qemu_img_info_and_convert(srv: Served, sock_dir: str) -> None:
    need("qemu-img")
    info = json.loads(run("qemu-img", "info", "--output=json", srv.uri).stdout)
    assert info["virtual-size"] == SIZE
    src = Path(sock_dir, "src.img")
    content = os.urandom(1 << 20) + bytes(2 << 20) + os.urandom(1 << 20)
    src.write_bytes(content + bytes(SIZE - len(content)))
    srv.backend.data[(2 << 20) : (3 << 20)] = b"\xff" * (1 << 20)  # must be zeroed
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri)
    srv.wait_closed()
    assert bytes(srv.backend.data[: len(content)]) == content


def test_qemu_io_pattern_write_and_verify(srv: Served) -> None:
    need("qemu-io")
    out = run(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0xab 65536 131072",
        "-c",
        "write -P 0xcd -f 196608 4096",  # -f: FUA
        "-c",
        "read -P 0xab 65536 131072",
        "-c",
        "flush",
        srv.uri,
    ).stdout
    assert "Pattern verification failed" not in out
    srv.wait_closed()
    assert srv.backend.data[65536:196608] == b"\xab" * 131072
    assert srv.backend.data[196608:200704] == b"\xcd" * 4096


def test_fio_random_writes_at_queue_depth_32_verify(srv: Served) -> None:
    need("fio")
    result = run(
        "fio",
        "--name=nbd-randwrite",
        "--ioengine=nbd",
        f"--uri={srv.uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=8m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    )
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 << 20
    assert job["read"]["io_bytes"] == 8 << 20  # the verify pass read everything back
    log.info("fio randwrite 4k iodepth 32: %.0f IOPS", job["write"]["iops"])
    srv.wait_closed()
    assert srv.backend.data[: 8 << 20].count(0) < (8 << 20) // 2


# --- raw clients ---------------------------------------------------------------------------
def test_malformed_requests_close_only_their_connection(srv: Served) -> None:
    good = RawClient(srv.path)
    assert good.write(1, 0, b"survivor") == 0
    bad_magic = RawClient(srv.path)
    bad_magic.sock.sendall(b"\x11\x22\x33\x44" + bytes(24))
    assert bad_magic.is_closed_by_server()
    oversized = RawClient(srv.path)
    oversized.send(p.CMD_WRITE, 2, 0, (32 << 20) + 1)
    assert oversized.is_closed_by_server()
    assert good.read(3, 0, 8) == (0, b"survivor")
    assert good.write(4, 8, b"!") == 0
    # past-end and oversized reads are error replies, not disconnects
    assert good.read(5, SIZE - 1, 2) == (p.EINVAL, b"")
    assert good.read(6, 0, (32 << 20) + 1) == (p.EINVAL, b"")
    assert good.write(7, SIZE, b"x") == p.ENOSPC
    assert good.read(8, 0, 9) == (0, b"survivor!")
    good.send(p.CMD_DISC, 9, 0, 0)
    assert good.is_closed_by_server()
    for c in (good, bad_magic, oversized):
        c.close()
    srv.wait_closed()
    assert srv.counts == [1, 2, 1, 2, 1, 0]


def test_open_count_follows_a_client(srv: Served) -> None:
    assert srv.open_count() == 0
    negotiating = RawClient(srv.path, go=False)  # in option haggling: not open
    client = RawClient(srv.path)
    assert srv.open_count() == 1
    assert srv.counts == [1]
    client.close()
    negotiating.close()
    srv.wait_closed()
    assert srv.open_count() == 0
    assert srv.counts == [1, 0]


def test_replies_come_out_of_order(srv: Served) -> None:
    gate = srv.lt.call(asyncio.Event)
    srv.backend.read_delays[4096] = gate
    client = RawClient(srv.path)
    client.send(p.CMD_READ, 1, 4096, 16)  # held by the backend
    client.send(p.CMD_READ, 2, 0, 16)
    client.send(p.CMD_FLUSH, 3, 0, 0)
    assert client.reply(16)[1] == 2
    assert client.reply()[1] == 3
    srv.lt.loop.call_soon_threadsafe(gate.set)
    assert client.reply(16)[:2] == (0, 1)
    client.close()


def test_backend_errors_map_to_nbd_errors(srv: Served) -> None:
    client = RawClient(srv.path)
    srv.backend.fail_write = OSError(errno.ENOSPC, "full")
    assert client.write(1, 0, b"x") == p.ENOSPC
    srv.backend.fail_write = OSError(errno.EROFS, "read-only fs")
    assert client.write(2, 0, b"x") == p.EPERM
    srv.backend.fail_write = RuntimeError("bug in the backend")
    assert client.write(3, 0, b"x") == p.EIO
    srv.backend.fail_write = None
    assert client.write(4, 0, b"y") == 0  # the connection stayed
    assert client.read(5, 0, 1) == (0, b"y")
    client.close()


def test_disconnect_waits_for_requests_in_flight(srv: Served) -> None:
    gate = srv.lt.call(asyncio.Event)
    srv.backend.write_gate = gate
    client = RawClient(srv.path)
    client.send(p.CMD_WRITE, 1, 0, 4, b"last")
    client.send(p.CMD_DISC, 2, 0, 0)
    time.sleep(0.1)
    assert srv.open_count() == 1
    srv.lt.loop.call_soon_threadsafe(gate.set)
    assert client.reply() == (0, 1, b"")
    assert client.is_closed_by_server()
    srv.wait_closed()
    assert srv.backend.data[:4] == b"last"
    client.close()


def test_backpressure_bounds_requests_in_flight(srv: Served) -> None:
    gate = srv.lt.call(asyncio.Event)
    srv.backend.write_gate = gate
    client = RawClient(srv.path)
    n = 200
    payload = b"\x5a" * 512

    def send_all() -> None:
        for h in range(n):
            client.send(p.CMD_WRITE, h, h * 512, 512, payload)

    sender = threading.Thread(target=send_all)
    sender.start()
    deadline = time.monotonic() + 5
    while srv.backend.active < 64:
        assert time.monotonic() < deadline, f"only {srv.backend.active} writes arrived"
        time.sleep(0.01)
    time.sleep(0.2)
    assert srv.backend.active == 64  # the rest waits in the socket and the parser
    srv.lt.loop.call_soon_threadsafe(gate.set)
    sender.join(10)
    handles = sorted(client.reply()[1] for _ in range(n))
    assert handles == list(range(n))
    assert srv.backend.max_active == 64
    assert srv.backend.data[: n * 512] == payload * n
    client.close()


@pytest.fixture
def big_srv(sock_dir: str) -> Iterator[Served]:
    yield from serve(sock_dir, MemoryBackend(96 << 20), "big.sock")


def test_large_requests_and_the_byte_limit(big_srv: Served) -> None:
    gate = big_srv.lt.call(asyncio.Event)
    big_srv.backend.write_gate = gate
    client = RawClient(big_srv.path)
    chunks = [bytes([i + 1]) * (16 << 20) for i in range(6)]

    def send_all() -> None:
        for i, chunk in enumerate(chunks):
            client.send(p.CMD_WRITE, i, i * len(chunk), len(chunk), chunk)

    sender = threading.Thread(target=send_all)
    sender.start()
    deadline = time.monotonic() + 10
    while big_srv.backend.active < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    assert big_srv.backend.active == 4  # 64 MiB of payload in flight: reading stopped
    big_srv.lt.loop.call_soon_threadsafe(gate.set)
    sender.join(20)
    assert sorted(client.reply()[1] for _ in chunks) == list(range(6))
    assert big_srv.backend.max_active == 4
    assert big_srv.backend.data == b"".join(chunks)
    error, data = client.read(9, (16 << 20) - 5, 1 << 20)  # a reply sent in two writes
    assert error == 0 and data == b"\1" * 5 + b"\2" * ((1 << 20) - 5)
    client.close()


def test_export_can_grow_while_connected(srv: Served) -> None:
    client = RawClient(srv.path)
    assert client.size == SIZE
    assert client.write(1, SIZE, b"more") == p.ENOSPC
    srv.lt.call(lambda: srv.backend.data.extend(bytes(1 << 20)))
    assert client.write(2, SIZE, b"more") == 0
    newcomer = RawClient(srv.path)
    assert newcomer.size == SIZE + (1 << 20)
    newcomer.close()
    client.close()


def test_socket_mode_stale_socket_and_close(sock_dir: str) -> None:
    lt = LoopThread()
    try:
        path = os.path.join(sock_dir, "x.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # a socket file nobody listens on
        server = lt.run(start_nbd_server(path, EXPORT, MemoryBackend()))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with pytest.raises(Refused, match="another server"):
            lt.run(start_nbd_server(path, EXPORT, MemoryBackend()))
        client = RawClient(path)
        assert client.write(1, 0, b"x") == 0
        lt.run(server.close())
        assert not os.path.exists(path)
        assert client.is_closed_by_server()
        assert server.open_count == 0
        client.close()
        Path(path).write_text("not a socket")
        with pytest.raises(Refused, match="not a socket"):
            lt.run(start_nbd_server(path, EXPORT, MemoryBackend()))
    finally:
        lt.stop()


def test_many_concurrent_clients(srv: Served) -> None:
    clients = [RawClient(srv.path) for _ in range(8)]
    assert srv.open_count() == 8
    for i, c in enumerate(clients):
        c.send(p.CMD_WRITE, i, i * 4096, 4096, bytes([i]) * 4096)
    for i, c in enumerate(clients):
        assert c.reply() == (0, i, b"")
        assert c.read(100 + i, ((i + 1) % 8) * 4096, 1) == (0, bytes([(i + 1) % 8]))
        c.close()
    srv.wait_closed()
    assert srv.counts[-1] == 0
