"""marsadm: the admin command line.

It edits the metadata tree under ``/mars`` and asks the local marsd over its control
socket. Every verb accepts ``--json``, ``--timeout`` and ``--dry-run``. Exit codes: 0 ok,
1 refused (the message says what to do), 2 usage error, 3 timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marslib import __version__, control
from marslib.device import probe_size
from marslib.durable import mkdir_durably, write_file_durably
from marslib.errors import DeviceError, MarsError, Refused, TimedOut, UsageError
from marslib.layout import MarsPaths, check_host_name, check_resource_name
from marslib.meta import MetaStore, MetaValue
from marslib.net.handshake import SECRET_MIN_LEN, restore_hint, secret_problem
from marslib.position import LogPosition
from marslib.sizes import format_size, human_size, parse_size


@dataclass
class Ctx:
    """What every verb gets: parsed arguments, paths, the metadata tree, output."""

    args: argparse.Namespace
    paths: MarsPaths
    host: str
    meta: MetaStore
    lines: list[str] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        return bool(self.args.dry_run)

    @property
    def timeout(self) -> float:
        return float(self.args.timeout)

    def say(self, text: str) -> None:
        self.lines.append(text)

    def rkey(self, resource: str, name: str) -> str:
        return f"resource-{resource}/{name}"

    def daemon(self, cmd: str, **kw: Any) -> dict[str, Any]:
        return control.request(self.paths.control_socket, cmd, timeout=self.timeout, **kw)

    def daemon_status(self) -> dict[str, Any] | None:
        try:
            return self.daemon("status")
        except control.DaemonNotRunning:
            return None

    def require_cluster(self) -> None:
        if self.meta.get("uuid") is None:
            raise Refused(f"{self.paths.root} holds no cluster: run 'marsadm create-cluster' first")

    def require_resource(self, resource: str) -> None:
        check_resource_name(resource)
        self.require_cluster()
        if not self.paths.resource_dir(resource).is_dir() or \
                self.meta.get(self.rkey(resource, "size")) is None:
            known = ", ".join(self.paths.resources()) or "none"
            raise Refused(f"resource {resource!r} does not exist (resources here: {known})")


Verb = Callable[[Ctx], dict[str, Any]]
VERBS: dict[str, tuple[Verb, Callable[[argparse.ArgumentParser], None], str]] = {}


def verb(name: str, help_text: str,
         add_args: Callable[[argparse.ArgumentParser], None] = lambda p: None
         ) -> Callable[[Verb], Verb]:
    def register(fn: Verb) -> Verb:
        VERBS[name] = (fn, add_args, help_text)
        return fn
    return register


def _resource_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource")


# ----------------------------------------------------------------- cluster
def _create_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip", default="127.0.0.1", help="address other hosts reach this one at")
    p.add_argument("--uuid", help="cluster id to use (default: a new random one)")
    p.add_argument("--secret-file", help="file with the cluster secret, '-' for stdin "
                   "(default: a new random secret)")


def _read_secret_arg(path: str) -> bytes:
    """The cluster secret from a file or stdin: at least 16 bytes, no whitespace around."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"--secret-file {path}: {exc.strerror}") from None
    secret = raw.strip()
    problem = secret_problem(secret)
    if problem is not None:
        raise UsageError(f"--secret-file {path}: {problem}: the secret must be one word of at "
                         f"least {SECRET_MIN_LEN} characters (e.g. 'openssl rand -hex 32')")
    return secret


def _check_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise UsageError(f"--uuid {value!r} is not a UUID") from None


def _write_secret(ctx: Ctx, secret: bytes) -> None:
    """The secret file, mode 0600, durable before the uuid that makes this host a member."""
    mkdir_durably(ctx.paths.root)
    write_file_durably(ctx.paths.secret, secret + b"\n", 0o600)


@verb("create-cluster", "start a new cluster with this host as its first member",
      _create_cluster_args)
def create_cluster(ctx: Ctx) -> dict[str, Any]:
    if ctx.meta.get("uuid") is not None:
        raise Refused(f"{ctx.paths.root} already belongs to cluster {ctx.meta.get('uuid')}; "
                      "use 'marsadm leave-cluster' first or another --root")
    cluster = _check_uuid(ctx.args.uuid) if ctx.args.uuid else str(uuid.uuid4())
    secret = (_read_secret_arg(ctx.args.secret_file) if ctx.args.secret_file
              else secrets.token_hex(32).encode())
    if ctx.dry_run:
        ctx.say(f"would create cluster in {ctx.paths.root} with host {ctx.host}")
        return {"changed": True, "dry_run": True}
    _write_secret(ctx, secret)  # replaces one left by a cluster that was left
    ctx.meta.set(f"ips/ip-{ctx.host}", ctx.args.ip, durable=True)
    ctx.meta.set(f"version-{ctx.host}", __version__)
    ctx.meta.set("uuid", cluster, durable=True)
    ctx.say(f"created cluster {cluster} in {ctx.paths.root}; this host is {ctx.host}")
    return {"changed": True, "uuid": cluster, "host": ctx.host}


# ---------------------------------------------------------------- resource
def _create_resource_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource")
    p.add_argument("device", help="data device (an LV, a loop device, or a file)")
    p.add_argument("--size", help="use only this much of the device (default: all of it)")
    p.add_argument("--buffered", action="store_true",
                   help="no O_DIRECT (for filesystems that refuse it; tests only)")
    p.add_argument("--wait", action="store_true", help="wait until marsd serves it")


@verb("create-resource", "create a resource with this host as its primary",
      _create_resource_args)
def create_resource(ctx: Ctx) -> dict[str, Any]:
    name = check_resource_name(ctx.args.resource)
    ctx.require_cluster()
    if ctx.meta.get(ctx.rkey(name, "size")) is not None:
        raise Refused(f"resource {name} already exists; 'marsadm view {name}' shows it")
    dev = os.path.abspath(ctx.args.device)
    if not os.path.exists(dev):
        raise Refused(f"data device {dev} does not exist: create the LV (or file) first")
    dev_size = probe_size(dev)
    size = parse_size(ctx.args.size) if ctx.args.size else dev_size
    if size > dev_size:
        raise Refused(f"--size {format_size(size)} is larger than {dev} "
                      f"({format_size(dev_size)})")
    if size <= 0 or size % 4096:
        raise Refused(f"resource size must be a positive multiple of 4 KiB, not {size}")
    for other in ctx.paths.resources():
        if ctx.meta.get(ctx.rkey(other, f"data-{ctx.host}")) == dev:
            raise Refused(f"{dev} is already the data device of resource {other}")
    if ctx.dry_run:
        ctx.say(f"would create resource {name} on {dev} ({format_size(size)})")
        return {"changed": True, "dry_run": True}
    r = lambda k: ctx.rkey(name, k)  # noqa: E731
    ctx.meta.set(r(f"data-{ctx.host}"), dev)
    if ctx.args.buffered:
        ctx.meta.set(r(f"buffered-{ctx.host}"), "1")
    for switch in ("attach", "fetch", "replay", "sync"):
        ctx.meta.set(r(f"todo-{ctx.host}/{switch}"), "1")
    ctx.meta.set(r(f"replay-{ctx.host}"), LogPosition(1, 0, 0, ctx.host).encode())
    ctx.meta.set(r("primary"), ctx.host)
    ctx.meta.set(r("size"), str(size), durable=True)
    ctx.say(f"created resource {name} on {dev} ({format_size(size)}), primary {ctx.host}")
    result: dict[str, Any] = {"changed": True, "resource": name, "device": dev, "size": size}
    if ctx.args.wait:
        result.update(_bring_up(ctx, name))
    else:
        _poke(ctx)
    return result


