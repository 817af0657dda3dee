"""The lab directory: its layout, ``state.json`` and the lock around changes to it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from marslib.lab.addresses import Net
from marslib.lab.errors import LabError

DEFAULT_LAB_DIR = Path("/var/tmp/mars-lab")
REPO = Path(__file__).resolve().parent.parent.parent
MARKER = "MARS_LAB_OWNER"  # set on every process the lab starts, to find them again
LAB_MARK = ".mars-lab"  # a file in every lab directory: only such a directory is removed


def default_lab_dir() -> Path:
    return Path(os.environ.get("MARS_LAB_DIR") or DEFAULT_LAB_DIR).absolute()


def venv_bin() -> Path:
    """The venv whose marsd/marsadm/python the lab hosts run."""
    venv = REPO / ".venv" / "bin"
    if (venv / "python").exists():
        return venv
    return Path(os.path.realpath(sys.executable)).parent


@dataclass
class LinkProfile:
    """What ``shape HOST`` set on the host's link; strings as the user gave them."""

    rate: str | None = None
    delay: str | None = None
    loss: str | None = None
    storm: str | None = None
    since: float = 0.0  # wall clock when set: storms are phased from here

    def empty(self) -> bool:
        return not (self.rate or self.delay or self.loss or self.storm)


@dataclass
class HostState:
    name: str
    index: int
    ip: str
    netns: str | None
    devices: list[str]
    images: list[str]


@dataclass
class LabState:
    lab_dir: str
    net: int
    mode: str  # "netns" (root: namespaces, sshd, shaping) or "local" (processes on 127.0.x.y)
    far: bool
    hosts: list[HostState]
    shapes: dict[str, LinkProfile] = field(default_factory=dict)
    partitions: list[list[str]] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    @property
    def local(self) -> bool:
        return self.mode == "local"

    @property
    def netobj(self) -> Net:
        return Net(self.net, local=self.local)

    def save(self) -> None:
        path = Path(self.lab_dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, lab_dir: Path) -> LabState:
        path = lab_dir / "state.json"
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {lab_dir} (no state.json): run `mars-lab up` "
                           "(or set MARS_LAB_DIR to the lab's directory)") from None
        except ValueError as exc:
            raise LabError(f"{path} is damaged ({exc}): run `mars-lab down` and `up`") from None
        raw["hosts"] = [HostState(**h) for h in raw.get("hosts", [])]
        raw["shapes"] = {k: LinkProfile(**v) for k, v in raw.get("shapes", {}).items()}
        return cls(**raw)


def host_dir(lab_dir: Path, name: str) -> Path:
    return lab_dir / "hosts" / name


@contextlib.contextmanager
def locked(lab_dir: Path) -> Iterator[None]:
    """Serialise changes to one lab (CLI calls and test processes may overlap)."""
    if not lab_dir.is_dir():
        raise LabError(f"no lab in {lab_dir}: run `mars-lab up`")
    with open(lab_dir / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
