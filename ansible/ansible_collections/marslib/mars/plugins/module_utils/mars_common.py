# Copyright: (c) 2026, marslib maintainers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

# Shared code of the marslib Ansible modules (mars_cluster, mars_resource, mars_role,
# mars_resize, mars_upgrade, mars_info, mars_wait). Ansible ships it with each module; it
# needs only the Python standard library (3.9 or newer) and runs on the managed host. The
# modules never import marslib: they run `marsadm ... --json` and read its one JSON object.

from __future__ import annotations

import json
import os
import re

DEFAULT_PREFIX = "/opt/marslib"
CURRENT_BIN = DEFAULT_PREFIX + "/current/bin"
NO_CLUSTER = "holds no cluster"  # marsadm's refusal text when the root has no cluster
NO_PRIMARY = "(none)"  # the primary key's value during a handover or after `secondary`

# Options every module takes: merge into the module's argument_spec (common_spec()).
COMMON_ARGS = dict(
    marsadm=dict(type="path"),
    root=dict(type="path"),
    run_dir=dict(type="path"),
    host=dict(type="str"),
    timeout=dict(type="float", default=600.0),
)

# States of a member that mean "not healthy" (an upgrade or handover should wait).
UNHEALTHY_STATES = ("Error", "Emergency", "SplitBrain", "Inconsistent", "Syncing", "Outdated",
                    "Disconnected")
FOLLOWING_STATES = ("UpToDate", "Replaying")  # a secondary that fetches and replays

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*")


def common_spec(**spec):
    """The module's own options plus the common ones (a fresh dict each call)."""
    merged = {k: dict(v) for k, v in COMMON_ARGS.items()}
    merged.update(spec)
    return merged


