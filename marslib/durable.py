"""Writing files, symlinks and directories under the state root so that a crash keeps them.

The way a database does it: write a temporary entry next to the final one, fsync it,
rename it over the final name, fsync the directory. After a power loss the name then holds
either the old or the new content, never an empty or half-written file. A symlink cannot be
opened for fsync; its inode is committed together with the directory that names it, so for
links the directory fsync after the rename is what makes them durable.

Temporary names start with ``.`` so that the metadata tree never takes them for keys.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages


@functools.cache
def _sync_file_range() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's sync_file_range, looked up on first use among the symbols the interpreter
    already has loaded (libc among them), not with ``ctypes.util.find_library``, which
    runs ``ldconfig`` and would cost every process that imports this module."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing the dirty pages of a file's range to the disk, and
    return (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: no wait, no cache flush, nothing
    made durable). A file written fast through the page cache is then not left with
    hundreds of megabytes dirty, which its fsync later pushes out in one burst that stalls
    every other writer of the disk. Advice only: its errors are ignored, and it is a no-op
    where the call does not exist."""
    fn = _sync_file_range()
    if fn is not None and length > 0:
        fn(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: Path | str) -> None:
    """fsync the directory ``path``: entries created, renamed or removed in it persist."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkdir_durably(path: Path) -> None:
    """Create ``path`` and its missing parents; each one created is fsynced into its parent.

    Nothing is synced when ``path`` exists already (the common case costs one stat)."""
    if path.is_dir():
        return
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not d.is_dir():
                raise
        fsync_dir(d.parent)


def write_file_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace the file ``path`` with ``data`` (permissions ``mode``) atomically and durably.

    The directory of ``path`` must exist (see :func:`mkdir_durably`)."""
    tmp = _tmp_name(path)
    _unlink_quietly(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def replace_symlink(path: Path, target: str, *, mtime_ns: int | None = None,
                    durable: bool = True) -> None:
    """Point the symlink ``path`` at ``target`` atomically (its own mtime ``mtime_ns``).

    With ``durable`` the directory is fsynced after the rename; without it the link is only
    atomic (for values written many times a second that a crash may take back)."""
    tmp = _tmp_name(path)
    _unlink_quietly(tmp)
    os.symlink(target, tmp)
    try:
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(path.parent)
