"""Resource workers: each resource's data path in a process of its own, supervised by
marsd. The channel format on its own (garbage in, only ProtocolError out), then real
marsd processes: a killed worker takes down its resource only, a killed marsd takes
its workers along, a malformed message drops one channel, and nothing acknowledged is
lost on the way."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    NBD_CLIENT,
    SYSTEM_PYTHON,
    BlockDev,
    MarsHost,
    WriterLines,
    loopback_ips,
    nbd_client,
    needs_libnbd,
    wait_in_sync,
    wait_until,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_crash import SLOT, SLOTS, SlotModel

from marslib import control
from marslib.errors import MarsError
from marslib.meta import LamportClock
from marslib.position import LogPosition
from marslib.worker import messages
from marslib.worker.channel import Channel, ChannelClosed, RemoteFailure
from marslib.worker.messages import (
    Failure,
    Hello,
    ProtocolError,
    Read,
    ReadData,
    Rotated,
    Start,
    State,
    StatePush,
)
from marslib.worker.supervisor import LoggerProxy

SIZE = 64 << 20


# ------------------------------------------------------------------ the format
def frame_of(msg: messages.Message, **env: int) -> tuple[bytes, bytes, bytes]:
    prefix, header, payload = messages.encode(msg, **env)
    return bytes(prefix), bytes(header), bytes(payload)


def roundtrip(msg: messages.Message) -> tuple[messages.Envelope, messages.Message | None]:
    prefix, header, payload = frame_of(msg, id=7, re=0, clock=99)
    hlen, plen = messages.parse_prefix(prefix)
    assert (hlen, plen) == (len(header), len(payload))
    return messages.decode(header, payload)


def test_every_message_survives_its_frame() -> None:
    samples = [
        Hello("1.2.3", 4242),
        Start("primary", "r0", "alpha", "/mars", "/run/mars", {"memory_limit": 4 << 20}),
        StatePush(log_end="log-000000001-alpha,4096,7", emergency=True, size=SIZE),
        ReadData(log_end=None, payload=b"\x00\xff" * 1000),
        Rotated(logfile="log-000000002-alpha"),
        Failure("no such device", "DeviceError"),
    ]
    for msg in samples:
        env, back = roundtrip(msg)
        assert env == messages.Envelope(msg.TYPE, 7, 0, 99)
        assert back == msg


def test_unknown_fields_are_ignored_and_missing_ones_take_defaults() -> None:
    header = (b'{"type":"state","id":1,"clock":5,"body":{"size":65536,'
              b'"from_a_newer_release":{"x":[1,2]}}}')
    env, msg = messages.decode(header)
    assert env.id == 1 and env.re == 0
    assert msg == StatePush(size=65536)
    _, unknown = messages.decode(b'{"type":"a-newer-request","id":3,"body":{}}')
    assert unknown is None  # answered with a Failure by the channel, not dropped


@pytest.mark.parametrize("header,why", [
    (b"[1,2]", "not a JSON object"),
    (b'{"type":"hello","body":{"version":"x"}}', "required field 'pid' missing"),
    (b'{"type":"hello","body":{"version":"x","pid":"12"}}', "wrong type"),
    (b'{"type":"state","body":{"size":true}}', "wrong type"),
    (b'{"type":"state","id":"1","body":{}}', "'id' is not int"),
    (b'{"type":"state","body":[]}', "body is not a JSON object"),
    (b"\xff\xfe", "not JSON"),
])
def test_malformed_headers_raise_protocol_error(header: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        messages.decode(header)


def test_bad_prefixes_raise_protocol_error() -> None:
    prefix, _, _ = frame_of(Hello("x", 1))
    with pytest.raises(ProtocolError, match="magic"):
        messages.parse_prefix(b"GARBAGE!" + prefix[8:])
    with pytest.raises(ProtocolError, match="version"):
        messages.parse_prefix(prefix[:4] + b"\x09\x00" + prefix[6:])
    with pytest.raises(ProtocolError, match="oversized"):
        messages.parse_prefix(messages.PREFIX.pack(messages.MAGIC, messages.VERSION, 0,
                                                   1 << 30, 0))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=messages.PREFIX_LEN, max_size=messages.PREFIX_LEN), st.binary())
def test_garbage_gives_protocol_error_or_a_message_never_a_crash(prefix: bytes,
                                                                 header: bytes) -> None:
    try:
        messages.parse_prefix(prefix)
    except ProtocolError:
        pass
    try:
        messages.decode(header)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["log_end", "emergency", "size", "phase", "error",
                                        "status", "logfile", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(),
                                 st.lists(st.integers()), st.dictionaries(st.text(),
                                                                          st.integers()))),
       st.sampled_from(sorted(messages.MESSAGES)))
def test_any_json_body_gives_protocol_error_or_a_message(body: dict[str, Any],
                                                         name: str) -> None:
    import json
    try:
        messages.decode(json.dumps({"type": name, "body": body}).encode())
    except ProtocolError:
        pass


# ------------------------------------------------------------------ the channel
async def channel_pair(on_request: Any) -> tuple[Channel, Channel, socket.socket]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_unix_connection(sock=a)
    rb, wb = await asyncio.open_unix_connection(sock=b)
    marsd_end = Channel(ra, wa, clock=LamportClock(), on_request=on_request)

    async def no_requests(msg: messages.Message) -> messages.Message:
        raise MarsError("no")

    worker_end = Channel(rb, wb, clock=LamportClock(), on_request=no_requests)
    return marsd_end, worker_end, b


def test_requests_replies_failures_and_clocks() -> None:
    async def scenario() -> None:
        async def answer(msg: messages.Message) -> messages.Message:
            if isinstance(msg, StatePush):
                return messages.Ack()
            raise MarsError(f"cannot {msg.TYPE}")

        marsd_end, worker_end, _ = await channel_pair(answer)
        runs = [asyncio.create_task(c.run()) for c in (marsd_end, worker_end)]
        worker_end.clock.witness(10**20)  # far ahead: marsd's clock must follow
        assert isinstance(await worker_end.request(StatePush(size=1)), messages.Ack)
        assert marsd_end.clock.tick() > 10**20
        with pytest.raises(RemoteFailure, match="cannot read") as err:
            await worker_end.request(Read(0, 1))
        assert err.value.kind == "MarsError"
        marsd_end.close()
        assert await runs[1] == "the other side closed the channel"
        with pytest.raises(ChannelClosed):
            await worker_end.request(StatePush(size=2))
        await runs[0]

    asyncio.run(scenario())


def test_a_malformed_frame_drops_the_channel_with_a_clear_log(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async def never(msg: messages.Message) -> messages.Message:
            await asyncio.sleep(3600)
            raise AssertionError

        marsd_end, worker_end, raw = await channel_pair(never)
        run = asyncio.create_task(marsd_end.run())
        waiting = asyncio.create_task(marsd_end.request(messages.StatusRequest()))
        await asyncio.sleep(0)
        raw.sendall(b"this is no frame of ours")
        reason = await asyncio.wait_for(run, 10)
        assert reason.startswith("malformed message: bad frame magic")
        assert marsd_end.broken
        with pytest.raises(ChannelClosed, match="malformed"):
            await waiting
        worker_end.close()

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert "control channel dropped: malformed message: bad frame magic" in caplog.text


def test_the_logger_proxy_keeps_the_newest_log_end_and_reads_in_pieces() -> None:
    class FakeWorker:
        log = logging.getLogger("test")

        def __init__(self) -> None:
            self.reads: list[tuple[int, int]] = []
            self.proxy: LoggerProxy

        async def request(self, msg: messages.Message) -> messages.Message:
            assert isinstance(msg, Read)
            self.reads.append((msg.offset, msg.length))
            reply = ReadData(log_end=f"log-000000002-alpha,{msg.offset},1",
                             payload=bytes([msg.offset // messages.READ_CHUNK]) * msg.length)
            self.proxy.apply(reply)
            return reply

    async def scenario() -> None:
        worker = FakeWorker()
        proxy = LoggerProxy(worker)  # type: ignore[arg-type]
        worker.proxy = proxy
        proxy.apply(State(log_end="log-000000003-alpha,100,9", size=SIZE))
        proxy.apply(State(log_end="log-000000003-alpha,50,8", size=SIZE))  # crossed
        assert proxy.log_end == LogPosition(3, 100, 9, "alpha")
        growth = asyncio.create_task(proxy.wait_growth(30))
        await asyncio.sleep(0)
        proxy.apply(State(log_end="log-000000003-alpha,200,10", size=SIZE))
        await asyncio.wait_for(growth, 5)  # woken by the growth, not the timeout
        n = messages.READ_CHUNK
        data = await proxy.read(0, 2 * n + 5)
        assert worker.reads == [(0, n), (n, n), (2 * n, 5)]
        assert data == bytes(n) + b"\x01" * n + b"\x02" * 5
        assert proxy.log_end == LogPosition(3, 200, 10, "alpha")  # older ends ignored

    asyncio.run(scenario())


# ------------------------------------------------------------- real processes
def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie does not: it holds no files or sockets)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def holders(path: Path) -> list[int]:
    """Live processes with ``path`` open: a file, or a unix socket bound to it."""
    targets = {str(path)}
    try:
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == str(path):
                targets.add(f"socket:[{parts[6]}]")
    except OSError:
        pass
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not pid_alive(int(entry)):
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in targets:
                    found.append(int(entry))
                    break
            except OSError:
                pass
    return found


def worker_pid(host: MarsHost, resource: str = "r0") -> int | None:
    pid = host.status(resource).get("worker_pid")
    return int(pid) if pid else None


def start_writer(host: MarsHost, resource: str, seed: int) -> WriterLines:
    writer = subprocess.Popen(
        [SYSTEM_PYTHON, str(NBD_CLIENT), host.nbd_uri(resource), "writer", str(seed), "4",
         str(SLOTS), str(SLOT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return WriterLines(writer)


def check_acknowledged(host: MarsHost, resource: str, output: str, image: Path) -> int:
    """Every write the writer saw acknowledged is what NBD reads back now."""
    image.unlink(missing_ok=True)
    subprocess.run(["nbdcopy", host.nbd_uri(resource), str(image)], check=True, timeout=60)
    data = image.read_bytes()
    acked, _ = SlotModel().check_cycle(output, lambda s: data[s * SLOT : (s + 1) * SLOT])
    return acked


def member_error(host: MarsHost, resource: str = "r0") -> str:
    view = host.marsadm("view", resource)
    return str(view["resources"][resource]["members"][host.name].get("error") or "")


@pytest.fixture
def two(tmp_path: Path) -> Any:
    host = MarsHost(tmp_path, ip=loopback_ips(1)[0])
    devs = [BlockDev(tmp_path / f"r{i}.img", SIZE) for i in range(2)]
    host.marsadm("create-cluster", "--ip", host.ip)
    for i, dev in enumerate(devs):
        host.marsadm("create-resource", f"r{i}", dev.path)
    host.start()
    for i in range(2):
        host.marsadm("up", f"r{i}")
    yield host, devs
    host.stop()
    for dev in devs:
        dev.close()


@needs_libnbd
def test_a_killed_worker_restarts_its_resource_alone(two: Any, tmp_path: Path) -> None:
    host, _ = two
    assert host.proc is not None
    p0, p1 = worker_pid(host, "r0"), worker_pid(host, "r1")
    assert p0 and p1 and len({p0, p1, host.proc.pid}) == 3, "two resources, two workers"
    for pid in (p0, p1):
        assert "marslib.worker" in cmdline(pid) and pid_alive(pid)
    # status is asked of the worker when it is asked: a write shows at once
    before = host.status("r1")["writes"]
    nbd_client(host.nbd_uri("r1"), "pwrite", "4096", "ab" * 512)
    assert host.status("r1")["writes"] == before + 1

    writer = start_writer(host, "r0", seed=3)
    writer.wait_acks(100, "the writer of r0")
    os.kill(p0, signal.SIGKILL)
    out, _ = writer.finish(timeout=60)
    # the control socket and the other resource go on as if nothing happened
    assert control.request(host.run_dir / "marsd.sock", "ping")["pid"] == host.proc.pid
    nbd_client(host.nbd_uri("r1"), "pwrite", "8192", "cd" * 512, "fua")
    assert nbd_client(host.nbd_uri("r1"), "pread", "8192", "512").stdout.strip() == "cd" * 512
    assert worker_pid(host, "r1") == p1
    # the crash is on record, and after the usual retry delay the resource runs again
    wait_until(lambda: f"worker (pid {p0}) was killed by SIGKILL" in member_error(host),
               "the crash recorded in actual-HOST/error")
    new = wait_until(lambda: worker_pid(host, "r0") not in (None, p0) and worker_pid(host, "r0"),
                     "r0 restarted in a new worker", timeout=90)
    assert not pid_alive(p0) and pid_alive(int(new))
    wait_until(lambda: not member_error(host), "the error cleared by the new start")
    acked = check_acknowledged(host, "r0", out, tmp_path / "r0.img")
    assert acked >= 100
    assert worker_pid(host, "r1") == p1


@needs_libnbd
def test_kill9_of_marsd_takes_its_workers_along(host: MarsHost, blockdev: BlockDev,
                                                tmp_path: Path) -> None:
    host.serve(blockdev.path)
    pid = worker_pid(host)
    assert pid is not None and host.proc is not None
    writer = start_writer(host, "r0", seed=5)
    writer.wait_acks(100, "the writer")
    os.kill(host.proc.pid, signal.SIGKILL)  # marsd alone, not its process group
    host.proc.wait()
    host.proc = None
    out, _ = writer.finish(timeout=60)
    wait_until(lambda: not pid_alive(pid), "the worker to die with marsd", timeout=30)
    socket_path = host.run_dir / "r0.nbd"
    logfiles = sorted((host.root / "resource-r0").glob("log-*"))
    assert logfiles
    assert not holders(socket_path), "a process still holds the NBD socket"
    for path in logfiles:
        assert not holders(path), f"a process still holds {path.name}"
    host.start()
    host.marsadm("up", "r0")
    assert worker_pid(host) not in (None, pid)
    assert check_acknowledged(host, "r0", out, tmp_path / "read.img") >= 100


def pidfd_getfd(pid: int, fd: int) -> int:
    """A copy of descriptor ``fd`` of process ``pid`` (Linux 5.6+, ptrace rights)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        new = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(new)
    finally:
        os.close(pidfd)


