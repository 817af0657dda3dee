"""What marsd uses of a running resource, whether it runs in marsd or in a worker.

marsd holds one handle per resource it runs: :class:`marslib.worker.local.LocalPrimary`
and ``LocalSecondary`` run the bricks in marsd's own loop (``marsd --workers off``);
:class:`marslib.worker.supervisor.WorkerPrimary` and ``WorkerSecondary`` run them in a
worker process and speak to it over the control channel. Both offer these surfaces.
"""

from __future__ import annotations

from typing import Protocol

from marslib.device import Device
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import ResourceKeys
from marslib.status import ResourceStatus


class PrimaryLog(Protocol):
    """What marsd itself uses of a primary's logger: the fetch and sync services, the
    space check and ``log-rotate``. In-process this is the Logger; with workers a proxy
    whose state the worker pushes (``log_end`` may lag the real one slightly, never lead
    it: the durable end only grows)."""

    @property
    def log_end(self) -> LogPosition | None: ...

    @property
    def size(self) -> int: ...

    @property
    def emergency(self) -> bool: ...

    async def wait_growth(self, timeout: float) -> None: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    async def read_at(self, offset: int, length: int
                      ) -> tuple[bytes | bytearray, LogPosition | None]:
        """Like ``read``, and the log position the data reflects."""

    async def rotate(self) -> str: ...

    async def enter_emergency(self, reason: str) -> None: ...

    async def leave_emergency(self) -> None: ...


class Handle(Protocol):
    """Common to both roles."""

    name: str

    @property
    def worker_pid(self) -> int | None:
        """The worker's process id; None in-process."""

    @property
    def exited(self) -> str | None:
        """How the worker ended (None while it runs, and always in-process)."""

    async def start(self) -> None: ...

    async def status(self) -> ResourceStatus:
        """The resource's live figures, asked now."""

    async def refresh(self, size: int) -> None:
        """One pass of marsd over the tree: publish ``device-size-HOST``; a primary serves
        a grown ``size`` (RuntimeError if its device is too small), a secondary follows its
        ``todo`` switches."""


class PrimaryHandle(Handle, Protocol):
    @property
    def logger(self) -> PrimaryLog | None: ...

    async def stop(self, end_marker: bool = False) -> None: ...


class SecondaryHandle(Handle, Protocol):
    @property
    def phase(self) -> str: ...

    @property
    def error(self) -> str | None: ...

    @property
    def size(self) -> int: ...

    async def stop(self) -> None: ...

    async def set_space_level(self, level: int) -> None:
        """Level 3 and up: stop fetching; 2 and up: drop applied logfiles (marslib.space)."""


def publish_device_size(meta: MetaStore, name: str, host: str, device: Device | None) -> None:
    """Keep ``device-size-HOST`` current: resize checks every member's device."""
    if device is None or device.fd < 0:
        return
    key = ResourceKeys(name).device_size(host)
    try:
        size = str(device.size)
    except OSError:
        return
    if meta.get(key) != size:
        meta.set(key, size)
