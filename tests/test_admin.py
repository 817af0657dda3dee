"""The admin layer's decisions, called directly: no marsd, no subprocess."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from marslib.admin import cluster, membership, roles
from marslib.admin.context import POLL_MAX, POLL_MIN, Admin, poll_interval
from marslib.admin.resize import device_sizes, plan_resize
from marslib.admin.snapshot import MemberSnapshot, ResourceSnapshot, read_resource
from marslib.admin.switches import condition_reached
from marslib.admin.view import member_info, member_state, split_brain_losers
from marslib.errors import Refused
from marslib.history import Fork
from marslib.layout import MarsPaths
from marslib.meta import MetaStore
from marslib.schema import NO_PRIMARY, ResourceKeys, SyncStatus
from marslib.status import ResourceStatus, tree_lag

DONE = SyncStatus(0, 0, finished=True)


def member(host: str, **kw: Any) -> MemberSnapshot:
    return MemberSnapshot(host=host, device=f"/dev/{host}", attach=True, sync=DONE, **kw)


def snap(primary: str | None = "alpha", **kw: Any) -> ResourceSnapshot:
    members = {"alpha": member("alpha", is_primary=True), "beta": member("beta")}
    members.update(kw.pop("members", {}))
    return ResourceSnapshot("r0", 1 << 26, primary, members=members, **kw)


LIVE = {"role": "secondary", "phase": "replaying", "consistent": True,
                  "replay": "log-000000001-alpha,4096,1", "fetch_logfile": "log-000000001-alpha",
                  "fetch_remote_end": 4096, "fetch_local_end": 4096, "fetch_contact_age": 0.1}


def live(**change: Any) -> ResourceStatus:
    """marsd's status of a secondary, as the control socket's JSON would give it."""
    return ResourceStatus.from_json({**LIVE, **change})


LIVE_SECONDARY = live()


# ------------------------------------------------------------------ roles
def test_a_caught_up_consistent_secondary_may_take_over() -> None:
    assert roles.primary_refusal(snap(), "beta", LIVE_SECONDARY) is None
    assert roles.handover_refusal(snap(), "beta", LIVE_SECONDARY) is None


@pytest.mark.parametrize("change, words", [
    ({"role": "primary"}, "not running here as a secondary"),
    ({"phase": "syncing"}, "still syncing"),
    ({"consistent": False}, "not consistent here yet"),
    ({"replay_error": "bad record"}, "cannot replay here: bad record"),
    ({"fetch_paused": True}, "paused here"),
    ({"fetch_contact_age": 99.0}, "has not answered for 99s"),
])
def test_handover_refused_by_the_live_status(change: dict[str, Any], words: str) -> None:
    why = roles.handover_refusal(snap(), "beta", live(**change))
    assert why is not None and words in why


def test_handover_refused_by_the_old_primary_and_the_history() -> None:
    busy = snap(members={"alpha": member("alpha", is_primary=True, open_count=2)})
    assert "still has 2 NBD client(s)" in str(roles.handover_refusal(busy, "beta",
                                                                      LIVE_SECONDARY))
    emergency = snap(members={"alpha": member("alpha", emergency=True)})
    assert "emergency mode" in str(roles.handover_refusal(emergency, "beta", LIVE_SECONDARY))
    fork = Fork(2, {"alpha": ("alpha", 100, 3), "beta": ("alpha", 50, 2)})
    split = snap(forks=(fork,))
    assert "split brain" in str(roles.handover_refusal(split, "beta", LIVE_SECONDARY))
    # no primary (a handover in progress): the old primary's state does not matter
    assert roles.handover_refusal(snap(primary=NO_PRIMARY, members={
        "alpha": member("alpha", open_count=1)}), "beta", LIVE_SECONDARY) is None


def test_failover_still_needs_a_synced_attached_member() -> None:
    s = snap(members={"beta": replace(member("beta"), sync=SyncStatus(10, 100))})
    assert "not fully synced" in str(roles.primary_refusal(s, "beta", LIVE_SECONDARY))
    assert "not attached" in str(roles.primary_refusal(snap(), "beta", None))
    assert "join-resource first" in str(roles.primary_refusal(snap(), "gamma", LIVE_SECONDARY))
    redo = live(replay_redo="log-000000001-alpha,8192,2")
    assert "redoing the batch" in str(roles.primary_refusal(snap(), "beta", redo))


def test_secondary_and_invalidate_rules() -> None:
    busy = snap(members={"alpha": member("alpha", open_count=1)})
    assert "1 NBD client(s)" in str(roles.secondary_refusal(busy, "alpha"))
    assert roles.secondary_refusal(snap(), "alpha") is None
    assert "only a secondary" in str(roles.invalidate_refusal(snap(), "alpha"))
    assert "not a member" in str(roles.invalidate_refusal(snap(), "gamma"))
    assert roles.invalidate_refusal(snap(), "beta") is None


def test_replayed_all_of_compares_logfile_then_offset() -> None:
    final = "log-000000002-alpha,500,9"
    assert roles.replayed_all_of(final, "log-000000002-alpha,500,9")
    assert roles.replayed_all_of(final, "log-000000003-beta,0,0")
    assert not roles.replayed_all_of(final, "log-000000002-alpha,499,8")
    assert not roles.replayed_all_of(None, "log-000000002-alpha,500,9")


# ------------------------------------------------------------------- view
def test_states_from_the_tree_and_the_live_status() -> None:
    s = snap()
    info = member_info(s, s.members["beta"])
    assert member_state(info) == "Replaying"  # no replay positions: lag unknown
    assert member_state({**info, "lag_bytes": 0}) == "UpToDate"
    assert member_state({**info, "attach": False}) == "Detached"
    assert member_state({**info, "syncing": True}) == "Syncing"
    assert member_state({**info, "consistent": False}) == "Inconsistent"
    assert member_state({**info, "replaying": False}) == "ReplayPaused"
    assert member_state({**info, "fetch_paused": True}) == "FetchPaused"
    assert member_state({**info, "fetch_contact_age": 60.0}) == "Disconnected"
    assert member_state({**info, "error": "log outdated"}) == "Outdated"
    assert member_state({**info, "split_brain": True}) == "SplitBrain"
    primary = member_info(s, s.members["alpha"])
    assert member_state(primary) == "Primary"
    assert member_state({**primary, "running": False}) == "PrimaryDown"


def test_tree_lag_only_within_one_logfile() -> None:
    assert tree_lag("log-000000002-a,900,5", "log-000000002-a,100,2") == 800  # status.tree_lag
    assert tree_lag("log-000000002-a,900,5", "log-000000002-a,950,6") == 0
    assert tree_lag("log-000000003-a,10,5", "log-000000002-a,100,2") is None
    assert tree_lag(None, "log-000000002-a,100,2") is None
    assert tree_lag("garbage", "log-000000002-a,100,2") is None


def test_split_brain_losers_differ_from_the_primary() -> None:
    fork = Fork(2, {"alpha": ("alpha", 100, 3), "beta": ("alpha", 50, 2),
                    "gamma": ("alpha", 100, 3)})
    assert split_brain_losers(snap(forks=(fork,))) == ["beta"]
    assert split_brain_losers(snap(primary="beta", forks=(fork,))) == ["alpha", "gamma"]


def test_wait_conditions() -> None:
    assert condition_reached("primary", ResourceStatus(role="primary"))
    assert condition_reached("up-to-date", ResourceStatus(role="primary"))
    assert condition_reached("up-to-date", LIVE_SECONDARY)
    assert not condition_reached("up-to-date", live(fetch_remote_end=9000))
    assert not condition_reached("consistent", live(consistent=False))
    assert not condition_reached("secondary", None)


# ----------------------------------------------------------------- resize
def test_resize_plans() -> None:
    s = snap(members={"alpha": member("alpha", device_size=1 << 27),
                      "beta": member("beta", device_size=(1 << 27) + 1000)})
    plan = plan_resize(s, "alpha", device_sizes(s), None)
    assert (plan.old, plan.new, plan.changes) == (1 << 26, 1 << 27, True)
    with pytest.raises(Refused, match="shrinking"):
        plan_resize(s, "alpha", device_sizes(s), 1 << 20)
    with pytest.raises(Refused, match="grow the device first on alpha"):
        plan_resize(s, "alpha", device_sizes(s), 1 << 28)
    with pytest.raises(Refused, match="on its primary"):
        plan_resize(s, "beta", device_sizes(s), None)
    with pytest.raises(Refused, match="unknown"):
        device_sizes(snap())


# ------------------------------------------------- steps on a real tree
@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    paths = MarsPaths(tmp_path / "mars", tmp_path / "run")
    return Admin(paths, "alpha", MetaStore(paths.root), timeout=5.0)


def test_create_cluster_and_resource_write_the_schema_keys(admin: Admin,
                                                           tmp_path: Path) -> None:
    cluster.create_cluster(admin, "10.0.0.1", cluster.new_uuid(None), cluster.new_secret())
    dev = tmp_path / "dev"
    dev.write_bytes(b"")
    with open(dev, "r+b") as f:
        f.truncate(1 << 24)
    out = membership.create_resource(admin, "r0", str(dev))
    assert out["changed"] and out["size"] == 1 << 24
    s = read_resource(admin.meta, "r0")
    assert s.primary == "alpha" and s.size == 1 << 24 and list(s.members) == ["alpha"]
    assert s.members["alpha"].attach and s.members["alpha"].device == str(dev)
    assert any("marsd is not running" in line for line in admin.lines)
    with pytest.raises(Refused, match="already exists"):
        membership.create_resource(admin, "r0", str(dev))
    with pytest.raises(Refused, match="already the data device"):
        membership.create_resource(admin, "r1", str(dev))
    k = ResourceKeys("r0")
    assert admin.meta.get(k.todo("alpha", "replay")) == "1"
    with pytest.raises(Refused, match="still holds resources r0"):
        cluster.leave_cluster(admin)
    with pytest.raises(Refused, match="is the primary of r0"):
        membership.leave_resource(admin, "r0")
    assert membership.delete_resource(admin, "r0")["changed"]
    assert cluster.leave_cluster(admin)["changed"]
    assert not cluster.leave_cluster(admin)["changed"]


def test_a_wait_checks_again_after_a_tenth_of_its_time_so_far() -> None:
    assert poll_interval(0.0) == POLL_MIN
    assert poll_interval(0.3) == pytest.approx(0.03)
    assert poll_interval(3600.0) == POLL_MAX
    waits = [poll_interval(t / 10) for t in range(100)]
    assert waits == sorted(waits)


# what a command must not load: the data path (an event loop, the log scanner and its
# checksums, fetch and replay); each costs every marsadm start tens of milliseconds
DATA_PATH = ("asyncio", "crc32c", "zstandard", "marslib.logscan", "marslib.replay",
             "marslib.fetch", "marslib.resync", "marslib.sync", "marslib.net.conn")


@pytest.mark.parametrize("modules", [
    ["marslib.cli"],
    ["marslib.cli", "marslib.admin.roles", "marslib.admin.view", "marslib.admin.switches",
     "marslib.admin.verify", "marslib.admin.membership", "marslib.admin.cluster"],
])
def test_the_command_line_loads_no_data_path(modules: list[str]) -> None:
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert set(modules) <= set(out)
    assert sorted(set(DATA_PATH) & set(out)) == []
