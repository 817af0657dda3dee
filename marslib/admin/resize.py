"""Growing a resource online, once every member's device has grown."""

from __future__ import annotations

from dataclasses import dataclass

from marslib.admin.context import Admin, Result
from marslib.admin.snapshot import ResourceSnapshot, read_resource
from marslib.device import probe_size
from marslib.errors import Refused
from marslib.sizes import format_size


@dataclass(frozen=True)
class ResizePlan:
    old: int
    new: int

    @property
    def changes(self) -> bool:
        return self.new != self.old


def device_sizes(snap: ResourceSnapshot) -> dict[str, int]:
    """Each member's device size as last reported; refused when one is unknown."""
    sizes: dict[str, int] = {}
    for host, m in snap.members.items():
        if m.device_size is None:
            raise Refused(f"the device size of {snap.name} on {host} is unknown: start marsd "
                          f"and 'marsadm up {snap.name}' there")
        sizes[host] = m.device_size
    return sizes


def plan_resize(snap: ResourceSnapshot, host: str, sizes: dict[str, int],
                requested: int | None) -> ResizePlan:
    """The new size (default: the smallest member device), or why it is refused."""
    if snap.primary != host:
        raise Refused(f"resize {snap.name} on its primary ({snap.primary})")
    new = requested if requested is not None else min(sizes.values())
    new -= new % 4096
    if new < snap.size:
        raise Refused(f"{snap.name} is {format_size(snap.size)}: shrinking to "
                      f"{format_size(new)} is refused (it would destroy data)")
    small = {h: s for h, s in sizes.items() if s < new}
    if small:
        raise Refused("grow the device first on " + ", ".join(
            f"{h} ({format_size(s)} < {format_size(new)})" for h, s in sorted(small.items())))
    return ResizePlan(snap.size, new)


def resize(admin: Admin, name: str, requested: int | None) -> Result:
    k = admin.require_resource(name)
    snap = read_resource(admin.meta, name)
    if snap.primary != admin.host:
        raise Refused(f"resize {name} on its primary ({snap.primary})")
    sizes = device_sizes(snap)
    device = snap.members[admin.host].device if admin.host in snap.members else None
    if device and admin.daemon_status() is not None:
        sizes[admin.host] = probe_size(device)  # this host's device may have grown just now
    plan = plan_resize(snap, admin.host, sizes, requested)
    if not plan.changes:
        admin.say(f"{name} is {format_size(plan.old)} already: nothing changes")
        return {"changed": False, "size": plan.old}
    if admin.dry_run:
        admin.say(f"would grow {name} from {format_size(plan.old)} to {format_size(plan.new)}")
        return {"changed": True, "dry_run": True, "old_size": plan.old, "size": plan.new}
    admin.meta.set(k.size, str(plan.new), durable=True)
    admin.poke()
    admin.say(f"{name} grown from {format_size(plan.old)} to {format_size(plan.new)}; "
              "secondaries sync the new tail; NBD clients see the new size when they "
              "reconnect")
    return {"changed": True, "old_size": plan.old, "size": plan.new}
