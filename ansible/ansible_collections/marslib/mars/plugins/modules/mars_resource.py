#!/usr/bin/python
# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# marslib Ansible module: create, join, leave or delete a replicated resource.

# ruff: noqa: E402  (Ansible modules import after their documentation)

from __future__ import annotations

DOCUMENTATION = r"""
module: mars_resource
short_description: Create, join, leave or delete a marslib resource
description:
  - V(present) creates the resource with this host as its primary
    (C(marsadm create-resource)).
  - V(joined) makes this host a secondary (C(marsadm join-resource)), with a fast full sync from
    the primary, then fetch and replay.
  - V(absent) makes a secondary leave the resource (C(marsadm leave-resource)); on the
    primary, with O(force=true) only, it deletes the resource (C(marsadm delete-resource)),
    which marsadm refuses while other members remain.
  - O(device_node) gives the resource a block device node C(/dev/mars/NAME) on this host
    while it is the primary here (C(marsadm attach-device)), or takes it away
    (C(marsadm detach-device)); see docs/block-device.md.
  - A host that already is a member with the same device is left as it is (with
    V(joined) and O(wait), a sync still running is waited for, without a change). The data
    device itself is never created, changed or wiped.
version_added: "0.2.0"
author:
  - marslib maintainers (@marslib)
options:
  name:
    description:
      - The resource name (1-64 characters of C(a-z 0-9 _ . -)).
    type: str
    required: true
    aliases: [resource]
  state:
    description:
      - V(present) creates the resource here as its primary. If it exists and this host is a
        member with the same device, nothing changes; another device fails; if this host is
        not a member the module fails (use V(joined)).
      - V(joined) joins it as a secondary; a member with the same device is unchanged.
      - V(absent) leaves it (secondary) or, on the primary with O(force=true), deletes it.
    type: str
    choices: [present, joined, absent]
    default: present
  device:
    description:
      - The data device on this host (an LV, a loop device or a file). Required for
        V(present) and V(joined). For V(joined) it must be at least the resource's size.
    type: path
  size:
    description:
      - With V(present), use only this much of the device (default all of it), in bytes or
        with a binary unit (V(512M), V(1G)); a multiple of 4 KiB. Ignored with a warning if
        the resource exists with another size (grow it with M(marslib.mars.mars_resize)).
    type: str
  wait:
    description:
      - With V(joined), wait until the full sync is done (C(--wait)). With V(present), wait
        until C(marsd) serves the resource (needs C(marsd) running).
      - Default V(true) for V(joined), V(false) for V(present).
    type: bool
  force:
    description:
      - Required for V(absent) on the primary, which deletes the resource with its logfiles
        (even with NBD clients connected). The data device is left as it is.
    type: bool
    default: false
  device_node:
    description:
      - V(true) with V(present) or V(joined), where this host is the primary of the
        resource, gives it the block device node C(/dev/mars/NAME) (C(marsadm
        attach-device)); C(marsd) keeps it, also across its restarts, while the switch is
        on. Nothing happens where this host is a secondary (a node exists only on the
        primary). V(present) then waits until C(marsd) serves the resource.
      - V(false) takes away a node this host has (C(marsadm detach-device)); refused, and
        the task fails, while the node is mounted or open. Nothing happens without one.
    type: bool
    default: false
  timeout:
    description:
      - Seconds marsadm may wait (C(--timeout)) for the resource to arrive, the sync, or
        C(marsd) to stop it.
extends_documentation_fragment:
  - marslib.mars.common
  - marslib.mars.attributes
attributes:
  check_mode:
    support: full
    details:
      - Runs marsadm with C(--dry-run), which checks the preconditions (device, size, other
        members) and changes nothing.
  diff_mode:
    support: full
    details:
      - Whether the resource exists, whether this host is a member, its role and device,
        before and after.
requirements:
  - marsadm on the managed host; C(marsd) running for O(wait)
seealso:
  - module: marslib.mars.mars_cluster
  - module: marslib.mars.mars_role
  - module: marslib.mars.mars_resize
  - module: marslib.mars.mars_wait
  - module: marslib.mars.mars_info
"""

