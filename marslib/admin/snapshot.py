"""A resource's tree values, read once into typed records: what decisions look at."""

from __future__ import annotations

from dataclasses import dataclass, field

from marslib.history import Fork, forks
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import (
    ResourceKeys,
    ResyncPlan,
    SyncResult,
    SyncStatus,
    VerifyDiff,
    VerifyResult,
    VerifyStatus,
    is_primary_host,
    switch_on,
    version,
)


@dataclass(frozen=True)
class MemberSnapshot:
    """One member's keys of one resource."""

    host: str
    device: str | None
    attach: bool = True
    fetch: bool = True
    replay_on: bool = True
    want_node: bool = False
    is_primary: bool = False
    emergency: bool = False
    open_count: int = 0
    error: str | None = None
    replay: str | None = None
    sync: SyncStatus | None = None
    syncpos: str | None = None
    last_sync: SyncResult | None = None
    resync: ResyncPlan | None = None  # how its last (or running) resync compares
    device_size: int | None = None
    node: str | None = None
    version: str | None = None
    # online verify (marsadm verify): the request or its progress, the last result
    verify: VerifyStatus | None = None
    last_verify: VerifyResult | None = None
    verify_diff: VerifyDiff | None = None

    @property
    def synced(self) -> bool:
        return self.sync is not None and self.sync.finished

    @property
    def syncing(self) -> bool:
        return self.sync is not None and not self.sync.finished

    @property
    def position(self) -> LogPosition | None:
        try:
            return LogPosition.decode(self.replay) if self.replay else None
        except ValueError:
            return None


@dataclass(frozen=True)
class ResourceSnapshot:
    """The tree's view of a resource, as this host knows it now."""

    name: str
    size: int
    primary: str | None
    history_gap: str | None = None
    members: dict[str, MemberSnapshot] = field(default_factory=dict)
    forks: tuple[Fork, ...] = ()

    @property
    def has_primary(self) -> bool:
        return is_primary_host(self.primary)

    def member(self, host: str) -> MemberSnapshot | None:
        return self.members.get(host)

    def differs_from_primary(self, host: str) -> bool:
        """``host``'s history forks off the designated primary's."""
        return any(host in f.views and self.primary in f.views
                   and f.views[host] != f.views[self.primary] for f in self.forks)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def member_hosts(meta: MetaStore, name: str) -> list[str]:
    """Hosts with a ``data-HOST`` key: the members."""
    k = ResourceKeys(name)
    return sorted(h for mv in meta.items(k.dir) if mv.value is not None
                  for h in [ResourceKeys.member_of(mv.key)] if h)


def read_member(meta: MetaStore, name: str, host: str) -> MemberSnapshot:
    k = ResourceKeys(name)
    g = meta.get
    return MemberSnapshot(
        host=host,
        device=g(k.data(host)),
        attach=switch_on(g(k.todo(host, "attach")), default=False),
        fetch=switch_on(g(k.todo(host, "fetch"))),
        replay_on=switch_on(g(k.todo(host, "replay"))),
        want_node=switch_on(g(k.todo(host, "device")), default=False),
        is_primary=switch_on(g(k.actual(host, "is-primary")), default=False),
        emergency=switch_on(g(k.actual(host, "emergency")), default=False),
        open_count=_int(g(k.actual(host, "open-count"))) or 0,
        error=g(k.actual(host, "error")),
        replay=g(k.replay(host)),
        sync=SyncStatus.decode(g(k.syncstatus(host))),
        syncpos=g(k.syncpos(host)),
        last_sync=SyncResult.decode(g(k.syncresult(host))),
        resync=ResyncPlan.decode(g(k.resync(host))),
        device_size=_int(g(k.device_size(host))),
        node=g(k.actual(host, "device")),
        version=g(version(host)),
        # online verify
        verify=VerifyStatus.decode(g(k.verifystatus(host))),
        last_verify=VerifyResult.decode(g(k.verifyresult(host))),
        verify_diff=VerifyDiff.decode(g(k.verifydiff(host))),
    )


def read_resource(meta: MetaStore, name: str) -> ResourceSnapshot:
    k = ResourceKeys(name)
    return ResourceSnapshot(
        name=name,
        size=_int(meta.get(k.size)) or 0,
        primary=meta.get(k.primary),
        history_gap=meta.get(k.history_gap),
        members={h: read_member(meta, name, h) for h in member_hosts(meta, name)},
        forks=tuple(forks(meta, name)),
    )