def _poke(ctx: Ctx) -> bool:
    try:
        ctx.daemon("reconcile")
        return True
    except control.DaemonNotRunning:
        ctx.say("note: marsd is not running here; it will start the resource when it starts")
        return False


def _wait_for(ctx: Ctx, what: str, check: Callable[[], str | None | bool]) -> None:
    """Poll ``check`` until it returns True; a string is an error to report."""
    deadline = time.monotonic() + ctx.timeout
    while True:
        outcome = check()
        if outcome is True:
            return
        if isinstance(outcome, str):
            raise Refused(outcome)
        if time.monotonic() >= deadline:
            raise TimedOut(f"timed out after {ctx.timeout:g}s waiting for {what}")
        time.sleep(0.05)


def _failure(st: dict[str, Any], name: str) -> str | None:
    """marsd's last failure to start ``name``, and when it tries again by itself."""
    msg = st.get("failures", {}).get(name)
    retry_in = st.get("retry_in", {}).get(name)  # None from an older marsd
    if not msg or retry_in is None:
        return msg
    at = time.strftime("%H:%M:%S", time.localtime(time.time() + retry_in))
    return (f"{msg}; marsd retries by itself at about {at} (in {retry_in:.0f} s); "
            f"'marsadm up {name}' retries at once")


def _bring_up(ctx: Ctx, name: str) -> dict[str, Any]:
    # an operator's up (after fixing the cause) tries a failed start again now
    ctx.daemon("reconcile", retry=name)
    is_primary = ctx.meta.get(ctx.rkey(name, "primary")) == ctx.host

    def up() -> str | bool:
        st = ctx.daemon("status")
        if name in st["resources"]:
            return True
        return _failure(st, name) or not is_primary

    _wait_for(ctx, f"resource {name} to come up", up)
    st = ctx.daemon("status")["resources"].get(name, {})
    if st.get("role") == "secondary":
        ctx.say(f"{name} is up on {ctx.host} as a secondary ({st.get('phase')})")
    elif st:
        ctx.say(f"{name} is up on {ctx.host}: NBD export at {st['nbd_socket']}")
        rec = st.get("recovery") or {}
        if rec.get("records_replayed"):
            ctx.say(f"recovery replayed {rec['records_replayed']} records "
                    f"({rec['bytes_replayed']} bytes) in {rec['seconds']}s")
        if rec.get("torn_tail"):
            ctx.say(f"recovery cut a torn tail: {rec['torn_tail']}")
    return {"status": st}


