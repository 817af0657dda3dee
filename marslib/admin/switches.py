"""Attach and detach, pause and resume, and waiting for a condition on this host."""

from __future__ import annotations

from marslib.admin.context import Admin, Result, daemon_failure, status_due
from marslib.admin.devnode import attach_device, clients_besides_node, release_node
from marslib.errors import Refused
from marslib.schema import OFF, ON, switch_on
from marslib.status import ResourceStatus, up_to_date

WAIT_CONDITIONS = ("sync-off", "consistent", "up-to-date", "primary", "secondary")


def bring_up(admin: Admin, name: str) -> Result:
    """Ask marsd to start ``name`` now and wait until it runs (a secondary: until marsd
    has it, whatever its phase)."""
    admin.daemon("reconcile", retry=name)  # an operator's up retries a failed start now
    is_primary = admin.meta.get(admin.keys(name).primary) == admin.host

    def running() -> str | bool:
        st = admin.require_daemon(f"marsd must start {name}")
        if name in st.resources:
            return True
        return daemon_failure(st, name) or not is_primary

    admin.wait_for(f"resource {name} to come up", running)
    st = admin.live(name)
    if st is not None and st.role == "secondary":
        phase = st.secondary.phase if st.secondary else "?"
        admin.say(f"{name} is up on {admin.host} as a secondary ({phase})")
    elif st is not None and st.primary is not None:
        admin.say(f"{name} is up on {admin.host}: NBD export at {st.primary.nbd_socket}")
        rec = st.primary.recovery
        if rec is not None and rec.records_replayed:
            admin.say(f"recovery replayed {rec.records_replayed} records "
                      f"({rec.bytes_replayed} bytes) in {rec.seconds}s")
        if rec is not None and rec.torn_tail:
            admin.say(f"recovery cut a torn tail: {rec.torn_tail}")
    return {"status": st.to_json() if st is not None else {}}


def up(admin: Admin, name: str, device: bool = False) -> Result:
    """Attach ``name`` here and wait until marsd runs it; with ``device`` also give the
    primary its block device node."""
    k = admin.require_member(name, "join-resource first")
    key = k.todo(admin.host, "attach")
    changed = admin.meta.get(key) != ON
    admin.require_daemon(f"'up' waits until marsd serves {name}")
    if admin.dry_run:
        admin.say(f"would {'bring up' if changed else 'leave up'} {name}")
        return {"changed": changed, "dry_run": True}
    admin.meta.set(key, ON)
    result = {"changed": changed, **bring_up(admin, name)}
    if device and result["status"].get("role") == "primary":  # the JSON of bring_up
        node = attach_device(admin, name)
        result.update(changed=changed or node["changed"], node=node.get("node"))
    return result


def down(admin: Admin, name: str, force: bool = False) -> Result:
    k = admin.require_resource(name)
    key = k.todo(admin.host, "attach")
    st = admin.daemon_status()
    live = st.resources.get(name) if st is not None else None
    clients = clients_besides_node(live)
    if clients and not force:
        raise Refused(f"resource {name} is in use by {clients} NBD client(s): stop "
                      "the application (umount, disconnect) first, or use --force")
    changed = admin.meta.get(key) != OFF or live is not None
    if admin.dry_run:
        admin.say(f"would {'take down' if changed else 'leave down'} {name}")
        return {"changed": changed, "dry_run": True}
    release_node(admin, name, live)  # refused while it is mounted: no change yet
    admin.meta.set(key, OFF)
    if st is not None:
        admin.daemon("reconcile")
        admin.wait_for(f"resource {name} to go down", lambda: admin.live(name) is None)
    admin.say(f"{name} is down on {admin.host}")
    return {"changed": changed}


def set_switch(admin: Admin, name: str, switch: str, on: bool) -> Result:
    """pause-/resume-fetch, -replay, -sync."""
    k = admin.require_resource(name)
    key = k.todo(admin.host, switch)
    changed = switch_on(admin.meta.get(key)) != on
    if admin.dry_run:
        admin.say(f"would {'resume' if on else 'pause'} {switch} of {name} on {admin.host}")
        return {"changed": changed, "dry_run": True}
    admin.meta.set(key, ON if on else OFF)
    running = admin.poke()
    if switch == "replay" and not on and running:
        def paused() -> bool:
            res = admin.live(name)
            return res is None or res.replayer is None or res.replayer.replay_paused
        admin.wait_for(f"replay of {name} to pause", paused)
    admin.say(f"{name}: {switch} {'resumed' if on else 'paused'} on {admin.host}")
    return {"changed": changed}


def set_connected(admin: Admin, name: str, on: bool) -> Result:
    """connect / disconnect: fetch and sync together."""
    a = set_switch(admin, name, "fetch", on)
    b = set_switch(admin, name, "sync", on)
    return {"changed": a["changed"] or b["changed"], **({"dry_run": True}
                                                         if admin.dry_run else {})}


def progress_line(label: str, done: int, total: int, rate: float, eta: float | None) -> str:
    from marslib.sizes import format_size
    width = 30
    frac = done / total if total else 1.0
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    eta_text = f"{eta:.0f}s" if eta is not None else "?"
    return (f"{label} [{bar}] {frac * 100:5.1f}% {format_size(done)}/{format_size(total)} "
            f"{rate / 1e6:.1f} MB/s ETA {eta_text}")


def wait_sync(admin: Admin, name: str) -> None:
    k = admin.keys(name)
    status_now = status_due()  # marsd's status for the progress line, not at every poll

    def done() -> bool:
        status = admin.meta.get(k.syncstatus(admin.host))
        if status == "done":
            return True
        if not status_now():
            return False
        res = admin.live(name)
        sync = res.syncer if res is not None else None
        if sync is not None:
            admin.progress(progress_line(f"sync {name}", sync.sync_done, sync.sync_size,
                                         sync.sync_rate, sync.sync_eta))
        return False
    admin.wait_for(f"the full sync of {name}", done)
    admin.progress("\n")


def condition_reached(cond: str, st: ResourceStatus | None) -> bool:
    """A wait-resource condition, from marsd's live status of the resource."""
    if st is None:
        return False
    if cond in ("primary", "secondary"):
        return st.role == cond
    if st.role == "primary":  # the primary's data is the reference
        return cond in ("consistent", "up-to-date")
    consistent = st.secondary is not None and st.secondary.consistent
    return consistent and (cond == "consistent" or up_to_date(st))


def wait_resource(admin: Admin, name: str, cond: str) -> Result:
    admin.require_resource(name)
    admin.require_daemon(f"waiting for {name} needs its live status")
    if cond == "sync-off":
        wait_sync(admin, name)
    else:
        admin.wait_for(f"{name} to be {cond}",
                       lambda: condition_reached(cond, admin.live(name)))
    return {"changed": False}
