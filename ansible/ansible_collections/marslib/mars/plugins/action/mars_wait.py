# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# marslib Ansible action plugin: runs the mars_wait module until it is done, on the
# controller, and prints each run's progress line. A long wait is a loop here, not a
# recursion of included task files: its memory stays the same for hours.
from __future__ import annotations

import time

from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()


class ActionModule(ActionBase):
    """``mars_wait``: repeat the module (each run waits one ``slice``) until the condition
    holds, the module fails, or the deadline passes."""

    TRANSFERS_FILES = False
    _supports_check_mode = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        # the deadline is the controller's: each run gets the seconds that are left, so
        # that the managed host's clock does not matter
        if args.get("deadline") is not None:
            deadline = float(args.pop("deadline"))
        else:
            deadline = time.time() + float(args.get("wait_timeout", 3600.0))
        host = task_vars.get("inventory_hostname", "?") if task_vars else "?"
        polls = runs = 0
        while True:
            args["wait_timeout"] = max(0.0, deadline - time.time())
            res = self._execute_module(module_name=self._task.action, module_args=args,
                                       task_vars=task_vars)
            runs += 1
            polls += int(res.get("polls") or 0)
            if res.get("msg") and not res.get("done") and not res.get("failed"):
                display.display(f"[{host}] {res['msg']}")
            if res.get("done") or res.get("failed") or "polls" not in res:
                break  # done, failed, or not our module's answer (a parse error)
        result.update(res)
        result.update(polls=polls, runs=runs, changed=False)
        return result