EXAMPLES = r"""
- name: Create r0 on the primary
  marslib.mars.mars_resource:
    name: r0
    device: /dev/vg0/r0
    wait: true

- name: Join r0 on the secondaries and wait for the full sync
  marslib.mars.mars_resource:
    name: r0
    state: joined
    device: /dev/vg0/r0
    timeout: 3600
  register: joined

- name: Create r0 with a block device node /dev/mars/r0 for a filesystem
  marslib.mars.mars_resource:
    name: r0
    device: /dev/vg0/r0
    device_node: true

- name: Leave r0 on a secondary
  marslib.mars.mars_resource:
    name: r0
    state: absent

- name: Delete r0 on its primary once it is the last member
  marslib.mars.mars_resource:
    name: r0
    state: absent
    force: true
"""

RETURN = r"""
action:
  description: The marsadm verb run (or that would run in check mode), or null.
  returned: always
  type: str
  sample: join-resource
resource:
  description: marsadm's view of the resource after the task (null when it is gone or not
    known here), with C(primary), C(size), C(split_brain), C(members).
  returned: always
  type: dict
state:
  description: This host's state in the resource (C(Primary), C(Syncing), C(UpToDate)...),
    null if it is not a member.
  returned: always
  type: str
  sample: UpToDate
role:
  description: This host's role, C(primary) or C(secondary), null if not a member.
  returned: always
  type: str
device:
  description: This host's data device, null if not a member.
  returned: always
  type: str
  sample: /dev/vg0/r0
size:
  description: The resource's size in bytes.
  returned: when the resource exists
  type: int
  sample: 1073741824
sync_seconds:
  description: How long the join with its full sync (or the wait for a running sync) took.
  returned: when this host joined, or waited for its sync, with O(wait)
  type: float
bytes:
  description: Bytes covered by the full sync (the resource's size).
  returned: when this host joined with O(wait)
  type: int
device_node:
  description: The block device node on this host (C(/dev/mars/NAME)) after the task, null
    if it has none.
  returned: with V(present) and V(joined)
  type: str
  sample: /dev/mars/r0
device_node_action:
  description: C(attach-device) or C(detach-device) if the task ran it (or would in check
    mode), else null.
  returned: with V(present) and V(joined)
  type: str
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.marslib.mars.plugins.module_utils.mars_common import (
    Marsadm,
    common_spec,
    parse_size,
    same_device,
    this_member,
)


def argument_spec():
    return common_spec(
        name=dict(type="str", required=True, aliases=["resource"]),
        state=dict(type="str", default="present", choices=["present", "joined", "absent"]),
        device=dict(type="path"),
        size=dict(type="str"),
        wait=dict(type="bool"),
        force=dict(type="bool", default=False),
        device_node=dict(type="bool", default=False),
    )


MODULE_KWARGS = dict(
    required_if=[("state", "present", ["device"]), ("state", "joined", ["device"])],
    supports_check_mode=True,
)


def plan(view, params):
    """What to do: a dict with ``changed``, ``action``, ``args``, ``fail`` and ``warnings``,
    from marsadm's view (None: no cluster) and the module's parameters."""
    out = dict(changed=False, action=None, args=[], fail=None, warnings=[])
    p = params
    name, state, device = p["name"], p["state"], p.get("device")
    if view is None:
        if state != "absent":
            out["fail"] = "no cluster here: create or join one first (mars_cluster)"
        return out
    host = view.get("host")
    res, me = this_member(view, name)
    if state == "absent":
        if me is None:
            return out
        if res.get("primary") == host:
            if not p.get("force"):
                out["fail"] = (f"{host} is the primary of {name}: state=absent here deletes the "
                               "resource (its other members must leave first); set force=true "
                               "to delete it, or hand over first (mars_role) and then leave")
                return out
            out.update(changed=True, action="delete-resource",
                       args=["delete-resource", name, "--force"])
            return out
        out.update(changed=True, action="leave-resource", args=["leave-resource", name])
        return out
    if me is not None:
        if not same_device(me.get("device"), device):
            out["fail"] = (f"{name} uses {me.get('device')} on {host}, not {device}: leave the "
                           "resource first to change the device")
        elif state == "joined" and me.get("syncing") and p.get("wait") is not False:
            # joined earlier (perhaps by a run that timed out): wait for the sync, no change
            out["args"] = ["wait-resource", name, "sync-off"]
        elif p.get("size") and state == "present":
            try:
                want = parse_size(p["size"])
            except ValueError as exc:
                out["fail"] = str(exc)
                return out
            if want != res.get("size"):
                out["warnings"].append(f"{name} has {res.get('size')} bytes, not {want}: size "
                                       "is used only when creating (grow with mars_resize)")
        return out
    if state == "present":
        if res is not None:
            out["fail"] = (f"resource {name} exists and {host} is not a member: use "
                           "state=joined to join it as a secondary")
            return out
        args = ["create-resource", name, device]
        if p.get("size"):
            try:
                args += ["--size", str(parse_size(p["size"]))]
            except ValueError as exc:
                out["fail"] = str(exc)
                return out
        if p.get("wait") or p.get("device_node"):
            args.append("--wait")  # a node needs the resource served
        out.update(changed=True, action="create-resource", args=args)
        return out
    args = ["join-resource", name, device]
    if p.get("wait", True) is not False:
        args.append("--wait")
    out.update(changed=True, action="join-resource", args=args)
    return out


def plan_node(view, params, check_mode=False):
    """The marsadm arguments that make this host's node match O(device_node), or None.

    ``view`` is marsadm's view after the resource part of the task; its member entry has
    ``device_node`` (the node path, or null) where marsadm reports it.
    """
    if params["state"] == "absent" or view is None:
        return None
    res, me = this_member(view, params["name"])
    if me is None:
        # in check mode a resource the task would create has this host as its primary
        return ["attach-device", params["name"]] if check_mode and \
            params.get("device_node") and params["state"] == "present" else None
    if params.get("device_node"):
        if me.get("role") != "primary":
            return None
        return ["attach-device", params["name"]]
    if me.get("device_node"):
        return ["detach-device", params["name"]]
    return None


def summary(view, name):
    """What the module returns about the resource and this host's part in it."""
    res, me = this_member(view, name)
    me = me or {}
    return dict(resource=res, state=me.get("state"), role=me.get("role"),
                device=me.get("device"), size=(res or {}).get("size"))


