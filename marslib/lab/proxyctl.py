"""Running the WAN proxy (wanproxy.py) in a lab host and steering its TCP traffic into it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from marslib.lab import firewall
from marslib.lab.errors import LabError
from marslib.lab.run import ns_prefix, pid_alive, read_pidfile, run
from marslib.lab.state import MARKER, REPO, venv_bin

log = logging.getLogger("marslib.lab")

PROXY_PORT = 17778
MARK = 0x4D4C  # "ML": the proxy's own connections carry it and skip the REDIRECT
MARS_PORTS = "7777:7779"


def _files(host_dir: Path) -> tuple[Path, Path, Path]:
    return host_dir / "wanproxy.json", host_dir / "wanproxy.pid", host_dir / "log" / "wanproxy.log"


def current_paths(host_dir: Path) -> dict[str, Any]:
    try:
        paths: dict[str, Any] = json.loads(_files(host_dir)[0].read_text()).get("paths", {})
        return paths
    except (OSError, ValueError):
        return {}


def configure(host_dir: Path, netns: str, lab_dir: Path, paths: dict[str, Any]) -> None:
    """Make the proxy in ``netns`` relay to each peer IP in ``paths`` with its delay/storms.

    Connections already open to a peer that was direct until now are reset (``ss -K``) so
    that the peer's daemons reconnect through the proxy: otherwise a long-lived replication
    connection would never see the new delay.
    """
    config, pidfile, logfile = _files(host_dir)
    old = current_paths(host_dir)
    tmp = config.with_suffix(".tmp")
    tmp.write_text(json.dumps({"paths": paths}, indent=1) + "\n")
    os.replace(tmp, config)
    pid = read_pidfile(pidfile)
    running = pid is not None and pid_alive(pid)
    if paths and not running:
        pid = _start(config, pidfile, logfile, netns, lab_dir)
    elif running and pid is not None:
        os.kill(pid, signal.SIGHUP)  # re-reads the config, also for open connections
    rules = [["-p", "tcp", "-d", ip, "--dport", MARS_PORTS, "-m", "mark", "!", "--mark",
              hex(MARK), "-j", "REDIRECT", "--to-ports", str(PROXY_PORT)] for ip in sorted(paths)]
    firewall.set_rules(netns, firewall.WAN, rules)
    for ip in sorted(set(paths) - set(old)):
        run([*ns_prefix(netns), "ss", "-K", "-tn", "dst", ip, "dport", ">=", ":7777",
             "dport", "<=", ":7779"], check=False)


def _start(config: Path, pidfile: Path, logfile: Path, netns: str, lab_dir: Path) -> int:
    ready = config.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, MARKER: str(lab_dir), "PYTHONPATH": str(REPO)}
    cmd = [*ns_prefix(netns), str(venv_bin() / "python"), "-m", "marslib.lab.wanproxy",
           "--config", str(config), "--port", str(PROXY_PORT), "--mark", hex(MARK),
           "--ready", str(ready)]
    with open(logfile, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                env=env, start_new_session=True)
    pidfile.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 15
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise LabError(f"WAN proxy in {netns} did not start:\n{tail}")
        time.sleep(0.02)
    log.info("lab: WAN proxy in %s pid %d", netns, proc.pid)
    return proc.pid
