"""Attach and detach a resource's filesystem on this host.

The stack, bottom up: the NBD export marsd serves on the primary (``$MARS_RUN_DIR/R.nbd``)
-> ``nbdfuse STATE/R/fuse`` (one virtual file, ``fuse/nbd``) -> a *buffered* loop device
over that file (O_DIRECT through FUSE fails) -> the filesystem, mounted at ``STATE/R/mnt``.

Both directions are idempotent and clean up what a killed run left behind: a mount on a
dead FUSE connection, loop devices over a stale ``fuse/nbd``, an nbdfuse that still runs.
Nothing here knows about the writer; :mod:`marslib.app.cli` stops it first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marslib.devnode.system import (
    fuse_answers,
    loops_backed_by,
    mounts_at,
    process_alive,
    read_pid,
    wait_gone,
)
from marslib.errors import MarsError, Refused, TimedOut

log = logging.getLogger("marslib.app.volume")

DEFAULT_STATE_DIR = "/var/lib/mars-app"
DEFAULT_RUN_DIR = "/run/mars"
FILESYSTEMS = ("ext4", "xfs")


class AppError(MarsError):
    """An action of the application failed; the message says where and why."""


@dataclass(frozen=True)
class AppPaths:
    """Where one resource's application state lives on this host."""

    state_dir: Path
    resource: str
    run_dir: Path

    @classmethod
    def from_env(cls, resource: str, state_dir: str | None = None,
                 run_dir: str | None = None) -> AppPaths:
        # absolute: the writer and nbdfuse run with / as their working directory
        return cls(Path(state_dir or os.environ.get("MARS_APP_DIR") or DEFAULT_STATE_DIR)
                   .absolute(), resource,
                   Path(run_dir or os.environ.get("MARS_RUN_DIR") or DEFAULT_RUN_DIR)
                   .absolute())

    @property
    def base(self) -> Path:
        return self.state_dir / self.resource

    @property
    def fuse(self) -> Path:
        return self.base / "fuse"

    @property
    def nbd_file(self) -> Path:
        return self.fuse / "nbd"

    @property
    def mnt(self) -> Path:
        return self.base / "mnt"

    @property
    def data(self) -> Path:
        return self.mnt / "data"

    @property
    def pidfile(self) -> Path:
        return self.base / "writer.pid"

    @property
    def writer_log(self) -> Path:
        return self.base / "writer.log"

    @property
    def acked(self) -> Path:
        return self.base / "acked.json"

    @property
    def settings(self) -> Path:
        return self.base / "settings.json"

    @property
    def nbdfuse_pidfile(self) -> Path:
        return self.base / "nbdfuse.pid"

    @property
    def nbdfuse_log(self) -> Path:
        return self.base / "nbdfuse.log"

    @property
    def lockfile(self) -> Path:
        return self.base / "lock"

    @property
    def socket(self) -> Path:
        return self.run_dir / f"{self.resource}.nbd"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.resource}?socket={self.socket}"


