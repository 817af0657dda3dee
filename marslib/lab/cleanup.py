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
from marslib.lab.state import LAB_MARK, MARKER

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


def unmount_under(lab_dir: Path, fuse: bool | None = None) -> None:
    """Lazily unmount what is mounted under ``lab_dir`` (only FUSE / only other if ``fuse``)."""
    for point, fstype in mounts_under(lab_dir):
        if fuse is not None and fstype.startswith("fuse") != fuse:
            continue
        if fstype.startswith("fuse") and shutil.which("fusermount3"):
            cmd = ["fusermount3", "-u", "-z", point]
        else:
            cmd = ["umount", "-l", point]
        if run(cmd, check=False).returncode != 0:
            run(["umount", "-l", point], check=False)
        log.info("lab: unmounted %s (%s)", point, fstype)


def is_lab_dir(path: Path) -> bool:
    """Only a directory the lab made (it holds LAB_MARK) has its mounts, loop devices and
    files removed: ``MARS_LAB_DIR=/tmp mars-lab down`` must not detach other people's loops."""
    return (path / LAB_MARK).exists()


def teardown(lab_dir: Path, nets: list[Net]) -> list[str]:
    """Remove everything of the lab in ``lab_dir`` on ``nets``; returns what is left, if any."""
    lab_dir = lab_dir.absolute()
    owned = is_lab_dir(lab_dir)
    root = os.geteuid() == 0
    if root and owned:
        # loop devices first, while their backing files still show under lab_dir (a file
        # on an nbdfuse mount loses its path once the FUSE daemon is gone)
        unmount_under(lab_dir, fuse=False)
        devices.detach_under(lab_dir)
        unmount_under(lab_dir, fuse=True)
    pids = lab_processes(lab_dir, nets)
    if pids:
        log.info("lab: stopping processes %s", pids)
        terminate(pids, timeout=5)
    if root and owned:
        unmount_under(lab_dir)
        devices.detach_under(lab_dir)
    if root:
        for net in nets:
            if not net.local:
                netns.destroy(net)
    for net in nets:
        claims.release(net.index, lab_dir)
    left = leftovers(lab_dir, nets)
    if lab_dir.exists() and not owned:
        left.append(f"{lab_dir} is not a lab directory (no {LAB_MARK}): left alone")
    if not left and lab_dir.exists():
        shutil.rmtree(lab_dir, ignore_errors=True)
    elif left:
        log.warning("lab: could not remove %s", "; ".join(left))
    return left


def teardown_net(net: Net) -> list[str]:
    """Stop what runs in ``net``'s namespaces and delete them, the veths and the bridge
    (a crashed lab nobody claims any more); returns what is left."""
    pids = [p for ns in netns.namespaces(net) for p in netns.netns_pids(ns)]
    terminate([p for p in pids if p not in ancestors()], timeout=5)
    netns.destroy(net)
    left = [f"netns {n}" for n in netns.namespaces(net)]
    return left + ([f"bridge {net.bridge}"] if netns.link_exists(net.bridge) else [])


def leftovers(lab_dir: Path, nets: list[Net]) -> list[str]:
    """What of this lab still exists (empty after a complete teardown, before the rmtree)."""
    left = [f"process {p}" for p in lab_processes(lab_dir, nets)]
    if is_lab_dir(lab_dir):
        left += [f"mount {m}" for m, _ in mounts_under(lab_dir)]
        left += [f"loop device {d} on {b}" for d, b in devices.loops_under(lab_dir)]
    for net in nets:
        if not net.local:
            left += [f"netns {n}" for n in netns.namespaces(net)]
            if netns.link_exists(net.bridge):
                left.append(f"bridge {net.bridge}")
    return left