@needs_libnbd
def test_a_malformed_message_drops_that_channel_and_marsd_goes_on(two: Any) -> None:
    host, _ = two
    assert host.proc is not None
    p0, p1 = worker_pid(host, "r0"), worker_pid(host, "r1")
    assert p0 and p1
    args = cmdline(p0)
    channel_fd = int(args[args.index("--fd") + 1])
    try:
        fd = pidfd_getfd(p0, channel_fd)
    except OSError as exc:
        pytest.skip(f"pidfd_getfd: {exc}")
    try:
        # what the worker of r0 "sends" to marsd: a frame that is none
        os.write(fd, b"\x00garbage, not a frame of the control channel\n")
    finally:
        os.close(fd)
    wait_until(lambda: "control channel dropped: malformed message: bad frame magic"
               in host.log_path.read_text(), "marsd to log the malformed message")
    wait_until(lambda: not pid_alive(p0), "marsd to kill the worker that sent it")
    assert control.request(host.run_dir / "marsd.sock", "ping")["pid"] == host.proc.pid
    assert worker_pid(host, "r1") == p1
    wait_until(lambda: "malformed message" in member_error(host), "the error on record")
    host.marsadm("up", "r0")  # an operator's up retries at once
    assert worker_pid(host, "r0") not in (None, p0)
    nbd_client(host.nbd_uri("r0"), "pwrite", "0", "ef" * 512, "fua")
    assert nbd_client(host.nbd_uri("r0"), "pread", "0", "512").stdout.strip() == "ef" * 512


