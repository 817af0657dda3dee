"""A real filesystem on the NBD export (nbdfuse + a buffered loop device, since this
kernel has no nbd module): mkfs, files, unmount, kill -9 of marsd, recover, fsck clean."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, BlockDev, MarsHost

pytestmark = pytest.mark.skipif(
    not IS_ROOT or not shutil.which("nbdfuse") or not shutil.which("fusermount3"),
    reason="needs root, nbdfuse (libnbd-bin) and fusermount3 (fuse3)",
)


class Attached:
    """nbdfuse on DIR, a buffered loop device over DIR/nbd (O_DIRECT through FUSE fails)."""

    def __init__(self, uri: str, base: Path) -> None:
        self.fuse_dir = base / "fuse"
        self.fuse_dir.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(["nbdfuse", str(self.fuse_dir), uri],
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while not (self.fuse_dir / "nbd").exists():
            assert self.proc.poll() is None, "nbdfuse exited"
            assert time.monotonic() < deadline, "nbdfuse did not come up"
            time.sleep(0.05)
        self.loop = subprocess.run(["losetup", "-f", "--show", str(self.fuse_dir / "nbd")],
                                   check=True, capture_output=True, text=True).stdout.strip()

    def close(self) -> None:
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = ""
        subprocess.run(["fusermount3", "-u", str(self.fuse_dir)], capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def fs_host(tmp_path: Path) -> Iterator[tuple[MarsHost, BlockDev]]:
    dev = BlockDev(tmp_path / "data.img", 96 << 20)
    h = MarsHost(tmp_path)
    h.marsadm("create-cluster")
    h.marsadm("create-resource", "r0", dev.path)
    h.start("--memory-limit", "8M", "--max-logfile-size", "8M")
    h.marsadm("up", "r0")
    yield h, dev
    h.stop()
    dev.close()


def write_files(mnt: Path, count: int, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    sums = {}
    for i in range(count):
        data = rng.randbytes(rng.randrange(1, 400_000))
        name = f"dir{i % 5}/file{i}.bin"
        (mnt / name).parent.mkdir(exist_ok=True)
        (mnt / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def check_files(mnt: Path, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name


def test_ext4_survives_a_crash_of_marsd(fs_host: tuple[MarsHost, BlockDev],
                                        tmp_path: Path) -> None:
    host, _ = fs_host
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    att = Attached(host.nbd_uri("r0"), tmp_path)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", att.loop], check=True)
        subprocess.run(["mount", att.loop, str(mnt)], check=True)
        try:
            sums = write_files(mnt, 60, seed=1)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        att.close()
    host.kill9()  # the crash: nothing is drained, recovery must replay the log
    host.start()
    host.marsadm("up", "r0")
    att = Attached(host.nbd_uri("r0"), tmp_path)
    try:
        fsck = subprocess.run(["fsck.ext4", "-f", "-n", att.loop], capture_output=True,
                              text=True)
        assert fsck.returncode == 0, f"fsck found damage: {fsck.stdout} {fsck.stderr}"
        subprocess.run(["mount", att.loop, str(mnt)], check=True)
        try:
            check_files(mnt, sums)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        att.close()


def test_ext4_crash_while_mounted_and_writing(fs_host: tuple[MarsHost, BlockDev],
                                              tmp_path: Path) -> None:
    """kill -9 of marsd under a mounted, busy filesystem: after recovery the journal
    replays and fsck is clean; files that were fsync'ed before the crash are intact."""
    host, _ = fs_host
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    att = Attached(host.nbd_uri("r0"), tmp_path)
    synced: dict[str, str] = {}
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", att.loop], check=True)
        subprocess.run(["mount", att.loop, str(mnt)], check=True)
        rng = random.Random(5)
        for i in range(30):
            data = rng.randbytes(rng.randrange(1, 200_000))
            path = mnt / f"synced{i}.bin"
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            synced[path.name] = hashlib.sha256(data).hexdigest()
        dfd = os.open(mnt, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        write_files(mnt, 20, seed=6)  # unsynced: may or may not survive
        host.kill9()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        att.close()
    host.start()
    host.marsadm("up", "r0")
    att = Attached(host.nbd_uri("r0"), tmp_path)
    try:
        subprocess.run(["e2fsck", "-p", att.loop], capture_output=True)  # journal replay
        fsck = subprocess.run(["fsck.ext4", "-f", "-n", att.loop], capture_output=True,
                              text=True)
        assert fsck.returncode == 0, f"fsck found damage: {fsck.stdout} {fsck.stderr}"
        subprocess.run(["mount", att.loop, str(mnt)], check=True)
        try:
            check_files(mnt, synced)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        att.close()