def diff_state(view, name):
    res, me = this_member(view, name)
    if me is None:
        return dict(member=False, exists=res is not None)
    return dict(member=True, exists=True, role=me.get("role"), device=me.get("device"))


def main():
    module = AnsibleModule(argument_spec=argument_spec(), **MODULE_KWARGS)
    p = module.params
    if p["wait"] is None:
        p["wait"] = p["state"] == "joined"
    marsadm = Marsadm(module)
    view = marsadm.view()
    todo = plan(view, p)
    for w in todo["warnings"]:
        module.warn(w)
    if todo["fail"]:
        module.fail_json(msg=todo["fail"], **summary(view, p["name"]))
    result = dict(changed=todo["changed"], action=todo["action"])
    after_view = view
    if todo["args"] and not todo["action"] and not module.check_mode:
        t0 = time.monotonic()
        marsadm.run_or_fail(todo["args"], wait=True)
        result["sync_seconds"] = round(time.monotonic() - t0, 3)
        after_view = marsadm.view()
    if todo["action"]:
        t0 = time.monotonic()
        marsadm.run_or_fail(todo["args"], wait=True, dry_run=module.check_mode)
        secs = round(time.monotonic() - t0, 3)
        if not module.check_mode:
            after_view = marsadm.view()
            if todo["action"] == "join-resource" and p["wait"]:
                result["sync_seconds"] = secs
                result["bytes"] = summary(after_view, p["name"])["size"]
    node_args = plan_node(after_view, p, module.check_mode)
    if p["state"] != "absent":
        me = this_member(after_view, p["name"])[1]
        result["device_node"] = (me or {}).get("device_node")
        result["device_node_action"] = node_args[0] if node_args else None
    if node_args:
        if module.check_mode and this_member(after_view, p["name"])[1] is None:
            node_reply = dict(changed=True, node=None)  # the resource is not there yet
        else:
            node_reply = marsadm.run_or_fail(node_args, dry_run=module.check_mode)
        result["changed"] = result["changed"] or bool(node_reply.get("changed"))
        if not module.check_mode:
            result["device_node"] = node_reply.get("node") \
                if node_args[0] == "attach-device" else None
    result.update(summary(after_view, p["name"]))
    if module._diff:
        before = diff_state(view, p["name"])
        if module.check_mode and todo["action"]:
            after = dict(before)
            if todo["action"] in ("create-resource", "join-resource"):
                after.update(member=True, exists=True, device=p["device"],
                             role="primary" if todo["action"] == "create-resource"
                             else "secondary")
            else:
                after = dict(member=False, exists=todo["action"] == "leave-resource")
        else:
            after = diff_state(after_view, p["name"])
        result["diff"] = dict(before=before, after=after)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
