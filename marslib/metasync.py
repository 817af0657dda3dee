"""Spreading the metadata tree: every host pushes keys changed since its last successful
push to every other host (port 7777); receivers keep whatever is newer (Lamport stamp).

"Changed since" is judged by stamp. Other processes write this tree too (marsadm, and
marsd's resource workers, each with its own Lamport clock), so a key may show up with a
stamp below one already pushed: one process's clock may be ahead of another's, and a key
written while the tree is being walked may be missed by that walk. The push therefore
never counts as done what is younger than ``SETTLE`` seconds (by this host's clock): such
keys go again with the next pushes, which receivers ignore where they have them."""

from __future__ import annotations

import asyncio
import logging
import time

from marslib import schema
from marslib.formats.frame import Frame, FrameType
from marslib.meta import MetaStore, MetaValue
from marslib.net.conn import PeerBundle, RemoteError
from marslib.net.handshake import PeerInfo, check_secret

log = logging.getLogger(__name__)

PUSH_INTERVAL = 0.25
MAX_ITEMS_PER_PUSH = 2000
SETTLE = 10.0  # seconds: a key written locally is visible to a walk of the tree by then


def cluster_hosts(meta: MetaStore) -> dict[str, str]:
    """Every host of the cluster with its address, from ``ips/ip-HOST``."""
    hosts = {}
    for mv in meta.items(schema.ip_dir()):
        host = schema.ip_host(mv.key)
        if host and mv.value:
            hosts[host] = mv.value
    return hosts


class MetaSync:
    """The metadata exchange of one host."""

    def __init__(self, meta: MetaStore, host: str, uuid: str, secret: bytes, port: int) -> None:
        check_secret(secret, f"the metadata exchange of {host}", meta.root / "secret")
        self.meta = meta
        self.host = host
        self.uuid = uuid
        self.secret = secret
        self.port = port
        self.peers: dict[str, PeerBundle] = {}
        self.acked: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.log = logging.LoggerAdapter(log, {"host": host})
        self.changed = asyncio.Event()  # set whenever a push from a peer changed something

    async def handle(self, frame: Frame, peer: PeerInfo) -> Frame:
        if frame.type != FrameType.META_PUSH:
            return Frame(FrameType.ERROR, {"error": f"unexpected frame {frame.type} on meta"})
        merged = refused = 0
        for item in frame.get("items", []):
            try:
                if self.meta.merge(MetaValue.from_wire(item)):
                    merged += 1
            except (ValueError, TypeError, IndexError, OSError) as exc:
                refused += 1
                self.log.warning("metadata from %s refused: %s", peer.host, exc)
        if merged:
            self.changed.set()
        return Frame(FrameType.PONG, {"merged": merged, "refused": refused})

    def sync_peers(self) -> None:
        """Start pushing to hosts that joined; stop for hosts that left."""
        hosts = cluster_hosts(self.meta)
        hosts.pop(self.host, None)
        for name in hosts:
            if name not in self._tasks:
                self._tasks[name] = asyncio.create_task(self._push_loop(name),
                                                        name=f"metasync-{name}")
        for name in list(self._tasks):
            if name not in hosts:
                self._tasks.pop(name).cancel()
                bundle = self.peers.pop(name, None)
                if bundle:
                    bundle.close()

    def _address(self, name: str) -> tuple[str, int] | None:
        ip = self.meta.get(schema.ip(name))
        return (ip, self.port) if ip else None

    async def _push_loop(self, name: str) -> None:
        bundle = PeerBundle(name, lambda: self._address(name), host=self.host, uuid=self.uuid,
                            secret=self.secret, channel="meta", size=1)
        self.peers[name] = bundle
        acked = 0
        while True:
            try:
                settled = time.time_ns() - int(SETTLE * 1e9)  # before the walk starts
                items = [mv for mv in await asyncio.to_thread(self.meta.items) if mv.stamp > acked]
                items.sort(key=lambda mv: mv.stamp)
                for i in range(0, len(items), MAX_ITEMS_PER_PUSH):
                    part = items[i : i + MAX_ITEMS_PER_PUSH]
                    await bundle.request(Frame(FrameType.META_PUSH, {
                        "items": [mv.to_wire() for mv in part]}), timeout=30)
                    acked = max(acked, min(part[-1].stamp, settled))
                    self.acked[name] = acked
                await asyncio.sleep(PUSH_INTERVAL)
            except (ConnectionError, RemoteError) as exc:
                if acked:
                    self.log.info("metadata push to %s interrupted: %s", name, exc)
                acked = 0  # after a reconnect, send everything again
                self.acked[name] = 0
                await asyncio.sleep(1.0)

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for bundle in self.peers.values():
            bundle.close()
