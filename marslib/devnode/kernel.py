"""The node where the kernel has ``nbd``: ``nbd-client`` on the export's unix socket.

Not run on the test machines (their kernel has no ``nbd``); the choice and the command
lines are tested. ``nbd-client -unix SOCK /dev/nbdN -name R -block-size 4096 -persist
-nonetlink``: the ioctl interface (``-nonetlink``) keeps nbd-client running next to the
device, and ``-persist`` makes it reconnect when the connection drops, which is what a
restarting marsd does to it: requests wait and go on on the new export. ``nbd-client -c
DEV`` tells whether a device is connected (and by which pid), ``nbd-client -d DEV``
disconnects it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from marslib.devnode import system
from marslib.devnode.common import KERNEL, NodePaths, State, socket_id
from marslib.errors import Refused, TimedOut

SYS_MODULE_NBD = Path("/sys/module/nbd")
BLOCK_SIZE = 4096

Runner = Callable[[list[str], Path], int]  # (command, log file) -> exit code


def available(sys_module_nbd: Path = SYS_MODULE_NBD) -> bool:
    """The kernel has the ``nbd`` driver (built in or loaded)."""
    return sys_module_nbd.is_dir()


def connect_command(resource: str, sock: Path, device: str) -> list[str]:
    return ["nbd-client", "-unix", str(sock), device, "-name", resource,
            "-block-size", str(BLOCK_SIZE), "-persist", "-nonetlink"]


def check_command(device: str) -> list[str]:
    return ["nbd-client", "-c", device]


def disconnect_command(device: str) -> list[str]:
    return ["nbd-client", "-d", device]


def connected_pid(device: str, sys_block: Path = system.SYS_BLOCK) -> int:
    """The pid of the nbd-client serving ``device`` (``/sys/block/nbdN/pid``), 0 if none."""
    return system.read_pid(sys_block / Path(device).name / "pid")


def free_device(sys_block: Path = system.SYS_BLOCK) -> str:
    """The first ``/dev/nbdN`` that is not connected."""
    devs = sorted((p for p in sys_block.glob("nbd*") if p.name[3:].isdigit()),
                  key=lambda p: int(p.name[3:]))
    for dev in devs:
        if not (dev / "pid").exists():
            return f"/dev/{dev.name}"
    raise Refused(f"no free /dev/nbdN ({len(devs)} in use): load the nbd module with more "
                  "devices (modprobe nbd nbds_max=N)")


def run_logged(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` in a session of its own with output to ``log_path`` (nbd-client forks
    a child that stays; it must not hold a pipe of ours)."""
    with open(log_path, "ab") as logf:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                              start_new_session=True, timeout=120).returncode


def problem(state: State, sys_block: Path = system.SYS_BLOCK) -> str | None:
    pid = connected_pid(state.device, sys_block)
    if not pid:
        return f"{state.device} is not connected"
    if not system.process_alive(pid, "nbd-client"):
        return f"nbd-client (pid {pid}) of {state.device} is not running"
    return None


def build(paths: NodePaths, sock: Path, timeout: float, runner: Runner = run_logged,
          sys_block: Path = system.SYS_BLOCK) -> State:
    ident = socket_id(sock)
    device = free_device(sys_block)
    cmd = connect_command(paths.resource, sock, device)
    rc = runner(cmd, paths.client_log)
    if rc != 0:
        raise system.CommandFailed(f"{' '.join(cmd)} failed (exit {rc}); see "
                                   f"{paths.client_log}")
    deadline = time.monotonic() + timeout
    while not connected_pid(device, sys_block):
        if time.monotonic() >= deadline:
            raise TimedOut(f"{device} was not connected within {timeout:.0f} s")
        time.sleep(0.05)
    return State(KERNEL, device, str(sock), ident, connected_pid(device, sys_block), 1)


def teardown(state: State | None, runner: Runner = run_logged,
             log_path: Path = Path(os.devnull)) -> list[str]:
    if state is None or state.backend != KERNEL:
        return []
    if not connected_pid(state.device):
        return []
    rc = runner(disconnect_command(state.device), log_path)
    if rc != 0:
        raise system.CommandFailed(f"nbd-client -d {state.device} failed (exit {rc})")
    return [f"disconnected {state.device}"]
