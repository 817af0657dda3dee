"""``marsadm verify``: compare a secondary with its primary while the application writes
(the comparison itself runs on the secondary: :mod:`marslib.verify`).

The request is a tree value, ``verifystatus-HOST`` = ``0/SIZE[,repair]``: from the
secondary itself or from any other member (``--host H``), where it travels with the
metadata, and the result comes back the same way (``verifyresult-HOST``,
``verifydiff-HOST``). The rules are a pure function of a :class:`ResourceSnapshot` and,
on the secondary itself, of marsd's live status (:func:`verify_refusal`).
"""

from __future__ import annotations

import json
from pathlib import Path

from marslib.admin.context import Admin, Result, status_due
from marslib.admin.snapshot import ResourceSnapshot, read_resource
from marslib.errors import Refused, TimedOut
from marslib.meta import MetaValue
from marslib.position import LogPosition
from marslib.schema import (
    VerifyDiff,
    VerifyResult,
    VerifyStatus,
    interrupted_batch,
    verify_from_start,
)
from marslib.sizes import human_size
from marslib.status import ResourceStatus

SHOWN_RANGES = 8  # ranges in the lines for people (all of the key's in the JSON)


def _before(a: str | None, b: str | None) -> bool:
    """Log position ``a`` lies before ``b`` (False when either is unknown)."""
    try:
        if not a or not b:
            return False
        pa, pb = LogPosition.decode(a), LogPosition.decode(b)
    except ValueError:
        return False
    return (pa.number, pa.offset) < (pb.number, pb.offset)


def verify_refusal(snap: ResourceSnapshot, host: str, live: ResourceStatus | None,
                   local: bool) -> str | None:
    """Why ``host`` cannot be verified now, if it cannot. ``local``: marsd here is
    ``host``'s, and ``live`` its status of the resource (None: not running it)."""
    name = snap.name
    me = snap.member(host)
    if me is None:
        return f"{host} is not a member of {name}: there is nothing to verify there"
    others = ", ".join(h for h in snap.members if h != host) or "none"
    if snap.primary == host:
        return (f"{host} is the primary of {name}: verify compares a secondary with it; "
                f"name the secondary with --host (members: {others})")
    if not snap.has_primary:
        return f"{name} has no primary to compare {host} with"
    assert snap.primary is not None
    primary = snap.member(snap.primary)
    if primary is not None and primary.emergency:
        return (f"the primary {snap.primary} is in emergency mode: its writes bypass the log, "
                f"so {host} cannot be compared with it; free space in its /mars first")
    if me.syncing:
        return (f"{name} is syncing on {host}: a verify compares a finished replica; wait "
                f"with 'marsadm wait-resource {name} sync-off' on {host}")
    gap = int(snap.history_gap or 0)
    pos = me.position
    if gap and pos is not None and gap > pos.number:
        return (f"the primary's history has a gap before logfile {gap} (emergency mode) that "
                f"{host} has not passed: it is outdated; run 'marsadm invalidate {name}' "
                f"on {host}")
    if local:
        if live is None or live.secondary is None:
            return f"{name} is not running here as a secondary: run 'marsadm up {name}'"
        if live.secondary.phase != "replaying":
            why = f": {live.secondary.error}" if live.secondary.error else ""
            return f"{name} is not replaying here (it is {live.secondary.phase}{why})"
        if not live.secondary.consistent:
            return (f"{name} is not consistent on {host} yet (replaying up to its syncpos, "
                    f"or redoing a batch a crash interrupted): wait with 'marsadm "
                    f"wait-resource {name} consistent'")
    elif interrupted_batch(me.replay) or _before(me.replay, me.syncpos) or (
            me.verify is not None and me.verify.repairing):
        return (f"{name} is not consistent on {host} yet (as the metadata here says): wait "
                f"until it is (marsadm view {name})")
    return None


def verify(admin: Admin, name: str, host: str, repair: bool, wait: bool) -> Result:
    """``verify``: ask ``host`` to compare its replica of ``name`` with the primary's
    data; with ``wait`` wait for the result (within --timeout)."""
    k = admin.require_resource(name)
    snap = read_resource(admin.meta, name)
    daemon = admin.require_daemon(
        f"the verify of {host} is asked for through marsd" if host != admin.host else
        "the verify runs in marsd")
    local = daemon.host == host
    live = daemon.resources.get(name) if local else None
    latest = admin.meta.read(k.verifystatus(host))  # read once: it may end meanwhile
    current = VerifyStatus.decode(latest.value if latest is not None else None)
    if current is not None and current.running:
        if repair and not current.repair:
            raise Refused(f"a verify of {name} without --repair is running on {host}: wait "
                          f"for it ('marsadm verify {name} --host {host}' waits), then verify "
                          "again with --repair")
        admin.say(f"a verify of {name} is already running on {host}: waiting for it")
        request = latest
        changed = False
        repair = current.repair
    else:
        why = verify_refusal(snap, host, live, local)
        if why:
            raise Refused(why)
        if admin.dry_run:
            admin.say(f"would verify {name} on {host} against the primary {snap.primary}"
                      + (" and repair the differences" if repair else ""))
            return {"changed": True, "dry_run": True}
        request = admin.meta.set(k.verifystatus(host), verify_from_start(snap.size, repair),
                                 durable=True)
        admin.poke()
        changed = True
        admin.say(f"{name}: verify of {host} against the primary {snap.primary} started"
                  + (" (differences are repaired)" if repair else ""))
    if not wait:
        return {"changed": changed, "host": host, "waiting": False}
    assert request is not None
    return {"changed": changed, "host": host, "repair": repair,
            **_wait_result(admin, name, host, request, local, repair)}


