"""One sshd per lab host (inside its namespace) and the lab's key pair."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from marslib.lab.errors import LabError
from marslib.lab.run import ns_prefix, pid_alive, read_pidfile, run, terminate

log = logging.getLogger("marslib.lab")

SSHD = "/usr/sbin/sshd"


def ensure_key(lab_dir: Path) -> Path:
    """The lab's ssh key pair (``id_ed25519``) and the authorized_keys every host accepts."""
    key = lab_dir / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mars-lab", "-f", str(key)])
    (lab_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    return key


def available() -> bool:
    return os.path.exists(SSHD)


def start(sshd_dir: Path, netns: str, ip: str, lab_dir: Path, env: dict[str, str]) -> int:
    """Configure and start sshd on ``ip``:22 in ``netns``; returns its pid once it answers.

    ``env`` is set for every session (``SetEnv``), so ``ssh labN marsadm view`` acts on labN.
    """
    sshd_dir.mkdir(parents=True, exist_ok=True)
    hostkey = sshd_dir / "ssh_host_ed25519_key"
    if not hostkey.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)])
    pidfile = sshd_dir / "sshd.pid"
    setenv = " ".join(f'"{k}={v}"' for k, v in sorted(env.items()))
    config = sshd_dir / "sshd_config"
    config.write_text(
        f"# mars-lab sshd for {ip} in {netns}\n"
        f"ListenAddress {ip}:22\n"
        f"HostKey {hostkey}\n"
        f"PidFile {pidfile}\n"
        f"AuthorizedKeysFile {lab_dir / 'authorized_keys'}\n"
        "UsePAM no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "StrictModes no\n"
        "PrintMotd no\n"
        "UseDNS no\n"
        "MaxStartups 100:30:200\n"
        "MaxSessions 50\n"
        "Subsystem sftp internal-sftp\n"
        f"SetEnv {setenv}\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    pidfile.unlink(missing_ok=True)
    run([*ns_prefix(netns), SSHD, "-f", str(config), "-E", str(sshd_dir / "sshd.log")],
        env={**os.environ, **env})
    deadline = time.monotonic() + 15
    while True:
        pid = read_pidfile(pidfile)
        if pid and _answers(ip):
            log.info("lab: sshd %s:22 pid %d", ip, pid)
            return pid
        if time.monotonic() > deadline:
            raise LabError(f"sshd on {ip} in {netns} did not come up; see {sshd_dir}/sshd.log")
        time.sleep(0.02)


def _answers(ip: str) -> bool:
    try:
        with socket.create_connection((ip, 22), timeout=1) as s:
            return s.recv(4).startswith(b"SSH")
    except OSError:
        return False


def stop(sshd_dir: Path) -> None:
    pid = read_pidfile(sshd_dir / "sshd.pid")
    if pid and pid_alive(pid):
        terminate([pid])


def ssh_argv(ssh_config: Path, host: str, *cmd: str) -> list[str]:
    return ["ssh", "-F", str(ssh_config), host, *cmd]


def ssh(ssh_config: Path, host: str, *cmd: str,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(ssh_argv(ssh_config, host, *cmd), check=False, timeout=timeout)