@verb("up", "attach the resource on this host (primary: serve it over NBD)", _resource_arg)
def up(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    key = ctx.rkey(name, f"todo-{ctx.host}/attach")
    if ctx.meta.get(ctx.rkey(name, f"data-{ctx.host}")) is None:
        raise Refused(f"this host ({ctx.host}) is not a member of resource {name}")
    changed = ctx.meta.get(key) != "1"
    if ctx.dry_run:
        ctx.say(f"would {'bring up' if changed else 'leave up'} {name}")
        return {"changed": changed, "dry_run": True}
    ctx.meta.set(key, "1")
    result = _bring_up(ctx, name)
    return {"changed": changed, **result}


def _down_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource")
    p.add_argument("--force", action="store_true", help="even if NBD clients are connected")


@verb("down", "stop serving the resource on this host (writes back everything first)",
      _down_args)
def down(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    key = ctx.rkey(name, f"todo-{ctx.host}/attach")
    st = ctx.daemon_status()
    running = st is not None and name in st["resources"]
    if running and st is not None and st["resources"][name]["open_count"] and not ctx.args.force:
        n = st["resources"][name]["open_count"]
        raise Refused(f"resource {name} is in use by {n} NBD client(s): stop the application "
                      "(umount, disconnect) first, or use --force")
    changed = ctx.meta.get(key) != "0" or running
    if ctx.dry_run:
        ctx.say(f"would {'take down' if changed else 'leave down'} {name}")
        return {"changed": changed, "dry_run": True}
    ctx.meta.set(key, "0")
    if st is not None:
        ctx.daemon("reconcile")
        _wait_for(ctx, f"resource {name} to go down",
                  lambda: name not in ctx.daemon("status")["resources"])
    ctx.say(f"{name} is down on {ctx.host}")
    return {"changed": changed}


# -------------------------------------------------------------------- view
def _view_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", nargs="?")


LIVE_KEYS = ("logfile", "log_end", "applied", "pending_bytes", "open_count", "writes",
             "commits", "writes_per_commit", "emergency", "direct_writes", "phase",
             "consistent", "fetch_logfile", "fetch_remote_end", "fetch_local_end",
             "fetch_rate", "replay_rate", "replay_paused", "fetch_paused", "replay_error",
             "sync_done", "sync_size", "sync_rate", "sync_eta", "corrupt_refetched",
             "caught_up_at", "logfile_count", "logfile_bytes", "fetch_contact_age",
             "fetch_bytes", "sync_copied", "replay_redo")


def resource_view(ctx: Ctx, name: str, daemon: dict[str, Any] | None) -> dict[str, Any]:
    """Everything about one resource as known here: tree values of every member, plus the
    live status of this host's marsd."""
    from marslib.metrics import lag_bytes, lag_seconds
    from marslib.schema import SyncStatus

    m = ctx.meta
    r = lambda k: ctx.rkey(name, k)  # noqa: E731
    members = sorted(
        mv.key.rsplit("/data-", 1)[1]
        for mv in m.items(f"resource-{name}")
        if "/data-" in mv.key and mv.value is not None
    )
    primary = m.get(r("primary"))
    logfiles = ctx.paths.logfiles(name)
    from marslib.history import forks
    split = forks(m, name)
    view: dict[str, Any] = {
        "resource": name,
        "size": int(m.get(r("size")) or 0),
        "primary": primary,
        "history_gap": m.get(r("history-gap")),
        "split_brain": [{"logfile": f.number, "views": {w: {"logfile_host": v[0], "end": v[1],
                                                             "seq": v[2]}
                                                         for w, v in f.views.items()}}
                        for f in split],
        "members": {},
        "logfiles": [p.name for _, _, p in logfiles],
        "log_bytes": sum(p.stat().st_size for _, _, p in logfiles if p.exists()),
    }
    primary_replay = m.get(r(f"replay-{primary}")) if primary else None
    for host in members:
        st = SyncStatus.decode(m.get(r(f"syncstatus-{host}")))
        sync = (st.done, st.size) if st is not None and not st.finished else None
        info: dict[str, Any] = {
            "device": m.get(r(f"data-{host}")),
            "role": "primary" if host == primary else "secondary",
            "attach": m.get(r(f"todo-{host}/attach")) == "1",
            "is_primary": m.get(r(f"actual-{host}/is-primary")) == "1",
            "emergency": m.get(r(f"actual-{host}/emergency")) == "1",
            "open_count": int(m.get(r(f"actual-{host}/open-count")) or 0),
            "replay": m.get(r(f"replay-{host}")),
            "syncing": sync is not None,
            "sync_progress": round(sync[0] / sync[1], 4) if sync and sync[1] else None,
            "syncpos": m.get(r(f"syncpos-{host}")),
            "fetch": m.get(r(f"todo-{host}/fetch"), "1") == "1",
            "replaying": m.get(r(f"todo-{host}/replay"), "1") == "1",
            "error": m.get(r(f"actual-{host}/error")),
            "lag_bytes": _tree_lag(primary_replay, m.get(r(f"replay-{host}"))),
            "version": m.get(f"version-{host}"),
            "last_sync": _sync_result(m.get(r(f"syncresult-{host}"))),
        }
        if host == ctx.host and daemon is not None:
            live = daemon["resources"].get(name)
            info["running"] = live is not None
            if live:
                info.update({k: live[k] for k in LIVE_KEYS if k in live})
                if live.get("role") == "secondary":
                    info["lag_bytes"] = lag_bytes(live)
                    info["lag_seconds"] = round(lag_seconds(live, time.time()), 1)
                if live.get("replay_error"):
                    info["error"] = live["replay_error"]
            if name in daemon.get("failures", {}):
                info["error"] = _failure(daemon, name)
        if host == ctx.host and not info.get("running"):
            # not running here (marsd stopped or killed, resource down): no export, no NBD
            # client, whatever a crash left in actual-HOST/open-count and is-primary
            info["running"] = False
            info["open_count"] = 0
        if host == ctx.host and "consistent" not in info:
            from marslib.replay import interrupted_batch
            if interrupted_batch(info["replay"]):  # a crash in a replay batch: torn device
                info["consistent"] = False
        info["split_brain"] = any(
            host in f.views and primary in f.views and f.views[host] != f.views[primary]
            for f in split)
        info["state"] = "SplitBrain" if info["split_brain"] else _state(info)
        view["members"][host] = info
    return view


def _sync_result(value: str | None) -> dict[str, float] | None:
    """``compared,copied,seconds`` of a member's last finished full sync."""
    try:
        compared, copied, seconds = (value or "").split(",")
        return {"compared": int(compared), "copied": int(copied), "seconds": float(seconds)}
    except ValueError:
        return None


def _tree_lag(primary: str | None, mine: str | None) -> int | None:
    """Bytes between two replay positions in the same logfile (a view from the tree)."""
    if not primary or not mine:
        return None
    try:
        p, q = LogPosition.decode(primary), LogPosition.decode(mine)
    except ValueError:
        return None
    return max(0, p.offset - q.offset) if p.number == q.number else None


DISCONNECTED_AFTER = 15.0  # seconds without an answer from the primary (long polls: 5 s)


def _state(info: dict[str, Any]) -> str:
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


@verb("view", "show resources, members, roles, states, lag", _view_args)
def view(ctx: Ctx) -> dict[str, Any]:
    ctx.require_cluster()
    names = [ctx.args.resource] if ctx.args.resource else [
        n for n in ctx.paths.resources() if ctx.meta.get(ctx.rkey(n, "size")) is not None]
    if ctx.args.resource:
        ctx.require_resource(ctx.args.resource)
    daemon = ctx.daemon_status()
    views = [resource_view(ctx, n, daemon) for n in names]
    extra = ""
    if daemon:
        extra = f"  /mars free {human_size(daemon.get('space_free', 0))} " \
                f"({daemon.get('space_level', '?')})"
    ctx.say(f"cluster {ctx.meta.get('uuid')}  host {ctx.host}  marsd "
            f"{'running' if daemon else 'NOT running'}{extra}")
    header = ("RESOURCE", "HOST", "ROLE", "STATE", "SIZE", "REPLAY", "LAG", "SYNC", "OPEN",
              "DEVICE")
    rows = [header]
    errors = []
    for v in views:
        for host, info in v["members"].items():
            lag = info.get("lag_bytes")
            lag_text = "-" if lag is None else human_size(lag)
            if info.get("lag_seconds"):
                lag_text += f"/{info['lag_seconds']:.0f}s"
            sync = info.get("sync_progress")
            rows.append((
                v["resource"], host, info["role"], info["state"], format_size(v["size"]),
                _short_pos(info.get("applied") or info.get("replay")), lag_text,
                "-" if sync is None else f"{sync * 100:.1f}%", str(info["open_count"]),
                info["device"] or "-",
            ))
            if info.get("error"):
                errors.append(f"{v['resource']}@{host}: {info['error']}"
                              + _advice_host(info["error"], host, ctx.host))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        ctx.say("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for err in errors:
        ctx.say(f"note: {err}")
    for v in views:
        losers = sorted(h for h, info in v["members"].items() if info["split_brain"])
        for fork in v["split_brain"]:
            ctx.say(f"SPLIT BRAIN in {v['resource']}: logfile {fork['logfile']:09d} ends "
                    + "; ".join(f"at {x['end']} for {w}" for w, x in fork["views"].items())
                    + " -- " + _split_brain_advice(v["resource"], v["primary"], losers))
    return {"cluster": ctx.meta.get("uuid"), "host": ctx.host, "marsd": daemon is not None,
            "ip": ctx.meta.get(f"ips/ip-{ctx.host}"),  # None once this host left
            "version": __version__,
            "marsd_version": daemon.get("version") if daemon else None,
            "peers": daemon.get("peers") if daemon else None,
            "space_free": daemon.get("space_free") if daemon else None,
            "space_level": daemon.get("space_level") if daemon else None,
            "resources": {v["resource"]: v for v in views}}


def _advice_host(error: str, member: str, here: str) -> str:
    """Another member's advice speaks of "this host" and "here": say which host that is
    (invalidate, say, is refused on the primary that shows a secondary's error)."""
    if member == here or "marsadm " not in error:
        return ""
    return f' (reported by {member}: "this host" and "here" mean {member}, not {here})'


def _split_brain_advice(name: str, primary: str | None, losers: list[str]) -> str:
    if not primary or primary == NO_PRIMARY:
        return (f"no host is primary: run 'marsadm primary --force {name}' on the host whose "
                f"data is to be kept, then 'marsadm invalidate {name}' on the others")
    if not losers:
        return (f"run 'marsadm invalidate {name}' on each host whose history differs from "
                f"the primary {primary}'s")
    return (f"run 'marsadm invalidate {name}' on {', '.join(losers)} (each then resyncs "
            f"from the primary {primary})")


def _short_pos(value: str | None) -> str:
    if not value:
        return "-"
    try:
        pos = LogPosition.decode(value)
    except ValueError:
        return value
    return f"{pos.number}:{pos.offset}"


# --------------------------------------------------------------------- logs
@verb("log-rotate", "start the next logfile of a resource (on its primary)", _resource_arg)
def log_rotate(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    if ctx.dry_run:
        ctx.say(f"would rotate the logfile of {name}")
        return {"changed": True, "dry_run": True}
    reply = ctx.daemon("log-rotate", resource=name)
    ctx.say(f"{name}: now logging to {reply['logfile']}")
    return {"changed": True, "logfile": reply["logfile"]}


def deletable_logfiles(ctx: Ctx, name: str) -> list[str]:
    """Logfiles every member has applied: older than the oldest replay position, never
    the newest logfile."""
    positions = []
    for mv in ctx.meta.items(f"resource-{name}"):
        tail = mv.key.rsplit("/", 1)[-1]
        if tail.startswith("replay-") and mv.value:
            try:
                positions.append(LogPosition.decode(mv.value))
            except ValueError:
                continue
    if not positions:
        return []
    oldest = min(p.number for p in positions)
    files = ctx.paths.logfiles(name)
    newest = files[-1][0] if files else 0
    return [p.name for number, _, p in files if number < oldest and number < newest]


@verb("log-delete", "delete logfiles that every member has applied", _resource_arg)
def log_delete(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    doomed = deletable_logfiles(ctx, name)
    if ctx.dry_run:
        ctx.say(f"would delete {len(doomed)} logfile(s) of {name}: {' '.join(doomed) or '-'}")
        return {"changed": bool(doomed), "deleted": doomed, "dry_run": True}
    freed = 0
    for fname in doomed:
        path = ctx.paths.resource_dir(name) / fname
        freed += path.stat().st_size
        path.unlink()
    ctx.say(f"{name}: deleted {len(doomed)} logfile(s), {format_size(freed)} freed")
    return {"changed": bool(doomed), "deleted": doomed, "bytes_freed": freed}


def _cron_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rotate-size", default="256M", help="rotate a logfile at this size")
    p.add_argument("--rotate-age", type=float, default=3600.0,
                   help="rotate a logfile older than this many seconds")


@verb("cron", "housekeeping: rotate old or big logfiles, delete applied ones", _cron_args)
def cron(ctx: Ctx) -> dict[str, Any]:
    ctx.require_cluster()
    rotate_size = parse_size(ctx.args.rotate_size)
    st = ctx.daemon_status()
    actions: dict[str, Any] = {}
    for name in ctx.paths.resources():
        done: dict[str, Any] = {}
        live = (st or {}).get("resources", {}).get(name)
        if live and live.get("log_end"):
            pos = LogPosition.decode(live["log_end"])
            path = ctx.paths.logfile(name, pos.number, pos.host)
            age = time.time() - path.stat().st_ctime if path.exists() else 0.0
            if pos.offset > 0 and (pos.offset >= rotate_size or age >= ctx.args.rotate_age):
                if not ctx.dry_run:
                    done["rotated_to"] = ctx.daemon("log-rotate", resource=name)["logfile"]
                else:
                    done["would_rotate"] = pos.logfile
        doomed = deletable_logfiles(ctx, name)
        if doomed:
            if not ctx.dry_run:
                for fname in doomed:
                    (ctx.paths.resource_dir(name) / fname).unlink()
            done["deleted"] = doomed
        if done:
            actions[name] = done
            ctx.say(f"{name}: {json.dumps(done)}")
    if not actions:
        ctx.say("nothing to do")
    return {"changed": bool(actions) and not ctx.dry_run, "actions": actions}


# ------------------------------------------------------------ membership
def _join_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("peer", help="address of a host that is already a member")
    p.add_argument("--ip", required=True, help="address other hosts reach this one at")
    p.add_argument("--ssh-user", default="root")
    p.add_argument("--ssh-key", help="private key file (default: ssh agent / ~/.ssh)")
    p.add_argument("--ssh-port", type=int, default=22)
    p.add_argument("--remote-root", default="/mars", help="the peer's state root")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="trust an unknown ssh host key (first contact, labs)")
    p.add_argument("--from-root", help="read the cluster from this local state root instead "
                   "of ssh (a member on the same machine, tests)")
    p.add_argument("--uuid", help="the cluster id, known already (with --secret-file and "
                   "--peer-name: no ssh to the peer; Ansible distributes both)")
    p.add_argument("--secret-file", help="file with the cluster secret, '-' for stdin")
    p.add_argument("--peer-name", help="the peer's host name (with --uuid)")


ClusterFacts = tuple[bytes, str, int, list[tuple[str, str, int]]]


def _read_cluster(read_file, readlink, lstat_ns, listdir, root: str) -> ClusterFacts:  # type: ignore[no-untyped-def]
    """secret, uuid, uuid stamp and ips/ of a member's state root, through any transport."""
    secret = read_file(f"{root}/secret").strip()
    uuid_value = readlink(f"{root}/uuid")
    ips = [(n, readlink(f"{root}/ips/{n}"), lstat_ns(f"{root}/ips/{n}"))
           for n in listdir(f"{root}/ips")]
    return secret, uuid_value, lstat_ns(f"{root}/uuid"), ips


def _cluster_over_ssh(ctx: Ctx) -> ClusterFacts:
    import paramiko  # only this path needs it

    a = ctx.args
    client = paramiko.SSHClient()
    client.load_system_host_keys()
    if a.accept_new_host_key:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(a.peer, port=a.ssh_port, username=a.ssh_user, key_filename=a.ssh_key,
                       timeout=ctx.timeout, allow_agent=a.ssh_key is None,
                       look_for_keys=a.ssh_key is None)
    except (paramiko.SSHException, OSError) as exc:
        raise Refused(f"cannot ssh to {a.ssh_user}@{a.peer}:{a.ssh_port}: {exc}") from None
    try:
        sftp = client.open_sftp()

        def read_file(path: str) -> bytes:
            with sftp.open(path) as f:
                return bytes(f.read())

        def lstat_ns(path: str) -> int:
            return int(sftp.lstat(path).st_mtime or 0) * 10**9

        return _read_cluster(read_file, sftp.readlink, lstat_ns, sftp.listdir,
                             a.remote_root.rstrip("/"))
    except OSError as exc:
        raise Refused(f"{a.peer}:{a.remote_root} holds no cluster ({exc}); check "
                      "--remote-root") from None
    finally:
        client.close()


def _cluster_from_dir(ctx: Ctx) -> ClusterFacts:
    root = ctx.args.from_root.rstrip("/")
    try:
        return _read_cluster(lambda p: Path(p).read_bytes(), os.readlink,
                             lambda p: os.lstat(p).st_mtime_ns, os.listdir, root)
    except OSError as exc:
        raise Refused(f"{root} holds no cluster ({exc})") from None


@verb("join-cluster", "join an existing cluster (copies its id and secret over ssh)",
      _join_cluster_args)
def join_cluster(ctx: Ctx) -> dict[str, Any]:
    if ctx.meta.get("uuid") is not None:
        raise Refused(f"{ctx.paths.root} already belongs to cluster {ctx.meta.get('uuid')}")
    a = ctx.args
    given = [a.uuid is not None, a.secret_file is not None, a.peer_name is not None]
    if any(given) and not all(given):
        raise UsageError("--uuid, --secret-file and --peer-name go together")
    known: ClusterFacts | None = None
    if all(given):
        # the peer's own entry (with its real stamp) replaces this one on first contact
        known = (_read_secret_arg(a.secret_file), _check_uuid(a.uuid), 0,
                 [(f"ip-{check_host_name(a.peer_name)}", a.peer, 0)])
    if ctx.dry_run:
        ctx.say(f"would join the cluster of {a.peer} as {ctx.host} ({a.ip})")
        return {"changed": True, "dry_run": True}
    secret, uuid_value, uuid_stamp, ips = (
        known if known is not None else
        _cluster_from_dir(ctx) if a.from_root else _cluster_over_ssh(ctx))
    if not uuid_value:
        raise Refused(f"{a.peer}:{a.remote_root}/uuid is empty")
    if known is None and secret_problem(secret) is not None:
        where = a.from_root or f"{a.peer}:{a.remote_root}"
        raise Refused(f"{where}/secret: {secret_problem(secret)}: that member's cluster secret "
                      f"is damaged; restore it there first ({restore_hint()})")
    _write_secret(ctx, secret)
    for name, value, stamp in ips:
        if name.startswith("ip-") and value:
            ctx.meta.merge(MetaValue(f"ips/{name}", value, stamp), durable=True)
    ctx.meta.set(f"ips/ip-{ctx.host}", a.ip, durable=True)
    ctx.meta.set(f"version-{ctx.host}", __version__)
    ctx.meta.merge(MetaValue("uuid", uuid_value, uuid_stamp), durable=True)
    ctx.say(f"joined cluster {uuid_value} through {a.peer}; this host is {ctx.host} ({a.ip}); "
            "start marsd to exchange metadata")
    return {"changed": True, "uuid": uuid_value, "host": ctx.host}


@verb("leave-cluster", "leave the cluster (only when no resource is left here)")
def leave_cluster(ctx: Ctx) -> dict[str, Any]:
    ctx.require_cluster()
    mine = [r for r in ctx.paths.resources()
            if ctx.meta.get(ctx.rkey(r, f"data-{ctx.host}")) is not None]
    if mine:
        raise Refused(f"this host still holds resources {', '.join(mine)}: run "
                      "leave-resource for each first")
    if ctx.meta.get(f"ips/ip-{ctx.host}") is None:
        ctx.say(f"{ctx.host} is not a member of the cluster (any more)")
        return {"changed": False}
    if ctx.dry_run:
        return {"changed": True, "dry_run": True}
    ctx.meta.delete(f"ips/ip-{ctx.host}")
    ctx.say(f"{ctx.host} left the cluster; stop marsd, then remove {ctx.paths.root}")
    return {"changed": True}


def _join_resource_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource")
    p.add_argument("device", help="data device on this host (at least the resource's size)")
    p.add_argument("--buffered", action="store_true", help="no O_DIRECT (tests only)")
    p.add_argument("--wait", action="store_true", help="wait until the full sync is done")


@verb("join-resource", "become a secondary of a resource: full sync, then fetch and replay",
      _join_resource_args)
def join_resource(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    check_resource_name(name)
    ctx.require_cluster()
    _wait_for(ctx, f"resource {name} to be known here (metadata from its primary)",
              lambda: ctx.meta.get(ctx.rkey(name, "size")) is not None)
    if ctx.meta.get(ctx.rkey(name, f"data-{ctx.host}")) is not None:
        raise Refused(f"this host is already a member of {name}")
    dev = os.path.abspath(ctx.args.device)
    if not os.path.exists(dev):
        raise Refused(f"data device {dev} does not exist: create the LV (or file) first")
    size = int(ctx.meta.get(ctx.rkey(name, "size")) or 0)
    if probe_size(dev) < size:
        raise Refused(f"{dev} has {format_size(probe_size(dev))}, resource {name} needs "
                      f"{format_size(size)}: grow the device first")
    if ctx.dry_run:
        ctx.say(f"would join {name} with {dev} and start a full sync")
        return {"changed": True, "dry_run": True}
    r = lambda k: ctx.rkey(name, k)  # noqa: E731
    if ctx.args.buffered:
        ctx.meta.set(r(f"buffered-{ctx.host}"), "1")
    for switch in ("fetch", "replay", "sync"):
        ctx.meta.set(r(f"todo-{ctx.host}/{switch}"), "1")
    ctx.meta.set(r(f"syncstatus-{ctx.host}"), f"0/{size}")
    ctx.meta.set(r(f"data-{ctx.host}"), dev)
    ctx.meta.set(r(f"todo-{ctx.host}/attach"), "1", durable=True)
    ctx.say(f"joined {name} with {dev}; full sync from {ctx.meta.get(r('primary'))} starts")
    _poke(ctx)
    if ctx.args.wait:
        _wait_sync(ctx, name)
    return {"changed": True, "resource": name, "device": dev}


@verb("leave-resource", "stop being a secondary of a resource", _resource_arg)
def leave_resource(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    if ctx.meta.get(ctx.rkey(name, "primary")) == ctx.host:
        raise Refused(f"{ctx.host} is the primary of {name}: hand over to another member "
                      "first (marsadm primary on the new primary)")
    if ctx.meta.get(ctx.rkey(name, f"data-{ctx.host}")) is None:
        return {"changed": False}
    if ctx.dry_run:
        return {"changed": True, "dry_run": True}
    ctx.meta.set(ctx.rkey(name, f"todo-{ctx.host}/attach"), "0")
    _poke(ctx)
    if ctx.daemon_status() is not None:
        _wait_for(ctx, f"resource {name} to stop here",
                  lambda: name not in ctx.daemon("status")["resources"])
    for key in (f"data-{ctx.host}", f"replay-{ctx.host}", f"syncstatus-{ctx.host}",
                f"syncpos-{ctx.host}", f"buffered-{ctx.host}", f"device-size-{ctx.host}",
                f"synced-size-{ctx.host}", f"syncresult-{ctx.host}"):
        ctx.meta.delete(ctx.rkey(name, key))
    from marslib.history import forget_links
    forget_links(ctx.meta, name, ctx.host)
    for mv in ctx.meta.items(f"resource-{name}/todo-{ctx.host}") + \
            ctx.meta.items(f"resource-{name}/actual-{ctx.host}"):
        ctx.meta.delete(mv.key)
    for _, host, path in ctx.paths.logfiles(name):
        if host != ctx.host:
            path.unlink()
    ctx.say(f"{ctx.host} left {name}")
    return {"changed": True}


def _switch_verb(switch: str, value: str) -> Verb:
    def run(ctx: Ctx) -> dict[str, Any]:
        name = ctx.args.resource
        ctx.require_resource(name)
        key = ctx.rkey(name, f"todo-{ctx.host}/{switch}")
        changed = ctx.meta.get(key, "1") != value
        if ctx.dry_run:
            return {"changed": changed, "dry_run": True}
        ctx.meta.set(key, value)
        _poke(ctx)
        if switch == "replay" and value == "0" and ctx.daemon_status() is not None:
            _wait_for(ctx, f"replay of {name} to pause",
                      lambda: ctx.daemon("status")["resources"].get(name, {}).get(
                          "replay_paused", True))
        ctx.say(f"{name}: {switch} {'resumed' if value == '1' else 'paused'} on {ctx.host}")
        return {"changed": changed}
    return run


for _switch in ("fetch", "replay", "sync"):
    verb(f"pause-{_switch}", f"pause {_switch} of a resource on this host",
         _resource_arg)(_switch_verb(_switch, "0"))
    verb(f"resume-{_switch}", f"resume {_switch} of a resource on this host",
         _resource_arg)(_switch_verb(_switch, "1"))


@verb("disconnect", "stop fetching and syncing a resource (replay what is here)",
      _resource_arg)
def disconnect(ctx: Ctx) -> dict[str, Any]:
    a = _switch_verb("fetch", "0")(ctx)
    b = _switch_verb("sync", "0")(ctx)
    return {"changed": a["changed"] or b["changed"]}


@verb("connect", "resume fetching and syncing a resource", _resource_arg)
def connect(ctx: Ctx) -> dict[str, Any]:
    a = _switch_verb("fetch", "1")(ctx)
    b = _switch_verb("sync", "1")(ctx)
    return {"changed": a["changed"] or b["changed"]}


def _invalidate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource")
    p.add_argument("--wait", action="store_true", help="wait until the full sync is done")


@verb("invalidate", "resync this secondary from the primary (fast full sync)",
      _invalidate_args)
def invalidate(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    if ctx.meta.get(ctx.rkey(name, "primary")) == ctx.host:
        raise Refused(f"{ctx.host} is the primary of {name}: only a secondary can be "
                      "invalidated")
    if ctx.meta.get(ctx.rkey(name, f"data-{ctx.host}")) is None:
        raise Refused(f"{ctx.host} is not a member of {name}: use join-resource")
    if ctx.dry_run:
        return {"changed": True, "dry_run": True}
    size = int(ctx.meta.get(ctx.rkey(name, "size")) or 0)
    from marslib.history import forget_links
    dropped = forget_links(ctx.meta, name, ctx.host)  # this host's history is discarded
    ctx.meta.set(ctx.rkey(name, f"syncstatus-{ctx.host}"), f"0/{size}")
    _poke(ctx)
    ctx.say(f"{name}: full sync from the primary restarted on {ctx.host}"
            + (f" ({dropped} version links of its old history dropped)" if dropped else ""))
    if ctx.args.wait:
        _wait_sync(ctx, name)
    return {"changed": True}


def _progress_line(label: str, done: int, total: int, rate: float, eta: float | None) -> str:
    width = 30
    frac = done / total if total else 1.0
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    eta_text = f"{eta:.0f}s" if eta is not None else "?"
    return (f"{label} [{bar}] {frac * 100:5.1f}% {format_size(done)}/{format_size(total)} "
            f"{rate / 1e6:.1f} MB/s ETA {eta_text}")


def _show_progress(ctx: Ctx, line: str) -> None:
    if not ctx.args.json and sys.stderr.isatty():
        print("\r" + line, end="", file=sys.stderr, flush=True)


def _wait_sync(ctx: Ctx, name: str) -> None:
    def done() -> bool:
        if ctx.meta.get(ctx.rkey(name, f"syncstatus-{ctx.host}")) == "done":
            return True
        st = ctx.daemon("status")["resources"].get(name, {})
        if "sync_done" in st:
            _show_progress(ctx, _progress_line(f"sync {name}", st["sync_done"],
                                               st["sync_size"], st["sync_rate"],
                                               st.get("sync_eta")))
        return False
    _wait_for(ctx, f"the full sync of {name}", done)
    _show_progress(ctx, "\n")


WAIT_CONDITIONS = ("sync-off", "consistent", "up-to-date", "primary", "secondary")


def _wait_resource_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource")
    p.add_argument("condition", choices=WAIT_CONDITIONS)


@verb("wait-resource", "wait until a resource reaches a condition on this host",
      _wait_resource_args)
def wait_resource(ctx: Ctx) -> dict[str, Any]:
    name, cond = ctx.args.resource, ctx.args.condition
    ctx.require_resource(name)
    if cond == "sync-off":
        _wait_sync(ctx, name)
        return {"changed": False}

    def reached() -> bool:
        st = ctx.daemon("status")["resources"].get(name, {})
        if cond == "primary":
            return st.get("role") == "primary"
        if cond == "secondary":
            return st.get("role") == "secondary"
        if st.get("role") == "primary":  # the primary's data is the reference
            return cond in ("consistent", "up-to-date")
        if cond == "consistent":
            return bool(st.get("consistent"))
        return bool(st.get("consistent")) and _up_to_date(st)
    _wait_for(ctx, f"{name} to be {cond}", reached)
    return {"changed": False}


def _up_to_date(st: dict[str, Any]) -> bool:
    """A secondary has applied everything the primary had when it last answered."""
    if st.get("role") != "secondary" or "replay" not in st:
        return st.get("role") == "primary"
    pos = LogPosition.decode(st["replay"])
    return pos.logfile == st.get("fetch_logfile") and \
        pos.offset >= st.get("fetch_remote_end", -1) >= 0


# -------------------------------------------------------------------- roles
def _primary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource")
    p.add_argument("--force", action="store_true",
                   help="failover: take over from what this host has, without waiting for "
                   "the old primary (it may cause a split brain)")


NO_PRIMARY = "(none)"


def _handover_refusal(ctx: Ctx, name: str, old: str | None, live: dict[str, Any]) -> str | None:
    """Why this host cannot take over ``name`` by a planned handover, if it cannot."""
    r = lambda k: ctx.rkey(name, k)  # noqa: E731
    if live.get("role") != "secondary":
        return f"{name} is not running here as a secondary: run 'marsadm up {name}'"
    if ctx.meta.get(r(f"syncstatus-{ctx.host}")) != "done" or live.get("phase") != "replaying":
        return f"{name} is still syncing here: wait with 'marsadm wait-resource {name} sync-off'"
    if not live.get("consistent"):
        return f"{name} is not consistent here yet: wait until it has replayed past its syncpos"
    if live.get("replay_error"):
        return f"{name} cannot replay here: {live['replay_error']}"
    if live.get("fetch_paused") or live.get("replay_paused"):
        return f"fetch or replay of {name} is paused here: resume them first"
    from marslib.history import forks
    split = forks(ctx.meta, name)
    if split:
        return (f"split brain ({split[0].describe()}): resolve it first ('marsadm "
                f"view-split-brain {name}'), or use --force")
    if old and old != NO_PRIMARY:
        if ctx.meta.get(r(f"actual-{old}/emergency")) == "1":
            return (f"the primary {old} is in emergency mode: its log is incomplete; free "
                    f"space in its /mars first (it then logs again, and every secondary, this "
                    f"one too, needs 'marsadm invalidate {name}'), or use --force")
        opened = int(ctx.meta.get(r(f"actual-{old}/open-count")) or 0)
        deadline = time.monotonic() + min(2.0, ctx.timeout)
        while opened and time.monotonic() < deadline:  # the count travels with the metadata
            time.sleep(0.1)
            opened = int(ctx.meta.get(r(f"actual-{old}/open-count")) or 0)
        if opened:
            return (f"the primary {old} still has {opened} NBD client(s) on {name}: stop the "
                    "application there (umount, disconnect) first")
        if (live.get("fetch_contact_age") or 0) > DISCONNECTED_AFTER:
            return f"the primary {old} has not answered for {live['fetch_contact_age']:.0f}s: " \
                   "if it is gone, use 'marsadm primary --force' (failover)"
    return None


@verb("primary", "make this host the primary: handover, or failover with --force",
      _primary_args)
def primary(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    r = lambda k: ctx.rkey(name, k)  # noqa: E731
    if ctx.meta.get(r(f"data-{ctx.host}")) is None:
        raise Refused(f"{ctx.host} is not a member of {name}: join-resource first")
    old = ctx.meta.get(r("primary"))
    if old == ctx.host:
        return {"changed": False, "primary": ctx.host}
    st = ctx.daemon("status")
    live = st["resources"].get(name, {})
    if ctx.meta.get(r(f"todo-{ctx.host}/attach")) != "1" or not live:
        raise Refused(f"{name} is not attached here: run 'marsadm up {name}' first")
    if ctx.meta.get(r(f"syncstatus-{ctx.host}")) != "done":
        raise Refused(f"{name} is not fully synced here: it would not be consistent")
    if live.get("replay_redo"):
        raise Refused(f"{name} is not consistent here: replay is redoing the batch a crash "
                      f"interrupted (up to {live['replay_redo']}); retry in a moment")
    if not ctx.args.force:
        why = _handover_refusal(ctx, name, old, live)
        if why:
            raise Refused(f"handover of {name} to {ctx.host} refused: {why}")
    if ctx.dry_run:
        ctx.say(f"would {'fail over' if ctx.args.force else 'hand over'} {name} from {old} "
                f"to {ctx.host}")
        return {"changed": True, "dry_run": True}
    t0 = time.monotonic()
    if ctx.args.force:
        ctx.meta.set(r("primary"), ctx.host, durable=True)
        ctx.say(f"failover: {ctx.host} takes over {name} from what it has replayed; if "
                f"{old} still writes, that is a split brain")
    else:
        _wait_caught_up(ctx, name)  # while the old primary still serves: no change yet
        ctx.meta.set(r("primary"), NO_PRIMARY, durable=True)
        _poke(ctx)
        try:
            _wait_old_primary_done(ctx, name, old)
        except TimedOut:
            if old and old != NO_PRIMARY:
                ctx.meta.set(r("primary"), old, durable=True)  # leave it as it was
            raise
        ctx.meta.set(r("primary"), ctx.host, durable=True)
    _poke(ctx)

    def serving() -> str | bool:
        st = ctx.daemon("status")
        return st["resources"].get(name, {}).get("role") == "primary" or \
            _failure(st, name) or False

    _wait_for(ctx, f"{name} to come up as primary here", serving)
    secs = round(time.monotonic() - t0, 3)
    now = ctx.daemon("status")["resources"][name]
    ctx.say(f"{ctx.host} is now the primary of {name} ({secs}s): NBD export at "
            f"{now.get('nbd_socket')}")
    return {"changed": True, "primary": ctx.host, "previous": old, "seconds": secs,
            "forced": bool(ctx.args.force)}


def _wait_caught_up(ctx: Ctx, name: str) -> None:
    """Wait (within --timeout) until this secondary has applied all it knows of; on a
    timeout nothing has changed."""
    def done() -> bool:
        live = ctx.daemon("status")["resources"].get(name, {})
        from marslib.metrics import lag_bytes
        lag = lag_bytes(live)
        _show_progress(ctx, f"handover {name}: {human_size(lag or 0)} still to replay")
        return lag == 0
    _wait_for(ctx, f"{name} to catch up here before the handover", done)


def _wait_old_primary_done(ctx: Ctx, name: str, old: str | None) -> None:
    """Wait until the old primary has ended its log and this host has replayed all of it."""
    r = lambda k: ctx.rkey(name, k)  # noqa: E731
    if not old or old == NO_PRIMARY:
        return

    def done() -> bool:
        if ctx.meta.get(r(f"actual-{old}/is-primary")) != "0":
            return False
        final = ctx.meta.get(r(f"replay-{old}"))
        live = ctx.daemon("status")["resources"].get(name, {})
        if not final or "applied" not in live:
            return False
        f, mine = LogPosition.decode(final), LogPosition.decode(live["applied"])
        _show_progress(ctx, f"handover {name}: replayed {mine.number}:{mine.offset} of "
                       f"{f.number}:{f.offset}")
        return (mine.number, mine.offset) >= (f.number, f.offset)

    _wait_for(ctx, f"{old} to end its log and {ctx.host} to replay all of it", done)
    _show_progress(ctx, "\n")


@verb("view-split-brain", "show where the members' histories of a resource fork",
      _resource_arg)
def view_split_brain(ctx: Ctx) -> dict[str, Any]:
    from marslib.history import forks
    name = ctx.args.resource
    ctx.require_resource(name)
    split = forks(ctx.meta, name)
    primary = ctx.meta.get(ctx.rkey(name, "primary"))
    losers = sorted({w for f in split for w, v in f.views.items()
                     if primary in f.views and v != f.views[primary]})
    for f in split:
        ctx.say(f.describe())
    if split:
        ctx.say(f"designated primary: {primary}; hosts to resync (marsadm invalidate {name} "
                f"on each): {', '.join(losers) or '-'}")
        if not primary or primary == NO_PRIMARY:
            ctx.say(_split_brain_advice(name, primary, losers))
    else:
        ctx.say(f"{name}: no split brain")
    return {"changed": False, "split_brain": bool(split), "losers": losers,
            "forks": [f.describe() for f in split]}


def _resize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource")
    p.add_argument("size", nargs="?", help="new size (default: the smallest member device)")


@verb("resize", "grow a resource online once every member's device is grown", _resize_args)
def resize(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    r = lambda k: ctx.rkey(name, k)  # noqa: E731
    if ctx.meta.get(r("primary")) != ctx.host:
        raise Refused(f"resize {name} on its primary ({ctx.meta.get(r('primary'))})")
    old = int(ctx.meta.get(r("size")) or 0)
    members = [mv.key.rsplit("/data-", 1)[1] for mv in ctx.meta.items(f"resource-{name}")
               if "/data-" in mv.key and mv.value is not None]
    sizes: dict[str, int] = {}
    for host in members:
        value = ctx.meta.get(r(f"device-size-{host}"))
        if value is None:
            raise Refused(f"the device size of {name} on {host} is unknown: start marsd and "
                          f"'marsadm up {name}' there")
        sizes[host] = int(value)
    if ctx.daemon_status() is not None:  # this host's device may have grown just now
        sizes[ctx.host] = probe_size(ctx.meta.get(r(f"data-{ctx.host}")) or "")
    new = parse_size(ctx.args.size) if ctx.args.size else min(sizes.values())
    new -= new % 4096
    if new < old:
        raise Refused(f"{name} is {format_size(old)}: shrinking to {format_size(new)} is "
                      "refused (it would destroy data)")
    small = {h: s for h, s in sizes.items() if s < new}
    if small:
        raise Refused("grow the device first on " + ", ".join(
            f"{h} ({format_size(s)} < {format_size(new)})" for h, s in sorted(small.items())))
    if new == old:
        return {"changed": False, "size": old}
    if ctx.dry_run:
        ctx.say(f"would grow {name} from {format_size(old)} to {format_size(new)}")
        return {"changed": True, "dry_run": True, "old_size": old, "size": new}
    ctx.meta.set(r("size"), str(new), durable=True)
    _poke(ctx)
    ctx.say(f"{name} grown from {format_size(old)} to {format_size(new)}; secondaries sync the "
            "new tail; NBD clients see the new size when they reconnect")
    return {"changed": True, "old_size": old, "size": new}


@verb("secondary", "give up the primary role (no host is primary until 'primary')",
      _resource_arg)
def secondary(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    r = lambda k: ctx.rkey(name, k)  # noqa: E731
    if ctx.meta.get(r("primary")) != ctx.host:
        return {"changed": False}
    opened = int(ctx.meta.get(r(f"actual-{ctx.host}/open-count")) or 0)
    if opened:
        raise Refused(f"{name} still has {opened} NBD client(s) here: stop the application "
                      "first")
    if ctx.dry_run:
        return {"changed": True, "dry_run": True}
    ctx.meta.set(r("primary"), NO_PRIMARY, durable=True)
    _poke(ctx)
    _wait_for(ctx, f"{name} to end its log here",
              lambda: ctx.daemon("status")["resources"].get(name, {}).get("role") != "primary")
    ctx.say(f"{ctx.host} is no longer the primary of {name}; make another member primary "
            "with 'marsadm primary'")
    return {"changed": True}


verb("attach", "the same as up: attach the resource here", _resource_arg)(up)
verb("detach", "the same as down: write back, detach", _down_args)(down)


def _delete_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource")
    p.add_argument("--force", action="store_true", help="even if NBD clients are connected")


@verb("delete-resource", "delete a resource whose last member is this host", _delete_args)
def delete_resource(ctx: Ctx) -> dict[str, Any]:
    name = ctx.args.resource
    ctx.require_resource(name)
    others = sorted(mv.key.rsplit("/data-", 1)[1] for mv in ctx.meta.items(f"resource-{name}")
                    if "/data-" in mv.key and mv.value is not None
                    and not mv.key.endswith(f"/data-{ctx.host}"))
    if others:
        raise Refused(f"{name} still has members {', '.join(others)}: run 'marsadm "
                      f"leave-resource {name}' on each first")
    if ctx.dry_run:
        return {"changed": True, "dry_run": True}
    if ctx.daemon_status() is not None:
        down(ctx)
    for mv in ctx.meta.items(f"resource-{name}"):
        if mv.value is not None:
            ctx.meta.delete(mv.key)
    for _, _, path in ctx.paths.logfiles(name):
        path.unlink()
    ctx.say(f"{name} deleted; its data device was left as it is")
    return {"changed": True}


# --------------------------------------------------------------------- main
def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options every verb takes, before or after the verb (after wins)."""
    common = argparse.ArgumentParser(add_help=False)

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common.add_argument("--json", action="store_true", default=default(False),
                        help="machine-readable output")
    common.add_argument("--timeout", type=float, default=default(60.0),
                        help="seconds to wait at most")
    common.add_argument("--dry-run", action="store_true", default=default(False),
                        help="say what would be done")
    common.add_argument("--root", default=default(None),
                        help="state root (default $MARS_ROOT or /mars)")
    common.add_argument("--run-dir", default=default(None),
                        help="marsd sockets (default $MARS_RUN_DIR or /run/mars)")
    common.add_argument("--host", default=default(None),
                        help="this host's name (default $MARS_HOST or hostname)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marsadm", description="marslib administration",
                                     parents=[_common_options(False)])
    parser.add_argument("--version", action="version", version=f"marsadm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    per_verb = _common_options(True)
    for name, (_, add_args, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, parents=[per_verb])
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    want_json = "--json" in argv
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr if want_json else sys.stderr):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        if want_json and exc.code not in (0, None):
            sys.stderr.write(stderr.getvalue())
            reason = (stderr.getvalue().strip().splitlines() or ["see marsadm --help"])[-1]
            print(json.dumps({"ok": False, "error": f"usage error: {reason}", "code": 2}))
        return int(exc.code or 0)
    if not args.verb:
        parser.print_help(sys.stderr)
        return 2
    code = 0
    ctx: Ctx | None = None
    try:
        host = check_host_name(args.host or os.environ.get("MARS_HOST") or socket.gethostname())
        paths = MarsPaths.from_env(args.root, args.run_dir)
        ctx = Ctx(args, paths, host, MetaStore(paths.root))
        result = VERBS[args.verb][0](ctx)
        out: dict[str, Any] = {"ok": True, **result}
    except UsageError as exc:
        code, out = 2, {"ok": False, "error": str(exc), "code": 2}
    except TimedOut as exc:
        code, out = 3, {"ok": False, "error": str(exc), "code": 3}
    except (Refused, DeviceError) as exc:
        code, out = 1, {"ok": False, "error": str(exc), "code": 1}
    except MarsError as exc:
        code, out = 1, {"ok": False, "error": str(exc), "code": 1}
    except OSError as exc:
        code, out = 1, {"ok": False, "error": f"{exc.filename or ''}: {exc.strerror}", "code": 1}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        for line in ctx.lines if ctx else []:
            print(line)
        if not out["ok"]:
            print(f"marsadm {args.verb}: {out['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
