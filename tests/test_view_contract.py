"""The contract of ``marsadm view --json`` that the Ansible modules and playbooks read.

The modules never import marslib (they run on managed hosts with any Python): they read
the JSON below. A field renamed, dropped or retyped here breaks them, so this test pins
each field the modules, module_utils, playbooks and task files use, with its type, on a
real primary and secondary, and pins the shared vocabulary (states, ``(none)``).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BIN,
    COLLECTION,
    HostPair,
    MarsHost,
    nbd_client,
    needs_libnbd,
    wait_in_sync,
    wait_until,
)

from marslib import schema
from marslib.admin.view import MEMBER_STATES, VIEW_SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[1]
SIZE = 64 << 20
OPT_STR = (str, type(None))
OPT_INT = (int, type(None))

TOP = {"schema_version": int, "cluster": str, "host": str, "marsd": bool, "ip": OPT_STR,
       "version": str, "marsd_version": OPT_STR, "peers": (dict, type(None)),
       "space_free": OPT_INT, "space_level": OPT_STR, "resources": dict}
RESOURCE = {"resource": str, "size": int, "primary": OPT_STR, "history_gap": OPT_STR,
            "split_brain": list, "members": dict, "logfiles": list, "log_bytes": int}
MEMBER = {"device": OPT_STR, "role": str, "attach": bool, "is_primary": bool,
          "emergency": bool, "open_count": int, "replay": OPT_STR, "syncing": bool,
          "sync_progress": (float, int, type(None)), "syncpos": OPT_STR, "fetch": bool,
          "replaying": bool, "error": OPT_STR, "lag_bytes": OPT_INT, "version": OPT_STR,
          "last_sync": (dict, type(None)), "state": str, "split_brain": bool,
          "device_node": OPT_STR}
LIVE_MEMBER = {"running": bool}  # this host's own entry
LIVE_SECONDARY = {"lag_seconds": (float, int)}  # this host's entry while it is a secondary
LAST_SYNC = {"compared": int, "copied": int, "seconds": (float, int)}


def marsadm_text(host: MarsHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "marsadm"), *args], capture_output=True, text=True,
                          env=host.env, timeout=60)


def check(obj: dict[str, Any], contract: dict[str, Any], where: str) -> None:
    for key, types in contract.items():
        assert key in obj, f"view --json lost {where}.{key}"
        assert isinstance(obj[key], types), \
            f"{where}.{key} is {type(obj[key]).__name__}, the contract says {types}"


def check_view(view: dict[str, Any]) -> None:
    check(view, TOP, "view")
    assert view["schema_version"] == VIEW_SCHEMA_VERSION
    for name, res in view["resources"].items():
        check(res, RESOURCE, f"resources.{name}")
        for host, m in res["members"].items():
            check(m, MEMBER, f"resources.{name}.members.{host}")
            assert m["state"] in MEMBER_STATES
            if host == view["host"]:
                check(m, LIVE_MEMBER, f"resources.{name}.members.{host}")
                if view["marsd"] and m["role"] == "secondary" and m["running"]:
                    check(m, LIVE_SECONDARY, f"resources.{name}.members.{host}")
            assert m["role"] in ("primary", "secondary")
            if m["last_sync"] is not None:
                check(m["last_sync"], LAST_SYNC, f"...{host}.last_sync")


def load_module_utils() -> Any:
    path = COLLECTION / "plugins" / "module_utils" / "mars_common.py"
    spec = importlib.util.spec_from_file_location("mars_common_contract", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_ansible_side_speaks_the_same_words() -> None:
    mod = load_module_utils()
    assert mod.NO_PRIMARY == schema.NO_PRIMARY
    for state in (*mod.UNHEALTHY_STATES, *mod.FOLLOWING_STATES):
        assert state in MEMBER_STATES, f"module_utils names a state view never shows: {state}"


def test_every_member_field_the_playbooks_read_is_pinned() -> None:
    """Fields read from a member entry in the collection's playbooks and role tasks and in
    the Molecule scenarios (``failover_me.state``, ``members[...].last_sync``) are part of
    the contract."""
    used: set[str] = set()
    for path in [*(COLLECTION / "playbooks").glob("*.yml"),
                 *(COLLECTION / "roles").glob("*/tasks/*.yml"),
                 *(REPO / "molecule").glob("*/*.yml")]:
        text = path.read_text()
        used |= set(re.findall(r"members\[[^\]]+\]\.([a-z_]+)", text))
        used |= set(re.findall(r"\b(?:\w+_)?me\.([a-z_]+)", text))
    assert used, "the pattern found no member field at all: it is broken"
    missing = used - set(MEMBER) - set(LIVE_MEMBER) - set(LIVE_SECONDARY)
    assert not missing, f"playbooks read member fields the contract does not pin: {missing}"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[HostPair]:
    p = HostPair(tmp_path)
    p.a.serve(p.dev_a.path)
    p.b.join_cluster_of(p.a)
    yield p
    p.close()


def positions(text: str) -> dict[str, tuple[int, int]]:
    """POSITION column of ``view`` for people: host -> (logfile, offset)."""
    lines = text.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("RESOURCE"))
    col = lines[head].index("POSITION")
    out = {}
    for row in lines[head + 1:]:
        if not row.startswith("r0 "):
            continue
        cell = row[col:].split()[0].lstrip("~")
        number, offset = cell.split(":")
        out[row.split()[1]] = (int(number), int(offset))
    return out


@needs_libnbd
def test_view_json_on_a_primary_and_a_secondary(pair: HostPair) -> None:
    pair.b.marsadm("join-resource", "r0", pair.dev_b.path, "--wait")
    wait_in_sync(pair.a, pair.b)
    wait_until(lambda: pair.b.marsadm("view")["resources"]["r0"]["members"]["beta"]["state"]
               == "UpToDate", "beta up to date")
    for host in (pair.a, pair.b):
        check_view(host.marsadm("view"))
    beta = pair.b.marsadm("view")["resources"]["r0"]["members"]["beta"]
    assert beta["lag_bytes"] == 0
    check(beta["last_sync"], LAST_SYNC, "beta.last_sync")
    # hand over and back: on every host the primary's position is never behind a
    # secondary's (the primary shows its log end, a secondary what it replayed)
    for new, old in ((pair.b, pair.a), (pair.a, pair.b)):
        nbd_client(old.nbd_uri("r0"), "writer", "7", "8", "64", "65536", "0.5")
        new.marsadm("primary", "r0")
        nbd_client(new.nbd_uri("r0"), "writer", "8", "8", "64", "65536", "0.5")
        wait_until(lambda o=old: o.marsadm("view")["resources"]["r0"]["members"][o.name]
                   ["state"] == "UpToDate", f"{old.name} up to date again")
        for host in (pair.a, pair.b):
            check_view(host.marsadm("view"))
            pos = positions(marsadm_text(host, "view").stdout)
            assert pos[new.name] >= pos[old.name], (host.name, pos)


# ------------------------------------------------------------- for people
def view_result(me: dict[str, Any], marsd: bool = True) -> dict[str, Any]:
    member = {"device": "/dev/loop9", "role": "secondary", "state": "UpToDate",
              "open_count": 0, "replay": "log-000000002-alpha,4096,3", "split_brain": False,
              "sync_progress": None, "lag_bytes": 0, **me}
    return {"cluster": "c", "host": "beta", "marsd": marsd, "root": "/srv/mars-test",
            "space_free": 5 << 30, "space_level": "ok",
            "resources": {"r0": {"resource": "r0", "size": 1 << 26, "primary": "alpha",
                                 "split_brain": [], "members": {"beta": member}}}}


def test_view_for_people_names_the_root_and_says_none_for_no_lag() -> None:
    from marslib.cli import render_view
    lines = render_view(view_result({}))
    assert lines[0].endswith("/srv/mars-test: 5.0GB free (ok)"), lines[0]
    assert "/mars free" not in lines[0]
    row = lines[2].split()
    assert row[5:7] == ["2:4096", "none"], lines
    assert render_view(view_result({"lag_bytes": None}))[2].split()[6] == "?"
    assert render_view(view_result({"lag_bytes": 3 << 20, "lag_seconds": 4.2}))[2] \
        .split()[6] == "3.0MB/4s"
    assert "free" not in render_view(view_result({}, marsd=False))[0]
