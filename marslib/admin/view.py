"""The read model behind ``marsadm view``: each member's state, lag and advice.

Everything here is a pure function of a :class:`ResourceSnapshot` and marsd's live status
of this host, except :func:`resource_view`, which also lists the logfiles here.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from marslib.admin.context import Admin, daemon_failure
from marslib.admin.snapshot import MemberSnapshot, ResourceSnapshot, read_resource
from marslib.resyncplan import describe as describe_resync
from marslib.resyncplan import view_entry as resync_view_entry
from marslib.schema import NO_PRIMARY, interrupted_batch
from marslib.status import DaemonStatus, ResourceStatus, lag, lag_seconds, tree_lag

VIEW_SCHEMA_VERSION = 1  # of ``view --json``; bumped when a field changes meaning

MEMBER_STATES = ("SplitBrain", "Detached", "Emergency", "Outdated", "Error", "Primary",
                 "PrimaryDown", "Syncing", "Inconsistent", "ReplayPaused", "FetchPaused",
                 "Disconnected", "UpToDate", "Replaying")  # what member_state() returns

DISCONNECTED_AFTER = 15.0  # seconds without an answer from the primary (long polls: 5 s)

# marsd's live figures of this host's member go into its view entry as they are, except
# these, where the view has its own meaning (from the tree, or a path instead of details)
NOT_LIVE = ("role", "device", "error", "device_node")


def member_state(info: dict[str, Any]) -> str:
    """One word for a member's state, from its view entry."""
    if info.get("split_brain"):
        return "SplitBrain"
    if not info["attach"]:
        return "Detached"
    if info.get("emergency"):
        return "Emergency"
    if info.get("error"):
        return "Outdated" if "outdated" in str(info["error"]) else "Error"
    if info["role"] == "primary":
        return "Primary" if info.get("running", info["is_primary"]) else "PrimaryDown"
    if info["syncing"]:
        return "Syncing"
    if info.get("consistent") is False:
        return "Inconsistent"
    if not info["replaying"] or info.get("replay_paused"):
        return "ReplayPaused"
    if not info["fetch"] or info.get("fetch_paused"):
        return "FetchPaused"
    if (info.get("fetch_contact_age") or 0) > DISCONNECTED_AFTER:
        return "Disconnected"  # the primary's progress is unknown: no lag to trust
    return "UpToDate" if info.get("lag_bytes") == 0 else "Replaying"


def member_info(snap: ResourceSnapshot, m: MemberSnapshot) -> dict[str, Any]:
    """A member's view entry from the tree alone."""
    primary_replay = snap.members[snap.primary].replay \
        if snap.primary in snap.members else None
    return {
        "device": m.device,
        "role": "primary" if m.host == snap.primary else "secondary",
        "attach": m.attach,
        "is_primary": m.is_primary,
        "emergency": m.emergency,
        "open_count": m.open_count,
        "replay": m.replay,
        "syncing": m.syncing,
        "sync_progress": m.sync.progress if m.sync else None,
        "syncpos": m.syncpos,
        "fetch": m.fetch,
        "replaying": m.replay_on,
        "error": m.error,
        "lag_bytes": tree_lag(primary_replay, m.replay),
        "version": m.version,
        "last_sync": asdict(m.last_sync) if m.last_sync else None,
        "device_node": m.node,
        # how the last or running resync compares (log-based since the fork, or the whole
        # device and why), and while it runs a line for people
        "resync": resync_view_entry(m.resync),
        "resync_note": describe_resync(m.resync) if m.syncing else None,
        **verify_info(m),
    }


def verify_info(m: MemberSnapshot) -> dict[str, Any]:
    """A member's online verify fields (marsadm verify), from the tree."""
    v, diff = m.verify, m.verify_diff
    info: dict[str, Any] = {
        "verifying": v is not None and v.running,
        "verify_progress": v.progress if v is not None else None,
        "last_verify": asdict(m.last_verify) if m.last_verify else None,
        "verify_diff": {"ranges": [list(r) for r in diff.ranges], "more": diff.more}
        if diff is not None and m.last_verify is not None else None,
    }
    if v is not None and v.repairing:
        info["consistent"] = False  # differing blocks are being copied
    return info


