#!/usr/bin/python
# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# marslib Ansible module: wait until a resource reaches a condition on this host.

# ruff: noqa: E402  (Ansible modules import after their documentation)

from __future__ import annotations

DOCUMENTATION = r"""
module: mars_wait
short_description: Wait until a marslib resource is up to date (or synced, consistent, primary) here
description:
  - Polls C(marsadm view NAME --json) on this host until its member of the resource
    reaches O(condition), for at most O(slice) seconds per run, and returns the progress
    (state, percent synced, lag, ETA) and whether the condition holds.
  - Its action plugin (same name) runs the module again and again on the controller,
    printing one progress line per run, until the condition holds or O(deadline) passes;
    a wait of hours takes no recursion and no growing memory, and shows where it is.
  - Fails at once on a split brain (waiting does not heal it), and when O(deadline)
    passes, with the last progress in the message.
  - Read-only; runs in check mode too.
version_added: "0.5.0"
author:
  - marslib maintainers (@marslib)
options:
  name:
    description: The resource.
    type: str
    required: true
    aliases: [resource]
  condition:
    description:
      - C(up-to-date) this host is the primary, or a secondary that has applied all the
        primary had when it last answered; C(sync-off) no full sync runs here;
        C(consistent) a secondary whose data is a consistent prefix (or the primary);
        C(primary), C(secondary) the resource runs here in that role.
    type: str
    choices: [up-to-date, sync-off, consistent, primary, secondary]
    default: up-to-date
  deadline:
    description:
      - Unix time (seconds) after which the wait fails. Default now + O(wait_timeout).
    type: float
  wait_timeout:
    description: Seconds to wait in all when O(deadline) is not given.
    type: float
    default: 3600.0
  poll:
    description: Seconds between two looks.
    type: float
    default: 5.0
  slice:
    description:
      - Seconds one module run waits at most before it returns its progress (the action
        plugin then shows it and runs the module again).
    type: float
    default: 60.0
  timeout:
    description:
      - Not used by this module (C(marsadm view) does not wait; the wait is O(wait_timeout)
        or O(deadline)); accepted like in the other modules.
extends_documentation_fragment:
  - marslib.mars.common
  - marslib.mars.attributes
attributes:
  check_mode:
    support: full
    details:
      - Read-only; check mode waits the same way.
  diff_mode:
    support: N/A
    details:
      - Read-only; there is no diff.
requirements:
  - marsadm on the managed host
seealso:
  - module: marslib.mars.mars_info
  - module: marslib.mars.mars_resource
    description: Joining with O(marslib.mars.mars_resource#module:wait=true) waits for the
      full sync in one marsadm call, without progress lines.
"""

EXAMPLES = r"""
- name: Wait up to 10 hours until r0 is up to date here, one progress line a minute
  marslib.mars.mars_wait:
    name: r0
    wait_timeout: 36000
    poll: 10
"""

RETURN = r"""
done:
  description: Whether the condition holds.
  type: bool
  returned: always
state:
  description: This host's member state (C(Syncing), C(Replaying), C(UpToDate), ...), or
    null while it is not a member yet.
  type: str
  returned: always
sync_progress:
  description: Fraction synced (0..1) while a full sync runs, else null.
  type: float
  returned: always
lag_bytes:
  description: Log bytes not applied yet (null when unknown).
  type: int
  returned: always
eta_seconds:
  description: Estimated seconds to go (sync or replay), null when unknown.
  type: float
  returned: always
polls:
  description: Looks taken by this run (the action plugin returns the sum of all runs).
  type: int
  returned: always
msg:
  description: The progress line.
  type: str
  returned: always
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.marslib.mars.plugins.module_utils.mars_common import (
    Marsadm,
    common_spec,
    this_member,
)

CONDITIONS = ("up-to-date", "sync-off", "consistent", "primary", "secondary")
CONSISTENT_STATES = ("UpToDate", "Replaying", "ReplayPaused", "FetchPaused", "Disconnected")


def argument_spec():
    return common_spec(
        name=dict(type="str", required=True, aliases=["resource"]),
        condition=dict(type="str", choices=list(CONDITIONS), default="up-to-date"),
        deadline=dict(type="float"),
        wait_timeout=dict(type="float", default=3600.0),
        poll=dict(type="float", default=5.0),
        slice=dict(type="float", default=60.0),
    )


MODULE_KWARGS = dict(supports_check_mode=True)


def reached(condition, me):
    """Whether this host's member entry of ``view --json`` meets ``condition``."""
    if not me:
        return False
    state, role = me.get("state"), me.get("role")
    if condition == "primary":
        return role == "primary" and state == "Primary"
    if condition == "secondary":
        return role == "secondary" and bool(me.get("running"))
    if role == "primary":
        return state == "Primary"
    if condition == "sync-off":
        return not me.get("syncing") and state != "Syncing"
    if condition == "consistent":
        return state in CONSISTENT_STATES
    return state == "UpToDate"


