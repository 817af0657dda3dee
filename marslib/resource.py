"""One resource on its primary host: data device, transaction logger and NBD export."""

from __future__ import annotations

import logging
from dataclasses import asdict

from marslib.device import Device
from marslib.layout import MarsPaths
from marslib.logger import Logger, LoggerConfig, RecoveryReport
from marslib.meta import MetaStore
from marslib.nbd.server import NbdServer, start_nbd_server
from marslib.schema import ON, SYNC_DONE, ResourceKeys, flag
from marslib.status import PrimaryStatus, RecoveryStatus, ResourceStatus

log = logging.getLogger(__name__)


class LoggerBackend:
    """Presents a resource's logger as a batch NBD backend: the writes of one socket read
    become one unit of the logger's group commit."""

    read_only = False

    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        # every write is durable when acknowledged, so FUA needs nothing extra
        self.submit_writes = logger.submit
        self.submit_reads = logger.submit_reads

    def size(self) -> int:
        return self.logger.size

    def trim(self, offset: int, length: int) -> None:
        """Discard is advisory: the data stays, identical on every replica."""
        if offset < 0 or offset + length > self.logger.size:
            raise OSError(22, "trim beyond the end of the device")


class PrimaryResource:
    """Wires device, logger and NBD server of ``name`` on this (primary) host."""

    def __init__(
        self, name: str, host: str, paths: MarsPaths, meta: MetaStore, config: LoggerConfig
    ) -> None:
        self.name = name
        self.host = host
        self.paths = paths
        self.meta = meta
        self.config = config
        self.keys = ResourceKeys(name)
        self.log = logging.LoggerAdapter(log, {"resource": name, "host": host})
        self.device: Device | None = None
        self.logger: Logger | None = None
        self.nbd: NbdServer | None = None
        self.recovery: RecoveryReport | None = None

    async def start(self) -> None:
        dev_path = self.meta.get(self.keys.data(self.host))
        if not dev_path:
            raise RuntimeError(f"resource {self.name} has no data device on {self.host}")
        buffered = self.meta.get(self.keys.buffered(self.host)) == ON
        self.device = Device(dev_path, buffered=buffered)
        try:
            size = int(self.meta.get(self.keys.size) or 0) or None
            self.meta.set(self.keys.device_size(self.host), str(self.device.size))
            self.logger = Logger(self.name, self.host, self.paths, self.meta, self.device,
                                 self.config, size=size)
            self.recovery = await self.logger.start()
            self.paths.run_dir.mkdir(parents=True, exist_ok=True)
            self.nbd = await start_nbd_server(
                str(self.paths.nbd_socket(self.name)), self.name, LoggerBackend(self.logger),
                log=logging.LoggerAdapter(logging.getLogger("marslib.nbd"),
                                          {"resource": self.name, "host": self.host}),
            )
        except BaseException:
            if self.logger is not None and self.logger._tasks:
                await self.logger.stop()
            self.device.close()
            raise
        self.nbd.on_open_count_change = self._open_count_changed
        # the primary's data is the reference: it needs no sync if it becomes a secondary
        if self.meta.get(self.keys.syncstatus(self.host)) != SYNC_DONE:
            self.meta.set(self.keys.syncstatus(self.host), SYNC_DONE)
        self.meta.set(self.keys.synced_size(self.host), str(self.logger.size))
        self.meta.set(self.keys.actual(self.host, "open-count"), "0")
        self.meta.set(self.keys.actual(self.host, "is-primary"), flag(True))
        self.meta.delete(self.keys.actual(self.host, "error"))

    def grow(self, size: int) -> bool:
        """Serve a grown resource (new NBD clients see the new size); True if it grew."""
        if self.logger is None or self.device is None or size <= self.logger.size:
            return False
        if size > self.device.size:
            raise RuntimeError(f"{self.device.path} has {self.device.size} bytes, "
                               f"resource {self.name} needs {size}")
        old, self.logger.size = self.logger.size, size
        self.meta.set(self.keys.synced_size(self.host), str(size))
        self.log.info("resized from %d to %d bytes; NBD clients see it when they reconnect",
                      old, size)
        return True

    def _open_count_changed(self, count: int) -> None:
        self.meta.set(self.keys.actual(self.host, "open-count"), str(count))

    async def stop(self, end_marker: bool = False) -> None:
        """Close the export, drain the logger, close the device."""
        if self.nbd is not None:
            try:
                await self.nbd.close()
            finally:
                self.nbd = None
                # the export is gone, so is every client of it
                self.meta.set(self.keys.actual(self.host, "open-count"), "0")
        if self.logger is not None:
            await self.logger.stop(end_marker=end_marker)
        if self.device is not None:
            self.device.close()
        self.meta.set(self.keys.actual(self.host, "is-primary"), flag(False))
        self.log.info("stopped")

    def status(self) -> ResourceStatus:
        count, size = logfile_usage(self.paths, self.name)
        recovery = None
        if self.recovery is not None:
            recovery = RecoveryStatus(**{**asdict(self.recovery), "logfiles_read": tuple(
                self.recovery.logfiles_read)})
        return ResourceStatus(
            role="primary",
            device=self.device.path if self.device else None,
            open_count=self.nbd.open_count if self.nbd else 0,
            logfile_count=count,
            logfile_bytes=size,
            primary=PrimaryStatus(nbd_socket=str(self.paths.nbd_socket(self.name)),
                                  recovery=recovery),
            logger=self.logger.status() if self.logger is not None else None,
        )


def logfile_usage(paths: MarsPaths, name: str) -> tuple[int, int]:
    """How many logfiles of ``name`` are in /mars, and their bytes."""
    files = paths.logfiles(name)
    size = 0
    for _, _, p in files:
        try:
            size += p.stat().st_size
        except FileNotFoundError:
            pass
    return len(files), size
