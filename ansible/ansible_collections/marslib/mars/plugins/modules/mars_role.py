#!/usr/bin/python
# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# marslib Ansible module: planned handover, forced failover, or giving up the primary role.

# ruff: noqa: E402  (Ansible modules import after their documentation)

from __future__ import annotations

DOCUMENTATION = r"""
module: mars_role
short_description: Make this host the primary or a secondary of a marslib resource
description:
  - V(primary) on a secondary is a planned handover (C(marsadm primary R)) that marsadm
    refuses, changing nothing, unless it is safe (synced, consistent, not paused, no split
    brain, no NBD clients on the old primary, the old primary answering). With
    O(force=true) it is a failover (C(marsadm primary --force R)) for when the old primary
    is gone; if the old primary still writes, that is a split brain.
  - V(secondary) on the primary gives up the role (C(marsadm secondary R)); no host is
    primary until one runs V(primary).
  - A host that already has the role is left as it is.
version_added: "0.2.0"
author:
  - marslib maintainers (@marslib)
options:
  name:
    description:
      - The resource name.
    type: str
    required: true
    aliases: [resource]
  role:
    description:
      - The role this host should have.
    type: str
    choices: [primary, secondary]
    default: primary
  force:
    description:
      - With V(primary), fail over at once instead of a planned handover. May cause a split
        brain if the old primary still writes.
      - Refused with V(secondary), where giving up the role has no forced form.
    type: bool
    default: false
  timeout:
    description:
      - Seconds each wait of the handover may take (C(--timeout)). A timeout while this host
        catches up changes nothing; a timeout while the old primary ends its log puts it back.
extends_documentation_fragment:
  - marslib.mars.common
  - marslib.mars.attributes
attributes:
  check_mode:
    support: full
    details:
      - Runs marsadm with C(--dry-run), which checks every precondition of the handover
        (and fails with marsadm's reason) but changes nothing.
  diff_mode:
    support: full
    details:
      - The designated primary before and after.
notes:
  - Needs C(marsd) running on this host.
requirements:
  - marsadm on the managed host
seealso:
  - module: marslib.mars.mars_wait
    description: Wait until the new secondary is up to date again after a handover.
  - module: marslib.mars.mars_info
  - module: marslib.mars.mars_resource
"""

EXAMPLES = r"""
- name: Planned handover of r0 to this host
  marslib.mars.mars_role:
    name: r0
    role: primary
  register: handover

- name: Failover after the primary's data centre is lost
  marslib.mars.mars_role:
    name: r0
    role: primary
    force: true

- name: Give up the primary role (no primary until another host takes it)
  marslib.mars.mars_role:
    name: r0
    role: secondary
"""

RETURN = r"""
old_primary:
  description: The designated primary before the task (C((none)) if there was none).
  returned: always
  type: str
  sample: alpha
new_primary:
  description: The designated primary after the task (C((none)) after V(secondary)).
  returned: always
  type: str
  sample: beta
seconds:
  description: How long the handover or failover took.
  returned: when the role changed (not in check mode)
  type: float
  sample: 1.42
forced:
  description: Whether it was a failover.
  returned: when the role changed
  type: bool
state:
  description: This host's state in the resource after the task (C(Primary), C(UpToDate)...).
  returned: always
  type: str
  sample: Primary
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.marslib.mars.plugins.module_utils.mars_common import (
    NO_PRIMARY,
    Marsadm,
    common_spec,
    this_member,
)


def argument_spec():
    return common_spec(
        name=dict(type="str", required=True, aliases=["resource"]),
        role=dict(type="str", default="primary", choices=["primary", "secondary"]),
        force=dict(type="bool", default=False),
    )


MODULE_KWARGS = dict(supports_check_mode=True)


def plan(view, params):
    """``changed``, ``args``, ``fail`` from marsadm's view and the parameters."""
    out = dict(changed=False, args=[], fail=None)
    name = params["name"]
    if params.get("force") and params["role"] == "secondary":
        out["fail"] = ("force applies to role=primary only (a failover); giving up the "
                       "primary role has no forced form: drop force")
        return out
    if view is None:
        out["fail"] = "no cluster here: create or join one first (mars_cluster)"
        return out
    host = view.get("host")
    res, me = this_member(view, name)
    if res is None:
        out["fail"] = f"resource {name} does not exist here"
        return out
    if me is None:
        out["fail"] = f"{host} is not a member of {name}: join it first (mars_resource)"
        return out
    primary = res.get("primary")
    if params["role"] == "primary":
        if primary != host:
            out.update(changed=True, args=["primary", name]
                       + (["--force"] if params.get("force") else []))
    elif primary == host:
        out.update(changed=True, args=["secondary", name])
    return out


def main():
    module = AnsibleModule(argument_spec=argument_spec(), **MODULE_KWARGS)
    p = module.params
    marsadm = Marsadm(module)
    view = marsadm.view()
    todo = plan(view, p)
    if todo["fail"]:
        module.fail_json(msg=todo["fail"])
    res, me = this_member(view, p["name"])
    old = res.get("primary") or NO_PRIMARY
    result = dict(changed=todo["changed"], old_primary=old, new_primary=old,
                  state=me.get("state"))
    if todo["changed"]:
        t0 = time.monotonic()
        reply = marsadm.run_or_fail(todo["args"], wait=True, dry_run=module.check_mode)
        secs = round(time.monotonic() - t0, 3)
        result["forced"] = bool(p["force"]) and p["role"] == "primary"
        if module.check_mode:
            result["new_primary"] = view["host"] if p["role"] == "primary" else NO_PRIMARY
        else:
            result["seconds"] = reply.get("seconds", secs)
            res, me = this_member(marsadm.view(), p["name"])
            result.update(new_primary=(res or {}).get("primary") or NO_PRIMARY,
                          state=(me or {}).get("state"))
    if not todo["changed"] and p["role"] == "primary" and result["state"] == "PrimaryDown":
        module.warn(f"{p['name']} is not running on this host, its primary: marsd is not "
                    f"running, or the resource is down (marsadm up {p['name']})")
    if module._diff:
        result["diff"] = dict(before=dict(primary=old), after=dict(primary=result["new_primary"]))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