def eta(me):
    """Seconds still to go, from the sync's own estimate or lag over replay rate."""
    if not me:
        return None
    if me.get("sync_eta") is not None:
        return float(me["sync_eta"])
    lag, rate = me.get("lag_bytes"), me.get("replay_rate")
    if lag and rate:
        return round(lag / rate, 1)
    return None


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def progress(name, host, me, seconds_left):
    """One line for people: state, percent synced, lag, ETA, time left."""
    if not me:
        return f"{name}@{host}: not a member yet ({seconds_left:.0f} s left)"
    parts = [f"{name}@{host}: {me.get('state')}"]
    if me.get("sync_progress") is not None:
        parts.append(f"synced {me['sync_progress'] * 100:.1f}%")
    lag = me.get("lag_bytes")
    if lag is not None and me.get("role") != "primary":
        parts.append("lag none" if lag == 0 else f"lag {human(lag)}")
    if me.get("lag_seconds"):
        parts.append(f"{me['lag_seconds']:.0f} s behind")
    left = eta(me)
    if left is not None:
        parts.append(f"ETA {left:.0f} s")
    parts.append(f"{seconds_left:.0f} s left")
    return ", ".join(parts)


def wait(look, condition, name, deadline, poll, slice_, clock=time.time, sleep=time.sleep):
    """Look (``look() -> (host, member entry or None)``) until ``condition`` holds, the
    slice ends or ``deadline`` passes. The module's result, without ``changed``."""
    end = min(deadline, clock() + slice_)
    polls = 0
    while True:
        host, me = look()
        polls += 1
        now = clock()
        line = progress(name, host, me, max(0.0, deadline - now))
        out = dict(done=reached(condition, me), condition=condition, polls=polls, msg=line,
                   state=(me or {}).get("state"), sync_progress=(me or {}).get("sync_progress"),
                   lag_bytes=(me or {}).get("lag_bytes"), eta_seconds=eta(me))
        if out["done"]:
            return out
        if me and me.get("split_brain"):
            return dict(out, failed=True, msg=f"{line}: split brain; waiting does not heal "
                        f"it (marsadm view-split-brain {name})")
        if now >= deadline:
            return dict(out, failed=True, msg=f"{line}: not {condition} by the deadline")
        if now + poll > end:
            if end < deadline:
                return out  # the slice is over: show the progress, come again
            sleep(max(0.0, deadline - now))  # last look at the deadline itself
            continue
        sleep(poll)


def main():
    module = AnsibleModule(argument_spec=argument_spec(), **MODULE_KWARGS)
    p = module.params
    deadline = p["deadline"] if p["deadline"] is not None else time.time() + p["wait_timeout"]
    marsadm = Marsadm(module)

    def look():
        view = marsadm.view(p["name"])
        me = this_member(view, p["name"])[1]
        return (view or {}).get("host") or p.get("host") or "?", me

    result = wait(look, p["condition"], p["name"], deadline, max(0.0, p["poll"]),
                  max(0.0, p["slice"]))
    result["deadline"] = deadline
    if result.pop("failed", False):
        module.fail_json(changed=False, **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
