"""What the host shows about mounts, loop devices, processes and open files.

Plain reads of ``/proc`` and ``/sys`` and one way to run a command; no policy. The demo
application (:mod:`marslib.app.volume`) has copies of the first few of these.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from marslib.errors import MarsError

SYS_BLOCK = Path("/sys/block")


class CommandFailed(MarsError):
    """A helper program failed; the message has the command, its exit code and stderr."""


def run(cmd: list[str], timeout: float = 120) -> str:
    """Run ``cmd``; its stdout, or CommandFailed with its stderr."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise CommandFailed(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from None
    if out.returncode != 0:
        msg = out.stderr.strip() or out.stdout.strip() or "no message"
        raise CommandFailed(f"{' '.join(cmd)} failed (exit {out.returncode}): {msg}")
    return out.stdout


def _unescape(field: str) -> str:
    """Mount table fields escape space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    target: str
    source: str
    fstype: str
    devno: str  # "MAJOR:MINOR" of the mounted device
    options: tuple[str, ...] = ()  # the mount's own options (rw/ro, ...)

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def mounts() -> list[Mount]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) < 6 or len(rf) < 2:
                continue
            out.append(Mount(_unescape(lf[4]), _unescape(rf[1]), rf[0], lf[2],
                             tuple(lf[5].split(","))))
    return out


def mounts_at(path: Path) -> list[Mount]:
    """Every mount on ``path``, bottom first (the last one is what is visible)."""
    target = os.path.realpath(path)
    return [m for m in mounts() if m.target == target]


def fuse_answers(fuse_dir: Path, file: Path) -> bool:
    """A FUSE filesystem is mounted on ``fuse_dir`` and its ``file`` answers ``stat``."""
    top = mounts_at(fuse_dir)
    if not top or not top[-1].fstype.startswith("fuse"):
        return False
    try:
        os.stat(file)
    except OSError:
        return False
    return True


def devno(dev: str) -> str | None:
    """``MAJOR:MINOR`` of block device ``dev`` (symlinks followed), None if it is none."""
    try:
        st = os.stat(dev)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def loop_backing(dev: str, sys_block: Path = SYS_BLOCK) -> str | None:
    """The backing file of loop device ``dev`` (without a " (deleted)" suffix)."""
    try:
        text = (sys_block / Path(dev).name / "loop" / "backing_file").read_text().strip()
    except OSError:  # no loop, or not bound
        return None
    return text.removesuffix(" (deleted)")


def loops_backed_by(path: Path, sys_block: Path = SYS_BLOCK) -> list[str]:
    """Loop devices whose backing file is ``path`` (also when it is gone or stale)."""
    want = os.path.realpath(path)
    return [f"/dev/{dev.name}" for dev in sorted(sys_block.glob("loop*"))
            if loop_backing(dev.name, sys_block) == want]


def holders(dev: str, sys_block: Path = SYS_BLOCK) -> list[str]:
    """Block devices stacked on ``dev`` (device-mapper, md, ...)."""
    try:
        return sorted(p.name for p in (sys_block / Path(dev).name / "holders").iterdir())
    except OSError:
        return []


def openers(paths: tuple[str, ...], devnum: str | None) -> list[tuple[int, str]]:
    """Processes (pid, command name) with one of ``paths`` or device ``devnum`` open."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            hit = False
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target in paths:
                    hit = True
                    break
                if devnum is not None and target.startswith("/dev/"):
                    if devno(target) == devnum:
                        hit = True
                        break
            fds.close()
            if hit:
                with open(f"/proc/{entry.name}/comm") as f:
                    found.append((int(entry.name), f.read().strip()))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def unix_listening(path: Path) -> bool:
    """A server listens on the unix socket ``path`` (``/proc/net/unix``: no connection
    is made, so a server sees nothing)."""
    want = str(path)
    with open("/proc/net/unix") as f:
        next(f, None)  # header
        for line in f:
            parts = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000: listening
            if len(parts) >= 8 and parts[7] == want and int(parts[3], 16) & 0x10000:
                return True
    return False


def process_alive(pid: int, *needles: str) -> bool:
    """``pid`` runs (not a zombie) and its command line contains every needle."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = st[st.rfind(b")") + 2:st.rfind(b")") + 3]
    if state in (b"Z", b"X"):
        return False
    return all(n in cmdline for n in needles)


def wait_gone(pid: int, timeout: float, *needles: str) -> bool:
    """Wait until ``pid`` has ended; False if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while process_alive(pid, *needles):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