def _wait_result(admin: Admin, name: str, host: str, request: MetaValue, local: bool,
                 repair: bool) -> Result:
    """Wait until ``host`` has written the result of the verify asked for by
    ``request`` (the tree value), and return it."""
    k = admin.keys(name)
    last_error: list[str] = []
    status_now = status_due()  # marsd's status for the progress line, not at every poll

    def newer(key: str) -> bool:  # written (or deleted) by the verify asked for
        mv = admin.meta.read(key)
        return mv is not None and mv.stamp > request.stamp

    def finished() -> bool | str:
        st = VerifyStatus.decode(admin.meta.get(k.verifystatus(host)))
        if st is None:
            return f"the verify request of {name} on {host} was withdrawn"
        if st.finished:
            return newer(k.verifyresult(host)) and newer(k.verifydiff(host))
        if not status_now():
            return False
        res = admin.live(name) if local else None
        v = res.verifier if res is not None else None
        if v is not None and v.verify_error:
            last_error[:] = [v.verify_error]
        if st.repairing:
            admin.progress(f"verify {name}: repairing {host}")
        elif v is not None:
            admin.progress(_progress(name, v.verify_done, v.verify_size, v.verify_differing,
                                     v.verify_pass))
        elif st.size:
            admin.progress(_progress(name, st.done, st.size, None, 0))
        return False

    try:
        admin.wait_for(f"the verify of {name} on {host}", finished)
    except TimedOut as exc:
        more = f" (last problem: {last_error[0]})" if last_error else ""
        raise TimedOut(f"{exc}{more}; the verify goes on: 'marsadm view {name}' shows its "
                       f"progress, 'marsadm verify {name} --host {host}' waits again") from None
    admin.progress("\n")
    return _result(admin, name, host, local, repair)


def _progress(name: str, done: int, size: int, differing: int | None, passno: int) -> str:
    frac = done / size if size else 1.0
    text = f"verify {name}: {frac * 100:5.1f}% of {human_size(size)}B"
    if differing:
        text += f", {human_size(differing)}B differ"
    if passno:
        text += f", pass {passno + 1} over blocks that were being written"
    return text


def _result(admin: Admin, name: str, host: str, local: bool, repair: bool) -> Result:
    k = admin.keys(name)
    res = VerifyResult.decode(admin.meta.get(k.verifyresult(host)))
    diff = VerifyDiff.decode(admin.meta.get(k.verifydiff(host))) or VerifyDiff(())
    if res is None:
        raise Refused(f"the verify of {name} on {host} ended without a readable result "
                      f"({admin.meta.get(k.verifyresult(host))!r})")
    out: Result = {"compared": res.compared, "differing": res.differing,
                   "ranges": [list(r) for r in diff.ranges], "ranges_left_out": diff.more,
                   "range_count": res.ranges, "unsettled": res.unsettled,
                   "repaired": res.repaired, "seconds": res.seconds}
    details = _local_details(admin, name, host) if local else {}
    out.update(details)
    _say_result(admin, name, host, res, diff, repair)
    return out


def state_file(admin: Admin, name: str, host: str) -> Path:
    """``marslib.verify.state_path`` (named here: importing the verify itself, with the
    sync, fetch and replay code, would slow every marsadm down)."""
    return admin.paths.resource_dir(name) / f"verify-{host}.json"


def _local_details(admin: Admin, name: str, host: str) -> Result:
    """Figures only the verify's state file on the host itself holds: blocks retried
    because they were being written, windows retried whole, where it resumed."""
    path = state_file(admin, name, host)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {"touched": state.get("touched"), "window_retries": state.get("window_retries"),
            "passes": state.get("passes"), "resumed_at": state.get("resumed_at"),
            "state_file": str(path)}


def _say_result(admin: Admin, name: str, host: str, res: VerifyResult, diff: VerifyDiff,
                repair: bool) -> None:
    head = (f"{name} on {host}: {human_size(res.compared)}B compared with the primary in "
            f"{res.seconds:.1f}s")
    if not res.differing:
        admin.say(f"{head}: no difference")
    else:
        shown = ", ".join(f"{off}+{length}" for off, length in diff.ranges[:SHOWN_RANGES])
        left = res.ranges - min(len(diff.ranges), SHOWN_RANGES)
        admin.say(f"{head}: {human_size(res.differing)}B in {res.ranges} range(s) differ "
                  f"(OFFSET+LENGTH): {shown}" + (f" and {left} more" if left > 0 else ""))
        if repair:
            admin.say(f"repaired: {human_size(res.repaired)}B copied from the primary; "
                      f"{host} is consistent again once it has replayed past its new syncpos")
        else:
            admin.say(f"resync them with 'marsadm verify {name} --host {host} --repair'")
    if res.unsettled:
        admin.say(f"{human_size(res.unsettled)}B were being written at every comparison: "
                  "not compared (unsettled), not reported as different")
