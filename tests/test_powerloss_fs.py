"""The power-loss filesystem itself: what an fsync made durable survives a drop, and what a
writer left to the page cache does not, so it catches a writer that skips an fsync."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
from powerloss_fs import PowerLossMount  # noqa: E402

WHY_NOT = PowerLossMount.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss fs: {WHY_NOT}")


@pytest.fixture
def plfs(tmp_path: Path) -> Iterator[PowerLossMount]:
    fs = PowerLossMount(tmp_path / "durable", tmp_path / "mnt", tmp_path / "powerloss_fs.log")
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


def power_cycle(fs: PowerLossMount) -> Path:
    """Drop the volatile state, then 'reboot': unmount and mount again."""
    fs.drop()
    fs.remount()
    return fs.mountpoint


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def careful_replace(path: Path, data: bytes) -> None:
    """The textbook durable replace: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name("." + path.name + ".tmp")
    write(tmp, data, sync=True)
    os.replace(tmp, path)
    fsync_path(path.parent)


def careless_replace(path: Path, data: bytes) -> None:
    """The classic bug: rename over the old file without fsync'ing the new data."""
    tmp = path.with_name("." + path.name + ".tmp")
    write(tmp, data, sync=False)
    os.replace(tmp, path)
    fsync_path(path.parent)


def test_careful_writer_loses_nothing(plfs: PowerLossMount) -> None:
    m = plfs.mountpoint
    (m / "dir").mkdir()
    fsync_path(m)
    for i in range(5):
        careful_replace(m / "dir" / f"f{i}", bytes([i]) * (10000 + i))
    careful_replace(m / "dir" / "f0", b"second version")
    os.symlink("value", m / "dir" / ".link.tmp")
    os.utime(m / "dir" / ".link.tmp", ns=(123, 456_789), follow_symlinks=False)
    os.replace(m / "dir" / ".link.tmp", m / "dir" / "link")
    fsync_path(m / "dir")
    dropped = plfs.drop()["dropped"]
    assert dropped == {"dirty_files": 0, "dirty_dirs": 0, "dirty_bytes": 0}
    plfs.remount()
    assert (m / "dir" / "f0").read_bytes() == b"second version"
    for i in range(1, 5):
        assert (m / "dir" / f"f{i}").read_bytes() == bytes([i]) * (10000 + i)
    assert os.readlink(m / "dir" / "link") == "value"
    assert os.lstat(m / "dir" / "link").st_mtime_ns == 456_789
    assert sorted(os.listdir(m / "dir")) == ["f0", "f1", "f2", "f3", "f4", "link"]


def test_writer_skipping_fsync_loses_its_data(plfs: PowerLossMount) -> None:
    m = plfs.mountpoint
    careful_replace(m / "config", b"old contents")
    careless_replace(m / "config", b"new contents")
    assert (m / "config").read_bytes() == b"new contents"  # read-your-writes before the drop
    m = power_cycle(plfs)
    # the name made it (the directory was fsync'ed), the data did not: an empty file, as
    # on a real filesystem that committed the rename before the data
    assert (m / "config").read_bytes() == b""


def test_rename_without_directory_fsync_is_undone(plfs: PowerLossMount) -> None:
    m = plfs.mountpoint
    careful_replace(m / "config", b"old contents")
    tmp = m / ".config.tmp"
    write(tmp, b"new contents", sync=True)
    os.replace(tmp, m / "config")
    os.symlink("v2", m / ".key.tmp")
    os.replace(m / ".key.tmp", m / "key")
    (m / "made").mkdir()
    write(m / "made" / "inside", b"x", sync=True)
    fsync_path(m / "made")  # its entries are durable, but 'made' itself is not
    m = power_cycle(plfs)
    assert (m / "config").read_bytes() == b"old contents"
    assert sorted(os.listdir(m)) == ["config"]


def test_unlink_without_directory_fsync_comes_back(plfs: PowerLossMount) -> None:
    m = plfs.mountpoint
    careful_replace(m / "a", b"AAAA")
    os.symlink("target", m / "l")
    fsync_path(m)
    os.unlink(m / "a")
    os.unlink(m / "l")
    assert not (m / "a").exists()
    m = power_cycle(plfs)
    assert (m / "a").read_bytes() == b"AAAA"
    assert os.readlink(m / "l") == "target"


def test_file_data_sizes_and_truncation(plfs: PowerLossMount) -> None:
    """Appends synced with fdatasync survive; later appends and truncations do not."""
    m = plfs.mountpoint
    fd = os.open(m / "log", os.O_RDWR | os.O_CREAT, 0o644)
    fsync_path(m)
    os.pwrite(fd, b"a" * 5000, 0)
    os.fdatasync(fd)
    os.pwrite(fd, b"b" * 3000, 5000)  # never synced
    os.pwrite(fd, b"c" * 100, 10)  # nor this overwrite
    os.ftruncate(fd, 20000)
    assert os.pread(fd, 20000, 0) == (b"a" * 10 + b"c" * 100 + b"a" * 4890 + b"b" * 3000
                                      + bytes(12000))
    os.close(fd)
    fd = os.open(m / "cut", os.O_RDWR | os.O_CREAT, 0o644)
    fsync_path(m)
    os.pwrite(fd, b"z" * 9000, 0)
    os.fsync(fd)
    os.ftruncate(fd, 100)
    os.ftruncate(fd, 9000)  # the cut-off tail reads back as zeros, not the old bytes
    assert os.pread(fd, 9000, 0) == b"z" * 100 + bytes(8900)
    os.close(fd)
    m = power_cycle(plfs)
    assert (m / "log").read_bytes() == b"a" * 5000
    assert (m / "cut").read_bytes() == b"z" * 9000


def test_fsync_before_the_name_is_durable(plfs: PowerLossMount) -> None:
    """Data synced while the file's name was not yet durable lands once the directory is
    fsync'ed later (the inode was durable, only nameless)."""
    m = plfs.mountpoint
    (m / "sub").mkdir()
    write(m / "sub" / "f", b"payload" * 1000, sync=True)
    os.rename(m / "sub" / "f", m / "sub" / "g")
    fsync_path(m / "sub")
    fsync_path(m)
    m = power_cycle(plfs)
    assert (m / "sub" / "g").read_bytes() == b"payload" * 1000
    assert os.listdir(m / "sub") == ["g"]


def test_after_the_drop_everything_fails(plfs: PowerLossMount) -> None:
    m = plfs.mountpoint
    fd = os.open(m / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x")
    plfs.drop()
    with pytest.raises(OSError) as exc:
        os.fsync(fd)
    assert exc.value.errno == errno.EIO
    os.close(fd)
    with pytest.raises(OSError):
        os.listdir(m)
    assert plfs.stats()["dead"] is True
