"""Aligned direct I/O on a data device: a block device (an LV, a loop device) or a file.

Reads and writes at any offset and length are accepted; unaligned edges are handled by
reading the surrounding aligned blocks first (read-modify-write), so callers that may
race on the same block must serialise (the logger's writeback is the only writer).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from marslib.errors import DeviceError

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
FILE_ALIGNMENT = 4096  # safe for O_DIRECT on files whatever the filesystem's block size
MAX_IO = 8 << 20  # one aligned buffer per thread is at most this big; larger I/O is split


@dataclass(frozen=True)
class DeviceInfo:
    path: str
    size: int
    alignment: int
    is_block_device: bool
    direct: bool


class Piece(Protocol):
    """Data to write at ``start`` (an extent of the writeback)."""

    @property
    def start(self) -> int: ...

    @property
    def data(self) -> memoryview: ...


class _BufferPool(threading.local):
    """One page-aligned buffer per thread, grown on demand (mmap memory is aligned)."""

    def __init__(self) -> None:
        self.buf: mmap.mmap | None = None
        self.whole: memoryview | None = None  # of buf, kept: a view per I/O costs

    def get(self, size: int) -> mmap.mmap:
        if self.buf is None or len(self.buf) < size:
            if self.whole is not None:
                self.whole.release()
                self.whole = None
            if self.buf is not None:
                self.buf.close()
            self.buf = mmap.mmap(-1, max(size, 1 << 20))
        return self.buf

    def view(self, size: int) -> memoryview:
        """The first ``size`` bytes of this thread's buffer."""
        whole = self.whole
        if whole is None or len(whole) < size:
            self.get(size)
            whole = self.whole = memoryview(self.buf)  # type: ignore[arg-type]
        return whole[:size]


_pool = _BufferPool()


def probe_size(path: str) -> int:
    """Size in bytes of a block device or file, without opening it for writing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise DeviceError(f"cannot open device {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("<Q", buf)[0])
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        raise DeviceError(f"{path} is neither a block device nor a regular file")
    finally:
        os.close(fd)


class Device:
    """A data device opened for aligned direct I/O (or buffered I/O with ``buffered``)."""

    def __init__(self, path: str, *, buffered: bool = False, read_only: bool = False) -> None:
        self.path = path
        self.buffered = buffered
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if not buffered:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DeviceError(f"data device {path} does not exist") from None
        except OSError as exc:
            if exc.errno == errno.EINVAL and not buffered:
                raise DeviceError(
                    f"{path}: this filesystem refuses O_DIRECT; use a block device, a file "
                    "on ext4/xfs, or --buffered for tests and development only"
                ) from None
            raise DeviceError(f"cannot open data device {path}: {exc.strerror}") from None
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if self.is_block_device:
            ssz = fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4)
            self.alignment = max(512, int(struct.unpack("<i", ssz)[0]))
        elif stat.S_ISREG(st.st_mode):
            self.alignment = FILE_ALIGNMENT
        else:
            os.close(self.fd)
            raise DeviceError(f"{path} is neither a block device nor a regular file")

    @property
    def size(self) -> int:
        if self.is_block_device:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("<Q", buf)[0])
        return os.fstat(self.fd).st_size

    def info(self) -> DeviceInfo:
        return DeviceInfo(self.path, self.size, self.alignment, self.is_block_device,
                          not self.buffered)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceError(
                f"{self.path}: I/O at {offset}+{length} is outside the device "
                f"({self.size} bytes)"
            )

    def _envelope(self, offset: int, length: int) -> tuple[int, int]:
        a = self.alignment
        start = offset - offset % a
        end = -(-(offset + length) // a) * a
        return start, end

    def _pread_aligned(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                raise DeviceError(f"{self.path}: short read at {offset + done}")
            done += n

    def _pwrite_aligned(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.pwritev(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                raise DeviceError(f"{self.path}: short write at {offset + done}")
            done += n

    def pread(self, offset: int, length: int) -> bytearray:
        """Read ``length`` bytes at ``offset`` (any alignment)."""
        self._check_range(offset, length)
        out = bytearray(length)
        pos = 0
        while pos < length:
            n = min(length - pos, MAX_IO - 2 * self.alignment)
            start, end = self._envelope(offset + pos, n)
            buf = memoryview(_pool.get(end - start))[: end - start]
            self._pread_aligned(buf, start)
            skip = offset + pos - start
            out[pos : pos + n] = buf[skip : skip + n]
            pos += n
        return out

    def pread_view(self, offset: int, length: int) -> memoryview:
        """Read ``length`` bytes at ``offset`` (any alignment) into this thread's aligned
        buffer, without copying them out: the view is valid only until this thread's next
        I/O on any device, so use it (hash it, copy it) before that. At most
        ``MAX_IO - 2 * alignment`` bytes."""
        self._check_range(offset, length)
        if length > MAX_IO - 2 * self.alignment:
            raise ValueError(f"pread_view of {length} bytes: at most "
                             f"{MAX_IO - 2 * self.alignment} at once")
        start, end = self._envelope(offset, length)
        buf = _pool.view(end - start)
        self._pread_aligned(buf, start)
        skip = offset - start
        return buf[skip : skip + length]

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (any alignment; unaligned edges are read first)."""
        length = len(data)
        self._check_range(offset, length)
        src = memoryview(data).cast("B")
        pos = 0
        while pos < length:
            n = min(length - pos, MAX_IO - 2 * self.alignment)
            start, end = self._envelope(offset + pos, n)
            buf = memoryview(_pool.get(end - start))[: end - start]
            skip = offset + pos - start
            a = self.alignment
            if skip:
                self._pread_aligned(buf[:a], start)
            if (skip + n) % a and not (skip and end - start == a):
                self._pread_aligned(buf[end - start - a :], end - a)
            buf[skip : skip + n] = src[pos : pos + n]
            self._pwrite_aligned(buf, start)
            pos += n

    def write_gathered(self, start: int, end: int, pieces: Sequence[Piece]) -> None:
        """Write the aligned range [start, end) made of ``pieces`` (objects with ``start``
        and ``data``, sorted, inside the range): copied once into an aligned buffer, one
        write. If they leave gaps, the range is read from the device first."""
        length = end - start
        if start % self.alignment or length % self.alignment or length > MAX_IO:
            raise ValueError("write_gathered needs an aligned range of at most MAX_IO")
        buf = _pool.view(length)
        if len(pieces) == 1:  # the common case: one extent, often exactly one block
            piece = pieces[0]
            data = piece.data
            at = piece.start - start
            if at or len(data) != length:
                self._pread_aligned(buf, start)
            buf[at:at + len(data)] = data
        else:
            if pieces[0].start != start or sum(len(p.data) for p in pieces) != length:
                self._pread_aligned(buf, start)
            for p in pieces:
                at = p.start - start
                buf[at:at + len(p.data)] = p.data
        if os.pwritev(self.fd, [buf], start) != length:  # short: finish it
            self._pwrite_aligned(buf, start)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
