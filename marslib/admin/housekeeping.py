"""Logfile rotation and deletion. marsd owns the logfiles: these steps ask it, and act
themselves (with the same rules, :mod:`marslib.logretention`) only while marsd is down."""

from __future__ import annotations

from typing import Any

from marslib import control
from marslib.admin.context import Admin, Result
from marslib.sizes import format_size


def log_rotate(admin: Admin, name: str) -> Result:
    admin.require_resource(name)
    admin.require_daemon(f"only the running primary of {name} can start a new logfile")
    if admin.dry_run:
        admin.say(f"would rotate the logfile of {name}")
        return {"changed": True, "dry_run": True}
    reply = admin.daemon("log-rotate", resource=name)
    admin.say(f"{name}: now logging to {reply['logfile']}")
    return {"changed": True, "logfile": reply["logfile"]}


def log_delete(admin: Admin, name: str) -> Result:
    """Delete the logfiles every member has applied."""
    admin.require_resource(name)
    try:
        reply: dict[str, Any] = admin.daemon("log-delete", resource=name,
                                             dry_run=admin.dry_run)
        deleted, freed = list(reply["deleted"]), int(reply.get("bytes_freed", 0))
    except control.DaemonNotRunning:
        from marslib.logretention import deletable_logfiles, delete_logfiles
        doomed = deletable_logfiles(admin.meta, admin.paths, name)
        deleted = [p.name for p in doomed]
        freed = 0 if admin.dry_run else delete_logfiles(doomed, name)
    if admin.dry_run:
        admin.say(f"would delete {len(deleted)} logfile(s) of {name}: "
                  f"{' '.join(deleted) or '-'}")
        return {"changed": bool(deleted), "deleted": deleted, "dry_run": True}
    admin.say(f"{name}: deleted {len(deleted)} logfile(s), {format_size(freed)} freed")
    return {"changed": bool(deleted), "deleted": deleted, "bytes_freed": freed}


def cron(admin: Admin, rotate_size: int, rotate_age: float) -> Result:
    """Housekeeping for every resource: rotate logfiles that are big or old (marsd must
    run for that), delete applied ones."""
    admin.require_cluster()
    try:
        actions: dict[str, Any] = admin.daemon(
            "cron", rotate_size=rotate_size, rotate_age=rotate_age,
            dry_run=admin.dry_run)["actions"]
    except control.DaemonNotRunning:
        from marslib.logretention import deletable_logfiles, delete_logfiles
        actions = {}
        for name in admin.resource_names():
            doomed = deletable_logfiles(admin.meta, admin.paths, name)
            if doomed:
                if not admin.dry_run:
                    delete_logfiles(doomed, name)
                actions[name] = {"deleted": [p.name for p in doomed]}
        admin.say("note: marsd is not running here: no logfile was rotated")
    for name, done in sorted(actions.items()):
        parts = []
        if done.get("rotated_to") or done.get("would_rotate"):
            verb = "rotated to" if done.get("rotated_to") else "would rotate"
            parts.append(f"{verb} {done.get('rotated_to') or done.get('would_rotate')}"
                         + (f" ({done['reason']})" if done.get("reason") else ""))
        if done.get("deleted"):
            parts.append(f"{'would delete' if admin.dry_run else 'deleted'} "
                         f"{' '.join(done['deleted'])}")
        admin.say(f"{name}: {'; '.join(parts)}")
    if not actions:
        admin.say("nothing to do")
    return {"changed": bool(actions) and not admin.dry_run, "actions": actions}
