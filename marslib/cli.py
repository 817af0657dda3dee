"""marsadm: the admin command line: argparse and rendering only.

Each verb parses and checks its options (a bad one is a usage error, exit 2, before
anything happens), calls one step of :mod:`marslib.admin` and prints what it returns:
lines for people, or one JSON object with ``--json``. Exit codes come from the error
(:attr:`marslib.errors.MarsError.exit_code`): 0 ok, 1 refused, 2 usage error, 3 timeout.

A verb imports its admin module when it runs, so that a command loads only what it
uses: playbooks and scripts start marsadm by the hundreds, and a command's start is part
of every wait and every resync an operator times.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from marslib import __version__
from marslib.admin.context import Admin, Result
from marslib.admin.view import (
    VIEW_SCHEMA_VERSION,
    advice_host,
    resource_view,
    split_brain_advice,
)
from marslib.errors import MarsError, UsageError
from marslib.layout import MarsPaths, check_host_name, check_resource_name
from marslib.meta import MetaStore
from marslib.net.handshake import SECRET_MIN_LEN, secret_problem
from marslib.position import LogPosition
from marslib.schema import UUID, ip
from marslib.sizes import format_size, human_size, parse_size

Handler = Callable[[Admin, argparse.Namespace], Result]
VERBS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], None], str]] = {}


def verb(name: str, help_text: str,
         add_args: Callable[[argparse.ArgumentParser], None] = lambda p: None
         ) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        VERBS[name] = (fn, add_args, help_text)
        return fn
    return register


# ------------------------------------------------------- option checks (exit 2)
def _typed(check: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse type: ``check`` raises on bad text; the message says what is wanted."""
    def convert(text: str) -> Any:
        try:
            return check(text)
        except (ValueError, MarsError) as exc:
            detail = f" ({exc})" if isinstance(exc, MarsError) else ""
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}{detail}") from None
    convert.__name__ = what  # argparse names the type in some messages
    return convert


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


def _age(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def _device_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0 or value % 4096:
        raise ValueError(text)
    return value


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError(text)
    return value


_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        if _HOSTNAME.match(text):
            return text
        raise


def _uuid(text: str) -> str:
    from marslib.admin import cluster
    return cluster.new_uuid(text)


SECONDS = _typed(_seconds, "a number of seconds above 0")
AGE = _typed(_age, "a number of seconds, 0 or more")
DEVICE_SIZE = _typed(_device_size, "a size that is a positive multiple of 4 KiB (e.g. 4096, "
                                   "64K, 10G)")
SIZE = _typed(_positive_size, "a size above 0 (e.g. 256M)")
PORT = _typed(_port, "a TCP port (1-65535)")
ADDRESS = _typed(_address, "an IP address or host name")
UUID_ARG = _typed(_uuid, "a UUID")
RESOURCE = _typed(check_resource_name, "a resource name")
HOST = _typed(check_host_name, "a host name")


def _resource_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", type=RESOURCE)


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


# ----------------------------------------------------------------- cluster
def _create_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip", type=ADDRESS, default="127.0.0.1",
                   help="address other hosts reach this one at")
    p.add_argument("--uuid", type=UUID_ARG, help="cluster id to use (default: a new one)")
    p.add_argument("--secret-file", help="file with the cluster secret, '-' for stdin "
                   "(default: a new random secret)")


@verb("create-cluster", "start a new cluster with this host as its first member",
      _create_cluster_args)
def _create_cluster(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import cluster
    secret = _read_secret_arg(a.secret_file) if a.secret_file else cluster.new_secret()
    return cluster.create_cluster(admin, a.ip, cluster.new_uuid(a.uuid), secret)


def _join_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("peer", type=ADDRESS, help="address of a host that is already a member")
    p.add_argument("--ip", type=ADDRESS, required=True,
                   help="address other hosts reach this one at")
    p.add_argument("--ssh-user", default="root")
    p.add_argument("--ssh-key", help="private key file (default: ssh agent / ~/.ssh)")
    p.add_argument("--ssh-port", type=PORT, default=22)
    p.add_argument("--remote-root", default="/mars", help="the peer's state root")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="trust an unknown ssh host key (first contact, labs)")
    p.add_argument("--from-root", help="read the cluster from this local state root instead "
                   "of ssh (a member on the same machine, tests)")
    p.add_argument("--uuid", type=UUID_ARG, help="the cluster id, known already (with "
                   "--secret-file and --peer-name: no ssh to the peer; Ansible distributes "
                   "both)")
    p.add_argument("--secret-file", help="file with the cluster secret, '-' for stdin")
    p.add_argument("--peer-name", type=HOST, help="the peer's host name (with --uuid)")


