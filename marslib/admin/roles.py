"""Who is primary: handover, failover, giving up the role, split brain, invalidate.

The rules are pure functions of a :class:`ResourceSnapshot` and marsd's live status here
(:func:`primary_refusal`, :func:`handover_refusal`, :func:`secondary_refusal`,
:func:`invalidate_refusal`); the steps below them act on the tree and wait for marsd.
"""

from __future__ import annotations

import time

from marslib import resyncplan
from marslib.admin.context import Admin, Result, daemon_failure
from marslib.admin.devnode import clients_besides_node, release_node
from marslib.admin.snapshot import ResourceSnapshot, read_resource
from marslib.admin.switches import wait_sync
from marslib.admin.view import DISCONNECTED_AFTER, split_brain_advice, split_brain_losers
from marslib.errors import Refused
from marslib.history import forget_links
from marslib.position import LogPosition
from marslib.schema import (
    NO_PRIMARY,
    RESYNC_LOG,
    SYNC_DONE,
    ResyncPlan,
    SyncResult,
    is_primary_host,
    sync_from_start,
)
from marslib.sizes import human_size
from marslib.status import ResourceStatus, lag

OPEN_COUNT_GRACE = 2.0  # seconds a handover waits for the old primary's clients to leave
RESYNC_SETTLE = 10.0  # seconds invalidate waits for the secondary to settle its plan


def primary_refusal(snap: ResourceSnapshot, host: str,
                    live: ResourceStatus | None) -> str | None:
    """Why ``host`` cannot become primary at all (handover or failover), if it cannot;
    ``live`` is marsd's status of the resource here (None: not running here)."""
    me = snap.member(host)
    if me is None:
        return f"{host} is not a member of {snap.name}: join-resource first"
    if not me.attach or live is None:
        return f"{snap.name} is not attached here: run 'marsadm up {snap.name}' first"
    if not me.synced:
        return f"{snap.name} is not fully synced here: it would not be consistent"
    redo = live.replayer.replay_redo if live.replayer else None
    if redo:
        return (f"{snap.name} is not consistent here: replay is redoing the batch a crash "
                f"interrupted (up to {redo}); retry in a moment")
    return None


def handover_refusal(snap: ResourceSnapshot, host: str, live: ResourceStatus) -> str | None:
    """Why ``host`` cannot take over by a planned handover (no --force), if it cannot."""
    name, old = snap.name, snap.primary
    sec, fetch, replay = live.secondary, live.fetcher, live.replayer
    if live.role != "secondary" or sec is None:
        return f"{name} is not running here as a secondary: run 'marsadm up {name}'"
    me = snap.member(host)
    if me is None or not me.synced or sec.phase != "replaying":
        return f"{name} is still syncing here: wait with 'marsadm wait-resource {name} sync-off'"
    if not sec.consistent:
        return f"{name} is not consistent here yet: wait until it has replayed past its syncpos"
    if replay is not None and replay.replay_error:
        return f"{name} cannot replay here: {replay.replay_error}"
    if (fetch is not None and fetch.fetch_paused) or (replay is not None and
                                                      replay.replay_paused):
        return f"fetch or replay of {name} is paused here: resume them first"
    if snap.forks:
        return (f"split brain ({snap.forks[0].describe()}): resolve it first ('marsadm "
                f"view-split-brain {name}'), or use --force")
    if is_primary_host(old) and old in snap.members:
        theirs = snap.members[old]
        if theirs.emergency:
            return (f"the primary {old} is in emergency mode: its log is incomplete; free "
                    f"space in its /mars first (it then logs again, and every secondary, this "
                    f"one too, needs 'marsadm invalidate {name}'), or use --force")
        if theirs.node:
            return (f"the primary {old} has the block device {theirs.node} of {name}: "
                    f"unmount it there and run 'marsadm detach-device {name}' there first")
        if theirs.open_count:
            return (f"the primary {old} still has {theirs.open_count} NBD client(s) on "
                    f"{name}: stop the application there (umount, disconnect) first")
        age = fetch.fetch_contact_age if fetch is not None else 0.0
        if age > DISCONNECTED_AFTER:
            return f"the primary {old} has not answered for {age:.0f}s: " \
                   "if it is gone, use 'marsadm primary --force' (failover)"
    return None


def secondary_refusal(snap: ResourceSnapshot, host: str,
                      live_clients: int | None = None) -> str | None:
    """Why ``host`` cannot give up the primary role; ``live_clients``: NBD clients besides
    its own block device node, as marsd counts them now (else the tree's count)."""
    me = snap.member(host)
    clients = live_clients if live_clients is not None else me.open_count if me else 0
    if clients:
        return (f"{snap.name} still has {clients} NBD client(s) here: stop the "
                "application first")
    return None


def invalidate_refusal(snap: ResourceSnapshot, host: str) -> str | None:
    if snap.primary == host:
        return f"{host} is the primary of {snap.name}: only a secondary can be invalidated"
    if snap.member(host) is None:
        return f"{host} is not a member of {snap.name}: use join-resource"
    return None


