"""Names and paths under the host's state root (``/mars``) and run directory."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from marslib.errors import UsageError

RESOURCE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LOGFILE_NAME = re.compile(r"log-(\d{9})-(" + HOST_NAME.pattern + r")")

DEFAULT_ROOT = "/mars"
DEFAULT_RUN_DIR = "/run/mars"


def check_resource_name(name: str) -> str:
    if not RESOURCE_NAME.fullmatch(name):
        raise UsageError(
            f"invalid resource name {name!r}: use 1-64 characters of a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return name


def check_host_name(name: str) -> str:
    if not HOST_NAME.fullmatch(name):
        raise UsageError(f"invalid host name {name!r}")
    return name


def logfile_name(number: int, host: str) -> str:
    """``log-NNNNNNNNN-HOST``: the logfile ``number`` written by ``host``."""
    return f"log-{number:09d}-{host}"


def parse_logfile_name(name: str) -> tuple[int, str] | None:
    m = LOGFILE_NAME.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


@dataclass(frozen=True)
class MarsPaths:
    """Where a host keeps its state; ``MARS_ROOT``/``MARS_RUN_DIR`` override the defaults."""

    root: Path
    run_dir: Path

    @classmethod
    def from_env(cls, root: str | None = None, run_dir: str | None = None) -> MarsPaths:
        return cls(
            Path(root or os.environ.get("MARS_ROOT") or DEFAULT_ROOT),
            Path(run_dir or os.environ.get("MARS_RUN_DIR") or DEFAULT_RUN_DIR),
        )

    @property
    def secret(self) -> Path:
        return self.root / "secret"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "marsd.sock"

    def resource_dir(self, resource: str) -> Path:
        return self.root / f"resource-{resource}"

    def nbd_socket(self, resource: str) -> Path:
        return self.run_dir / f"{resource}.nbd"

    def resync_blocks(self, resource: str) -> Path:
        """The block set a log-based resync of ``resource`` compares (saved before its
        first window, deleted at its end). Not ``resync-...``: that would be the tree key
        ``resync-HOST`` of a host named ``blocks``."""
        return self.resource_dir(resource) / "resync.blocks"

    def logfile(self, resource: str, number: int, host: str) -> Path:
        return self.resource_dir(resource) / logfile_name(number, host)

    def logfiles(self, resource: str) -> list[tuple[int, str, Path]]:
        """All logfiles of ``resource`` on this host, oldest first."""
        found = []
        rdir = self.resource_dir(resource)
        if not rdir.is_dir():
            return []
        for entry in os.scandir(rdir):
            parsed = parse_logfile_name(entry.name)
            if parsed and entry.is_file(follow_symlinks=False):
                found.append((parsed[0], parsed[1], Path(entry.path)))
        found.sort()
        return found

    def resources(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for entry in os.scandir(self.root):
            if entry.name.startswith("resource-") and entry.is_dir(follow_symlinks=False):
                names.append(entry.name[len("resource-") :])
        return sorted(names)
