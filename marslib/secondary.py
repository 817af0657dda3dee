"""One resource on a secondary host: initial fast full sync, then fetch and replay.

An ``invalidate`` while it replays (``syncstatus-HOST`` unfinished again) is a resync in
place: fetch and replay stop (the replay after its batch), the sync runs (log-based when
``resync-HOST`` plans it: :mod:`marslib.resync`), and new ones start from the sync's
replay position. The process (a resource worker) stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from marslib.device import Device
from marslib.durable import mkdir_durably
from marslib.errors import LogCorrupt
from marslib.fetch import Fetcher
from marslib.history import forget_links
from marslib.layout import MarsPaths, parse_logfile_name
from marslib.logretention import applied_logfiles, delete_logfiles
from marslib.meta import MetaStore
from marslib.net.conn import PeerBundle
from marslib.position import LogPosition
from marslib.replay import Replayer
from marslib.resource import logfile_usage
from marslib.resync import LogResync
from marslib.resyncplan import forget_saved_set, pending_log_plan
from marslib.schema import (
    NO_PRIMARY,
    ON,
    ResourceKeys,
    ResyncPlan,
    SyncStatus,
    flag,
    is_primary_host,
    switch_on,
)
from marslib.schema import ip as ip_key
from marslib.status import ResourceStatus, SecondaryStatus
from marslib.sync import SyncClient
from marslib.verify import VerifyRunner  # verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetConfig:
    """What a host needs to dial its peers."""

    uuid: str
    secret: bytes
    meta_port: int = 7777
    fetch_port: int = 7778
    sync_port: int = 7779
    fetch_connections: int = 2
    sync_connections: int = 2


class SecondaryResource:
    """Wires sync, fetch and replay of ``name`` on this (secondary) host."""

    def __init__(self, name: str, host: str, paths: MarsPaths, meta: MetaStore,
                 net: NetConfig) -> None:
        self.name = name
        self.host = host
        self.paths = paths
        self.meta = meta
        self.net = net
        self.keys = ResourceKeys(name)
        self.log = logging.LoggerAdapter(log, {"resource": name, "host": host})
        self.device: Device | None = None
        self.fetch_bundle: PeerBundle | None = None
        self.sync_bundle: PeerBundle | None = None
        self.fetcher: Fetcher | None = None
        self.replayer: Replayer | None = None
        self.syncer: SyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: str | None = None
        self.on_change: Callable[[], None] | None = None  # called when the phase changes
        self._phase = "starting"
        self.space_blocks_fetch = False  # /mars is too full to fetch
        self.size = 0  # the resource size this secondary runs with
        self.resync_due = asyncio.Event()  # invalidated while replaying: resync in place
        self._stopping = False
        self.verifier = VerifyRunner(name, host, paths, meta)  # verify

    @property
    def phase(self) -> str:
        """starting, syncing, replaying or error (then ``error`` says why)."""
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase = value
        if self.on_change is not None:
            self.on_change()

    def _primary_address(self, port: int) -> tuple[str, int] | None:
        primary = self.meta.get(self.keys.primary)
        if primary == NO_PRIMARY and self.fetcher is not None:
            # a handover: the old primary still serves the end of the logfile it wrote
            parsed = parse_logfile_name(self.fetcher.logfile)
            primary = parsed[1] if parsed else None
        if primary is None or not is_primary_host(primary) or primary == self.host:
            return None
        ip = self.meta.get(ip_key(primary))
        return (ip, port) if ip else None

    def _synced(self) -> bool:
        """``syncstatus-HOST`` says the full sync is done."""
        st = SyncStatus.decode(self.meta.get(self.keys.syncstatus(self.host)))
        return st is not None and st.finished

    def _sync_in_progress(self) -> SyncStatus | None:
        """``syncstatus-HOST`` while a full sync is due or running (None: done or never)."""
        st = SyncStatus.decode(self.meta.get(self.keys.syncstatus(self.host)))
        return None if st is None or st.finished else st

    def switch(self, name: str) -> bool:
        return switch_on(self.meta.get(self.keys.todo(self.host, name)))

    async def start(self) -> None:
        dev_path = self.meta.get(self.keys.data(self.host))
        if not dev_path:
            raise RuntimeError(f"resource {self.name} has no data device on {self.host}")
        buffered = self.meta.get(self.keys.buffered(self.host)) == ON
        self.device = Device(dev_path, buffered=buffered)
        size = int(self.meta.get(self.keys.size) or 0)
        self.size = size
        self.meta.set(self.keys.device_size(self.host), str(self.device.size))
        synced_key = self.keys.synced_size(self.host)
        synced = int(self.meta.get(synced_key) or 0)
        if self._synced():
            forget_saved_set(self.paths, self.name)  # a resync ended before deleting it
            if synced and synced < size:  # grown while this host was down: sync the tail
                self.meta.set(self.keys.syncstatus(self.host), SyncStatus(synced, size).encode())
            elif not synced:
                self.meta.set(synced_key, str(size))
        if size > self.device.size:
            self.device.close()
            raise RuntimeError(f"{dev_path} has {self.device.size} bytes, resource {self.name} "
                               f"needs {size}: grow the device first")
        mkdir_durably(self.paths.resource_dir(self.name))
        net = self.net
        self.fetch_bundle = PeerBundle(
            "primary", lambda: self._primary_address(net.fetch_port), host=self.host,
            uuid=net.uuid, secret=net.secret, channel="fetch", size=net.fetch_connections)
        self.sync_bundle = PeerBundle(
            "primary", lambda: self._primary_address(net.sync_port), host=self.host,
            uuid=net.uuid, secret=net.secret, channel="sync", size=net.sync_connections)
        self.syncer = SyncClient(self.name, self.host, self.meta, self.device, size,
                                 self.sync_bundle)
        self._task = asyncio.create_task(self._run(), name=f"secondary-{self.name}")
        self.meta.set(self.keys.actual(self.host, "is-primary"), flag(False))
        self.meta.delete(self.keys.actual(self.host, "error"))

    async def _run(self) -> None:
        try:
            while True:
                if not self._synced():
                    await self._sync()
                self.phase = "replaying"
                pos = LogPosition.decode(self.meta.get(self.keys.replay(self.host)) or "")
                assert self.fetch_bundle is not None and self.device is not None
                self.fetcher = Fetcher(self.name, self.host, self.paths, self.fetch_bundle,
                                       pos.logfile, parallel=self.net.fetch_connections)
                self.replayer = Replayer(self.name, self.host, self.paths, self.meta,
                                         self.device, self.fetcher)
                self.resync_due.clear()
                self.apply_switches()
                await self._replicate()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            advice = self.replayer.error if self.replayer is not None else None
            # a damaged record: the replayer's message says what to run on this host
            self.error = advice if isinstance(exc, LogCorrupt) and advice else \
                f"{type(exc).__name__}: {exc}"
            self.phase = "error"
            self.log.error("secondary stopped: %s", self.error)
            self.meta.set(self.keys.actual(self.host, "error"), self.error[:1000])

    async def _sync(self) -> None:
        """The full sync, log-based when ``resync-HOST`` plans it."""
        assert self.syncer is not None
        self.phase = "syncing"
        state = self._sync_in_progress()
        if state is not None and state.done == 0:
            # from the start: this host's history is discarded. invalidate dropped its
            # version links already, but a replay that ran until now may have written one
            # again (at a divergence it does, every second)
            dropped = forget_links(self.meta, self.name, self.host)
            if dropped:
                self.log.info("dropped %d version links of this host's old history", dropped)
        planned = pending_log_plan(self.meta, self.paths, self.name, self.host)
        planner = None
        if planned is not None and planned.since is not None:
            planner = LogResync(self.name, self.host, self.paths, self.meta, planned.since,
                                self.size, self.syncer.block_size,
                                self.syncer.written_on_primary)
        try:
            await self.syncer.run(plan=planner)
        except BaseException:
            if planner is not None:
                planner.close()
            raise
        if planner is not None:
            if planner.fallback is None and self.syncer.dropped:
                # the primary compares no block sets: everything was compared
                self.meta.set(self.keys.resync(self.host),
                              ResyncPlan.full(self.syncer.dropped).encode(), durable=True)
            await planner.finish()

    async def _replicate(self) -> None:
        """Fetch and replay until a resync is due; then stop both (the replay after its
        batch) and return. What stops either of them is raised."""
        assert self.fetcher is not None and self.replayer is not None
        tasks = {asyncio.create_task(self.fetcher.run(), name=f"{self.name} fetch"),
                 asyncio.create_task(self.replayer.run(), name=f"{self.name} replay")}
        due = asyncio.create_task(self.resync_due.wait())
        try:
            while True:
                done, _ = await asyncio.wait(tasks | {due},
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done & tasks:
                    task.result()  # raises what stopped it
                    tasks.discard(task)  # (neither ends by itself)
                if due in done:
                    break
            self.log.info("invalidated: fetch and replay stop for a resync in place")
            await self.verifier.stop()  # verify: it holds the fetcher and the replayer
            try:
                async with asyncio.timeout(30):
                    await self.replayer.halt()
            except TimeoutError:
                self.log.warning("replay did not finish its batch within 30 s: the resync "
                                 "starts anyway")
        finally:
            due.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # the sync sets the replay position: these must not save theirs any more
        self.fetcher = None
        self.replayer = None

    def _follow_invalidate(self) -> None:
        """``syncstatus-HOST`` asks for a sync while this secondary replays, or after it
        stopped on an error: resync in place. A grown size is marsd's to handle (it
        starts a new secondary of the new size)."""
        if self._stopping or self._sync_in_progress() is None:
            return
        if int(self.meta.get(self.keys.size) or 0) != self.size:
            return
        if self.phase == "replaying":
            self.resync_due.set()
        elif self.phase == "error" and self._task is not None and self._task.done():
            self.log.info("invalidated after an error: resyncing in place")
            self.error = None
            self.meta.delete(self.keys.actual(self.host, "error"))
            self.fetcher = self.replayer = None
            self._task = asyncio.create_task(self._run(), name=f"secondary-{self.name}")

    def apply_switches(self) -> None:
        """Follow todo-HOST/{fetch,replay,sync}: pause or resume each brick."""
        if self.fetcher is not None:
            if self.switch("fetch") and not self.space_blocks_fetch:
                self.fetcher.resume()
            else:
                self.fetcher.pause()
        if self.replayer is not None:
            if self.switch("replay"):
                self.replayer.resume()
            elif not self.replayer.paused:
                asyncio.create_task(self.replayer.pause())
        if self.syncer is not None:
            self.syncer.resume() if self.switch("sync") else self.syncer.pause()
        self._follow_invalidate()
        # verify: start or resume what verifystatus-HOST asks for, once replaying
        self.verifier.follow(self.device, self.syncer, self.fetcher, self.replayer,
                             replaying=self.phase == "replaying")

    def drop_applied_logfiles(self) -> list[str]:
        """Space is short: delete local logfiles this host has applied, without waiting
        for the other members."""
        if self.replayer is None:
            return []
        doomed = applied_logfiles(self.paths, self.name, self.replayer.position)
        if doomed:
            self.log.warning("space short: dropping applied logfiles %s",
                             " ".join(p.name for p in doomed))
            delete_logfiles(doomed, self.name)
        return [p.name for p in doomed]

    def consistent(self) -> bool:
        """Whether the device holds a consistent prefix of the primary's history (between
        batches): synced, replayed past ``syncpos``, no batch interrupted by a crash left to
        redo."""
        if not self._synced():
            return False
        if self.verifier.repairing:  # verify: differing blocks are being copied
            return False
        if self.replayer is not None and self.replayer.redoing:
            return False
        target = self.meta.get(self.keys.syncpos(self.host))
        if not target or self.replayer is None:
            return self.replayer is not None
        t = LogPosition.decode(target)
        p = self.replayer.position
        return (p.number, p.offset) >= (t.number, t.offset)

    async def stop(self) -> None:
        self._stopping = True
        await self.verifier.stop()  # verify
        if self._task is not None:
            if self.replayer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.replayer.halt(), 30)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for b in (self.fetch_bundle, self.sync_bundle):
            if b is not None:
                b.close()
        if self.replayer is not None:
            # with the end of a batch still to redo (or in progress, after the timeout)
            self.meta.set(self.keys.replay(self.host), self.replayer.saved_value())
        if self.device is not None:
            self.device.close()
        self.log.info("stopped")

    def status(self) -> ResourceStatus:
        sync = self._sync_in_progress()
        count, size = logfile_usage(self.paths, self.name)
        return ResourceStatus(
            role="secondary",
            device=self.device.path if self.device else None,
            open_count=0,
            logfile_count=count,
            logfile_bytes=size,
            secondary=SecondaryStatus(phase=self.phase,
                                      fetch_blocked_by_space=self.space_blocks_fetch,
                                      error=self.error, consistent=self.consistent()),
            syncer=self.syncer.status() if self.syncer is not None and sync is not None
            else None,
            fetcher=self.fetcher.status() if self.fetcher is not None else None,
            replayer=self.replayer.status() if self.replayer is not None else None,
            verifier=self.verifier.status(),  # verify
        )