def replayed_all_of(old_final: str | None, applied: str | None) -> bool:
    """This host's device holds everything up to the old primary's final position."""
    if not old_final or not applied:
        return False
    f, mine = LogPosition.decode(old_final), LogPosition.decode(applied)
    return (mine.number, mine.offset) >= (f.number, f.offset)


# --------------------------------------------------------------------- steps
def _snapshot_after_clients_left(admin: Admin, name: str) -> ResourceSnapshot:
    """The snapshot once the old primary's open count reached 0, or after a short grace
    (the count travels with the metadata, a moment behind the application)."""
    snap = read_resource(admin.meta, name)
    deadline = time.monotonic() + min(OPEN_COUNT_GRACE, admin.timeout)
    while time.monotonic() < deadline and is_primary_host(snap.primary) and \
            snap.primary in snap.members and snap.members[snap.primary].open_count:
        time.sleep(0.1)
        snap = read_resource(admin.meta, name)
    return snap


def make_primary(admin: Admin, name: str, force: bool) -> Result:
    """``primary``: a planned handover to this host, or with ``force`` a failover."""
    k = admin.require_resource(name)
    snap = read_resource(admin.meta, name)
    if snap.member(admin.host) is None:
        raise Refused(f"{admin.host} is not a member of {name}: join-resource first")
    old = snap.primary
    if old == admin.host:
        admin.say(f"{admin.host} is already the primary of {name}: nothing changes")
        return {"changed": False, "primary": admin.host}
    st = admin.require_daemon(f"{name} must run here to take over")
    live = st.resources.get(name)
    why = primary_refusal(snap, admin.host, live)
    if why is None and live is not None and not force:
        why = handover_refusal(_snapshot_after_clients_left(admin, name), admin.host, live)
        if why:
            why = f"handover of {name} to {admin.host} refused: {why}"
    if why:
        raise Refused(why)
    if admin.dry_run:
        admin.say(f"would {'fail over' if force else 'hand over'} {name} from {old} "
                  f"to {admin.host}")
        return {"changed": True, "dry_run": True}
    t0 = time.monotonic()
    if force:
        admin.meta.set(k.primary, admin.host, durable=True)
        admin.say(f"failover: {admin.host} takes over {name} from what it has replayed; if "
                  f"{old} still writes, that is a split brain")
    else:
        _wait_caught_up(admin, name)  # while the old primary still serves: no change yet
        admin.meta.set(k.primary, NO_PRIMARY, durable=True)
        try:  # from here any failure (a timeout, marsd not answering the poke) undoes it
            admin.poke()
            _wait_old_primary_done(admin, name, old)
        except BaseException:
            if is_primary_host(old):
                admin.meta.set(k.primary, old or NO_PRIMARY, durable=True)  # as it was
            raise
        admin.meta.set(k.primary, admin.host, durable=True)
    admin.poke()

    def serving() -> str | bool:
        st = admin.require_daemon(f"{name} must come up as primary here")
        res = st.resources.get(name)
        return (res is not None and res.role == "primary") or daemon_failure(st, name) \
            or False

    admin.wait_for(f"{name} to come up as primary here", serving)
    secs = round(time.monotonic() - t0, 3)
    now = admin.live(name)
    export = now.primary.nbd_socket if now is not None and now.primary else None
    admin.say(f"{admin.host} is now the primary of {name} ({secs}s): NBD export at {export}")
    return {"changed": True, "primary": admin.host, "previous": old, "seconds": secs,
            "forced": force}


def _wait_caught_up(admin: Admin, name: str) -> None:
    """Wait (within --timeout) until this secondary has applied all it knows of; on a
    timeout nothing has changed."""
    def done() -> bool:
        res = admin.live(name)
        behind = lag(res) if res is not None else None
        admin.progress(f"handover {name}: {human_size(behind or 0)}B still to replay")
        return behind == 0
    admin.wait_for(f"{name} to catch up here before the handover", done)


def _wait_old_primary_done(admin: Admin, name: str, old: str | None) -> None:
    """Wait until the old primary has ended its log and this host has replayed all of it."""
    if not is_primary_host(old):
        return
    assert old is not None
    k = admin.keys(name)

    def done() -> bool:
        if admin.meta.get(k.actual(old, "is-primary")) != "0":
            return False
        final = admin.meta.get(k.replay(old))
        res = admin.live(name)
        applied = res.applied if res is not None else None
        if final and applied:
            f, mine = LogPosition.decode(final), LogPosition.decode(applied)
            admin.progress(f"handover {name}: replayed {mine.number}:{mine.offset} of "
                           f"{f.number}:{f.offset}")
        return replayed_all_of(final, applied)

    admin.wait_for(f"{old} to end its log and {admin.host} to replay all of it", done)
    admin.progress("\n")


