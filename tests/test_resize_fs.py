"""Online resize with a real filesystem: xfs on the primary's NBD export (nbdfuse + a
buffered loop device), grown with xfs_growfs, then a handover: the filesystem on the new
primary has the new size and every file."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    IS_ROOT,
    BlockDev,
    MarsHost,
    have_libnbd,
    loopback_ips,
    wait_in_sync,
    wait_until,
)
from test_filesystem import Attached

from marslib.meta import MetaStore

pytestmark = pytest.mark.skipif(
    not IS_ROOT or not have_libnbd() or not shutil.which("mkfs.xfs")
    or not shutil.which("nbdfuse"), reason="needs root, libnbd, nbdfuse and xfsprogs")

OLD, NEW = 320 << 20, 448 << 20  # mkfs.xfs wants at least 300 MiB


def grow(dev: BlockDev, size: int) -> None:
    with open(dev.image, "r+b") as f:
        f.truncate(size)
    if dev.loop:
        subprocess.run(["losetup", "-c", dev.loop], check=True)


def files(mnt: Path, start: int, count: int) -> dict[str, str]:
    sums = {}
    for i in range(start, start + count):
        data = os.urandom(100_000 + i * 997)
        (mnt / f"f{i}").write_bytes(data)
        sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return sums


def fs_size(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return st.f_blocks * st.f_frsize


def test_xfs_grows_online_and_survives_a_handover(tmp_path: Path) -> None:
    ip_a, ip_b = loopback_ips(2)
    a, b = MarsHost(tmp_path / "a", "alpha", ip_a), MarsHost(tmp_path / "b", "beta", ip_b)
    dev_a, dev_b = BlockDev(tmp_path / "a.img", OLD), BlockDev(tmp_path / "b.img", OLD)
    mnt = tmp_path / "mnt"
    for d in (mnt, tmp_path / "fa", tmp_path / "fb"):
        d.mkdir()
    att: Attached | None = None
    try:
        a.serve(dev_a.path)
        b.join(a, dev_b.path)
        att = Attached(a.nbd_uri("r0"), tmp_path / "fa")
        subprocess.run(["mkfs.xfs", "-q", "-f", att.loop], check=True)
        subprocess.run(["mount", att.loop, str(mnt)], check=True)
        sums = files(mnt, 0, 20)
        before = fs_size(mnt)
        # grow the devices on every member, then the resource, while the fs is mounted
        grow(dev_a, NEW)
        grow(dev_b, NEW)
        deadline = time.monotonic() + 20
        while True:
            r = a.marsadm("resize", "r0", str(NEW), check=False)
            if r["rc"] == 0:
                break
            assert time.monotonic() < deadline, r
            time.sleep(0.5)
        assert r["size"] == NEW
        sums.update(files(mnt, 20, 10))  # the application keeps writing
        # NBD tells connected clients nothing about a new size: the client reconnects
        subprocess.run(["umount", str(mnt)], check=True)
        att.close()
        att = Attached(a.nbd_uri("r0"), tmp_path / "fa")
        subprocess.run(["mount", att.loop, str(mnt)], check=True)
        subprocess.run(["xfs_growfs", str(mnt)], check=True, capture_output=True)
        grown = fs_size(mnt)
        assert grown > before + (100 << 20)
        sums.update(files(mnt, 30, 10))
        subprocess.run(["umount", str(mnt)], check=True)
        att.close()
        att = None
        # handover: the new primary serves the grown filesystem with every file, once it
        # has synced the grown tail (the resize only started that)
        tree_b = MetaStore(b.root)
        wait_until(lambda: tree_b.get(f"resource-r0/syncstatus-{b.name}") == "done"
                   and tree_b.get(f"resource-r0/synced-size-{b.name}") == str(NEW),
                   f"{b.name} to sync the grown tail", timeout=300)
        wait_in_sync(a, b)
        b.marsadm("primary", "r0")
        att = Attached(b.nbd_uri("r0"), tmp_path / "fb")
        subprocess.run(["mount", att.loop, str(mnt)], check=True)
        assert fs_size(mnt) == grown
        for name, digest in sums.items():
            assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
        subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        if att is not None:
            att.close()
        a.stop()
        b.stop()
        dev_a.close()
        dev_b.close()
