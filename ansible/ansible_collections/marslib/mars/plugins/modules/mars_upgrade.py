#!/usr/bin/python
# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# marslib Ansible module: the per-host step of a rolling software upgrade.

# ruff: noqa: E402  (Ansible modules import after their documentation)

from __future__ import annotations

DOCUMENTATION = r"""
module: mars_upgrade
short_description: Upgrade marslib on one host (one step of a rolling upgrade)
description:
  - Installs marslib O(version) into its own venv C(PREFIX/venv-VERSION), switches the
    symlink C(PREFIX/current) to it atomically, restarts C(marsd) and waits until it runs
    the new version and every resource of this host is back (C(Primary) where it was the
    primary, C(UpToDate) or C(Replaying) where it was a following secondary).
  - Before touching anything it checks that this host is healthy (C(marsd) running; for
    each resource this host is a member of no split brain, no member in C(Error),
    C(Emergency), C(SplitBrain), C(Inconsistent), C(Syncing), C(Outdated) or
    C(Disconnected), no secondary lagging by more than O(max_lag_bytes)) and fails with the
    reasons otherwise.
  - Unchanged when marsadm in C(PREFIX/current) and the running C(marsd) already have
    O(version) (the health is still reported).
  - The old venv is kept; to roll back point C(PREFIX/current) at it again and restart
    C(marsd) (or run the module with the old version and source).
  - Run it on one host at a time (C(serial=1) in the play), secondaries first, then hand over and
    upgrade the old primary.
version_added: "0.2.0"
author:
  - marslib maintainers (@marslib)
options:
  version:
    description:
      - The version to run, as C(marsadm --version) prints it (V(0.2.0)).
    type: str
    required: true
  source:
    description:
      - What to install, on the managed host - a wheel, an sdist, or a source directory;
        passed to pip.
    type: path
    required: true
  prefix:
    description:
      - Where the venvs live (C(PREFIX/venv-VERSION)) and the C(PREFIX/current) symlink.
    type: path
    default: /opt/marslib
  python:
    description:
      - The interpreter that creates the venv (Python 3.11 or newer for marslib).
    type: path
    default: /usr/bin/python3
  pip_args:
    description:
      - Extra arguments for C(pip install), for example V([--no-deps]) or
        V([--no-index, --find-links, /srv/wheels]).
    type: list
    elements: str
    default: []
  deps_site_packages:
    description:
      - A site-packages directory whose packages the new venv may use; written as one line
        into C(marslib-deps.pth) in the venv's site-packages (offline labs that reuse
        installed dependencies, with O(pip_args=[--no-deps])).
    type: path
  restart_command:
    description:
      - The command (argv list, no shell) that restarts C(marsd) with
        C(PREFIX/current/bin/marsd).
    type: list
    elements: str
    default: [systemctl, restart, marsd]
  check_health:
    description:
      - Refuse to upgrade an unhealthy host.
    type: bool
    default: true
  max_lag_bytes:
    description:
      - The most a secondary may lag behind (bytes) for the host to count as healthy.
    type: int
    default: 67108864
  marsadm:
    description:
      - The marsadm that reads the current state while C(PREFIX/current/bin/marsadm) does not
        exist yet (moving from another install). Default C(marsadm) on the E(PATH).
  timeout:
    description:
      - Seconds to wait after the restart for C(marsd) with the new version and the
        resources to be back.
extends_documentation_fragment:
  - marslib.mars.common
  - marslib.mars.attributes
attributes:
  check_mode:
    support: full
    details:
      - Checks the health and the source and reports the planned steps in RV(actions); it
        changes nothing.
  diff_mode:
    support: full
    details:
      - The marslib version before and after.
notes:
  - Without a cluster on this host only the software is installed and switched (there is
    no C(marsd) to restart).
  - C(PYTHONPATH) is removed from the environment of every command it runs.
requirements:
  - Python with the venv module (C(python3-venv)) on the managed host
seealso:
  - module: marslib.mars.mars_info
  - module: marslib.mars.mars_role
    description: Hand over before upgrading the primary.
"""

EXAMPLES = r"""
- name: Upgrade marslib, one host at a time
  marslib.mars.mars_upgrade:
    version: "0.2.0"
    source: /srv/wheels/marslib-0.2.0-py3-none-any.whl
    pip_args: [--no-index, --find-links, /srv/wheels]
  register: upgrade

- name: Lab without an index - reuse the dependencies of an existing venv
  marslib.mars.mars_upgrade:
    version: "0.2.0"
    source: /srv/src/marslib
    pip_args: [--no-deps]
    deps_site_packages: /opt/marslib/venv-0.1.0/lib/python3.11/site-packages
    restart_command: [/usr/local/bin/restart-marsd]
"""