@verb("join-cluster", "join an existing cluster (copies its id and secret over ssh)",
      _join_cluster_args)
def _join_cluster(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import cluster
    given = [a.uuid is not None, a.secret_file is not None, a.peer_name is not None]
    if any(given) and not all(given):
        raise UsageError("--uuid, --secret-file and --peer-name go together")
    if all(given):
        facts = cluster.given_cluster(_read_secret_arg(a.secret_file), a.uuid, a.peer_name,
                                      a.peer)
        return cluster.join_cluster(admin, a.ip, a.peer, lambda: facts, a.peer, checked=True)
    if a.from_root:
        return cluster.join_cluster(admin, a.ip, a.peer,
                                    lambda: cluster.cluster_from_dir(a.from_root),
                                    a.from_root, checked=False)
    peer = cluster.SshPeer(a.peer, a.ssh_user, a.ssh_port, a.ssh_key, a.remote_root,
                           a.accept_new_host_key)
    return cluster.join_cluster(admin, a.ip, a.peer,
                                lambda: cluster.cluster_over_ssh(peer, admin.timeout),
                                f"{a.peer}:{a.remote_root}", checked=False)


@verb("leave-cluster", "leave the cluster (only when no resource is left here)")
def _leave_cluster(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import cluster
    return cluster.leave_cluster(admin)


# ---------------------------------------------------------------- resource
def _create_resource_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", type=RESOURCE)
    p.add_argument("device", help="data device (an LV, a loop device, or a file)")
    p.add_argument("--size", type=DEVICE_SIZE,
                   help="use only this much of the device (default: all of it)")
    p.add_argument("--buffered", action="store_true",
                   help="no O_DIRECT (for filesystems that refuse it; tests only)")
    p.add_argument("--wait", action="store_true", help="wait until marsd serves it")


@verb("create-resource", "create a resource with this host as its primary",
      _create_resource_args)
def _create_resource(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import membership
    return membership.create_resource(admin, a.resource, a.device, a.size, a.buffered, a.wait)


def _join_resource_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", type=RESOURCE)
    p.add_argument("device", help="data device on this host (at least the resource's size)")
    p.add_argument("--buffered", action="store_true", help="no O_DIRECT (tests only)")
    p.add_argument("--wait", action="store_true", help="wait until the full sync is done")


@verb("join-resource", "become a secondary of a resource: full sync, then fetch and replay",
      _join_resource_args)
def _join_resource(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import membership
    return membership.join_resource(admin, a.resource, a.device, a.buffered, a.wait)


@verb("leave-resource", "stop being a secondary of a resource", _resource_arg)
def _leave_resource(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import membership
    return membership.leave_resource(admin, a.resource)


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", type=RESOURCE)
    p.add_argument("--force", action="store_true", help="even if NBD clients are connected")


@verb("delete-resource", "delete a resource whose last member is this host", _force_arg)
def _delete_resource(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import membership
    return membership.delete_resource(admin, a.resource, a.force)


def _up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", type=RESOURCE)
    p.add_argument("--device", action="store_true",
                   help="also give it the block device /dev/mars/RESOURCE (on the primary)")


@verb("up", "attach the resource on this host (primary: serve it over NBD)", _up_args)
def _up(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import switches
    return switches.up(admin, a.resource, device=getattr(a, "device", False))


@verb("down", "stop serving the resource on this host (writes back everything first)",
      _force_arg)
def _down(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import switches
    return switches.down(admin, a.resource, a.force)


VERBS["attach"] = (_up, _up_args, "the same as up: attach the resource here")
VERBS["detach"] = (_down, _force_arg, "the same as down: write back, detach")


@verb("attach-device", "give the resource the block device /dev/mars/RESOURCE here "
      "(on its primary)", _resource_arg)
def _attach_device(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import devnode
    return devnode.attach_device(admin, a.resource)


@verb("detach-device", "remove the resource's block device here (refused while mounted)",
      _resource_arg)
def _detach_device(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import devnode
    return devnode.detach_device(admin, a.resource)


def _switch_handler(switch: str, on: bool) -> Handler:
    def run(admin: Admin, a: argparse.Namespace) -> Result:
        from marslib.admin import switches
        return switches.set_switch(admin, a.resource, switch, on)
    return run


for _switch in ("fetch", "replay", "sync"):
    verb(f"pause-{_switch}", f"pause {_switch} of a resource on this host",
         _resource_arg)(_switch_handler(_switch, False))
    verb(f"resume-{_switch}", f"resume {_switch} of a resource on this host",
         _resource_arg)(_switch_handler(_switch, True))


@verb("disconnect", "stop fetching and syncing a resource (replay what is here)",
      _resource_arg)
def _disconnect(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import switches
    return switches.set_connected(admin, a.resource, False)


@verb("connect", "resume fetching and syncing a resource", _resource_arg)
def _connect(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import switches
    return switches.set_connected(admin, a.resource, True)


def _wait_resource_args(p: argparse.ArgumentParser) -> None:
    from marslib.admin import switches
    p.add_argument("resource", type=RESOURCE)
    p.add_argument("condition", choices=switches.WAIT_CONDITIONS)


@verb("wait-resource", "wait until a resource reaches a condition on this host",
      _wait_resource_args)
def _wait_resource(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import switches
    return switches.wait_resource(admin, a.resource, a.condition)


# -------------------------------------------------------------------- roles
def _primary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", type=RESOURCE)
    p.add_argument("--force", action="store_true",
                   help="failover: take over from what this host has, without waiting for "
                   "the old primary (it may cause a split brain)")


@verb("primary", "make this host the primary: handover, or failover with --force",
      _primary_args)
def _primary(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import roles
    return roles.make_primary(admin, a.resource, a.force)


@verb("secondary", "give up the primary role (no host is primary until 'primary')",
      _resource_arg)
def _secondary(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import roles
    return roles.give_up_primary(admin, a.resource)


def _invalidate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", type=RESOURCE)
    p.add_argument("--wait", action="store_true", help="wait until the full sync is done")
    p.add_argument("--full", action="store_true",
                   help="compare the whole device, not only the blocks written since the "
                   "fork")


@verb("invalidate", "resync this secondary from the primary (after a split brain only the "
      "blocks written since the fork)", _invalidate_args)
def _invalidate(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import roles
    return roles.invalidate(admin, a.resource, a.wait, a.full)


@verb("view-split-brain", "show where the members' histories of a resource fork",
      _resource_arg)
def _view_split_brain(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import roles
    return roles.view_split_brain(admin, a.resource)


def _resize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", type=RESOURCE)
    p.add_argument("size", nargs="?", type=DEVICE_SIZE,
                   help="new size (default: the smallest member device)")


@verb("resize", "grow a resource online once every member's device is grown", _resize_args)
def _resize(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import resize
    return resize.resize(admin, a.resource, a.size)


# ------------------------------------------------------------------- verify
def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", type=RESOURCE)
    p.add_argument("--repair", action="store_true",
                   help="resync the blocks found different from the primary at the end")
    p.add_argument("--no-wait", action="store_true",
                   help="start it and return ('marsadm view' shows its progress)")


@verb("verify", "compare a secondary (this host, or --host H) with the primary while "
      "the application writes; --repair resyncs what differs", _verify_args)
def _verify(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import verify as online_verify
    return online_verify.verify(admin, a.resource, admin.host, a.repair, not a.no_wait)


# --------------------------------------------------------------------- logs
@verb("log-rotate", "start the next logfile of a resource (on its primary)", _resource_arg)
def _log_rotate(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import housekeeping
    return housekeeping.log_rotate(admin, a.resource)


@verb("log-delete", "delete logfiles that every member has applied", _resource_arg)
def _log_delete(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import housekeeping
    return housekeeping.log_delete(admin, a.resource)


def _cron_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rotate-size", type=SIZE, default=parse_size("256M"),
                   help="rotate a logfile at this size (default 256M)")
    p.add_argument("--rotate-age", type=AGE, default=3600.0,
                   help="rotate a logfile whose first record is older than this many seconds")


@verb("cron", "housekeeping: rotate old or big logfiles, delete applied ones", _cron_args)
def _cron(admin: Admin, a: argparse.Namespace) -> Result:
    from marslib.admin import housekeeping
    return housekeeping.cron(admin, a.rotate_size, a.rotate_age)


# -------------------------------------------------------------------- view
def _view_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", nargs="?", type=RESOURCE)


@verb("view", "show resources, members, roles, states, lag", _view_args)
def _view(admin: Admin, a: argparse.Namespace) -> Result:
    admin.require_cluster()
    if a.resource:
        admin.require_resource(a.resource)
    names = [a.resource] if a.resource else admin.resource_names()
    daemon = admin.daemon_status()
    views = [resource_view(admin, n, daemon) for n in names]
    result = {"schema_version": VIEW_SCHEMA_VERSION,
              "cluster": admin.meta.get(UUID), "host": admin.host, "marsd": daemon is not None,
              "ip": admin.meta.get(ip(admin.host)),  # None once this host left
              "version": __version__,
              "marsd_version": daemon.version if daemon else None,
              "peers": daemon.to_json()["peers"] if daemon else None,
              "space_free": daemon.space_free if daemon else None,
              "space_level": daemon.space_level if daemon else None,
              "root": str(admin.paths.root),
              "resources": {v["resource"]: v for v in views}}
    for line in render_view(result):
        admin.say(line)
    return result


def _short_pos(value: str | None) -> str:
    if not value:
        return "-"
    try:
        pos = LogPosition.decode(value)
    except ValueError:
        return value
    return f"{pos.number}:{pos.offset}"


def _position(info: dict[str, Any], fetched_end: str | None) -> str:
    """POSITION: a primary's log end, a secondary's replayed position (logfile:offset)."""
    if info["role"] == "primary":
        if info.get("log_end"):
            return _short_pos(info["log_end"])
        return f"~{fetched_end}" if fetched_end else "-"
    return _short_pos(info.get("applied") or info.get("replay"))


def _lag_text(info: dict[str, Any]) -> str:
    if info["role"] == "primary":
        return "-"
    lag = info.get("lag_bytes")
    if lag is None:
        return "?"
    text = "none" if lag == 0 else f"{human_size(lag)}B"
    if info.get("lag_seconds"):
        text += f"/{info['lag_seconds']:.0f}s"
    return text


def _verify_note(name: str, host: str, info: dict[str, Any]) -> str | None:
    """The view's line about a member's online verify: while it runs, and after one that
    found differences (or blocks it could not compare)."""
    if info.get("verifying"):
        if info.get("verify_repairing") or (info.get("verify_progress") is None
                                            and info.get("consistent") is False):
            return "verify: copying the differing blocks from the primary (repair)"
        progress = info.get("verify_progress")
        text = "verify running" + (f": {progress * 100:.1f}%" if progress is not None else "")
        if info.get("verify_differing"):
            text += f", {human_size(info['verify_differing'])}B differ so far"
        if info.get("verify_pass"):
            text += f", pass {info['verify_pass'] + 1}"
        if info.get("verify_error"):
            text += f" ({info['verify_error']})"
        return text
    last = info.get("last_verify")
    if not last or not (last["differing"] or last["unsettled"]):
        return None
    text = "last verify: "
    if last["differing"]:
        text += f"{human_size(last['differing'])}B in {last['ranges']} range(s) differed"
        text += ", repaired" if last["repaired"] else \
            f" (repair: 'marsadm verify {name} --host {host} --repair')"
    if last["unsettled"]:
        text += ("; " if last["differing"] else "") + \
            f"{human_size(last['unsettled'])}B were being written at every comparison"
    return text


def render_view(result: dict[str, Any]) -> list[str]:
    """``view`` for people: a header, one row per member, notes and split-brain advice."""
    lines = []
    header = (f"cluster {result['cluster']}  host {result['host']}  marsd "
              f"{'running' if result['marsd'] else 'NOT running'}")
    if result["marsd"]:
        header += (f"  {result['root']}: {human_size(result.get('space_free') or 0)}B free "
                   f"({result.get('space_level', '?')})")
    lines.append(header)
    cols = ("RESOURCE", "HOST", "ROLE", "STATE", "SIZE", "POSITION", "LAG", "SYNC", "OPEN",
            "DEVICE", "NODE")
    rows = [cols]
    notes = []
    for v in result["resources"].values():
        here = v["members"].get(result["host"], {})
        fetched = None  # a secondary here knows the primary's log end from its fetch
        if here.get("fetch_logfile") and here.get("fetch_remote_end", -1) >= 0:
            fetched = _short_pos(f"{here['fetch_logfile']},{here['fetch_remote_end']},0")
        for host, info in v["members"].items():
            sync = info.get("sync_progress")
            rows.append((
                v["resource"], host, info["role"], info["state"], format_size(v["size"]),
                _position(info, fetched), _lag_text(info),
                "-" if sync is None else f"{sync * 100:.1f}%", str(info["open_count"]),
                info["device"] or "-", info.get("device_node") or "-",
            ))
            if info.get("device_node_note"):
                notes.append(f"note: {v['resource']}@{host}: block device: "
                             f"{info['device_node_note']}")
            if info.get("error"):
                notes.append(f"note: {v['resource']}@{host}: {info['error']}"
                             + advice_host(info["error"], host, result["host"]))
            if info.get("resync_note"):
                notes.append(f"note: {v['resource']}@{host}: {info['resync_note']}")
            verify_note = _verify_note(v["resource"], host, info)
            if verify_note:
                notes.append(f"note: {v['resource']}@{host}: {verify_note}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    lines += notes
    for v in result["resources"].values():
        losers = sorted(h for h, info in v["members"].items() if info["split_brain"])
        for fork in v["split_brain"]:
            lines.append(f"SPLIT BRAIN in {v['resource']}: logfile {fork['logfile']:09d} ends "
                         + "; ".join(f"at {x['end']} for {w}" for w, x in fork["views"].items())
                         + " -- " + split_brain_advice(v["resource"], v["primary"], losers))
    return lines


# --------------------------------------------------------------------- main
def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options every verb takes, before or after the verb (after wins)."""
    common = argparse.ArgumentParser(add_help=False)

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common.add_argument("--json", action="store_true", default=default(False),
                        help="machine-readable output")
    common.add_argument("--timeout", type=SECONDS, default=default(60.0),
                        help="seconds to wait at most (above 0)")
    common.add_argument("--dry-run", action="store_true", default=default(False),
                        help="say what would be done")
    common.add_argument("--root", default=default(None),
                        help="state root (default $MARS_ROOT or /mars)")
    common.add_argument("--run-dir", default=default(None),
                        help="marsd sockets (default $MARS_RUN_DIR or /run/mars)")
    common.add_argument("--host", type=HOST, default=default(None),
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


def _show_progress(want_json: bool) -> Callable[[str], None]:
    def show(line: str) -> None:
        if not want_json and sys.stderr.isatty():
            print("\r" + line, end="", file=sys.stderr, flush=True)
    return show


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
    admin: Admin | None = None
    try:
        host = check_host_name(args.host or os.environ.get("MARS_HOST") or socket.gethostname())
        paths = MarsPaths.from_env(args.root, args.run_dir)
        admin = Admin(paths, host, MetaStore(paths.root), timeout=args.timeout,
                      dry_run=args.dry_run, progress=_show_progress(args.json))
        out: dict[str, Any] = {"ok": True, **VERBS[args.verb][0](admin, args)}
        code = 0
    except MarsError as exc:
        code, out = exc.exit_code, {"ok": False, "error": str(exc), "code": exc.exit_code}
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        code, out = 1, {"ok": False, "error": f"{where}{exc.strerror or exc}", "code": 1}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        for line in admin.lines if admin else []:
            print(line)
        if not out["ok"]:
            print(f"marsadm {args.verb}: {out['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
