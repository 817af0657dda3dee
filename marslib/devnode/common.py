"""Names, records and the node symlink shared by both backends."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from marslib.errors import Refused

DEFAULT_DEV_DIR = "/dev/mars"
DEFAULT_RUN_DIR = "/run/mars"
FUSE = "fuse-loop"  # nbdfuse + a buffered loop device
KERNEL = "kernel-nbd"  # nbd-client onto /dev/nbdN


def dev_dir() -> Path:
    """Where the node links live: ``$MARS_DEV_DIR`` or ``/dev/mars``."""
    return Path(os.environ.get("MARS_DEV_DIR") or DEFAULT_DEV_DIR)


def default_run_dir() -> Path:
    return Path(os.environ.get("MARS_RUN_DIR") or DEFAULT_RUN_DIR)


@dataclass(frozen=True)
class NodePaths:
    """The files of one resource's node: its link and what the backends keep in the run
    directory (gone after a reboot, like the devices they describe)."""

    resource: str
    run_dir: Path

    @property
    def node(self) -> Path:
        return dev_dir() / self.resource

    @property
    def state(self) -> Path:
        return self.run_dir / f"{self.resource}.devnode.json"

    @property
    def fuse_dir(self) -> Path:
        return self.run_dir / f"{self.resource}.fuse"

    @property
    def nbd_file(self) -> Path:
        return self.fuse_dir / "nbd"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.resource}.nbdfuse.pid"

    @property
    def client_log(self) -> Path:
        return self.run_dir / f"{self.resource}.devnode.log"


@dataclass(frozen=True)
class NodeInfo:
    """A resource's block device node as found on this host."""

    resource: str
    node: str  # the stable path, /dev/mars/R
    device: str  # what it links to: /dev/loopN or /dev/nbdN
    backend: str  # FUSE or KERNEL
    socket: str  # the NBD export it reaches
    client_pid: int | None = None  # nbdfuse or nbd-client
    connections: int = 0  # NBD connections it holds: each counts in open-count
    healthy: bool = True
    problem: str | None = None  # why it is not healthy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class State:
    """What attach recorded (``R.devnode.json``): enough to tell a node from a stale one."""

    backend: str
    device: str
    socket: str
    socket_id: str  # the export's socket when attached (inode:ctime): a restarted export
    # has a new one
    client_pid: int
    connections: int  # NBD connections the client holds (each counts in open-count)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self)) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> State | None:
        try:
            raw = json.loads(path.read_text())
            return cls(str(raw["backend"]), str(raw["device"]), str(raw["socket"]),
                       str(raw["socket_id"]), int(raw["client_pid"]), int(raw["connections"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def socket_id(sock: Path) -> str:
    """Who the export's socket is (``INODE:CTIME_NS``; a new socket at the same path gets
    another ctime even where the filesystem reuses the inode); Refused if there is none."""
    try:
        st = os.stat(sock)
    except FileNotFoundError:
        raise Refused(f"no NBD export at {sock}: the resource is not running as primary "
                      "on this host") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused(f"{sock} is not a socket")
    return f"{st.st_ino}:{st.st_ctime_ns}"


def link_target(node: Path) -> str | None:
    try:
        return os.readlink(node)
    except OSError:
        return None


def set_link(node: Path, device: str) -> None:
    """Point ``node`` at ``device`` atomically (a reader never sees it missing)."""
    node.parent.mkdir(parents=True, exist_ok=True)
    tmp = node.with_name(f".{node.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(device, tmp)
    os.replace(tmp, node)


def remove_link(node: Path, device: str | None) -> bool:
    """Remove ``node`` if it is a link (to ``device`` when given); True if removed."""
    target = link_target(node)
    if target is None or (device is not None and target != device):
        return False
    node.unlink(missing_ok=True)
    return True