RETURN = r"""
before:
  description: Versions before the task (null where unknown or not running).
  returned: always
  type: dict
  sample: {marsadm: 0.1.0, marsd: null}
after:
  description: Versions after the task (planned ones in check mode).
  returned: always
  type: dict
  sample: {marsadm: 0.2.0, marsd: 0.2.0}
venv:
  description: The venv of O(version).
  returned: always
  type: str
  sample: /opt/marslib/venv-0.2.0
previous_venv:
  description: Where C(PREFIX/current) pointed before (for a rollback), null if nowhere.
  returned: always
  type: str
  sample: /opt/marslib/venv-0.1.0
actions:
  description: The steps done (or, in check mode, that would be done).
  returned: always
  type: list
  elements: str
health:
  description: The health check before the task - C(checked), C(ok) and C(problems)
    (a list of reasons) - and after it, C(problems_after).
  returned: always
  type: dict
install_seconds:
  description: Time to create the venv and install into it (0 if it was there).
  returned: when changed (not in check mode)
  type: float
restart_seconds:
  description: Time the restart command took.
  returned: when marsd was restarted
  type: float
catchup_seconds:
  description: Time from the restart until marsd ran the new version with every resource
    back.
  returned: when marsd was restarted
  type: float
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.marslib.mars.plugins.module_utils.mars_common import (
    FOLLOWING_STATES,
    Marsadm,
    common_spec,
    drop_pythonpath,
    health_problems,
    this_member,
)

POLL_SECONDS = 0.5


def argument_spec():
    return common_spec(
        version=dict(type="str", required=True),
        source=dict(type="path", required=True),
        prefix=dict(type="path", default="/opt/marslib"),
        python=dict(type="path", default="/usr/bin/python3"),
        pip_args=dict(type="list", elements="str", default=[]),
        deps_site_packages=dict(type="path"),
        restart_command=dict(type="list", elements="str",
                             default=["systemctl", "restart", "marsd"]),
        check_health=dict(type="bool", default=True),
        max_lag_bytes=dict(type="int", default=64 << 20),
    )


MODULE_KWARGS = dict(supports_check_mode=True)


def up_to_date(marsadm_version, view, version):
    """Whether nothing is to do: marsadm has ``version``, and so has the running marsd
    (without a cluster there is no marsd to run)."""
    if marsadm_version != version:
        return False
    if view is None:
        return True
    return view.get("marsd_version") == version


def wanted_states(view):
    """For each resource of this host, the states it must be in again after the restart
    (None: whatever it had was not a running state to return to; no wait for it)."""
    wants = {}
    for name in sorted((view or {}).get("resources") or {}):
        me = this_member(view, name)[1]
        if me is None:
            continue
        state = me.get("state")
        if state == "Primary":
            wants[name] = ["Primary"]
        elif state == "Syncing":
            wants[name] = ["Syncing", *FOLLOWING_STATES]
        elif state in ("UpToDate", "Replaying", "Inconsistent", "Disconnected"):
            wants[name] = list(FOLLOWING_STATES)
        else:
            wants[name] = None
    return wants


def pending(view, version, wants):
    """What the restarted host still lacks ([] when it is back)."""
    if view is None:
        return ["no cluster"]
    if not view.get("marsd"):
        return ["marsd is not answering"]
    out = []
    if view.get("marsd_version") != version:
        out.append(f"marsd runs version {view.get('marsd_version')}, not {version}")
    for name, states in sorted(wants.items()):
        if states is None:
            continue
        me = this_member(view, name)[1]
        state = (me or {}).get("state")
        if state not in states:
            out.append(f"{name} is {state}, waiting for {' or '.join(states)}")
    return out


def plan_actions(p, venv, venv_ready, switch, restart):
    actions = []
    if not venv_ready:
        if not os.path.isdir(venv):
            actions.append(f"create venv {venv} with {p['python']}")
        if p.get("deps_site_packages"):
            actions.append(f"add {p['deps_site_packages']} to the venv (marslib-deps.pth)")
        actions.append(" ".join(["pip install", *p["pip_args"], p["source"]]))
    if switch:
        actions.append(f"switch {os.path.join(p['prefix'], 'current')} to {venv}")
    if restart:
        actions.append("restart marsd: " + " ".join(p["restart_command"]))
        actions.append(f"wait for marsd {p['version']} and the resources to be back")
    return actions


class Upgrade:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.prefix = self.p["prefix"]
        self.current = os.path.join(self.prefix, "current")
        self.venv = os.path.join(self.prefix, "venv-" + self.p["version"])
        drop_pythonpath()

    def run(self, cmd, what, **extra):
        rc, out, err = self.module.run_command(cmd, expand_user_and_vars=False)
        if rc != 0:
            lines = [ln for ln in (err or out or "").splitlines() if ln.strip()]
            self.module.fail_json(msg=f"{what} failed: {lines[-1] if lines else f'rc {rc}'}",
                                  cmd=cmd, rc=rc, stdout=out, stderr=err, **extra)
        return out

    def old_marsadm(self):
        """The marsadm of the current install, or None if there is none."""
        path = os.path.join(self.current, "bin", "marsadm")
        if os.path.exists(path):
            return path
        if self.p.get("marsadm"):
            return self.p["marsadm"]
        return self.module.get_bin_path("marsadm")

    def venv_version(self):
        exe = os.path.join(self.venv, "bin", "marsadm")
        if not os.path.exists(exe):
            return None
        rc, out = self.module.run_command([exe, "--version"])[:2]
        return out.strip().split()[-1] if rc == 0 and out.strip() else None

    def current_target(self):
        if not os.path.islink(self.current):
            return None
        return os.path.realpath(self.current)

    def install(self):
        p = self.p
        if not os.path.isdir(self.venv):
            self.run([p["python"], "-m", "venv", self.venv], "creating the venv", changed=True)
        vpy = os.path.join(self.venv, "bin", "python")
        if p.get("deps_site_packages"):
            purelib = self.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], "finding the venv's site-packages",
                               changed=True).strip()
            with open(os.path.join(purelib, "marslib-deps.pth"), "w") as f:
                f.write(p["deps_site_packages"] + "\n")
        self.run([vpy, "-m", "pip", "install", "--disable-pip-version-check", *p["pip_args"],
                  p["source"]], "pip install", changed=True)
        got = self.venv_version()
        if got != p["version"]:
            self.module.fail_json(msg=f"{self.venv}/bin/marsadm reports version {got} after "
                                  f"installing {p['source']}, not {p['version']}; "
                                  f"{self.current} was not switched", changed=True)

    def switch(self):
        tmp = os.path.join(self.prefix, f".current-{os.getpid()}")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.basename(self.venv), tmp)
        try:
            os.replace(tmp, self.current)
        except OSError as exc:
            os.unlink(tmp)
            self.module.fail_json(msg=f"cannot switch {self.current}: {exc}", changed=True)

    def wait_back(self, new_marsadm, wants):
        deadline = time.monotonic() + self.p["timeout"]
        last, view = ["no answer yet"], None
        while True:
            res = new_marsadm.run(["view"])
            if res.ok:
                view = res.reply
                last = pending(view, self.p["version"], wants)
                if not last:
                    return view
            else:
                last = [res.message]
            if time.monotonic() >= deadline:
                self.module.fail_json(
                    msg=f"after the restart marsd did not come back with version "
                    f"{self.p['version']} within {self.p['timeout']:g}s: {'; '.join(last)} "
                    f"({self.current} points to {self.venv}; to roll back point it at the "
                    "previous venv and restart marsd)",
                    changed=True, pending=last, view=view)
            time.sleep(POLL_SECONDS)


def main():
    module = AnsibleModule(argument_spec=argument_spec(), **MODULE_KWARGS)
    p = module.params
    up = Upgrade(module)
    old_path = up.old_marsadm()
    old_version, view = None, None
    if old_path:
        old = Marsadm(module, path=old_path)
        old_version = old.version()
        view = old.view()
    before = dict(marsadm=old_version, marsd=(view or {}).get("marsd_version"))
    problems = health_problems(view, p["max_lag_bytes"]) if view is not None else []
    health = dict(checked=bool(p["check_health"]) and view is not None,
                  ok=not problems, problems=problems)
    previous = up.current_target()
    result = dict(changed=False, before=before, after=dict(before), venv=up.venv,
                  previous_venv=previous, health=health, actions=[])
    if up_to_date(old_version, view, p["version"]):
        module.exit_json(**result)
    if problems and p["check_health"]:
        module.fail_json(msg="this host is not healthy, upgrade refused: " + "; ".join(problems),
                         **result)
    if not os.path.exists(p["source"]):
        module.fail_json(msg=f"source {p['source']} does not exist on this host", **result)
    venv_ready = up.venv_version() == p["version"]
    switch = previous != os.path.realpath(up.venv)
    restart = view is not None
    result["changed"] = True
    result["actions"] = plan_actions(p, up.venv, venv_ready, switch, restart)
    result["after"] = dict(marsadm=p["version"], marsd=p["version"] if restart else None)
    if module._diff:
        result["diff"] = dict(before=dict(version=old_version),
                              after=dict(version=p["version"]))
    if module.check_mode:
        module.exit_json(**result)
    wants = wanted_states(view)
    t0 = time.monotonic()
    if not venv_ready:
        up.install()
    result["install_seconds"] = round(time.monotonic() - t0, 3)
    if switch:
        up.switch()
    new = Marsadm(module, path=os.path.join(up.current, "bin", "marsadm"))
    if restart:
        t1 = time.monotonic()
        up.run(p["restart_command"], "the restart command", **result)
        t2 = time.monotonic()
        after_view = up.wait_back(new, wants)
        result["restart_seconds"] = round(t2 - t1, 3)
        result["catchup_seconds"] = round(time.monotonic() - t2, 3)
        result["after"] = dict(marsadm=new.version(), marsd=after_view.get("marsd_version"))
        health["problems_after"] = health_problems(after_view, p["max_lag_bytes"])
    else:
        result["after"] = dict(marsadm=new.version(), marsd=None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
