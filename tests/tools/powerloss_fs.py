#!/usr/bin/env python3
"""A FUSE filesystem with a volatile page cache that a test can throw away: power loss.

usage: powerloss_fs.py BACKING_DIR MOUNTPOINT [--trace] [--debug]

Everything under MOUNTPOINT is served from memory over BACKING_DIR, which holds only what
an fsync made durable, laid out as a plain directory tree:

- file data written and not yet fsync'ed (or fdatasync'ed) lives in memory pages; an
  fsync of the file writes them, the file's size and its mode and times to the backing
  copy of that file; a write through a descriptor opened with O_DSYNC or O_SYNC is
  followed by that fsync, as a real filesystem makes such a write durable before it
  returns;
- a name (create, mkdir, symlink, rename, unlink, rmdir) becomes durable only when its
  directory is fsync'ed; until then the directory's durable entries are the old ones. A
  file fsync'ed before its name is durable keeps its data in a hidden orphan area, as an
  inode without a name would: a power loss frees it. A symlink's target and times are
  written with its directory entry (a symlink cannot be fsync'ed itself);
- reads see the volatile state (read-your-writes).

Writing ``drop`` to the control file MOUNTPOINT/.powerloss is the power loss: the
volatile state is thrown away, and from then on every operation fails with EIO until the
filesystem is unmounted; BACKING_DIR is then exactly what survived. Mounting it again
(after removing the orphans) is the reboot. Reading the control file gives JSON counters.

The test side (``PowerLossMount``) starts this as its own process, waits for the mount,
drops and unmounts; it needs only the standard library, so tests can import this module
without the FUSE binding (mfusepy, over libfuse3) installed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = 4096
CONTROL = ".powerloss"
ORPHANS = ".powerloss-orphans"  # in BACKING_DIR: durable inodes without a durable name
RESERVED = (CONTROL, ORPHANS)
UTIME_NOW = (1 << 30) - 1  # libfuse hands utimensat's special values through as tv_nsec
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
ROOT = 1
CONTROL_FH = 0

log = logging.getLogger("powerloss_fs")


@dataclass(eq=False)
class Node:
    """One inode: its volatile state, and where its durable copy lives in BACKING_DIR."""

    ino: int
    mode: int
    mtime: int
    uid: int = 0
    gid: int = 0
    atime: int = 0
    ctime: int = 0
    # regular files: the volatile size, how much of the backing copy is still visible
    # (a truncate below it hides the rest), and the dirty pages over it
    size: int = 0
    base: int = 0
    pages: dict[int, bytearray] = field(default_factory=dict)
    target: str = ""  # symlinks
    entries: dict[str, int] = field(default_factory=dict)  # directories: volatile names
    dentries: dict[str, int] = field(default_factory=dict)  # directories: durable names
    # durable location: None (no backing copy), ORPHAN, or (parent ino, name)
    dloc: tuple[int, str] | str | None = None
    links: int = 0  # volatile names pointing here (0 or 1: no hard links)
    opens: int = 0
    meta_dirty: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


ORPHAN = "orphan"


def now_ns() -> int:
    return time.time_ns()


class PowerLossFS:
    """The filesystem's state and operations, independent of the FUSE binding."""

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        self.orphans = backing / ORPHANS
        shutil.rmtree(self.orphans, ignore_errors=True)  # the reboot frees nameless inodes
        self.orphans.mkdir()
        self.nodes: dict[int, Node] = {}
        self.next_ino = ROOT + 1
        self.dead = False
        self.counters = {"writes": 0, "fsyncs": 0, "dir_fsyncs": 0}
        self.dropped: dict[str, int] | None = None
        st = os.lstat(backing)
        root = Node(ROOT, st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_atime_ns,
                    st.st_ctime_ns, links=1, dloc=(ROOT, ""))
        self.nodes[ROOT] = root
        self._load(root, backing, top=True)

    # -- loading the durable tree -------------------------------------------------------

    def _load(self, parent: Node, path: Path, top: bool = False) -> None:
        for name in sorted(os.listdir(path)):
            if top and name in RESERVED:
                continue
            p = path / name
            st = os.lstat(p)
            node = self._new(st.st_mode, st.st_mtime_ns)
            node.uid, node.gid, node.atime, node.ctime = (st.st_uid, st.st_gid, st.st_atime_ns,
                                                          st.st_ctime_ns)
            node.dloc = (parent.ino, name)
            node.links = 1
            parent.entries[name] = parent.dentries[name] = node.ino
            if node.is_dir:
                self._load(node, p)
            elif node.is_link:
                node.target = os.readlink(p)
            elif node.is_file:
                node.size = node.base = st.st_size
            else:
                raise SystemExit(f"{p}: only files, directories and symlinks are supported")

    def _new(self, mode: int, mtime: int | None = None) -> Node:
        t = now_ns() if mtime is None else mtime
        node = Node(self.next_ino, mode, t, atime=t, ctime=t)
        self.next_ino += 1
        self.nodes[node.ino] = node
        return node

    # -- volatile namespace -------------------------------------------------------------

    def check_alive(self) -> None:
        if self.dead:
            raise OSError(errno.EIO, "power lost")

    def lookup(self, path: str | None) -> Node:
        if path is None:  # an unlinked file reached by a call without its handle
            raise OSError(errno.ENOENT, "unlinked")
        node = self.nodes[ROOT]
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, path)
            if node.ino == ROOT and part in RESERVED:
                raise OSError(errno.ENOENT, path)
            ino = node.entries.get(part)
            if ino is None:
                raise OSError(errno.ENOENT, path)
            node = self.nodes[ino]
        return node

    def parent_of(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self.lookup(head or "/")
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, path)
        if not name or name in (".", ".."):
            raise OSError(errno.EINVAL, path)
        if parent.ino == ROOT and name in RESERVED:
            raise OSError(errno.EPERM, f"{path}: reserved by powerloss_fs")
        return parent, name

    def make(self, path: str, mode: int, target: str = "") -> Node:
        parent, name = self.parent_of(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        node = self._new(mode)
        node.target = target
        node.links = 1
        parent.entries[name] = node.ino
        parent.mtime = parent.ctime = node.mtime
        return node

    def remove(self, path: str, want_dir: bool) -> None:
        parent, name = self.parent_of(path)
        ino = parent.entries.get(name)
        if ino is None:
            raise OSError(errno.ENOENT, path)
        node = self.nodes[ino]
        if want_dir and not node.is_dir:
            raise OSError(errno.ENOTDIR, path)
        if not want_dir and node.is_dir:
            raise OSError(errno.EISDIR, path)
        if node.is_dir and node.entries:
            raise OSError(errno.ENOTEMPTY, path)
        del parent.entries[name]
        parent.mtime = parent.ctime = now_ns()
        self._unlinked(node)

    def _unlinked(self, node: Node) -> None:
        node.links -= 1
        self._maybe_forget(node)

    def _maybe_forget(self, node: Node) -> None:
        """A node without names and opens can never be reached again: free its memory and
        a nameless backing copy (a durable name is removed by its directory's fsync)."""
        if node.links > 0 or node.opens > 0:
            return
        node.pages.clear()
        if node.dloc == ORPHAN:
            self._discard_backing(node)
        if node.dloc is None:
            self.nodes.pop(node.ino, None)

    def rename(self, old: str, new: str, flags: int) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "only RENAME_NOREPLACE is supported")
        oparent, oname = self.parent_of(old)
        nparent, nname = self.parent_of(new)
        ino = oparent.entries.get(oname)
        if ino is None:
            raise OSError(errno.ENOENT, old)
        node = self.nodes[ino]
        if node.is_dir and (new.rstrip("/") + "/").startswith(old.rstrip("/") + "/"):
            raise OSError(errno.EINVAL, f"{new} is inside {old}")
        victim_ino = nparent.entries.get(nname)
        if victim_ino == ino:
            return
        if victim_ino is not None:
            if flags & RENAME_NOREPLACE:
                raise OSError(errno.EEXIST, new)
            victim = self.nodes[victim_ino]
            if node.is_dir and not victim.is_dir:
                raise OSError(errno.ENOTDIR, new)
            if victim.is_dir and not node.is_dir:
                raise OSError(errno.EISDIR, new)
            if victim.is_dir and victim.entries:
                raise OSError(errno.ENOTEMPTY, new)
        del oparent.entries[oname]
        nparent.entries[nname] = ino
        t = now_ns()
        oparent.mtime = oparent.ctime = nparent.mtime = nparent.ctime = node.ctime = t
        if victim_ino is not None:
            self._unlinked(self.nodes[victim_ino])

    # -- file data ----------------------------------------------------------------------

    def _backing_read(self, node: Node, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        fd = os.open(self.path_of(node), os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return data.ljust(length, b"\0")

    def read(self, node: Node, offset: int, length: int) -> bytes:
        end = min(offset + length, node.size)
        if end <= offset:
            return b""
        out = bytearray(end - offset)
        if offset < node.base:
            chunk = self._backing_read(node, offset, min(end, node.base) - offset)
            out[: len(chunk)] = chunk
        if node.pages:
            for idx in range(offset // PAGE, (end - 1) // PAGE + 1):
                page = node.pages.get(idx)
                if page is None:
                    continue
                start = idx * PAGE
                lo, hi = max(start, offset), min(start + PAGE, end)
                out[lo - offset : hi - offset] = page[lo - start : hi - start]
        return bytes(out)

    def write(self, node: Node, offset: int, data: bytes) -> int:
        end = offset + len(data)
        view = memoryview(data)
        for idx in range(offset // PAGE, (end - 1) // PAGE + 1 if data else offset // PAGE):
            start = idx * PAGE
            lo, hi = max(start, offset), min(start + PAGE, end)
            page = node.pages.get(idx)
            if page is None:
                if hi - lo == PAGE:
                    node.pages[idx] = bytearray(view[lo - offset : hi - offset])
                    continue
                page = bytearray(PAGE)
                if start < node.base:
                    keep = self._backing_read(node, start, min(PAGE, node.base - start))
                    page[: len(keep)] = keep
                node.pages[idx] = page
            page[lo - start : hi - start] = view[lo - offset : hi - offset]
        node.size = max(node.size, end)
        node.mtime = node.ctime = now_ns()
        node.meta_dirty = True
        self.counters["writes"] += 1
        return len(data)

    def truncate(self, node: Node, length: int) -> None:
        if not node.is_file:
            raise OSError(errno.EISDIR if node.is_dir else errno.EINVAL, "truncate")
        if length < node.size:
            for idx in [i for i in node.pages if i * PAGE >= length]:
                del node.pages[idx]
            page = node.pages.get(length // PAGE)
            if page is not None:
                cut = length % PAGE
                page[cut:] = bytes(PAGE - cut)
            node.base = min(node.base, length)
        node.size = length
        node.mtime = node.ctime = now_ns()
        node.meta_dirty = True

    # -- durability ---------------------------------------------------------------------

    def path_of(self, node: Node) -> Path:
        """Where ``node``'s durable copy is in BACKING_DIR."""
        parts: list[str] = []
        while node.ino != ROOT:
            if node.dloc == ORPHAN:
                return self.orphans.joinpath(f"ino-{node.ino}", *reversed(parts))
            if not isinstance(node.dloc, tuple):
                raise AssertionError(f"inode {node.ino} has no durable copy")
            parent, name = node.dloc
            parts.append(name)
            node = self.nodes[parent]
        return self.backing.joinpath(*reversed(parts))

    def _ensure_backing(self, node: Node) -> Path:
        """Give ``node`` a durable copy if it has none yet: a nameless (orphan) one."""
        if node.dloc is None:
            path = self.orphans / f"ino-{node.ino}"
            self._create_backing(node, path)
            node.dloc = ORPHAN
        return self.path_of(node)

    def _create_backing(self, node: Node, path: Path) -> None:
        if node.is_dir:
            os.mkdir(path)
        elif node.is_link:
            os.symlink(node.target, path)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._write_meta(node, path)

    def _write_meta(self, node: Node, path: Path) -> None:
        if not node.is_link:
            os.chmod(path, stat.S_IMODE(node.mode))
        os.lchown(path, node.uid, node.gid)
        os.utime(path, ns=(node.atime, node.mtime), follow_symlinks=False)
        node.meta_dirty = False

    def fsync_file(self, node: Node) -> None:
        self.counters["fsyncs"] += 1
        log.debug("fsync inode %d (%d dirty pages)", node.ino, len(node.pages))
        if node.is_dir:
            self.fsync_dir(node)
            return
        path = self._ensure_backing(node)
        if node.is_file:
            fd = os.open(path, os.O_WRONLY)
            try:
                if os.fstat(fd).st_size > node.base:
                    os.ftruncate(fd, node.base)
                runs: list[list[int]] = []
                for idx in sorted(node.pages):
                    if runs and runs[-1][-1] == idx - 1 and len(runs[-1]) < 256:
                        runs[-1].append(idx)
                    else:
                        runs.append([idx])
                for run in runs:
                    bufs = [memoryview(node.pages[i]) for i in run]
                    start = run[0] * PAGE
                    over = start + len(run) * PAGE - node.size
                    if over > 0:
                        bufs[-1] = bufs[-1][: PAGE - over]
                    os.pwritev(fd, bufs, start)
                os.ftruncate(fd, node.size)
            finally:
                os.close(fd)
            node.pages.clear()
            node.base = node.size
        self._write_meta(node, path)

    def fsync_dir(self, d: Node) -> None:
        """Make ``d``'s names durable: its backing directory gets exactly its entries."""
        self.counters["dir_fsyncs"] += 1
        dpath = self._ensure_backing(d)
        log.debug("fsyncdir %s: %s", dpath.relative_to(self.backing), sorted(
            (n, "+" if d.dentries.get(n) != i else "=") for n, i in d.entries.items()
            if d.dentries.get(n) != i) + sorted(("-", n) for n in d.dentries
                                                if d.entries.get(n) != d.dentries[n]))
        for name, ino in list(d.dentries.items()):
            if d.entries.get(name) == ino:
                continue
            del d.dentries[name]
            old = self.nodes[ino]
            if old.links > 0 or old.opens > 0:  # still reachable: keep its copy nameless
                os.rename(dpath / name, self.orphans / f"ino-{ino}")
                old.dloc = ORPHAN
            else:
                self._discard_backing(old)
        for name, ino in d.entries.items():
            node = self.nodes[ino]
            target = dpath / name
            if d.dentries.get(name) == ino:
                if node.is_link and node.meta_dirty:
                    self._write_meta(node, target)
                continue
            if node.dloc is None:
                self._create_backing(node, target)
            else:
                src = self.path_of(node)
                try:
                    os.rename(src, target)
                except OSError as exc:  # e.g. a directory moved below itself durably
                    log.warning("fsyncdir: cannot move %s to %s: %s", src, target, exc)
                    continue
                if isinstance(node.dloc, tuple):  # moved from another durable directory
                    self.nodes[node.dloc[0]].dentries.pop(node.dloc[1], None)
                if node.is_link and node.meta_dirty:
                    self._write_meta(node, target)
            node.dloc = (d.ino, name)
            d.dentries[name] = ino
        self._write_meta(d, dpath)

    def _discard_backing(self, node: Node) -> None:
        """Remove ``node``'s durable copy; durable children that are still reachable keep
        theirs as orphans."""
        path = self.path_of(node)
        if node.is_dir:
            for name, ino in list(node.dentries.items()):
                child = self.nodes[ino]
                if child.links > 0 or child.opens > 0:
                    os.rename(path / name, self.orphans / f"ino-{ino}")
                    child.dloc = ORPHAN
                else:
                    self._discard_backing(child)
            node.dentries.clear()
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        node.dloc = None
        if node.links == 0 and node.opens == 0:
            self.nodes.pop(node.ino, None)

    # -- power loss ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        files = dirs = dirty_bytes = 0
        for node in self.nodes.values():
            if node.is_file and (node.pages or node.base != node.size or node.dloc is None):
                files += 1
                dirty_bytes += len(node.pages) * PAGE
            elif node.is_dir and node.entries != node.dentries:
                dirs += 1
        return {"dead": self.dead, "dirty_files": files, "dirty_dirs": dirs,
                "dirty_bytes": dirty_bytes, **self.counters, "dropped": self.dropped}

    def drop(self) -> None:
        """Power loss: forget everything volatile; fail every operation from now on."""
        if self.dead:
            return
        s = self.stats()
        self.dropped = {k: s[k] for k in ("dirty_files", "dirty_dirs", "dirty_bytes")}
        self.dead = True
        for node in self.nodes.values():
            node.pages.clear()
        log.warning("power loss: dropped %s", self.dropped)

    def control(self, data: bytes) -> None:
        cmd = data.decode(errors="replace").strip()
        if cmd == "drop":
            self.drop()
        else:
            raise OSError(errno.EINVAL, f"unknown command {cmd!r} (know: drop)")


def attrs_of(node: Node) -> dict[str, Any]:
    if node.is_file:
        size = node.size
    elif node.is_link:
        size = len(os.fsencode(node.target))
    else:
        size = 4096
    return {"st_mode": node.mode, "st_nlink": 2 if node.is_dir else 1, "st_size": size,
            "st_uid": node.uid, "st_gid": node.gid, "st_atime": node.atime,
            "st_mtime": node.mtime, "st_ctime": node.ctime, "st_blksize": PAGE,
            "st_blocks": (size + 511) // 512}


def serve(backing: Path, mountpoint: Path, debug: bool) -> int:
    """Mount the filesystem (foreground) until unmounted."""
    import mfusepy

    fs = PowerLossFS(backing)

    class Ops(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def _node(self, path: str | None, fi: Any = None) -> Node:
            if fi is not None and fi.fh != CONTROL_FH:
                node = fs.nodes.get(fi.fh)
                if node is not None:
                    return node
            if path is None:
                raise OSError(errno.EBADF, "no path and no handle")
            return fs.lookup(path)

        @staticmethod
        def _is_control(path: str | None) -> bool:
            return path == "/" + CONTROL

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            if self._is_control(path):
                t = now_ns()
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0,
                        "st_atime": t, "st_mtime": t, "st_ctime": t}
            fs.check_alive()
            return attrs_of(self._node(path, fh))

        def readdir(self, path: str, fh: int) -> list[Any]:
            fs.check_alive()
            node = fs.lookup(path)
            return [".", ".."] + [(n, {"st_mode": fs.nodes[i].mode}, 0)
                                  for n, i in node.entries.items()]

        def opendir(self, path: str) -> int:
            fs.check_alive()
            node = fs.lookup(path)
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, path)
            return node.ino

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            fs.check_alive()
            node = fs.nodes.get(fh) or fs.lookup(path)
            fs.fsync_dir(node)
            return 0

        def access(self, path: str, amode: int) -> int:
            if not self._is_control(path):
                fs.check_alive()
                fs.lookup(path)
            return 0

        def readlink(self, path: str) -> str:
            fs.check_alive()
            node = fs.lookup(path)
            if not node.is_link:
                raise OSError(errno.EINVAL, path)
            return node.target

        def open(self, path: str, fi: Any) -> int:
            fi.direct_io = 1  # every read and write reaches the model, O_DIRECT works
            if self._is_control(path):
                fi.fh = CONTROL_FH
                return 0
            fs.check_alive()
            node = fs.lookup(path)
            if node.is_dir:
                raise OSError(errno.EISDIR, path)
            node.opens += 1
            fi.fh = node.ino
            return 0

        def create(self, path: str, mode: int, fi: Any) -> int:
            fs.check_alive()
            try:
                node = fs.lookup(path)
                if fi.flags & os.O_EXCL:
                    raise OSError(errno.EEXIST, path)
            except FileNotFoundError:
                node = fs.make(path, stat.S_IFREG | stat.S_IMODE(mode))
            node.opens += 1
            fi.fh = node.ino
            fi.direct_io = 1
            return 0

        def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
            if fi.fh == CONTROL_FH:
                text = (json.dumps(fs.stats()) + "\n").encode()
                return text[offset : offset + size]
            fs.check_alive()
            return fs.read(self._node(path, fi), offset, size)

        def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
            if fi.fh == CONTROL_FH:
                fs.control(data)
                return len(data)
            fs.check_alive()
            node = self._node(path, fi)
            written = fs.write(node, offset, data)
            if fi.flags & os.O_DSYNC:  # O_DSYNC or O_SYNC: durable when write(2) returns,
                fs.fsync_file(node)  # which FUSE's direct-I/O mode leaves to the filesystem
            return written

        def truncate(self, path: str, length: int, fi: Any = None) -> int:
            if self._is_control(path):
                return 0
            fs.check_alive()
            fs.truncate(self._node(path, fi), length)
            return 0

        def fsync(self, path: str, datasync: int, fi: Any) -> int:
            if fi.fh == CONTROL_FH:
                return 0
            fs.check_alive()
            fs.fsync_file(self._node(path, fi))
            return 0

        def flush(self, path: str, fi: Any) -> int:
            return 0  # close(2) makes nothing durable

        def release(self, path: str, fi: Any) -> int:
            node = fs.nodes.get(fi.fh) if fi.fh != CONTROL_FH else None
            if node is not None:
                node.opens -= 1
                if not fs.dead:
                    fs._maybe_forget(node)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            fs.check_alive()
            fs.make(path, stat.S_IFDIR | stat.S_IMODE(mode))
            return 0

        def symlink(self, target: str, source: str) -> int:
            fs.check_alive()
            fs.make(target, stat.S_IFLNK | 0o777, target=source)
            return 0

        def unlink(self, path: str) -> int:
            fs.check_alive()
            fs.remove(path, want_dir=False)
            return 0

        def rmdir(self, path: str) -> int:
            fs.check_alive()
            fs.remove(path, want_dir=True)
            return 0

        def rename(self, old: str, new: str, flags: int = 0) -> int:
            fs.check_alive()
            fs.rename(old, new, flags)
            return 0

        def chmod(self, path: str, mode: int) -> int:
            fs.check_alive()
            node = fs.lookup(path)
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            node.ctime = now_ns()
            node.meta_dirty = True
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            fs.check_alive()
            node = fs.lookup(path)
            node.uid = node.uid if uid == -1 else uid
            node.gid = node.gid if gid == -1 else gid
            node.ctime = now_ns()
            node.meta_dirty = True
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            fs.check_alive()
            node = fs.lookup(path)
            t = now_ns()
            atime, mtime = times if times is not None else (t, t)
            if atime != UTIME_OMIT:
                node.atime = t if atime == UTIME_NOW else atime
            if mtime != UTIME_OMIT:
                node.mtime = t if mtime == UTIME_NOW else mtime
            node.ctime = t
            node.meta_dirty = True
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            fs.check_alive()
            st = os.statvfs(fs.backing)
            return {k: getattr(st, k) for k in (
                "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                "f_ffree", "f_favail", "f_namemax")}

    class Fuse(mfusepy.FUSE):  # type: ignore[misc]
        """mfusepy's FUSE, passing rename's flags and ftruncate's handle through."""

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return int(self.operations.rename(os.fsdecode(old), os.fsdecode(new), flags))

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            fi = fip.contents if fip else None
            return int(self.operations.truncate(None if path is None else os.fsdecode(path),
                                                length, fi))

    log.info("serving %s on %s", backing, mountpoint)
    Fuse(Ops(), str(mountpoint), raw_fi=True, foreground=True, nothreads=True,
         debug=debug, hard_remove=True, fsname="powerloss", subtype="powerloss")
    return 0


class PowerLossMount:
    """The test side: run the filesystem as its own process over ``backing`` on
    ``mountpoint``, cut its power, unmount and mount it again."""

    def __init__(self, backing: Path, mountpoint: Path, log_path: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot run the filesystem, or None."""
        if os.geteuid() != 0:
            return "needs root (FUSE mounts)"
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if shutil.which("fusermount3") is None:
            return "no fusermount3 (apt-get install fuse3)"
        probe = subprocess.run([sys.executable, "-c", "import mfusepy"], capture_output=True,
                               text=True)
        if probe.returncode != 0:
            why = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return f"FUSE binding unusable (pip install mfusepy; apt-get install fuse3): {why}"
        return None

    def mount(self, timeout: float = 20) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.backing),
                                      str(self.mountpoint)], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while not self.mounted():
            if self.proc.poll() is not None:
                raise AssertionError(f"powerloss_fs exited: {self.logtail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"powerloss_fs did not mount: {self.logtail()}")
            time.sleep(0.01)

    def mounted(self) -> bool:
        """Whether the mount is there (a stat would fail with EIO once the power is cut)."""
        target = os.fsencode(self.mountpoint)
        with open("/proc/self/mounts", "rb") as f:
            return any(line.split()[1] == target for line in f if line.strip())

    def control(self) -> Path:
        return self.mountpoint / CONTROL

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.control().read_text())
        return result

    def drop(self) -> dict[str, Any]:
        """Cut the power: what was not fsync'ed is gone; the mount fails every call after."""
        with open(self.control(), "w") as f:
            f.write("drop")
        return self.stats()

    def unmount(self) -> None:
        if self.proc is None:
            return
        if self.mounted():
            out = subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                 capture_output=True, text=True)
            if out.returncode != 0:  # still busy: detach it anyway
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                               capture_output=True)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def remount(self) -> None:
        """Unmount and mount again: the reboot after a power loss."""
        self.unmount()
        self.mount()

    def logtail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return "(no powerloss_fs log)"


def main(argv: list[str]) -> int:
    args = [a for a in argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    debug = "--debug" in argv  # libfuse's and the binding's own debug output too
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s powerloss_fs %(levelname)s %(message)s")
    if "--trace" in argv or os.environ.get("POWERLOSS_FS_TRACE"):
        log.setLevel(logging.DEBUG)  # every fsync and what each directory fsync made durable
    return serve(Path(args[0]).resolve(), Path(args[1]).resolve(), debug)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