def parse_size(value):
    """Bytes of a size like marsadm's: ``512``, ``64K``, ``1G``, ``2TiB`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}")
        return value
    m = _SIZE.fullmatch(str(value))
    if not m:
        raise ValueError(f"invalid size {value!r}: use a number with an optional K, M, G or T")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_size(n):
    """``1G``, ``64M``, ``4096``: the largest binary unit that divides ``n``."""
    if n is None:
        return None
    for unit in ("T", "G", "M", "K"):
        step = _UNITS[unit.lower()]
        if n >= step and n % step == 0:
            return f"{n // step}{unit}"
    return str(n)


def this_member(view, name):
    """(resource view or None, this host's member entry or None)."""
    res = ((view or {}).get("resources") or {}).get(name)
    if res is None:
        return None, None
    return res, (res.get("members") or {}).get(view.get("host"))


def same_device(a, b):
    """Whether two device paths name the same device (as given, absolute, or resolved)."""
    if not a or not b:
        return False
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    return os.path.realpath(a) == os.path.realpath(b)


def health_problems(view, max_lag_bytes=None):
    """Why this host is not healthy, one line per problem ([] if it is): marsd not running;
    for each resource this host is a member of, a split brain, a member in an unhealthy
    state, a secondary lagging by more than ``max_lag_bytes`` (unknown lag is not counted)."""
    if view is None:
        return ["no cluster here"]
    problems = []
    if not view.get("marsd"):
        problems.append("marsd is not running")
    host = view.get("host")
    for name, res in sorted((view.get("resources") or {}).items()):
        members = res.get("members") or {}
        if host not in members:
            continue
        if res.get("split_brain"):
            problems.append(f"{name}: split brain (marsadm view-split-brain {name})")
        for h, m in sorted(members.items()):
            state = m.get("state")
            if state in UNHEALTHY_STATES:
                why = f" ({m['error']})" if m.get("error") else ""
                problems.append(f"{name}@{h}: {state}{why}")
            lag = m.get("lag_bytes")
            if (max_lag_bytes is not None and m.get("role") != "primary" and lag is not None
                    and lag > max_lag_bytes):
                problems.append(f"{name}@{h}: lags {lag} bytes behind the primary "
                                f"(more than {max_lag_bytes})")
    return problems


def marsadm_message(reply, rc, stdout, stderr):
    """The operator-facing message of a failed marsadm run: its JSON error, with
    argparse's explanation from stderr for usage errors."""
    err_lines = [ln for ln in (stderr or "").splitlines() if ln.strip()]
    if isinstance(reply, dict) and reply.get("error"):
        msg = str(reply["error"])
        if reply.get("code") == 2 and err_lines:
            msg += ": " + err_lines[-1]
        return msg
    if err_lines:
        return err_lines[-1]
    return f"marsadm exited with code {rc} and printed no JSON: {(stdout or '').strip()[:300]}"


def drop_pythonpath():
    """marsadm (and pip, python) run from their own venv: an inherited PYTHONPATH would mix
    versions. run_command's environ_update cannot unset, so drop it from this process."""
    os.environ.pop("PYTHONPATH", None)


class MarsadmResult:
    """One marsadm run: argv, rc, stdout, stderr and the parsed JSON object."""

    def __init__(self, cmd, rc, stdout, stderr, reply):
        self.cmd = cmd
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.reply = reply if isinstance(reply, dict) else {}

    @property
    def ok(self):
        return self.rc == 0 and self.reply.get("ok") is True

    @property
    def message(self):
        return marsadm_message(self.reply, self.rc, self.stdout, self.stderr)

    def failure(self):
        """Keyword arguments for fail_json."""
        return dict(msg=self.message, cmd=self.cmd, rc=self.rc, stdout=self.stdout,
                    stderr=self.stderr)


def find_marsadm(module, explicit=None):
    """The marsadm to run: the option, else /opt/marslib/current/bin/marsadm, else PATH."""
    if explicit:
        return explicit
    current = os.path.join(CURRENT_BIN, "marsadm")
    if os.path.exists(current):
        return current
    return module.get_bin_path("marsadm", required=True, opt_dirs=[CURRENT_BIN])


class Marsadm:
    """Runs marsadm with the module's common options (argv lists, never a shell)."""

    def __init__(self, module, path=None):
        self.module = module
        p = module.params
        self.path = path or find_marsadm(module, p.get("marsadm"))
        self.timeout = p.get("timeout")
        self.common = []
        for opt, flag in (("root", "--root"), ("run_dir", "--run-dir"), ("host", "--host")):
            if p.get(opt):
                self.common += [flag, str(p[opt])]
        drop_pythonpath()

    def argv(self, args, wait=False, dry_run=False):
        cmd = [self.path, *[str(a) for a in args], "--json", *self.common]
        if wait and self.timeout is not None:
            cmd += ["--timeout", f"{self.timeout:g}"]
        if dry_run:
            cmd.append("--dry-run")
        return cmd

    def run(self, args, wait=False, dry_run=False, data=None):
        """Run ``marsadm ARGS --json``; ``data`` goes to stdin (secrets, never argv)."""
        cmd = self.argv(args, wait=wait, dry_run=dry_run)
        rc, out, err = self.module.run_command(cmd, data=data, expand_user_and_vars=False)
        try:
            reply = json.loads(out) if out and out.strip() else None
        except ValueError:
            reply = None
        return MarsadmResult(cmd, rc, out, err, reply)

    def run_or_fail(self, args, **kw):
        res = self.run(args, **kw)
        if not res.ok:
            self.module.fail_json(**res.failure())
        return res.reply

    def view(self, resource=None):
        """``marsadm view --json`` as a dict, or None when the root holds no cluster."""
        res = self.run(["view"] + ([resource] if resource else []))
        if res.ok:
            return res.reply
        if res.rc == 1 and NO_CLUSTER in res.message:
            return None
        self.module.fail_json(**res.failure())
        return None  # not reached

    def version(self):
        """``marsadm --version``'s version string, or None if it does not run."""
        if not os.path.exists(self.path):
            return None
        rc, out = self.module.run_command([self.path, "--version"])[:2]
        if rc != 0 or not out.strip():
            return None
        return out.strip().split()[-1]
