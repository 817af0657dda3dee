#!/usr/bin/python
# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# marslib Ansible module: create, join or leave a marslib cluster.

# ruff: noqa: E402  (Ansible modules import after their documentation)

from __future__ import annotations

DOCUMENTATION = r"""
module: mars_cluster
short_description: Create, join or leave a marslib cluster
description:
  - Makes this host the first member of a new marslib cluster (C(marsadm create-cluster)),
    joins it to an existing cluster through a member (C(marsadm join-cluster)), or makes it
    leave the cluster (C(marsadm leave-cluster)).
  - A host already in a cluster is left as it is (C(changed=false)); with O(uuid) the module
    fails if that is another cluster.
  - The cluster secret is kept in C(ROOT/secret) (mode 0600) on every member. It is never
    returned; a playbook that creates the cluster may read it with C(ansible.builtin.slurp)
    (with C(no_log)) and pass it to the other hosts as O(secret) together with O(uuid) and
    O(peer_name), so that they join without ssh.
  - The module does not start or stop C(marsd); start it after creating or joining.
version_added: "0.2.0"
author:
  - marslib maintainers (@marslib)
options:
  state:
    description:
      - V(present) creates the cluster (without O(peer)) or joins it through O(peer).
      - V(absent) removes this host's address from the cluster. marsadm refuses while this
        host is still a member of a resource. Afterwards stop C(marsd) and remove the state
        root.
    type: str
    choices: [present, absent]
    default: present
  ip:
    description:
      - The address the other hosts reach this host at (C(--ip)).
      - Required with O(state=present).
    type: str
  peer:
    description:
      - Address of a host that is already a member. Without it, O(state=present) creates a
        new cluster.
    type: str
  peer_name:
    description:
      - The marslib host name of O(peer). With O(uuid) and O(secret) this host joins
        without ssh to the peer.
    type: str
  uuid:
    description:
      - The cluster id. When creating, use this id instead of a random one; when joining
        without ssh, the id of the cluster to join; when already a member, the module fails
        if the host belongs to another cluster.
    type: str
  secret:
    description:
      - The cluster secret (at least 16 characters, no whitespace). When creating, use it
        instead of a random one; when joining without ssh (with O(uuid) and O(peer_name)), the
        cluster's secret. Passed to marsadm on standard input, never on its command line.
    type: str
  ssh_user:
    description:
      - User for the ssh connection to O(peer) (joining over ssh). marsadm's default is
        C(root).
    type: str
  ssh_key:
    description:
      - Private key file for ssh to O(peer). Without it the ssh agent and C(~/.ssh) keys are
        used.
    type: path
  ssh_port:
    description:
      - ssh port of O(peer). marsadm's default is 22.
    type: int
  remote_root:
    description:
      - The state root on O(peer). marsadm's default is C(/mars).
    type: path
  accept_new_host_key:
    description:
      - Trust an unknown ssh host key of O(peer) (first contact, labs).
    type: bool
    default: false
  timeout:
    description:
      - Seconds marsadm may wait (C(--timeout)); here the ssh connection timeout.
extends_documentation_fragment:
  - marslib.mars.common
  - marslib.mars.attributes
attributes:
  check_mode:
    support: full
    details:
      - Runs marsadm with C(--dry-run), which checks the preconditions and changes nothing.
  diff_mode:
    support: full
    details:
      - The cluster id and whether this host is a member, before and after. In check mode
        a cluster to be created without O(uuid) shows as C((a new cluster)).
notes:
  - Changing the address of a member is not supported.
requirements:
  - marsadm on the managed host
seealso:
  - module: marslib.mars.mars_resource
    description: Create or join a resource once the host is in the cluster.
  - module: marslib.mars.mars_info
"""

EXAMPLES = r"""
- name: Create the cluster on the first host
  marslib.mars.mars_cluster:
    ip: 192.0.2.10
  register: cluster

- name: Read the cluster secret
  ansible.builtin.slurp:
    src: /mars/secret
  register: mars_secret
  no_log: true

- name: Join the other hosts without ssh between them
  marslib.mars.mars_cluster:
    ip: 192.0.2.11
    peer: 192.0.2.10
    peer_name: alpha
    uuid: "{{ cluster.uuid }}"
    secret: "{{ mars_secret.content | b64decode | trim }}"
  no_log: true

- name: Join over ssh instead
  marslib.mars.mars_cluster:
    ip: 192.0.2.12
    peer: 192.0.2.10
    ssh_key: /root/.ssh/id_ed25519
    accept_new_host_key: true

- name: Leave the cluster (after leaving every resource)
  marslib.mars.mars_cluster:
    state: absent
"""

