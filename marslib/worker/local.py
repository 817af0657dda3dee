"""Resources run in the calling process: in marsd with ``--workers off``, and inside each
worker process (which serves one of these over its control channel)."""

from __future__ import annotations

from marslib.layout import MarsPaths
from marslib.logger import LoggerConfig
from marslib.meta import MetaStore
from marslib.resource import PrimaryResource
from marslib.secondary import NetConfig, SecondaryResource
from marslib.status import ResourceStatus
from marslib.worker.handle import PrimaryLog, publish_device_size


class LocalPrimary:
    """A PrimaryResource (device, logger, NBD export) in this process."""

    worker_pid: int | None = None
    exited: str | None = None

    def __init__(self, name: str, host: str, paths: MarsPaths, meta: MetaStore,
                 config: LoggerConfig) -> None:
        self.name = name
        self.host = host
        self.meta = meta
        self.resource = PrimaryResource(name, host, paths, meta, config)

    @property
    def logger(self) -> PrimaryLog | None:
        return self.resource.logger

    async def start(self) -> None:
        await self.resource.start()

    async def stop(self, end_marker: bool = False) -> None:
        await self.resource.stop(end_marker=end_marker)

    async def refresh(self, size: int) -> None:
        publish_device_size(self.meta, self.name, self.host, self.resource.device)
        self.resource.grow(size)

    async def status(self) -> ResourceStatus:
        return self.resource.status()


class LocalSecondary:
    """A SecondaryResource (sync, fetch, replay) in this process."""

    worker_pid: int | None = None
    exited: str | None = None

    def __init__(self, name: str, host: str, paths: MarsPaths, meta: MetaStore,
                 net: NetConfig) -> None:
        self.name = name
        self.host = host
        self.meta = meta
        self.resource = SecondaryResource(name, host, paths, meta, net)

    @property
    def phase(self) -> str:
        return self.resource.phase

    @property
    def error(self) -> str | None:
        return self.resource.error

    @property
    def size(self) -> int:
        return self.resource.size

    async def start(self) -> None:
        await self.resource.start()

    async def stop(self) -> None:
        await self.resource.stop()

    async def refresh(self, size: int) -> None:
        publish_device_size(self.meta, self.name, self.host, self.resource.device)
        self.resource.apply_switches()

    async def set_space_level(self, level: int) -> None:
        self.resource.space_blocks_fetch = level >= 3
        self.resource.apply_switches()
        if level >= 2:
            self.resource.drop_applied_logfiles()

    async def status(self) -> ResourceStatus:
        return self.resource.status()
