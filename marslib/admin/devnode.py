"""The block device node of a resource (``/dev/mars/R``): marsd builds and keeps it while
the resource is primary here, as the switch ``todo-HOST/device`` says."""

from __future__ import annotations

from marslib.admin.context import Admin, Result
from marslib.errors import MarsError, Refused
from marslib.schema import OFF, ON


def attach_device(admin: Admin, name: str) -> Result:
    k = admin.require_member(name, "join-resource first")
    if admin.meta.get(k.primary) != admin.host:
        raise Refused(f"{admin.host} is not the primary of {name}: a device node is given "
                      f"where the resource is primary ({admin.meta.get(k.primary)})")
    st = admin.require_daemon(f"marsd builds the device node of {name}")
    live = st["resources"].get(name, {})
    if live.get("role") != "primary":
        raise Refused(f"{name} is not running here: run 'marsadm up {name}' first")
    key = k.todo(admin.host, "device")
    before = admin.meta.get(key)
    if live.get("device_node") and before == ON:
        admin.say(f"{name} already has the block device {live['device_node']}: nothing "
                  "changes")
        return {"changed": False, "node": live["device_node"]}
    if admin.dry_run:
        admin.say(f"would give {name} a block device node here")
        return {"changed": True, "dry_run": True}
    admin.meta.set(key, ON)
    try:
        reply = admin.daemon("attach-device", resource=name)
    except MarsError:
        if before is None:
            admin.meta.delete(key)  # refused: the tree is as it was
        else:
            admin.meta.set(key, before)
        raise
    node = reply.get("node")
    admin.say(f"{name}: block device {node} ({reply.get('backend')})")
    return {"changed": True, **{k2: v for k2, v in reply.items() if k2 != "ok"}}


def detach_device(admin: Admin, name: str) -> Result:
    k = admin.require_resource(name)
    key = k.todo(admin.host, "device")
    st = admin.daemon_status()
    live = (st or {}).get("resources", {}).get(name, {})
    if not live.get("device_node") and admin.meta.get(key) != ON:
        admin.say(f"{name} has no block device here: nothing changes")
        return {"changed": False}
    if admin.dry_run:
        admin.say(f"would remove the block device of {name}")
        return {"changed": True, "dry_run": True}
    if st is not None and live.get("device_node"):
        admin.daemon("detach-device", resource=name)  # refused while mounted: no change
    admin.meta.set(key, OFF)
    admin.say(f"{name}: block device removed")
    return {"changed": True}