@needs_libnbd
def test_workers_off_runs_the_resource_in_marsd(host: MarsHost, blockdev: BlockDev) -> None:
    host.marsadm("create-cluster", "--ip", host.ip)
    host.marsadm("create-resource", "r0", blockdev.path)
    host.start("--workers", "off")
    host.marsadm("up", "r0")
    assert host.proc is not None
    st = control.request(host.run_dir / "marsd.sock", "status")
    assert st["workers"] is False and st["resources"]["r0"].get("worker_pid") is None
    assert holders(host.run_dir / "r0.nbd") == [host.proc.pid]
    nbd_client(host.nbd_uri("r0"), "pwrite", "4096", "12" * 512, "fua")
    assert nbd_client(host.nbd_uri("r0"), "pread", "4096", "512").stdout.strip() == "12" * 512
    assert host.status()["writes"] == 1


@needs_libnbd
def test_a_killed_secondary_worker_restarts_and_catches_up(tmp_path: Path) -> None:
    ip_a, ip_b = loopback_ips(2)
    a, b = MarsHost(tmp_path / "a", "alpha", ip_a), MarsHost(tmp_path / "b", "beta", ip_b)
    dev_a, dev_b = BlockDev(tmp_path / "a.img", SIZE), BlockDev(tmp_path / "b.img", SIZE)
    try:
        a.serve(dev_a.path)
        b.join(a, dev_b.path)
        writer = subprocess.Popen([SYSTEM_PYTHON, str(NBD_CLIENT), a.nbd_uri("r0"), "writer",
                                   "9", "4", "256", "65536"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        lines = WriterLines(writer)
        lines.wait_acks(100, "the writer")
        pid = wait_until(lambda: worker_pid(b), "beta's worker")
        assert b.status()["role"] == "secondary"
        os.kill(pid, signal.SIGKILL)
        lines.wait_acks(lines.acks + 100, "the writer after the kill")  # alpha goes on
        writer.send_signal(signal.SIGINT)
        try:
            lines.finish(timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nalpha:\n{a.logtail(60)}\nbeta:\n{b.logtail(60)}") \
                from None
        wait_until(lambda: f"worker (pid {pid}) was killed by SIGKILL" in member_error(b),
                   "the crash of beta's worker on record")
        wait_until(lambda: worker_pid(b) not in (None, pid), "beta's resource restarted",
                   timeout=90)
        wait_in_sync(a, b, timeout=120)
        a.marsadm("down", "r0")
        b.marsadm("down", "r0")
        assert dev_a.read() == dev_b.read()
    finally:
        for h in (a, b):
            h.stop()
        dev_a.close()
        dev_b.close()


def test_marsd_help_names_the_workers_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from marslib.daemon import main
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--workers {on,off}" in capsys.readouterr().out


def test_a_worker_whose_marsd_is_gone_does_not_start() -> None:
    a, b = socket.socketpair()
    with a, b:
        proc = subprocess.run(
            [sys.executable, "-m", "marslib.worker", "--fd", str(b.fileno()), "--parent", "1",
             "--resource", "r0", "--host", "alpha"],
            pass_fds=(b.fileno(),), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "marsd (pid 1) is gone" in proc.stderr


def test_the_docs_name_every_message_and_the_flag() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs"
    arch = (docs / "architecture.md").read_text()
    table = arch[arch.index("| Request (marsd → worker)"):]
    table = table[: table.index("\n\n")]
    named = {name for part in table.split("`")[1::2] for name in part.split(", ")}
    pushes = {"hello", "state", "ack", "failure"}  # described in the text around it
    assert set(messages.MESSAGES) - pushes <= named, set(messages.MESSAGES) - pushes - named
    assert "`--workers`" in (docs / "cli.md").read_text()
