"""Starting, stopping and killing marsd in a lab host (pidfile and log in the host's dir)."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
from pathlib import Path

from marslib.lab.run import ns_prefix, pid_alive, read_pidfile, run, wait_gone
from marslib.lab.state import REPO, venv_bin

log = logging.getLogger("marslib.lab")


def pidfile(host_dir: Path) -> Path:
    return host_dir / "marsd.pid"


def logfile(host_dir: Path) -> Path:
    return host_dir / "log" / "marsd.log"


def command() -> list[str]:
    marsd = venv_bin() / "marsd"
    if marsd.exists():
        return [str(marsd)]
    return [str(venv_bin() / "python"), str(REPO / "bin" / "marsd")]


@functools.cache
def supports_listen() -> bool:
    """Whether this marsd takes ``--listen`` (added while the lab was written)."""
    out = run([*command(), "--help"], check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    return "--listen" in out.stdout


def start(host_dir: Path, netns: str | None, ip: str, env: dict[str, str],
          extra: tuple[str, ...]) -> subprocess.Popen[bytes]:
    """Start marsd in its own session, detached from the caller's terminal."""
    listen = ["--listen", ip] if supports_listen() else []
    cmd = [*ns_prefix(netns), *command(), *listen, *extra]
    logfile(host_dir).parent.mkdir(parents=True, exist_ok=True)
    with open(logfile(host_dir), "ab") as logf:
        logf.write(f"--- mars-lab: {' '.join(cmd)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    pidfile(host_dir).write_text(f"{proc.pid}\n")
    log.info("lab: marsd on %s pid %d", env.get("MARS_HOST"), proc.pid)
    return proc


def running_pid(host_dir: Path) -> int | None:
    pid = read_pidfile(pidfile(host_dir))
    return pid if pid is not None and pid_alive(pid) else None


def signal_marsd(host_dir: Path, sig: int, timeout: float) -> bool:
    """Send ``sig``; wait until marsd is gone. False if it still runs after ``timeout``."""
    pid = running_pid(host_dir)
    if pid is None:
        return True
    os.kill(pid, sig)
    gone = wait_gone([pid], timeout)
    if gone:
        pidfile(host_dir).unlink(missing_ok=True)
    return gone


def stop(host_dir: Path, timeout: float = 30) -> None:
    if not signal_marsd(host_dir, signal.SIGTERM, timeout):
        log.warning("lab: marsd in %s ignored SIGTERM for %.0f s: SIGKILL", host_dir, timeout)
        signal_marsd(host_dir, signal.SIGKILL, 10)


def kill(host_dir: Path) -> None:
    signal_marsd(host_dir, signal.SIGKILL, 10)


def tail(host_dir: Path, lines: int = 40) -> str:
    try:
        text = logfile(host_dir).read_text(errors="replace")
    except FileNotFoundError:
        return "(no marsd log)"
    return "\n".join(text.splitlines()[-lines:])
