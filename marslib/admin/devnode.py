"""The block device node of a resource (``/dev/mars/R``): marsd builds and keeps it while
the resource is primary here and its switch ``todo-HOST/device`` is on; these steps ask
marsd, which sets the switch as it acts (``marslib/devnode``)."""

from __future__ import annotations

from marslib.admin.context import Admin, Result
from marslib.errors import Refused
from marslib.status import DeviceNodeStatus, ResourceStatus


def node_of(live: ResourceStatus | None) -> DeviceNodeStatus | None:
    """The node in marsd's live status of a resource, if it has one."""
    node = live.device_node if live is not None else None
    return node if node is not None and node.node else None


def clients_besides_node(live: ResourceStatus | None) -> int:
    """NBD clients of a running primary other than its own block device node's
    connections (nbdfuse holds several)."""
    if live is None:
        return 0
    node = node_of(live)
    return max(0, live.open_count - (node.connections if node else 0))


def attach_device(admin: Admin, name: str) -> Result:
    k = admin.require_member(name, "join-resource first")
    if admin.meta.get(k.primary) != admin.host:
        raise Refused(f"{admin.host} is not the primary of {name}: a device node is given "
                      f"where the resource is primary ({admin.meta.get(k.primary)})")
    st = admin.require_daemon(f"marsd builds the device node of {name}")
    live = st.resources.get(name)
    if live is None or live.role != "primary":
        raise Refused(f"{name} is not running here: run 'marsadm up {name}' first")
    node = node_of(live)
    if admin.dry_run:
        healthy = node is not None and node.healthy and node.wanted
        admin.say(f"{name} has the block device {node.node}: nothing changes"
                  if node is not None and healthy
                  else f"would give {name} a block device node here")
        return {"changed": not healthy, "dry_run": True}
    reply = admin.daemon("attach-device", resource=name)
    admin.say(f"{name}: block device {reply.get('node')} ({reply.get('backend')}"
              f"{', unchanged' if not reply.get('changed') else ''})")
    return {k2: v for k2, v in reply.items() if k2 != "ok"}


def detach_device(admin: Admin, name: str) -> Result:
    admin.require_resource(name)
    st = admin.daemon_status()
    if st is None:
        raise Refused(f"marsd is not running here: it owns the block device of {name}; "
                      "start it first")
    live = st.resources.get(name)
    wanted = admin.meta.get(admin.keys(name).todo(admin.host, "device")) == "1"
    if node_of(live) is None and not wanted:
        admin.say(f"{name} has no block device here: nothing changes")
        return {"changed": False}
    if admin.dry_run:
        admin.say(f"would remove the block device of {name}")
        return {"changed": True, "dry_run": True}
    reply = admin.daemon("detach-device", resource=name)  # refused while in use
    admin.say(f"{name}: block device {reply.get('node')} removed")
    return {k2: v for k2, v in reply.items() if k2 != "ok"}


def release_node(admin: Admin, name: str, live: ResourceStatus | None) -> None:
    """Before the primary stops here: take its node away (refused while mounted or open,
    and then nothing has changed)."""
    if node_of(live) is not None and not admin.dry_run:
        admin.daemon("detach-device", resource=name)
