"""marsd's side of the nodes: follow ``todo-HOST/device``, answer the control commands.

marsd holds one :class:`DeviceNodes`. After each reconcile it calls :meth:`follow`: a
primary running here whose switch is on gets its node (a stale one, e.g. after a marsd
restart, is rebuilt); a node whose switch is off, or whose resource is no longer to be
primary here, is taken away. Before a primary stops, :meth:`may_stop` takes its node away
first and says no while the node is in use: marsd then leaves the primary running, as
``marsadm down`` leaves a resource with NBD clients. ``actual-HOST/device`` carries the
node's path while it is attached and works.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from marslib.devnode.common import NodeInfo, NodePaths
from marslib.devnode.node import attach, detach, in_use, node_state
from marslib.errors import MarsError, Refused, UsageError
from marslib.layout import MarsPaths, check_resource_name
from marslib.meta import MetaStore
from marslib.schema import OFF, ON, ResourceKeys, is_primary_host
from marslib.status import DeviceNodeStatus

log = logging.getLogger("marslib.devnode")

ATTACH, DETACH = "attach-device", "detach-device"
COMMANDS = (ATTACH, DETACH)


class DeviceNodes:
    """The block device nodes of the resources this marsd serves as primary."""

    def __init__(self, host: str, paths: MarsPaths, meta: MetaStore,
                 serving: Callable[[], Iterable[str]]) -> None:
        self.host = host
        self.paths = paths
        self.meta = meta
        self.serving = serving  # names of the primaries running here now
        self.nodes: dict[str, NodeInfo] = {}  # as last seen
        self.notes: dict[str, str] = {}  # why a node is missing or not rebuilt
        self.held: dict[str, str] = {}  # primaries kept running: their node is in use
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ helpers
    def _keys(self, name: str) -> ResourceKeys:
        return ResourceKeys(name)

    def switch(self, name: str) -> bool:
        return self.meta.get(self._keys(name).todo(self.host, "device")) == ON

    def _primary_here(self, name: str) -> bool:
        value = self.meta.get(self._keys(name).primary)
        return is_primary_host(value) and value == self.host

    def _to_run_here(self, name: str) -> bool:
        """The tree still wants ``name`` running here as primary."""
        return self.meta.get(self._keys(name).todo(self.host, "attach")) == ON and \
            self._primary_here(name)

    def _publish(self, name: str, info: NodeInfo | None) -> None:
        key = self._keys(name).actual(self.host, "device")
        value = info.node if info is not None and info.healthy else None
        if self.meta.get(key) != value:
            if value is None:
                self.meta.delete(key)
            else:
                self.meta.set(key, value)
        if info is None:
            self.nodes.pop(name, None)
        else:
            self.nodes[name] = info

    def _note(self, name: str, msg: str | None) -> None:
        """Remember why a node is missing or stale; log it once per change."""
        if msg is None:
            self.notes.pop(name, None)
        elif self.notes.get(name) != msg:
            self.notes[name] = msg
            log.warning("%s", msg, extra={"resource": name})

    async def _attach(self, name: str) -> NodeInfo:
        sock = self.paths.nbd_socket(name)
        info = await asyncio.to_thread(attach, name, sock, self.paths.run_dir)
        self._publish(name, info)
        self._note(name, None)
        return info

    async def _detach(self, name: str) -> list[str]:
        done = await asyncio.to_thread(detach, name, self.paths.run_dir)
        self._publish(name, None)
        self._note(name, None)
        return done

    # ------------------------------------------------------------ marsd's calls
    async def follow(self) -> None:
        """Make the nodes match the switches and the primaries running here."""
        async with self._lock:
            serving = set(self.serving())
            names = serving | set(self.nodes) | set(self.paths.resources())
            for name in list(self.held):
                if name not in serving or self._to_run_here(name):
                    del self.held[name]  # stopped after all, or wanted again
            for name in sorted(names):
                try:
                    if name in serving and self.switch(name):
                        await self._attach(name)
                        continue
                    info = await asyncio.to_thread(node_state, name, self.paths.run_dir)
                    if info is None:
                        self._publish(name, None)
                        continue
                    if self.switch(name) and self._primary_here(name):
                        # its primary is starting again (a failed start, a crashed worker):
                        # the node is rebuilt when it runs
                        self._publish(name, info)
                        continue
                    await self._detach(name)
                except (MarsError, OSError) as exc:
                    self._publish(name, await asyncio.to_thread(
                        node_state, name, self.paths.run_dir))
                    self._note(name, f"block device node: {exc}")

    async def may_stop(self, name: str) -> bool:
        """Before the primary of ``name`` stops by reconcile: take its node away; False
        (the primary must stay) while the node is in use."""
        async with self._lock:
            try:
                if await asyncio.to_thread(node_state, name, self.paths.run_dir) is not None:
                    await self._detach(name)
            except Refused as exc:
                msg = f"the primary keeps running: {exc}"
                if self.held.get(name) != msg:
                    log.warning("%s", msg, extra={"resource": name})
                self.held[name] = msg
                return False
            except (MarsError, OSError) as exc:
                self._note(name, f"block device node: {exc}")
            self.held.pop(name, None)
            return True

    async def before_stop(self, name: str) -> None:
        """The primary of ``name`` stops whatever happens (marsd exits): take the node
        away if nothing uses it; else it stays, stale, and a later marsd rebuilds it."""
        if not await self.may_stop(name):
            log.warning("the node of %s stays, mounted or open; its I/O fails until the "
                        "resource runs here again and it is unmounted", name,
                        extra={"resource": name})

    def status(self, name: str) -> DeviceNodeStatus | None:
        """``device_node`` of marsd's status for ``name``: the node as last seen."""
        info = self.nodes.get(name)
        note = self.held.get(name) or self.notes.get(name)
        if info is None and note is None:
            return None
        seen = {} if info is None else {k: v for k, v in info.to_dict().items()
                                        if k != "resource"}
        return DeviceNodeStatus(**seen, wanted=self.switch(name), note=note)

    # ------------------------------------------------------------ control commands
    async def handle(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        """``attach-device`` / ``detach-device`` (argument ``resource``)."""
        name = check_resource_name(str(req.get("resource") or ""))
        if name not in self.paths.resources():
            raise Refused(f"no resource {name} on {self.host}")
        key = self._keys(name).todo(self.host, "device")
        node = str(NodePaths(name, self.paths.run_dir).node)
        if cmd == ATTACH:
            if name not in set(self.serving()):
                raise Refused(f"{name} is not running as primary on {self.host}: a node "
                              f"exists only on the primary ('marsadm up {name}' on it)")
            async with self._lock:
                before = await asyncio.to_thread(node_state, name, self.paths.run_dir)
                was_on = self.switch(name)
                if not was_on:
                    self.meta.set(key, ON)
                info = await self._attach(name)
            changed = not was_on or before is None or not before.healthy
            return {"ok": True, "changed": changed, "node": node, **info.to_dict()}
        if cmd == DETACH:
            async with self._lock:
                user = await asyncio.to_thread(in_use, name, self.paths.run_dir)
                if user is not None:
                    raise Refused(f"the node {node} of {name} is in use ({user}): unmount "
                                  "or close it first")
                was_on = self.switch(name)
                if was_on or self.meta.get(key) is None:
                    self.meta.set(key, OFF)
                done = await self._detach(name)
            return {"ok": True, "changed": was_on or bool(done), "node": node,
                    "attached": False, "done": done}
        raise UsageError(f"unknown device command {cmd!r}")
