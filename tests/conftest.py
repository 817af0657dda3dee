"""Fixtures that bring up real things: loop devices, marsd processes, NBD clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from marslib.logfile import LogScanner
from marslib.position import LogPosition

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3 carries libnbd's binding
NBD_CLIENT = REPO / "tests" / "tools" / "nbd_client.py"
T = TypeVar("T")


def have_libnbd() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    return subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode == 0


needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (loop devices, mounts)")
needs_libnbd = pytest.mark.skipif(not have_libnbd(), reason="libnbd python binding missing "
                                  "(apt-get install python3-libnbd libnbd-bin)")


class BlockDev:
    """A loop device with direct I/O over a file on a real filesystem (root), else the file."""

    def __init__(self, image: Path, size: int) -> None:
        self.image = image
        with open(image, "wb") as f:
            f.truncate(size)
        self.loop: str | None = None
        if IS_ROOT and shutil.which("losetup"):
            out = subprocess.run(["losetup", "--direct-io=on", "-f", "--show", str(image)],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                self.loop = out.stdout.strip()
        self.path = self.loop or str(image)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Read what is on the device itself (bypassing marsd)."""
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(length) if length is not None else f.read()

    def close(self) -> None:
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None


@pytest.fixture
def blockdev(tmp_path: Path) -> Iterator[BlockDev]:
    dev = BlockDev(tmp_path / "data.img", 64 << 20)
    yield dev
    dev.close()


