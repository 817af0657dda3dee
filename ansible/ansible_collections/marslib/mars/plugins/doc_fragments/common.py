# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# The options every marslib module takes (module_utils/mars_common.py COMMON_ARGS): where
# marsadm is and which host and state root it acts on. A module whose timeout means
# something more specific states its own description of it.

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  marsadm:
    description:
      - Path of marsadm on the managed host. Default C(/opt/marslib/current/bin/marsadm) if
        it exists, else C(marsadm) on the E(PATH).
    type: path
  root:
    description:
      - The host's state root (C(--root)). Default E(MARS_ROOT), else C(/mars).
    type: path
  run_dir:
    description:
      - Where C(marsd.sock) and the NBD sockets live (C(--run-dir)). Default
        E(MARS_RUN_DIR), else C(/run/mars).
    type: path
  host:
    description:
      - This host's name in the cluster (C(--host)). Default E(MARS_HOST), else the
        hostname.
    type: str
  timeout:
    description:
      - Seconds marsadm may wait for C(marsd) (C(--timeout)).
    type: float
    default: 600.0
"""
