#!/usr/bin/python
# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# marslib Ansible module: the cluster and its resources, as this host sees them (read-only).

# ruff: noqa: E402  (Ansible modules import after their documentation)

from __future__ import annotations

DOCUMENTATION = r"""
module: mars_info
short_description: Information about marslib on this host
description:
  - Reads C(marsadm view --json) and returns it as RV(mars) - the cluster, this host,
    whether C(marsd) runs, the versions, and each resource with its members' roles, states,
    lag and sync progress.
  - Read-only; never changes anything, also runs in check mode.
  - Without a cluster on this host RV(mars.cluster) is null and RV(mars.resources) empty.
version_added: "0.2.0"
author:
  - marslib maintainers (@marslib)
options:
  name:
    description:
      - Only this resource. A resource not known here gives no entry in
        RV(mars.resources).
    type: str
    aliases: [resource]
  timeout:
    description:
      - Not used by this module (C(marsadm view) does not wait); accepted like in the other
        modules.
extends_documentation_fragment:
  - marslib.mars.common
  - marslib.mars.attributes
attributes:
  check_mode:
    support: full
    details:
      - Read-only; check mode runs it the same way.
  diff_mode:
    support: N/A
    details:
      - Read-only; there is no diff.
notes:
  - States and lag of other hosts are as this host last heard of them; a replica's own
    view (run the module there) is exact.
  - Before marslib 0.5.0 the module returned the view as the fact C(ansible_facts.mars);
    it now returns it as RV(mars) of the registered result, which sets no host fact.
requirements:
  - marsadm on the managed host
seealso:
  - module: marslib.mars.mars_wait
    description: Wait until a resource reaches a state here, with progress.
  - module: marslib.mars.mars_resource
  - module: marslib.mars.mars_role
"""

EXAMPLES = r"""
- name: Read the cluster as this host sees it
  marslib.mars.mars_info:
  register: info

- name: Fail unless r0 is up to date here
  ansible.builtin.assert:
    that:
      - info.mars.resources.r0.members[info.mars.host].state in ['Primary', 'UpToDate']

- name: Only r0
  marslib.mars.mars_info:
    name: r0
  register: r0_info

- name: Show r0's primary
  ansible.builtin.debug:
    msg: "r0 runs on {{ r0_info.mars.resources.r0.primary }}"
"""

RETURN = r"""
mars:
  description: The cluster as this host sees it.
  returned: always
  type: dict
  contains:
    cluster:
      description: The cluster id, null without a cluster.
      type: str
      returned: always
    host:
      description: This host's name (null without a cluster unless known from O(host)).
      type: str
      returned: always
    marsd:
      description: Whether C(marsd) answers on this host.
      type: bool
      returned: always
    version:
      description: marsadm's version.
      type: str
      returned: always
    marsd_version:
      description: The running C(marsd)'s version (null if not running or too old to
        tell).
      type: str
      returned: always
    space_free:
      description: Free bytes in the state root (null without C(marsd)).
      type: int
      returned: always
    space_level:
      description: The free-space level (C(ok), C(warn), ...; null without C(marsd)).
      type: str
      returned: always
    resources:
      description: Per resource C(primary), C(size), C(split_brain) (bool),
        C(history_gap) and C(members), per host C(role), C(state), C(lag_bytes),
        C(lag_seconds), C(sync_progress), C(emergency), C(split_brain), C(version),
        C(device), C(open_count), C(error), C(last_sync) (what the member's last full
        sync C(compared) and C(copied) in bytes, and its C(seconds); null if none).
      type: dict
      returned: always
      sample:
        r0:
          primary: alpha
          size: 67108864
          split_brain: false
          history_gap: null
          members:
            alpha: {role: primary, state: Primary, lag_bytes: 0, lag_seconds: null,
                    sync_progress: null, emergency: false, split_brain: false,
                    version: 0.2.0, device: /dev/vg0/r0, open_count: 1, error: null,
                    last_sync: null}
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.marslib.mars.plugins.module_utils.mars_common import Marsadm, common_spec

MEMBER_KEYS = ("role", "state", "lag_bytes", "lag_seconds", "sync_progress", "emergency",
               "split_brain", "version", "device", "open_count", "error", "last_sync")


def argument_spec():
    return common_spec(name=dict(type="str", aliases=["resource"]))


MODULE_KWARGS = dict(supports_check_mode=True)


def info(view, name=None, host=None, version=None):
    """The module's ``mars`` result from marsadm's view (None: no cluster here). Keys missing
    in an older marsadm's view come out as null."""
    if view is None:
        return dict(cluster=None, host=host, marsd=False, version=version, marsd_version=None,
                    space_free=None, space_level=None, resources={})
    resources = {}
    for rname, res in sorted((view.get("resources") or {}).items()):
        if name and rname != name:
            continue
        resources[rname] = dict(
            primary=res.get("primary"),
            size=res.get("size"),
            split_brain=bool(res.get("split_brain")),
            history_gap=res.get("history_gap"),
            members={h: {k: m.get(k) for k in MEMBER_KEYS}
                     for h, m in sorted((res.get("members") or {}).items())},
        )
    return dict(cluster=view.get("cluster"), host=view.get("host"),
                marsd=bool(view.get("marsd")), version=view.get("version") or version,
                marsd_version=view.get("marsd_version"), space_free=view.get("space_free"),
                space_level=view.get("space_level"), resources=resources)


def main():
    module = AnsibleModule(argument_spec=argument_spec(), **MODULE_KWARGS)
    p = module.params
    marsadm = Marsadm(module)
    view = marsadm.view()
    version = None
    if view is None or "version" not in view:
        version = marsadm.version()
    mars = info(view, p.get("name"), host=p.get("host") or os.environ.get("MARS_HOST"),
                version=version)
    module.exit_json(changed=False, mars=mars)


if __name__ == "__main__":
    main()