# ------------------------------------------------------------------ small helpers
def run(cmd: list[str], what: str | None = None, timeout: float = 120) -> str:
    """Run ``cmd``; its stdout, or AppError with its stderr."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise AppError(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise AppError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from None
    if out.returncode != 0:
        msg = (out.stderr.strip() or out.stdout.strip() or f"exit code {out.returncode}")
        raise AppError(f"{what or ' '.join(cmd)} failed: {msg}")
    return out.stdout


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AppError(f"{path}: not valid JSON ({exc}); remove it") from None
    if not isinstance(value, dict):
        raise AppError(f"{path}: expected a JSON object")
    return value


def write_json_atomic(path: Path, value: dict[str, Any], durable: bool = True) -> None:
    """Replace ``path`` with ``value`` so that readers see the old or the new file whole."""
    tmp = path.with_name(path.name + ".tmp")
    data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)








@contextlib.contextmanager
def resource_lock(paths: AppPaths, timeout: float) -> Iterator[None]:
    """Serialise start/stop/grow/attach of one resource on this host."""
    paths.base.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimedOut(f"another mars-app command holds {paths.lockfile}") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------ what is there


def fuse_alive(paths: AppPaths) -> bool:
    """nbdfuse is mounted on ``fuse/`` and answers."""
    return fuse_answers(paths.fuse, paths.nbd_file)


@dataclass
class Attached:
    """The state of a healthy, mounted stack."""

    loop: str
    fstype: str
    readonly: bool


def healthy(paths: AppPaths) -> Attached | None:
    """The filesystem is mounted at ``mnt`` on a loop device over a live ``fuse/nbd``."""
    top = mounts_at(paths.mnt)
    if not top:
        return None
    m = top[-1]
    if m.source not in loops_backed_by(paths.nbd_file) or not fuse_alive(paths):
        return None
    return Attached(m.source, m.fstype, m.readonly)


def device_size(dev: str) -> int:
    return int(run(["blockdev", "--getsize64", dev]).strip())


def export_size(paths: AppPaths) -> int:
    """The size marsd serves now (a new NBD connection sees a resize at once)."""
    return int(run(["nbdinfo", "--size", paths.uri], "nbdinfo --size").strip())


def fs_stats(paths: AppPaths) -> dict[str, int]:
    st = os.statvfs(paths.mnt)
    return {"fs_size": st.f_blocks * st.f_frsize,
            "fs_free": st.f_bavail * st.f_frsize}


def fs_type(dev: str) -> str | None:
    """The filesystem type on ``dev`` by a low-level probe, None if there is none."""
    try:
        out = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev],
                             capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise AppError("blkid is not installed (util-linux)") from None
    if out.returncode == 2:
        return None
    if out.returncode != 0:
        raise AppError(f"blkid -p {dev} failed (exit {out.returncode}): "
                       f"{out.stderr.strip() or 'ambiguous or unreadable signature'}")
    return out.stdout.strip() or None


def tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


# ------------------------------------------------------------------ detach
def detach(paths: AppPaths, timeout: float = 30) -> list[str]:
    """Take down whatever of the stack exists, top to bottom; what was done, in words.

    Idempotent: with nothing there it does nothing and returns [].
    """
    done: list[str] = []
    # 1. the filesystem (several stacked mounts are possible after odd failures)
    for _ in range(8):
        top = mounts_at(paths.mnt)
        if not top:
            break
        fuse_ok = fuse_alive(paths)
        proc = subprocess.run(["umount", str(paths.mnt)], capture_output=True, text=True)
        if proc.returncode == 0:
            done.append(f"unmounted {paths.mnt}")
            continue
        if fuse_ok:
            raise AppError(f"umount {paths.mnt} failed: {proc.stderr.strip()} (something "
                           f"still uses it: fuser -vm {paths.mnt})")
        # the device under it is dead: nothing can be written back any more
        run(["umount", "-l", str(paths.mnt)])
        done.append(f"lazily unmounted {paths.mnt} (its NBD connection was dead)")
    else:
        raise AppError(f"{paths.mnt} is still mounted after 8 unmounts")
    # 2. every loop device over fuse/nbd (a killed run may have left several)
    if fuse_alive(paths):
        with contextlib.suppress(OSError):  # best effort: umount has flushed already
            fd = os.open(paths.nbd_file, os.O_RDONLY)
            try:
                os.fsync(fd)  # FUSE fsync -> NBD_CMD_FLUSH
            finally:
                os.close(fd)
    for loop in loops_backed_by(paths.nbd_file):
        run(["losetup", "-d", loop])
        done.append(f"detached {loop}")
    # 3. nbdfuse: unmounting it makes it exit
    if mounts_at(paths.fuse):
        proc = subprocess.run(["fusermount3", "-u", str(paths.fuse)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            run(["fusermount3", "-u", "-z", str(paths.fuse)])
            done.append(f"lazily unmounted {paths.fuse} ({proc.stderr.strip()})")
        else:
            done.append(f"unmounted {paths.fuse}")
    pid = read_pid(paths.nbdfuse_pidfile)
    if pid and process_alive(pid, "nbdfuse", str(paths.fuse)):
        if not wait_gone(pid, timeout, "nbdfuse", str(paths.fuse)):
            log.warning("nbdfuse pid %d did not exit after its unmount: terminating it", pid,
                        extra={"resource": paths.resource})
            os.kill(pid, signal.SIGTERM)
            if not wait_gone(pid, 5, "nbdfuse", str(paths.fuse)):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5, "nbdfuse", str(paths.fuse))
        done.append(f"nbdfuse pid {pid} exited")
    paths.nbdfuse_pidfile.unlink(missing_ok=True)
    return done


# ------------------------------------------------------------------ attach
def check_export(paths: AppPaths) -> None:
    try:
        st = os.stat(paths.socket)
    except FileNotFoundError:
        raise Refused(f"no NBD export {paths.socket}: this host is not the primary of "
                      f"{paths.resource}, or marsd is not running here") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused(f"{paths.socket} is not a socket")


def _start_nbdfuse(paths: AppPaths, timeout: float) -> int:
    paths.fuse.mkdir(parents=True, exist_ok=True)
    paths.nbdfuse_pidfile.unlink(missing_ok=True)
    with open(paths.nbdfuse_log, "ab") as logf:
        proc = subprocess.Popen(
            ["nbdfuse", "-P", str(paths.nbdfuse_pidfile), str(paths.fuse), paths.uri],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
            cwd="/")
    deadline = time.monotonic() + timeout
    while True:
        if read_pid(paths.nbdfuse_pidfile) and paths.nbd_file.exists():
            return proc.pid
        if proc.poll() is not None:
            raise AppError(f"nbdfuse {paths.uri} exited with {proc.returncode}: "
                           f"{tail(paths.nbdfuse_log)}")
        if time.monotonic() >= deadline:
            raise TimedOut(f"nbdfuse on {paths.uri} did not come up within {timeout:.0f} s")
        time.sleep(0.02)


def make_fs(dev: str, fs: str) -> None:
    if fs == "ext4":
        # no discard: it would trim the whole export through FUSE for nothing; lazy init:
        # zeroing the journal and inode tables through FUSE and NBD takes seconds (the kernel
        # zeroes the inode tables in the background after the mount)
        run(["mkfs.ext4", "-q", "-F", "-e", "remount-ro",
             "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", dev], "mkfs.ext4")
    elif fs == "xfs":
        run(["mkfs.xfs", "-q", "-f", "-K", dev], "mkfs.xfs")
    else:
        raise AppError(f"unsupported filesystem {fs!r} (use one of {', '.join(FILESYSTEMS)})")


def attach(paths: AppPaths, fs: str = "ext4", mkfs: bool = False, readonly: bool = False,
           timeout: float = 30, grow: bool = False) -> dict[str, Any]:
    """Make the filesystem available at ``mnt``.

    Reuses a healthy stack (``changed`` false; a read-only mount is remounted read-write
    when asked for writing). Otherwise cleans up leftovers and builds it anew. ``mkfs``
    makes a filesystem of type ``fs`` only when the device carries none. ``readonly`` mounts
    with ``-o ro`` (a journal that needs recovery is still replayed, as any mount would).
    ``grow`` makes the filesystem fill the device: ext2/3/4 before mounting, xfs after.
    """
    where = {"resource": paths.resource}
    cur = healthy(paths)
    if cur is not None:
        if cur.readonly and not readonly:
            run(["mount", "-o", "remount,rw", str(paths.mnt)])
            log.info("remounted %s read-write", paths.mnt, extra=where)
            return {"changed": True, "loop": cur.loop, "fs": cur.fstype, "mkfs": False,
                    "cleaned": []}
        return {"changed": False, "loop": cur.loop, "fs": cur.fstype, "mkfs": False,
                "cleaned": []}
    check_export(paths)
    cleaned = detach(paths, timeout)
    if cleaned:
        log.warning("cleaned up leftovers of an earlier run: %s", "; ".join(cleaned),
                    extra=where)
    paths.mnt.mkdir(parents=True, exist_ok=True)
    made = False
    try:
        _start_nbdfuse(paths, timeout)
        loop = run(["losetup", "-f", "--show", str(paths.nbd_file)], "losetup").strip()
        found = fs_type(loop)
        if found is None:
            if not mkfs:
                raise Refused(f"the export of {paths.resource} carries no filesystem: "
                              "start with --mkfs to create one")
            if readonly:
                raise Refused(f"the export of {paths.resource} carries no filesystem")
            make_fs(loop, fs)
            found, made = fs, True
            log.info("made a new %s filesystem on %s (%d bytes)", fs, loop,
                     device_size(loop), extra=where)
        if grow and found in EXT:
            _grow_unmounted(loop, found, where)
        elif grow and found != "xfs":
            raise AppError(f"cannot grow a {found} filesystem (ext4 and xfs can grow)")
        opts = ["-o", "ro"] if readonly else []
        run(["mount", "-t", found, *opts, loop, str(paths.mnt)], f"mount {found} {loop}")
        if grow and found == "xfs":
            run(["xfs_growfs", str(paths.mnt)], "xfs_growfs")
    except (MarsError, OSError):
        with contextlib.suppress(MarsError, OSError):  # keep the first error
            detach(paths, timeout)
        raise
    log.info("attached %s: nbdfuse -> %s -> %s on %s%s", paths.uri, loop, found, paths.mnt,
             " (read-only)" if readonly else "", extra=where)
    return {"changed": True, "loop": loop, "fs": found, "mkfs": made, "cleaned": cleaned}


EXT = ("ext2", "ext3", "ext4")


def fs_capacity(paths: AppPaths, att: Attached) -> int:
    """How much of the device the filesystem spans, in bytes (its own idea, not statvfs)."""
    if att.fstype in EXT:
        out = run(["dumpe2fs", "-h", att.loop], "dumpe2fs -h")
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return int(fields["Block count"]) * int(fields["Block size"])
    if att.fstype == "xfs":
        m = re.search(r"^data\s*=\s*bsize=(\d+)\s+blocks=(\d+)",
                      run(["xfs_info", str(paths.mnt)], "xfs_info"), re.MULTILINE)
        if m is None:
            raise AppError(f"xfs_info {paths.mnt}: no data section in its output")
        return int(m.group(1)) * int(m.group(2))
    raise AppError(f"cannot grow a {att.fstype} filesystem (ext4 and xfs can grow)")


def _grow_unmounted(dev: str, fstype: str, where: dict[str, str]) -> None:
    """ext2/3/4 grow offline: online resizing needs CAP_SYS_RESOURCE, which containers and
    lab namespaces often lack, and the writer is stopped for the re-attach anyway."""
    proc = subprocess.run(["e2fsck", "-f", "-p", dev], capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: errors corrected
        raise AppError(f"e2fsck -f -p {dev} before growing exited {proc.returncode}: "
                       f"{(proc.stdout + proc.stderr).strip()[-500:]}")
    if proc.returncode == 1:
        log.warning("e2fsck corrected errors on %s: %s", dev, proc.stdout.strip()[-300:],
                    extra=where)
    run(["resize2fs", dev], "resize2fs")
