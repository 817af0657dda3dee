"""A resource's members: create, join, leave, delete."""

from __future__ import annotations

import os

from marslib.admin.context import Admin, Result
from marslib.admin.snapshot import member_hosts
from marslib.admin.switches import bring_up, down, wait_sync
from marslib.device import probe_size
from marslib.errors import Refused
from marslib.history import forget_links
from marslib.layout import check_resource_name
from marslib.logretention import delete_logfiles
from marslib.position import LogPosition
from marslib.schema import ON, ResourceKeys, sync_from_start
from marslib.sizes import format_size

SECONDARY_SWITCHES = ("fetch", "replay", "sync")


def create_resource(admin: Admin, name: str, device: str, size: int | None = None,
                    buffered: bool = False, wait: bool = False) -> Result:
    """A new resource with this host as its primary."""
    check_resource_name(name)
    admin.require_cluster()
    k = ResourceKeys(name)
    if admin.meta.get(k.size) is not None:
        raise Refused(f"resource {name} already exists; 'marsadm view {name}' shows it")
    dev = os.path.abspath(device)
    if not os.path.exists(dev):
        raise Refused(f"data device {dev} does not exist: create the LV (or file) first")
    dev_size = probe_size(dev)
    size = dev_size if size is None else size
    if size > dev_size:
        raise Refused(f"--size {format_size(size)} is larger than {dev} "
                      f"({format_size(dev_size)})")
    if size <= 0 or size % 4096:
        raise Refused(f"{dev} has {dev_size} bytes: a resource needs a positive multiple of "
                      "4 KiB; give --size")
    for other in admin.paths.resources():
        if admin.meta.get(ResourceKeys(other).data(admin.host)) == dev:
            raise Refused(f"{dev} is already the data device of resource {other}")
    if wait:
        admin.require_daemon(f"--wait waits until marsd serves {name}")
    if admin.dry_run:
        admin.say(f"would create resource {name} on {dev} ({format_size(size)})")
        return {"changed": True, "dry_run": True}
    admin.meta.set(k.data(admin.host), dev)
    if buffered:
        admin.meta.set(k.buffered(admin.host), ON)
    for switch in ("attach", *SECONDARY_SWITCHES):
        admin.meta.set(k.todo(admin.host, switch), ON)
    admin.meta.set(k.replay(admin.host), LogPosition(1, 0, 0, admin.host).encode())
    admin.meta.set(k.primary, admin.host)
    admin.meta.set(k.size, str(size), durable=True)
    admin.say(f"created resource {name} on {dev} ({format_size(size)}), primary {admin.host}")
    result: Result = {"changed": True, "resource": name, "device": dev, "size": size}
    if wait:
        result.update(bring_up(admin, name))
    else:
        admin.poke()
    return result


def join_resource(admin: Admin, name: str, device: str, buffered: bool = False,
                  wait: bool = False) -> Result:
    """Become a secondary: full sync from the primary, then fetch and replay."""
    check_resource_name(name)
    admin.require_cluster()
    k = ResourceKeys(name)
    admin.wait_for(f"resource {name} to be known here (metadata from its primary)",
                   lambda: admin.meta.get(k.size) is not None)
    if admin.meta.get(k.data(admin.host)) is not None:
        raise Refused(f"this host is already a member of {name}")
    dev = os.path.abspath(device)
    if not os.path.exists(dev):
        raise Refused(f"data device {dev} does not exist: create the LV (or file) first")
    size = int(admin.meta.get(k.size) or 0)
    if probe_size(dev) < size:
        raise Refused(f"{dev} has {format_size(probe_size(dev))}, resource {name} needs "
                      f"{format_size(size)}: grow the device first")
    if wait:
        admin.require_daemon("--wait waits for the full sync marsd runs")
    if admin.dry_run:
        admin.say(f"would join {name} with {dev} and start a full sync")
        return {"changed": True, "dry_run": True}
    if buffered:
        admin.meta.set(k.buffered(admin.host), ON)
    for switch in SECONDARY_SWITCHES:
        admin.meta.set(k.todo(admin.host, switch), ON)
    admin.meta.set(k.syncstatus(admin.host), sync_from_start(size))
    admin.meta.set(k.data(admin.host), dev)
    admin.meta.set(k.todo(admin.host, "attach"), ON, durable=True)
    admin.say(f"joined {name} with {dev}; full sync from {admin.meta.get(k.primary)} starts")
    admin.poke()
    if wait:
        wait_sync(admin, name)
    return {"changed": True, "resource": name, "device": dev}


def leave_resource(admin: Admin, name: str) -> Result:
    """Stop being a secondary: the tree forgets this member, its fetched logs go."""
    k = admin.require_resource(name)
    if admin.meta.get(k.primary) == admin.host:
        raise Refused(f"{admin.host} is the primary of {name}: hand over to another member "
                      "first (marsadm primary on the new primary)")
    if admin.meta.get(k.data(admin.host)) is None:
        admin.say(f"{admin.host} is not a member of {name}: nothing changes")
        return {"changed": False}
    if admin.dry_run:
        admin.say(f"would stop {name} here and forget this member")
        return {"changed": True, "dry_run": True}
    admin.meta.set(k.todo(admin.host, "attach"), "0")
    if admin.poke():
        admin.wait_for(f"resource {name} to stop here",
                       lambda: name not in admin.daemon("status")["resources"])
    for key in k.member_keys(admin.host):
        admin.meta.delete(key)
    forget_links(admin.meta, name, admin.host)
    for mv in admin.meta.items(k.todo_dir(admin.host)) + \
            admin.meta.items(k.actual_dir(admin.host)):
        admin.meta.delete(mv.key)
    delete_logfiles([path for _, host, path in admin.paths.logfiles(name)
                     if host != admin.host], name)  # fetched copies: marsd stopped here
    admin.say(f"{admin.host} left {name}")
    return {"changed": True}


def delete_resource(admin: Admin, name: str, force: bool = False) -> Result:
    """Delete a resource whose last member is this host (its data device stays)."""
    k = admin.require_resource(name)
    others = [h for h in member_hosts(admin.meta, name) if h != admin.host]
    if others:
        raise Refused(f"{name} still has members {', '.join(others)}: run 'marsadm "
                      f"leave-resource {name}' on each first")
    if admin.dry_run:
        admin.say(f"would delete {name} and its logfiles; its data device stays")
        return {"changed": True, "dry_run": True}
    if admin.daemon_status() is not None:
        down(admin, name, force=force)
    for mv in admin.meta.items(k.dir):
        if mv.value is not None:
            admin.meta.delete(mv.key)
    delete_logfiles([path for _, _, path in admin.paths.logfiles(name)], name)
    admin.say(f"{name} deleted; its data device was left as it is")
    return {"changed": True}