class MarsHost:
    """One host's state root, run dir and marsd process, driven like an operator would."""

    def __init__(self, base: Path, name: str = "alpha", ip: str = "127.0.0.1",
                 code: Path | None = None) -> None:
        self.name = name
        self.ip = ip
        self.code = code  # run marsd from this copy of the package (a test double)
        self.root = base / "mars"
        self.run_dir = base / "run"
        self.log_path = base / f"marsd-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "MARS_ROOT": str(self.root), "MARS_RUN_DIR": str(self.run_dir),
                    "MARS_HOST": name, "PYTHONPATH": str(REPO)}

    def marsadm(self, *args: str, check: bool = True, timeout: float = 120) -> dict[str, Any]:
        """``marsadm ARGS --json``: the reply with ``rc`` added. ``timeout`` is past
        marsadm's own default --timeout (60 s), so that a command that waits too long
        ends by itself, cleans up and says what it waited for."""
        cmd = [str(BIN / "marsadm"), *args, "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        try:
            reply: dict[str, Any] = json.loads(out.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"marsadm {args}: no JSON: {out.stdout!r} {out.stderr!r}") from None
        reply["rc"] = out.returncode
        if check and out.returncode != 0:
            raise AssertionError(f"marsadm {' '.join(args)} failed: {reply}\n{self.logtail()}")
        return reply

    def start(self, *extra: str) -> None:
        logf = open(self.log_path, "ab")
        marsd = [str(BIN / "marsd")]
        if self.code is not None:
            marsd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(self.code)!r}); "
                     "from marslib.daemon import main; raise SystemExit(main())"]
        self.proc = subprocess.Popen(
            [*marsd, "--listen", self.ip, "--metrics", f"{self.ip}:9577", *extra],
            env=self.env,
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
        )
        logf.close()
        deadline = time.monotonic() + 20
        sock = self.run_dir / "marsd.sock"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"marsd exited: {self.logtail()}")
            if sock.exists():
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(str(sock))
                    s.close()
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise AssertionError(f"marsd did not start: {self.logtail()}")

    def serve(self, device: str, *marsd_args: str, resource: str = "r0") -> None:
        """A new cluster with this host as the primary of ``resource`` on ``device``:
        marsd running (with ``marsd_args``) and the resource up."""
        self.marsadm("create-cluster", "--ip", self.ip)
        self.marsadm("create-resource", resource, device)
        self.start(*marsd_args)
        self.marsadm("up", resource)

    def join_cluster_of(self, member: MarsHost) -> None:
        """Join ``member``'s cluster (read from its state root) and start marsd."""
        self.marsadm("join-cluster", member.name, "--ip", self.ip, "--from-root",
                     str(member.root))
        self.start()

    def join(self, primary: MarsHost, device: str, resource: str = "r0") -> None:
        """Join ``primary``'s cluster and its ``resource``, waiting for the full sync."""
        self.join_cluster_of(primary)
        self.marsadm("join-resource", resource, device, "--wait")

    def kill9(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.proc = None

    def status(self, resource: str = "r0") -> dict[str, Any]:
        """marsd's live status of ``resource`` on this host ({} if it does not run it)."""
        from marslib import control
        reply = control.request(self.run_dir / "marsd.sock", "status")
        return dict(reply["resources"].get(resource, {}))

    def logtail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return "(no marsd log)"

    def nbd_uri(self, resource: str) -> str:
        return f"nbd+unix:///{resource}?socket={self.run_dir / (resource + '.nbd')}"



class HostPair:
    """Two hosts on their own loopback addresses, alpha and beta, with a data device each
    (nothing started yet)."""

    def __init__(self, base: Path, size: int = 64 << 20) -> None:
        ip_a, ip_b = loopback_ips(2)
        self.a = MarsHost(base / "a", "alpha", ip_a)
        self.b = MarsHost(base / "b", "beta", ip_b)
        self.dev_a = BlockDev(base / "a.img", size)
        self.dev_b = BlockDev(base / "b.img", size)

    def replicate(self) -> None:
        """alpha serves its device as the primary of r0; beta joins with its own (full
        sync)."""
        self.a.serve(self.dev_a.path)
        self.b.join(self.a, self.dev_b.path)

    def close(self) -> None:
        for h in (self.a, self.b):
            h.stop()
        self.dev_a.close()
        self.dev_b.close()

@pytest.fixture
def host(tmp_path: Path) -> Iterator[MarsHost]:
    h = MarsHost(tmp_path, ip=loopback_ips(1)[0])
    yield h
    h.stop()


_ip_count = [0]


def loopback_ips(n: int) -> list[str]:
    """Fresh addresses 127.X.Y.1 (all of 127/8 is local), X from this process's pid, so that
    tests never share ports, not even with a pytest run next to this one."""
    out = []
    for _ in range(n):
        _ip_count[0] += 1
        out.append(f"127.{100 + os.getpid() % 150}.{_ip_count[0] % 250 + 1}.1")
    return out


def nbd_client(uri: str, *args: str, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run tests/tools/nbd_client.py (libnbd) against ``uri``."""
    out = subprocess.run([SYSTEM_PYTHON, str(NBD_CLIENT), uri, *args], capture_output=True,
                         text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"nbd client {args} failed: {out.stdout} {out.stderr}")
    return out


class WriterLines:
    """The output of tests/tools/nbd_client.py's writer, read as it comes, so that a test
    can act after a number of acknowledged writes instead of after a sleep."""

    def __init__(self, writer: subprocess.Popen[str]) -> None:
        self.writer = writer
        self.lines: list[str] = []
        self.acks = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.writer.stdout is not None
        for line in self.writer.stdout:
            self.lines.append(line)
            if line.startswith("A "):
                self.acks += 1

    def wait_acks(self, n: int, what: str = "the writer", timeout: float = 60) -> None:
        """Wait until the writer has ``n`` acknowledged writes in all."""
        deadline = time.monotonic() + timeout
        while self.acks < n:
            if self.writer.poll() is not None:
                self.reader.join()
                if self.acks >= n:
                    break
                err = self.writer.stderr.read() if self.writer.stderr else ""
                raise AssertionError(f"{what}: the writer ended after {self.acks} of {n} "
                                     f"acknowledged writes: {err}")
            assert time.monotonic() < deadline, \
                f"{what}: only {self.acks} of {n} writes acknowledged in {timeout} s"
            time.sleep(0.005)

    def finish(self, timeout: float = 60) -> tuple[str, str]:
        """Wait for the writer to end; its whole output and its stderr. A writer that does
        not end is killed, and the assertion says what it had done last."""
        try:
            self.writer.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.writer.kill()
            self.writer.wait()
            self.reader.join()
            unacked = sum(1 for x in self.lines if x.startswith("I ")) - self.acks
            raise AssertionError(
                f"the writer did not end within {timeout} s of its stop: {self.acks} writes "
                f"acknowledged, {unacked} issued and not acknowledged; last lines: "
                f"{''.join(self.lines[-6:])!r}; stderr: "
                f"{self.writer.stderr.read() if self.writer.stderr else ''!r}") from None
        self.reader.join()
        err = self.writer.stderr.read() if self.writer.stderr else ""
        return "".join(self.lines), err


def state_at(primary_root: Path, pos: LogPosition, size: int) -> bytes:
    """The primary's device as of log position ``pos``: every record up to it, in order,
    over the zeroed device it started with."""
    img = bytearray(size)
    files = sorted((primary_root / "resource-r0").glob("log-*"))
    for path in files:
        number = int(path.name.split("-")[1])
        if number > pos.number:
            break
        for _, end, rec in LogScanner(path):
            if number == pos.number and end > pos.offset:
                break
            img[rec.offset : rec.offset + rec.data_len] = rec.data
    return bytes(img)


def wait_until(condition: Callable[[], T], what: str, timeout: float = 30,
               interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something true and return that; fail after
    ``timeout`` seconds saying ``what`` did not happen and what the condition last gave.
    For state that other processes change (metadata travelling between hosts, a daemon
    finishing what a command started), instead of reading it once or after a sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {value!r})")
        time.sleep(interval)


def wait_in_sync(primary: MarsHost, secondary: MarsHost, timeout: float = 60,
                 resource: str = "r0") -> dict[str, Any]:
    """Wait until ``secondary`` has applied the primary's whole log and is consistent;
    return its status."""
    deadline = time.monotonic() + timeout
    while True:
        p, s = primary.status(resource), secondary.status(resource)
        if s.get("applied") == p.get("log_end") and s.get("consistent"):
            return s
        assert time.monotonic() < deadline, \
            f"{secondary.name} never caught up with {primary.name}: {s} vs {p}"
        time.sleep(0.1)


COLLECTION = REPO / "ansible" / "ansible_collections" / "marslib" / "mars"


@pytest.fixture(scope="session")
def installed_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """marslib.mars built (ansible-galaxy collection build) and installed into a temporary
    collections path, as a user installs it: ANSIBLE_COLLECTIONS_PATH=<this> uses it."""
    dest = tmp_path_factory.mktemp("collections")
    out = subprocess.run([str(REPO / "scripts" / "install-collection.sh"), str(dest)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (dest / "ansible_collections" / "marslib" / "mars" / "MANIFEST.json").exists()
    return dest
