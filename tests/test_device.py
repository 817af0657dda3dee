"""Aligned direct I/O on real devices: a loop device with direct I/O, a file on ext4,
and a FUSE file that refuses O_DIRECT (a clear error, and --buffered as the escape)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import IS_ROOT, BlockDev
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marslib.device import Device, probe_size
from marslib.errors import DeviceError


@pytest.fixture(scope="module")
def loopdev(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    dev = BlockDev(tmp_path_factory.mktemp("dev") / "dev.img", 8 << 20)
    yield dev
    dev.close()


def test_block_device_properties(loopdev: BlockDev) -> None:
    d = Device(loopdev.path)
    try:
        assert d.size == 8 << 20 == probe_size(loopdev.path)
        if IS_ROOT:
            assert d.is_block_device and d.alignment in (512, 4096)
        else:
            assert d.alignment == 4096
    finally:
        d.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, (8 << 20) - 1), st.integers(1, 300_000), st.integers(0, 255))
def test_unaligned_writes_and_reads_match_a_model(loopdev: BlockDev, offset: int, length: int,
                                                  value: int) -> None:
    length = min(length, (8 << 20) - offset)
    d = Device(loopdev.path)
    try:
        before = d.pread(max(0, offset - 5000), min(8 << 20, offset + length + 5000)
                         - max(0, offset - 5000))
        data = bytes([value]) * length
        d.pwrite(offset, data)
        d.flush()
        assert d.pread(offset, length) == data
        lo = max(0, offset - 5000)
        after = d.pread(lo, len(before))
        expect = bytearray(before)
        expect[offset - lo : offset - lo + length] = data
        assert after == expect, "bytes around an unaligned write changed"
    finally:
        d.close()
    # the device file itself (bypassing our cache-free path) agrees
    with open(loopdev.image, "rb") as f:
        f.seek(offset)
        assert f.read(min(length, 4096)) == bytes([value]) * min(length, 4096)


def test_out_of_range_and_missing(loopdev: BlockDev, tmp_path: Path) -> None:
    d = Device(loopdev.path)
    try:
        with pytest.raises(DeviceError, match="outside the device"):
            d.pread((8 << 20) - 10, 20)
        with pytest.raises(DeviceError, match="outside the device"):
            d.pwrite(8 << 20, b"x")
    finally:
        d.close()
    with pytest.raises(DeviceError, match="does not exist"):
        Device(str(tmp_path / "nope"))


def test_file_on_ext4_uses_direct_io(tmp_path: Path) -> None:
    img = tmp_path / "file.img"
    img.write_bytes(bytes(1 << 20))
    d = Device(str(img))
    try:
        assert not d.buffered and d.alignment == 4096
        flags = int(Path(f"/proc/self/fdinfo/{d.fd}").read_text().split("flags:")[1].split()[0],
                    8)
        assert flags & os.O_DIRECT
        d.pwrite(4095, b"ab")
        assert d.pread(4094, 4) == b"\0ab\0"
    finally:
        d.close()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount ramfs")
def test_filesystem_refusing_o_direct_gets_a_clear_error(tmp_path: Path) -> None:
    """ramfs has no direct I/O: open(O_DIRECT) fails with EINVAL on this kernel."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        img = mnt / "dev.img"
        img.write_bytes(bytes(64 << 10))
        with pytest.raises(DeviceError, match="refuses O_DIRECT.*--buffered"):
            Device(str(img))
        d = Device(str(img), buffered=True)
        try:
            d.pwrite(10, b"buffered ok")
            assert d.pread(10, 11) == b"buffered ok"
        finally:
            d.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
