#!/usr/bin/python
# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# marslib Ansible module: grow a resource online.

# ruff: noqa: E402  (Ansible modules import after their documentation)

from __future__ import annotations

DOCUMENTATION = r"""
module: mars_resize
short_description: Grow a marslib resource online
description:
  - Grows a resource (C(marsadm resize R [SIZE])) on its primary, after the data device has
    been grown on every member (for example with C(community.general.lvol)). The primary
    serves the new size to NBD clients that connect from then on; running secondaries sync
    the new tail.
  - Unchanged if the resource already has the target size. Shrinking is refused.
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
  size:
    description:
      - The new size, in bytes or with a binary unit (V(512M), V(2G)); rounded down to
        4 KiB.
      - Default the smallest member device (as C(marsd) last published it).
    type: str
extends_documentation_fragment:
  - marslib.mars.common
  - marslib.mars.attributes
attributes:
  check_mode:
    support: full
    details:
      - Runs marsadm with C(--dry-run). Without O(size) it tells whether the resource
        would grow, but not to which size (RV(new_size) is null then).
  diff_mode:
    support: partial
    details:
      - The size before and after; in check mode without O(size) the size after is null
        (marsadm picks it when it runs).
notes:
  - Run it on the primary; elsewhere it fails.
  - marsadm refuses (and the module fails with its reason) while a member's device is
    smaller than the target or its size is not known yet (C(marsd) publishes it a moment
    after the device has grown).
requirements:
  - marsadm on the managed host
seealso:
  - module: marslib.mars.mars_resource
  - module: marslib.mars.mars_info
  - module: community.general.lvol
    description: Grow the logical volume of each member first.
"""

EXAMPLES = r"""
- name: Grow r0 to 2 GiB (every member's device is at least that big)
  marslib.mars.mars_resize:
    name: r0
    size: 2G

- name: Grow r0 to its smallest member device
  marslib.mars.mars_resize:
    name: r0
"""

RETURN = r"""
old_size:
  description: The resource's size in bytes before the task.
  returned: always
  type: int
  sample: 1073741824
new_size:
  description: The size after the task (null in check mode without O(size)).
  returned: always
  type: int
  sample: 2147483648
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.marslib.mars.plugins.module_utils.mars_common import (
    Marsadm,
    common_spec,
    parse_size,
    this_member,
)


def argument_spec():
    return common_spec(
        name=dict(type="str", required=True, aliases=["resource"]),
        size=dict(type="str"),
    )


MODULE_KWARGS = dict(supports_check_mode=True)


def plan(view, params):
    """``changed`` (None: marsadm decides), ``args``, ``old_size``, ``new_size``, ``fail``."""
    out = dict(changed=False, args=[], old_size=None, new_size=None, fail=None)
    name = params["name"]
    if view is None:
        out["fail"] = "no cluster here: create or join one first (mars_cluster)"
        return out
    res = this_member(view, name)[0]
    if res is None:
        out["fail"] = f"resource {name} does not exist here"
        return out
    old = res.get("size")
    out.update(old_size=old, new_size=old)
    if res.get("primary") != view.get("host"):
        out["fail"] = f"resize {name} on its primary ({res.get('primary')}), not here"
        return out
    if not params.get("size"):
        out.update(changed=None, args=["resize", name], new_size=None)
        return out
    try:
        new = parse_size(params["size"])
    except ValueError as exc:
        out["fail"] = str(exc)
        return out
    new -= new % 4096
    if new < old:
        out["fail"] = (f"{name} has {old} bytes: shrinking to {new} is refused (it would "
                       "destroy data)")
    elif new > old:
        out.update(changed=True, args=["resize", name, str(new)], new_size=new)
    return out


def main():
    module = AnsibleModule(argument_spec=argument_spec(), **MODULE_KWARGS)
    p = module.params
    marsadm = Marsadm(module)
    todo = plan(marsadm.view(), p)
    if todo["fail"]:
        module.fail_json(msg=todo["fail"], old_size=todo["old_size"])
    result = dict(changed=bool(todo["changed"]), old_size=todo["old_size"],
                  new_size=todo["new_size"])
    if todo["args"]:
        reply = marsadm.run_or_fail(todo["args"], wait=True, dry_run=module.check_mode)
        result["changed"] = bool(reply.get("changed"))
        if not module.check_mode:
            result["new_size"] = reply.get("size")
        elif not result["changed"]:
            result["new_size"] = todo["old_size"]
    if module._diff:
        result["diff"] = dict(before=dict(size=result["old_size"]),
                              after=dict(size=result["new_size"]))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
