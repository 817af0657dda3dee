"""Which lab directory owns which lab net, so that two labs never share names or addresses.

A claim is a file ``net-K`` holding the owning lab directory, under /run/mars-lab (gone
after a reboot, like the namespaces it stands for).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from marslib.lab.addresses import MAX_NET


def claims_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/mars-lab")
    return Path(f"/tmp/mars-lab-claims-{os.geteuid()}")


def owner(net: int) -> Path | None:
    try:
        return Path((claims_dir() / f"net-{net}").read_text().strip())
    except OSError:
        return None


def claim(net: int, lab_dir: Path) -> None:
    """Record ``lab_dir`` as the owner of ``net`` (the caller cleaned up any old owner)."""
    claims_dir().mkdir(parents=True, exist_ok=True)
    path = claims_dir() / f"net-{net}"
    tmp = path.with_suffix(f".{os.getpid()}")
    tmp.write_text(f"{lab_dir}\n")
    os.replace(tmp, path)


def claim_free(lab_dir: Path, in_use: set[int]) -> int:
    """Claim the lowest net >= 1 that no live lab owns (``lab_dir``'s own claim is reused).

    ``in_use`` holds nets with a bridge or namespaces on this machine: those without a
    claim belong to something we do not know and are skipped.
    """
    claims_dir().mkdir(parents=True, exist_ok=True)
    with open(claims_dir() / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for net in range(1, MAX_NET + 1):
            current = owner(net)
            if current == lab_dir:
                return net
            if current is not None and current.is_dir():
                continue  # a live lab (or one being set up: its directory comes first)
            if current is None and net in in_use:
                continue
            claim(net, lab_dir)  # free, or the claim of a lab whose directory is gone
            return net
    raise RuntimeError("no free lab net: run `mars-lab down` on old labs")


def release(net: int, lab_dir: Path) -> None:
    if owner(net) == lab_dir:
        with contextlib.suppress(FileNotFoundError):
            (claims_dir() / f"net-{net}").unlink()


def owned_by(lab_dir: Path) -> list[int]:
    nets = []
    with contextlib.suppress(FileNotFoundError):
        for path in claims_dir().glob("net-*"):
            with contextlib.suppress(ValueError):
                if owner(int(path.name[4:])) == lab_dir:
                    nets.append(int(path.name[4:]))
    return nets
