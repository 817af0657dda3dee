"""Running commands in the root namespace or a lab host's namespace; process checks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence

from marslib.lab.errors import LabCommandError

log = logging.getLogger("marslib.lab")


def ns_prefix(netns: str | None) -> list[str]:
    """The argv prefix that runs a command inside ``netns`` (nothing for local hosts).

    ``nsenter --net`` only switches the network namespace: mounts (nbdfuse, loop devices)
    stay visible to the whole machine, unlike ``ip netns exec``.
    """
    return ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60,
        env: dict[str, str] | None = None, input: str | None = None,
        quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` capturing its output; raise LabCommandError if ``check`` and it fails."""
    argv = list(cmd)
    if not quiet:
        log.debug("lab: run %s", " ".join(argv))
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                             input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise LabCommandError(argv, 127, "", f"{exc}: install it (scripts/bootstrap.sh)") from None
    except subprocess.TimeoutExpired as exc:
        raise LabCommandError(argv, -1, _text(exc.stdout), _text(exc.stderr),
                              f"timed out after {timeout} s") from None
    if check and out.returncode != 0:
        raise LabCommandError(argv, out.returncode, out.stdout, out.stderr)
    return out


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (PID 1 here does not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def read_pidfile(path: os.PathLike[str] | str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def terminate(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL what is left and wait for it to die."""
    alive = [p for p in pids if pid_alive(p)]
    if not alive:
        return
    signal_pids(alive, signal.SIGTERM)
    if not wait_gone(alive, timeout):
        signal_pids(alive, signal.SIGKILL)
        wait_gone(alive, 5.0)


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def ancestors() -> set[int]:
    """This process and its ancestors: never killed by a cleanup."""
    pids = set()
    pid = os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids
