"""The status marsd reports: one typed record per brick, one per resource, one per daemon.

Each brick's ``status()`` returns its record (:class:`LoggerStatus`, :class:`FullSyncStatus`,
:class:`FetchStatus`, :class:`ReplayStatus`, :class:`OnlineVerifyStatus`);
:class:`marslib.resource.PrimaryResource` and :class:`marslib.secondary.SecondaryResource`
compose them into a :class:`ResourceStatus`, and marsd's reply to ``status`` is a
:class:`DaemonStatus`.

JSON exists only where a status leaves a process: marsd's control socket
(:meth:`DaemonStatus.to_json`) and the channel from a resource worker to marsd
(:meth:`ResourceStatus.to_json`). A resource is one *flat* JSON object: every brick's
fields side by side, a brick that is not running has no keys at all. Attribute names are
the JSON keys. ``from_json`` ignores keys it does not know (a newer marsd or worker during
a rolling upgrade) and gives missing ones their defaults (an older one).

How far a secondary is behind is computed here and nowhere else: :func:`lag`,
:func:`up_to_date`, :func:`lag_seconds` from a resource's live status, :func:`tree_lag`
from two replay positions of the metadata tree.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from marslib.layout import parse_logfile_name
from marslib.position import LogPosition

SCHEMA_VERSION = 1  # of DaemonStatus's JSON; raised when a key changes meaning or goes away

PRIMARY = "primary"
SECONDARY = "secondary"

_R = TypeVar("_R")


def _record_json(record: Any) -> dict[str, Any]:
    """A flat record's fields as JSON values (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _has_keys(cls: Any, obj: Mapping[str, Any]) -> bool:
    return any(f.name in obj for f in dataclasses.fields(cls))


def _record(cls: type[_R], obj: Mapping[str, Any]) -> _R:
    """The record ``cls`` from the keys of ``obj`` it knows; missing ones take defaults."""
    args: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in obj:
            value = obj[f.name]
            args[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**args)


# ------------------------------------------------------------------------ bricks
@dataclass(frozen=True)
class LoggerStatus:
    """The primary's logger (marslib.logger): log, writeback, emergency mode."""

    logfile: str = ""  # the logfile being written
    log_end: str | None = None  # durable end of the log (a LogPosition)
    applied: str | None = None  # how far the log is on the device (a LogPosition)
    next_seq: int = 0
    pending_bytes: int = 0  # acknowledged, not yet on the device
    queued_writes: int = 0
    writes: int = 0
    bytes_written: int = 0
    commits: int = 0
    writes_per_commit: float = 0.0
    writeback_rounds: int = 0
    device_writes: int = 0
    direct_writes: int = 0  # written straight to the device (emergency mode)
    emergency: bool = False
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecoveryStatus:
    """What the primary's logger found and did when it started (``recovery``)."""

    started_from: str | None = None
    ended_at: str = ""
    records_replayed: int = 0
    bytes_replayed: int = 0
    logfiles_read: tuple[str, ...] = ()
    torn_tail: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class PrimaryStatus:
    """A primary resource's own figures (marslib.resource), besides its logger's."""

    nbd_socket: str = ""
    recovery: RecoveryStatus | None = None

    def to_json(self) -> dict[str, Any]:
        return {"nbd_socket": self.nbd_socket,
                "recovery": _record_json(self.recovery) if self.recovery else None}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PrimaryStatus:
        rec = obj.get("recovery")
        return cls(nbd_socket=str(obj.get("nbd_socket", "")),
                   recovery=_record(RecoveryStatus, rec) if isinstance(rec, dict) else None)


@dataclass(frozen=True)
class FullSyncStatus:
    """A running fast full sync (marslib.sync): the ``sync_*`` figures. Not to be confused
    with the sync client's own counters (``sync.SyncProgress``) or the tree's
    ``syncstatus-HOST`` value."""

    sync_done: int = 0  # bytes compared
    sync_size: int = 0
    sync_copied: int = 0  # bytes of differing blocks copied
    sync_rate: int = 0  # bytes compared per second
    sync_paused: bool = False
    sync_eta: float | None = None  # seconds; None while the rate is unknown


@dataclass(frozen=True)
class OnlineVerifyStatus:
    """A running online verify of a secondary against its primary (marslib.verify): the
    ``verify_*`` figures. Not to be confused with the tree's ``verifystatus-HOST`` value
    (``schema.VerifyStatus``)."""

    verify_done: int = 0  # bytes of the device passed (a prefix) in the first pass
    verify_size: int = 0
    verify_compared: int = 0  # bytes compared, retries included
    verify_differing: int = 0  # bytes found different so far
    verify_unsettled: int = 0  # bytes written during every comparison so far (retried)
    verify_touched: int = 0  # blocks written while being compared, retried at least once
    verify_pass: int = 0  # 0: the first pass over the device; 1-5: retries of busy blocks
    verify_rate: int = 0  # bytes passed per second
    verify_eta: float | None = None  # seconds; None while the rate is unknown
    verify_repair: bool = False  # the differences are resynced at the end
    verify_repairing: bool = False  # they are being copied now (not consistent)
    verify_resumed_at: int = 0  # where this verify resumed after a restart (0: fresh)
    verify_error: str | None = None  # why it waits or stopped (retried by itself)


@dataclass(frozen=True)
class FetchStatus:
    """A secondary's fetcher (marslib.fetch)."""

    fetch_logfile: str = ""  # the logfile being fetched
    fetch_local_end: int = 0  # complete bytes of it here
    fetch_remote_end: int = -1  # its durable end on the primary as last seen; -1: not yet
    fetch_bytes: int = 0
    fetch_rate: int = 0
    fetch_paused: bool = False
    fetch_connections: int = 0
    fetch_error: str | None = None
    fetch_contact_age: float = 0.0  # seconds since the primary last answered
    fetch_hedges: int = 0  # requests asked for again on another connection (a slow one)


@dataclass(frozen=True)
class ReplayStatus:
    """A secondary's replayer (marslib.replay)."""

    replay: str = ""  # the position applied so far (a LogPosition)
    replay_records: int = 0
    replay_bytes: int = 0
    replay_rate: int = 0
    replay_paused: bool = False
    replay_redo: str | None = None  # end of a batch a crash interrupted, still to redo
    replay_error: str | None = None
    corrupt_refetched: int = 0
    replay_stamp_ns: int = 0  # when the newest applied write was made on the primary
    caught_up_at: float | None = None  # time.time() when this replica last had everything


@dataclass(frozen=True)
class SecondaryStatus:
    """A secondary resource's own figures (marslib.secondary), besides its bricks'."""

    phase: str = ""  # starting, syncing, replaying, error
    fetch_blocked_by_space: bool = False
    error: str | None = None
    consistent: bool = False


# --------------------------------------------------------------------- resource
@dataclass(frozen=True)
class DeviceNodeStatus:
    """A primary's block device node ``/dev/mars/R`` as marsd last saw it
    (``marslib.devnode``); nested under ``device_node`` in the JSON."""

    node: str | None = None  # the stable path; None: no node (only a note)
    device: str | None = None  # /dev/loopN or /dev/nbdN
    backend: str | None = None
    socket: str | None = None
    client_pid: int | None = None  # nbdfuse or nbd-client
    connections: int = 0  # NBD connections it holds: they count in open_count
    healthy: bool = False
    problem: str | None = None  # why it is not healthy
    wanted: bool = False  # todo-HOST/device is on
    note: str | None = None  # why it is missing, or why the primary stays


@dataclass(frozen=True)
class ResourceStatus:
    """One resource as its marsd runs it: the figures every role has, the role's own, and
    those of each brick that runs (None: not running, no keys in the JSON)."""

    role: str | None = None  # "primary" or "secondary"
    device: str | None = None
    open_count: int = 0  # NBD clients
    logfile_count: int = 0  # logfiles of the resource in /mars
    logfile_bytes: int = 0
    primary: PrimaryStatus | None = None
    secondary: SecondaryStatus | None = None
    logger: LoggerStatus | None = None
    syncer: FullSyncStatus | None = None
    fetcher: FetchStatus | None = None
    replayer: ReplayStatus | None = None
    verifier: OnlineVerifyStatus | None = None  # an online verify of this secondary
    worker_pid: int | None = None  # the resource's worker process (absent in-process)
    worker_error: str | None = None  # the worker did not answer: the figures may be old
    device_node: DeviceNodeStatus | None = None  # a primary's block device node

    @property
    def applied(self) -> str | None:
        """How far the log is on this host's device: the logger's writeback on a
        primary, the replay position on a secondary (the JSON key ``applied``)."""
        if self.logger is not None:
            return self.logger.applied
        return self.replayer.replay if self.replayer is not None else None

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of the control socket and the worker channel."""
        out: dict[str, Any] = {"role": self.role}
        if self.secondary is not None:
            out.update(_record_json(self.secondary))
        out["device"] = self.device
        out["open_count"] = self.open_count
        for part in (self.logger, self.syncer, self.fetcher, self.replayer, self.verifier):
            if part is not None:
                out.update(_record_json(part))
        if self.primary is not None:
            out.update(self.primary.to_json())
        if self.replayer is not None and self.role != PRIMARY:
            out["applied"] = self.replayer.replay
        out["logfile_count"] = self.logfile_count
        out["logfile_bytes"] = self.logfile_bytes
        if self.worker_pid is not None:
            out["worker_pid"] = self.worker_pid
        if self.worker_error is not None:
            out["worker_error"] = self.worker_error
        if self.device_node is not None:
            out["device_node"] = _record_json(self.device_node)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ResourceStatus:
        """Unknown keys are ignored; a brick with none of its keys is not running."""
        role = obj.get("role")
        as_primary, as_secondary = role != SECONDARY, role != PRIMARY

        def part(kind: type[_R], wanted: bool) -> _R | None:
            return _record(kind, obj) if wanted and _has_keys(kind, obj) else None

        return cls(
            role=role if isinstance(role, str) else None,
            device=obj.get("device"),
            open_count=int(obj.get("open_count") or 0),
            logfile_count=int(obj.get("logfile_count") or 0),
            logfile_bytes=int(obj.get("logfile_bytes") or 0),
            primary=PrimaryStatus.from_json(obj)
            if as_primary and _has_keys(PrimaryStatus, obj) else None,
            secondary=part(SecondaryStatus, as_secondary),
            logger=part(LoggerStatus, as_primary),
            syncer=part(FullSyncStatus, as_secondary),
            fetcher=part(FetchStatus, as_secondary),
            replayer=part(ReplayStatus, as_secondary),
            verifier=part(OnlineVerifyStatus, as_secondary),
            worker_pid=obj.get("worker_pid"),
            worker_error=obj.get("worker_error"),
            device_node=_record(DeviceNodeStatus, obj["device_node"])
            if isinstance(obj.get("device_node"), dict) else None,
        )


# ----------------------------------------------------------------------- daemon
@dataclass(frozen=True)
class PeerStatus:
    """marsd's metadata connection to another host."""

    connected: bool = False
    error: str | None = None


@dataclass(frozen=True)
class DaemonStatus:
    """marsd's reply to ``status`` (and ``reconcile``), without the reply's ``ok``."""

    host: str = ""
    version: str = ""  # marslib version of marsd
    workers: bool = True  # resources run in worker processes
    peers: dict[str, PeerStatus] = field(default_factory=dict)
    space_free: int = 0  # bytes free in /mars
    space_level: str = "ok"  # marslib.space.LEVEL_NAMES
    space_level_number: int = 0
    resources: dict[str, ResourceStatus] = field(default_factory=dict)  # running here
    failures: dict[str, str] = field(default_factory=dict)  # resource: why it did not start
    retry_in: dict[str, float] = field(default_factory=dict)  # seconds until marsd retries
    schema_version: int = SCHEMA_VERSION  # 0 from a marsd older than this field

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "host": self.host,
            "version": self.version,
            "workers": self.workers,
            "peers": {name: _record_json(p) for name, p in self.peers.items()},
            "space_free": self.space_free,
            "space_level": self.space_level,
            "space_level_number": self.space_level_number,
            "resources": {name: r.to_json() for name, r in self.resources.items()},
            "failures": dict(self.failures),
            "retry_in": dict(self.retry_in),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DaemonStatus:
        """From marsd's reply (its ``ok`` and any key not known here are ignored)."""
        peers = obj.get("peers") or {}
        resources = obj.get("resources") or {}
        return cls(
            host=str(obj.get("host", "")),
            version=str(obj.get("version", "")),
            workers=bool(obj.get("workers", True)),
            peers={str(n): _record(PeerStatus, p) for n, p in peers.items()
                   if isinstance(p, dict)},
            space_free=int(obj.get("space_free") or 0),
            space_level=str(obj.get("space_level", "ok")),
            space_level_number=int(obj.get("space_level_number") or 0),
            resources={str(n): ResourceStatus.from_json(r) for n, r in resources.items()
                       if isinstance(r, dict)},
            failures={str(n): str(m) for n, m in (obj.get("failures") or {}).items()},
            retry_in={str(n): float(s) for n, s in (obj.get("retry_in") or {}).items()},
            schema_version=int(obj.get("schema_version") or 0),
        )


# -------------------------------------------------------------------------- lag
def lag(status: ResourceStatus) -> int | None:
    """Bytes of log a secondary still has to apply of what the primary had when it last
    answered; 0 for a primary; None when that is not known (no fetch or replay running,
    no answer from the primary yet).

    While the replay is still in an older logfile than the one fetched, this is the
    primary's end of the newer one: a lower bound (the rest of the older logfiles is not
    in the status), and None if that end is 0, so that 0 always means up to date."""
    if status.role == PRIMARY:
        return 0
    fetch, replay = status.fetcher, status.replayer
    if status.role != SECONDARY or fetch is None or replay is None:
        return None
    remote = fetch.fetch_remote_end
    fetching = parse_logfile_name(fetch.fetch_logfile)
    try:
        pos = LogPosition.decode(replay.replay)
    except ValueError:
        return None
    if remote < 0 or fetching is None:
        return None
    if pos.logfile == fetch.fetch_logfile:
        return max(0, remote - pos.offset)
    if pos.number < fetching[0]:
        return remote or None
    return None


def up_to_date(status: ResourceStatus) -> bool:
    """A primary; or a secondary that has applied everything the primary had when it
    last answered."""
    return lag(status) == 0


def lag_seconds(status: ResourceStatus, now: float | None = None) -> float:
    """Seconds since a secondary last had everything the primary had; 0 while it is up to
    date or its lag is unknown. ``now`` is a ``time.time()``."""
    behind = lag(status)
    if not behind or status.replayer is None or status.replayer.caught_up_at is None:
        return 0.0
    now = time.time() if now is None else now
    return max(0.0, now - status.replayer.caught_up_at)


def tree_lag(primary_replay: str | None, member_replay: str | None) -> int | None:
    """Bytes between the primary's and a member's ``replay-HOST`` values from the tree, if
    both are in the same logfile (None otherwise: the tree does not say how long the
    logfiles between them are). A view of any member, from any host."""
    if not primary_replay or not member_replay:
        return None
    try:
        p, q = LogPosition.decode(primary_replay), LogPosition.decode(member_replay)
    except ValueError:
        return None
    return max(0, p.offset - q.offset) if p.logfile == q.logfile else None
