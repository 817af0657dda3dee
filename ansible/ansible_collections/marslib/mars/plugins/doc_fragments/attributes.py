# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# The attributes every marslib module has. Each module states its own support for
# check_mode and diff_mode (and details where it is not plain full support).

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check mode and return the changed status it predicts without
      modifying the managed host.
  diff_mode:
    description: Returns what changed (or would change, in check mode) as before and after
      in diff mode.
  platform:
    description: Target OS families the module can act on.
    support: full
    platforms: linux
    details:
      - Runs on the managed host, where marslib runs (Linux only - block devices and NBD).
  action_group:
    description: Use C(group/marslib.mars.mars) in C(module_defaults) to set the common
      options (O(marsadm), O(root), O(run_dir), O(host)) for every module of the
      collection at once.
    support: full
    membership:
      - marslib.mars.mars
"""
