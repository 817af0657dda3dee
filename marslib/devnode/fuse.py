"""The node where the kernel has no ``nbd``: nbdfuse, a buffered loop device over its file.

``nbdfuse RUN/R.fuse URI`` serves the export as one file, ``RUN/R.fuse/nbd``; ``losetup
-f --show`` on it (buffered: O_DIRECT through FUSE fails) gives ``/dev/loopN``. nbdfuse
runs in a session of its own, so it outlives the command that started it; it holds one
NBD connection for as long as it runs and does not reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from marslib.devnode import system
from marslib.devnode.common import FUSE, NodePaths, State, socket_id
from marslib.errors import MarsError, TimedOut

log = logging.getLogger("marslib.devnode")


def nbd_uri(resource: str, sock: Path) -> str:
    return f"nbd+unix:///{resource}?socket={sock}"


CONNECTIONS = 4  # nbdfuse's default where the server allows multi-conn, as marslib's does


def nbdfuse_command(paths: NodePaths, sock: Path) -> list[str]:
    return ["nbdfuse", "-C", str(CONNECTIONS), "-P", str(paths.pidfile), str(paths.fuse_dir),
            nbd_uri(paths.resource, sock)]


def fuse_alive(paths: NodePaths) -> bool:
    """nbdfuse is mounted on ``R.fuse`` and its file answers ``stat``."""
    return system.fuse_answers(paths.fuse_dir, paths.nbd_file)


def problem(paths: NodePaths, state: State, sock: Path) -> str | None:
    """Why the node described by ``state`` does not work, None if it does."""
    if not system.process_alive(state.client_pid, "nbdfuse", str(paths.fuse_dir)):
        return f"nbdfuse (pid {state.client_pid}) is not running"
    if not fuse_alive(paths):
        return f"the FUSE mount {paths.fuse_dir} is gone or dead"
    if system.loop_backing(state.device) != os.path.realpath(paths.nbd_file):
        return f"{state.device} is no longer a loop device over {paths.nbd_file}"
    try:
        ident = socket_id(sock)
    except MarsError:
        return f"the NBD export {sock} is gone"
    if ident != state.socket_id:
        return "the NBD export was restarted: nbdfuse's connection to it is gone"
    if not system.unix_listening(sock):
        return f"nothing serves the NBD export {sock} (marsd stopped?)"
    return None


def devices(paths: NodePaths) -> list[str]:
    """Every loop device over this resource's nbdfuse file (a crash may leave several)."""
    return system.loops_backed_by(paths.nbd_file)


def build(paths: NodePaths, sock: Path, timeout: float) -> State:
    """Start nbdfuse and a loop device over its file; the caller links the node."""
    ident = socket_id(sock)
    paths.fuse_dir.mkdir(parents=True, exist_ok=True)
    paths.pidfile.unlink(missing_ok=True)
    with open(paths.client_log, "ab") as logf:
        proc = subprocess.Popen(nbdfuse_command(paths, sock), stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, start_new_session=True, cwd="/")
    deadline = time.monotonic() + timeout
    while not (system.read_pid(paths.pidfile) and paths.nbd_file.exists()):
        if proc.poll() is not None:
            raise system.CommandFailed(
                f"nbdfuse for {paths.resource} exited with {proc.returncode}: "
                f"{_tail(paths.client_log)}")
        if time.monotonic() >= deadline:
            proc.kill()
            raise TimedOut(f"nbdfuse for {paths.resource} did not come up within "
                           f"{timeout:.0f} s")
        time.sleep(0.02)
    loop = system.run(["losetup", "-f", "--show", str(paths.nbd_file)]).strip()
    return State(FUSE, loop, str(sock), ident, system.read_pid(paths.pidfile) or proc.pid,
                 CONNECTIONS)


def teardown(paths: NodePaths, timeout: float) -> list[str]:
    """Remove loop devices, FUSE mount and nbdfuse of this resource; what was done."""
    done: list[str] = []
    if fuse_alive(paths):
        with contextlib.suppress(OSError):  # FUSE fsync -> NBD_CMD_FLUSH; best effort
            fd = os.open(paths.nbd_file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for loop in devices(paths):
        system.run(["losetup", "-d", loop])
        done.append(f"detached {loop}")
    for _ in range(4):
        if not system.mounts_at(paths.fuse_dir):
            break
        proc = subprocess.run(["fusermount3", "-u", str(paths.fuse_dir)],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            done.append(f"unmounted {paths.fuse_dir}")
        else:
            system.run(["fusermount3", "-u", "-z", str(paths.fuse_dir)])
            done.append(f"lazily unmounted {paths.fuse_dir} ({proc.stderr.strip()})")
    pid = system.read_pid(paths.pidfile)
    needles = ("nbdfuse", str(paths.fuse_dir))
    if pid and system.process_alive(pid, *needles):
        if not system.wait_gone(pid, timeout, *needles):
            log.warning("nbdfuse pid %d did not exit after its unmount: terminating it", pid,
                        extra={"resource": paths.resource})
            os.kill(pid, signal.SIGTERM)
            if not system.wait_gone(pid, 5, *needles):
                os.kill(pid, signal.SIGKILL)
                system.wait_gone(pid, 5, *needles)
        done.append(f"nbdfuse pid {pid} exited")
    paths.pidfile.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        paths.fuse_dir.rmdir()
    return done


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
