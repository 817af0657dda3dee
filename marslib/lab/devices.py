"""Data devices of lab hosts: sparse backing files with direct-I/O loop devices on them."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from marslib.lab.errors import LabCommandError
from marslib.lab.run import run

log = logging.getLogger("marslib.lab")


def create_images(dev_dir: Path, count: int, size: int) -> list[Path]:
    dev_dir.mkdir(parents=True, exist_ok=True)
    if _fstype(dev_dir) == "tmpfs":
        log.warning("lab: %s is on tmpfs: loop devices will not get direct I/O; set "
                    "MARS_LAB_DIR to a directory on a disk filesystem", dev_dir)
    images = []
    for j in range(count):
        image = dev_dir / f"disk{j}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        images.append(image)
    return images


def attach(image: Path) -> str:
    """A loop device with direct I/O over ``image``; returns /dev/loopN."""
    out = run(["losetup", "--direct-io=on", "-f", "--show", str(image)])
    dev = out.stdout.strip()
    log.info("lab: %s on %s", dev, image)
    return dev


def can_attach() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None


def loops_under(lab_dir: Path) -> list[tuple[str, str]]:
    """(device, backing file) of every loop device whose backing file is under ``lab_dir``."""
    if not shutil.which("losetup"):
        return []
    out = run(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"], check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    found = []
    prefix = str(lab_dir).rstrip("/") + "/"
    for dev in json.loads(out.stdout).get("loopdevices", []):
        back = (dev.get("back-file") or "").removesuffix(" (deleted)")
        if back.startswith(prefix):
            found.append((dev["name"], back))
    return found


def detach_under(lab_dir: Path) -> None:
    for dev, back in loops_under(lab_dir):
        try:
            run(["losetup", "-d", dev])
            log.info("lab: detached %s (%s)", dev, back)
        except LabCommandError as exc:
            log.warning("lab: cannot detach %s (%s): %s", dev, back, exc)


def _fstype(path: Path) -> str:
    out = run(["stat", "-f", "-c", "%T", str(path)], check=False, quiet=True)
    return out.stdout.strip()