def add_live(info: dict[str, Any], live: ResourceStatus | None, failure: str | None,
             now: float) -> None:
    """Overlay this host's live figures from marsd (None: it does not run the resource)."""
    if live is not None:
        info["running"] = True
        info.update({k: v for k, v in live.to_json().items() if k not in NOT_LIVE})
        if live.role == "secondary":
            info["lag_bytes"] = lag(live)
            info["lag_seconds"] = round(lag_seconds(live, now), 1)
        if live.replayer is not None and live.replayer.replay_error:
            info["error"] = live.replayer.replay_error
        node = live.device_node
        if node is not None:  # marsd's view of the node is newer than the tree's
            info["device_node"] = node.node if node.healthy else None
            if node.note or node.problem:
                info["device_node_note"] = node.note or node.problem
    else:
        # not running here (marsd stopped or killed, resource down): no export, no NBD
        # client, whatever a crash left in actual-HOST/open-count and is-primary
        info["running"] = False
        info["open_count"] = 0
    if failure:
        info["error"] = failure
    if "consistent" not in info and interrupted_batch(info["replay"]):
        info["consistent"] = False  # a crash in a replay batch: torn device


def split_brain_entries(snap: ResourceSnapshot) -> list[dict[str, Any]]:
    return [{"logfile": f.number,
             "views": {w: {"logfile_host": v[0], "end": v[1], "seq": v[2]}
                       for w, v in f.views.items()}}
            for f in snap.forks]


def split_brain_losers(snap: ResourceSnapshot) -> list[str]:
    """Hosts whose history differs from the designated primary's (to invalidate)."""
    return sorted({w for f in snap.forks for w, v in f.views.items()
                   if snap.primary in f.views and v != f.views[snap.primary]})


def split_brain_advice(name: str, primary: str | None, losers: list[str]) -> str:
    if not primary or primary == NO_PRIMARY:
        return (f"no host is primary: run 'marsadm primary --force {name}' on the host whose "
                f"data is to be kept, then 'marsadm invalidate {name}' on the others")
    if not losers:
        return (f"run 'marsadm invalidate {name}' on each host whose history differs from "
                f"the primary {primary}'s")
    return (f"run 'marsadm invalidate {name}' on {', '.join(losers)} (each then resyncs "
            f"from the primary {primary})")


def advice_host(error: str, member: str, here: str) -> str:
    """Another member's advice speaks of "this host" and "here": say which host that is
    (invalidate, say, is refused on the primary that shows a secondary's error)."""
    if member == here or "marsadm " not in error:
        return ""
    return f' (reported by {member}: "this host" and "here" mean {member}, not {here})'


def resource_view(admin: Admin, name: str, daemon: DaemonStatus | None,
                  snap: ResourceSnapshot | None = None) -> dict[str, Any]:
    """Everything about one resource as known here: tree values of every member, plus the
    live status of this host's marsd."""
    snap = snap or read_resource(admin.meta, name)
    logfiles = admin.paths.logfiles(name)
    sizes = []
    for _, _, p in logfiles:
        try:
            sizes.append(p.stat().st_size)
        except FileNotFoundError:
            pass  # deleted since the listing
    view: dict[str, Any] = {
        "resource": name,
        "size": snap.size,
        "primary": snap.primary,
        "history_gap": snap.history_gap,
        "split_brain": split_brain_entries(snap),
        "members": {},
        "logfiles": [p.name for _, _, p in logfiles],
        "log_bytes": sum(sizes),
    }
    now = time.time()
    for host, m in snap.members.items():
        info = member_info(snap, m)
        if host == admin.host:
            live = daemon.resources.get(name) if daemon else None
            add_live(info, live, daemon_failure(daemon, name) if daemon else None, now)
        info["split_brain"] = snap.differs_from_primary(host)
        info["state"] = member_state(info)
        view["members"][host] = info
    return view