RETURN = r"""
uuid:
  description: The cluster's id (for O(state=absent), of the cluster left).
  returned: when this host is or was in a cluster
  type: str
  sample: 21ee4249-dfba-446d-8af8-5d6e905c7c87
host:
  description: This host's name in the cluster.
  returned: always
  type: str
  sample: alpha
member:
  description: Whether this host is a member of the cluster after the task.
  returned: always
  type: bool
secret_file:
  description: Where the cluster secret is kept on this host.
  returned: when this host is a member
  type: str
  sample: /mars/secret
action:
  description: The marsadm verb run (or that would run in check mode), or null.
  returned: always
  type: str
  sample: create-cluster
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.marslib.mars.plugins.module_utils.mars_common import Marsadm, common_spec

TOMBSTONE = "(deleted)"


def argument_spec():
    return common_spec(
        state=dict(type="str", default="present", choices=["present", "absent"]),
        ip=dict(type="str"),
        peer=dict(type="str"),
        peer_name=dict(type="str"),
        uuid=dict(type="str"),
        secret=dict(type="str", no_log=True),
        ssh_user=dict(type="str"),
        ssh_key=dict(type="path"),
        ssh_port=dict(type="int"),
        remote_root=dict(type="path"),
        accept_new_host_key=dict(type="bool", default=False),
    )


MODULE_KWARGS = dict(
    required_if=[("state", "present", ["ip"])],
    required_by={"peer_name": ["peer"]},
    supports_check_mode=True,
)


def state_root(params):
    return params.get("root") or os.environ.get("MARS_ROOT") or "/mars"


def host_address(view, root):
    """This host's address in the cluster, None if it left (or never had one)."""
    if "ip" in view:  # a marsadm that reports it
        return view["ip"]
    try:
        target = os.readlink(os.path.join(root, "ips", "ip-" + str(view.get("host"))))
    except OSError:
        return None
    return None if target == TOMBSTONE else target


def plan(view, params, address=None):
    """What to do: a dict with ``changed``, ``action`` (the verb or None), ``args`` (marsadm
    arguments), ``data`` (stdin), ``fail`` (a message, or None). ``view`` is marsadm's view
    (None: no cluster here); ``address`` this host's address (None: it left the cluster)."""
    out = dict(changed=False, action=None, args=[], data=None, fail=None)
    p = params
    if p["state"] == "absent":
        if view is not None and address is not None:
            out.update(changed=True, action="leave-cluster", args=["leave-cluster"])
        return out
    if view is not None:
        if address is None:
            out["fail"] = (f"this host left cluster {view.get('cluster')}: stop marsd and remove "
                           "its state root before creating or joining a cluster again")
        elif p.get("uuid") and p["uuid"].lower() != str(view.get("cluster")).lower():
            out["fail"] = (f"this host belongs to cluster {view.get('cluster')}, not "
                           f"{p['uuid']}: leave it first (state=absent)")
        return out
    if not p.get("peer"):
        args = ["create-cluster", "--ip", p["ip"]]
        if p.get("uuid"):
            args += ["--uuid", p["uuid"]]
        if p.get("secret"):
            args += ["--secret-file", "-"]
            out["data"] = p["secret"]
        out.update(changed=True, action="create-cluster", args=args)
        return out
    args = ["join-cluster", p["peer"], "--ip", p["ip"]]
    known = [bool(p.get(k)) for k in ("uuid", "secret", "peer_name")]
    if any(known):
        if not all(known):
            out["fail"] = ("joining without ssh needs uuid, secret and peer_name together "
                           "(or give none of them to join over ssh)")
            return out
        args += ["--uuid", p["uuid"], "--secret-file", "-", "--peer-name", p["peer_name"]]
        out["data"] = p["secret"]
    else:
        for opt, flag in (("ssh_user", "--ssh-user"), ("ssh_key", "--ssh-key"),
                          ("ssh_port", "--ssh-port"), ("remote_root", "--remote-root")):
            if p.get(opt) is not None:
                args += [flag, str(p[opt])]
        if p.get("accept_new_host_key"):
            args.append("--accept-new-host-key")
    out.update(changed=True, action="join-cluster", args=args)
    return out


def main():
    module = AnsibleModule(argument_spec=argument_spec(), **MODULE_KWARGS)
    p = module.params
    marsadm = Marsadm(module)
    view = marsadm.view()
    root = state_root(p)
    address = host_address(view, root) if view is not None else None
    todo = plan(view, p, address)
    if todo["fail"]:
        module.fail_json(msg=todo["fail"], uuid=(view or {}).get("cluster"))
    if p["state"] == "present" and address and p.get("ip") and address != p["ip"]:
        module.warn(f"this host's address in the cluster is {address}, not {p['ip']}: "
                    "changing it is not supported")
    before = dict(cluster=(view or {}).get("cluster"), member=address is not None)
    result = dict(changed=todo["changed"], action=todo["action"],
                  host=(view or {}).get("host") or p.get("host") or os.environ.get("MARS_HOST"),
                  uuid=before["cluster"], member=before["member"])
    if todo["action"]:
        reply = marsadm.run_or_fail(todo["args"], wait=True, dry_run=module.check_mode,
                                    data=todo["data"])
        if todo["action"] == "leave-cluster":
            result["member"] = False
        else:
            result["member"] = True
            if not module.check_mode:
                result.update(uuid=reply.get("uuid"), host=reply.get("host"))
            elif p.get("uuid"):
                result["uuid"] = p["uuid"]
    if result["member"]:
        result["secret_file"] = os.path.join(root, "secret")
    if module._diff:
        after_cluster = result["uuid"]
        if todo["action"] == "create-cluster" and not after_cluster:
            after_cluster = "(a new cluster)"  # check mode: the id is chosen when it runs
        result["diff"] = dict(before=before,
                              after=dict(cluster=after_cluster, member=result["member"]))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
