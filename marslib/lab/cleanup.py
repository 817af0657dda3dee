"""Tearing a lab down from what exists on the machine, not only from what state.json says.

Order matters: processes first (they hold mounts, loop devices and namespaces), then
mounts under the lab directory (FUSE with ``fusermount3 -u``), loop devices backed by lab
files, namespaces and the bridge, the claim on the net, and finally the directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from marslib.lab import claims, devices, netns
from marslib.lab.addresses import Net
from marslib.lab.run import ancestors, pid_alive, run, terminate
from marslib.lab.state import MARKER

log = logging.getLogger("marslib.lab")


def lab_processes(lab_dir: Path, nets: list[Net]) -> list[int]:
    """Processes in the lab's namespaces or started by the lab (marked in their environment)."""
    pids: set[int] = set()
    for net in nets:
        if not net.local:
            for ns in netns.namespaces(net):
                pids.update(netns.netns_pids(ns))
    marker = f"{MARKER}={lab_dir}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.add(int(entry))
    return sorted(p for p in pids - ancestors() if pid_alive(p))


def mounts_under(lab_dir: Path) -> list[tuple[str, str]]:
    """(mount point, fs type) under ``lab_dir``, deepest first."""
    found = []
    prefix = str(lab_dir).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            fstype = fields[fields.index("-") + 1]
            if point.startswith(prefix) or point == str(lab_dir):
                found.append((point, fstype))
    return sorted(found, key=lambda m: m[0].count("/"), reverse=True)


def unmount_under(lab_dir: Path) -> None:
    for point, fstype in mounts_under(lab_dir):
        if fstype.startswith("fuse") and shutil.which("fusermount3"):
            cmd = ["fusermount3", "-u", "-z", point]
        else:
            cmd = ["umount", "-l", point]
        if run(cmd, check=False).returncode != 0:
            run(["umount", "-l", point], check=False)
        log.info("lab: unmounted %s (%s)", point, fstype)


def teardown(lab_dir: Path, nets: list[Net]) -> list[str]:
    """Remove everything of the lab in ``lab_dir`` on ``nets``; returns what is left, if any."""
    lab_dir = lab_dir.absolute()
    pids = lab_processes(lab_dir, nets)
    if pids:
        log.info("lab: stopping processes %s", pids)
        terminate(pids, timeout=5)
    if os.geteuid() == 0:
        unmount_under(lab_dir)
        devices.detach_under(lab_dir)
        unmount_under(lab_dir)  # a filesystem on a lab loop device
        for net in nets:
            if not net.local:
                netns.destroy(net)
    for net in nets:
        claims.release(net.index, lab_dir)
    left = leftovers(lab_dir, nets)
    if not left and lab_dir.exists():
        shutil.rmtree(lab_dir, ignore_errors=True)
    elif left:
        log.warning("lab: could not remove %s", "; ".join(left))
    return left


def leftovers(lab_dir: Path, nets: list[Net]) -> list[str]:
    """What of this lab still exists (empty after a complete teardown, before the rmtree)."""
    left = [f"process {p}" for p in lab_processes(lab_dir, nets)]
    left += [f"mount {m}" for m, _ in mounts_under(lab_dir)]
    left += [f"loop device {d} on {b}" for d, b in devices.loops_under(lab_dir)]
    for net in nets:
        if not net.local:
            left += [f"netns {n}" for n in netns.namespaces(net)]
            if netns.link_exists(net.bridge):
                left.append(f"bridge {net.bridge}")
    return left