def give_up_primary(admin: Admin, name: str) -> Result:
    """``secondary``: no host is primary until another member runs ``primary``."""
    k = admin.require_resource(name)
    snap = read_resource(admin.meta, name)
    if snap.primary != admin.host:
        admin.say(f"{admin.host} is not the primary of {name} (the primary is "
                  f"{snap.primary}): nothing changes")
        return {"changed": False}
    st = admin.require_daemon(f"the primary of {name} must end its log")
    live = st.resources.get(name)
    why = secondary_refusal(snap, admin.host,
                            clients_besides_node(live) if live is not None else None)
    if why:
        raise Refused(why)
    if admin.dry_run:
        admin.say(f"would end {name}'s log here; no host would be primary")
        return {"changed": True, "dry_run": True}
    release_node(admin, name, live)  # refused while it is mounted: no change yet
    admin.meta.set(k.primary, NO_PRIMARY, durable=True)
    admin.poke()
    admin.wait_for(f"{name} to end its log here",
                   lambda: getattr(admin.live(name), "role", None) != "primary")
    admin.say(f"{admin.host} is no longer the primary of {name}; make another member primary "
              "with 'marsadm primary'")
    return {"changed": True}


def invalidate(admin: Admin, name: str, wait: bool = False, full: bool = False) -> Result:
    """Discard this secondary's data and history and resync it from the primary: only
    the blocks either side wrote since their histories forked when that is known and the
    logs since then are here (:mod:`marslib.resync`), else (or with ``full``) the whole
    device. The plan is made before the fork's evidence, this host's version links, is
    dropped."""
    k = admin.require_resource(name)
    snap = read_resource(admin.meta, name)
    why = invalidate_refusal(snap, admin.host)
    if why:
        raise Refused(why)
    if wait:
        admin.require_daemon("--wait waits for the full sync marsd runs")
    decided = resyncplan.plan(admin.meta, admin.paths, name, admin.host, full)
    if admin.dry_run:
        admin.say(f"would resync {name} on {admin.host} from the primary: "
                  f"{resyncplan.describe(decided)}")
        return {"changed": True, "dry_run": True, **_resync_result(decided)}
    last_result = admin.meta.get(k.syncresult(admin.host))
    resyncplan.forget_saved_set(admin.paths, name)  # a set of an earlier resync
    # durable before the fork's evidence goes; the unfinished sync pins the logs since
    # the fork on every member (logretention)
    admin.meta.set(k.resync(admin.host), decided.encode(), durable=True)
    admin.meta.set(k.syncstatus(admin.host), sync_from_start(snap.size), durable=True)
    dropped = forget_links(admin.meta, name, admin.host)  # this host's history is discarded
    running = admin.poke()
    admin.say(f"{name}: resync from the primary started on {admin.host}"
              + (f" ({dropped} version links of its old history dropped)" if dropped else ""))
    if wait:
        wait_sync(admin, name)
    elif running and admin.live(name) is not None:
        _wait_resync_planned(admin, name)
    final = resyncplan.read_plan(admin.meta, name, admin.host) or decided
    admin.say(f"{name}: {resyncplan.describe(final)}")
    result: Result = {"changed": True, **_resync_result(final)}
    if wait:
        done = _new_sync_result(admin, name, last_result)
        if done is not None:
            result.update(compared=done.compared, copied=done.copied, seconds=done.seconds)
            admin.say(f"{name}: resync done: {human_size(done.compared)}B compared, "
                      f"{human_size(done.copied)}B copied in {done.seconds:.1f}s")
    return result


def _resync_result(p: ResyncPlan) -> Result:
    return {"resync": p.mode, "since": p.since.encode() if p.since else None,
            "blocks": p.blocks, "reason": p.reason or None}


def _new_sync_result(admin: Admin, name: str, before: str | None) -> SyncResult | None:
    """The finished sync's figures (the sync writes them before ``syncstatus=done``);
    None when the value is still the one from before this resync."""
    value = admin.meta.get(admin.keys(name).syncresult(admin.host))
    return SyncResult.decode(value) if value != before else None


def _wait_resync_planned(admin: Admin, name: str) -> None:
    """Wait a moment (at most RESYNC_SETTLE seconds, and --timeout) until the secondary
    has settled the plan: the block set computed, or a full comparison decided. No
    error when it has not: the result then says what was planned."""
    k = admin.keys(name)
    deadline = time.monotonic() + min(RESYNC_SETTLE, admin.timeout)
    while time.monotonic() < deadline:
        p = resyncplan.read_plan(admin.meta, name, admin.host)
        if p is None or p.mode != RESYNC_LOG or p.blocks is not None or \
                admin.meta.get(k.syncstatus(admin.host)) == SYNC_DONE:
            return
        time.sleep(0.05)


def view_split_brain(admin: Admin, name: str) -> Result:
    admin.require_resource(name)
    snap = read_resource(admin.meta, name)
    losers = split_brain_losers(snap)
    for f in snap.forks:
        admin.say(f.describe())
    if snap.forks:
        admin.say(f"designated primary: {snap.primary}; hosts to resync (marsadm invalidate "
                  f"{name} on each): {', '.join(losers) or '-'}")
        if not snap.has_primary:
            admin.say(split_brain_advice(name, snap.primary, losers))
    else:
        admin.say(f"{name}: no split brain")
    return {"changed": False, "split_brain": bool(snap.forks), "losers": losers,
            "forks": [f.describe() for f in snap.forks]}
