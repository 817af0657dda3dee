"""Log-based resync after a split brain, between two real marsd processes.

The split brain is made the way a network partition makes it, one marsd at a time: alpha
(the primary) writes what beta does not fetch and dies; beta takes over with ``primary
--force`` and writes; beta stops; alpha comes back alone, still primary in its own tree,
writes and rotates its log; alpha stops; both come up, the tree says beta is the primary,
and both see the split brain. Each side wrote known 64 KiB blocks, so the divergence is
known exactly. That takes a while, so it is made once per module and copied (state roots
and the data devices, plain files here) for each test, with both marsd stopped.

The plan's rules (:func:`marslib.resyncplan.plan`) and the retention pins are tested on a bare
tree first.
"""

from __future__ import annotations

import filecmp
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    NBD_CLIENT,
    SYSTEM_PYTHON,
    MarsHost,
    WriterLines,
    loopback_ips,
    needs_libnbd,
    wait_in_sync,
    wait_until,
)

from marslib.history import write_link
from marslib.layout import MarsPaths
from marslib.logretention import deletable_logfiles, resync_pins
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.resyncplan import plan
from marslib.schema import ON, ResourceKeys, ResyncPlan, SyncStatus
from marslib.sync import FAULT_KILL_AFTER

SIZE = 256 << 20  # 16 sync windows of 16 MiB (256 blocks)
BLOCK = 64 << 10
COMMON = [3, 700, 1000]  # written before the split: equal on both sides
ALPHA_BEFORE_KILL = [10, 11, 12, 300]  # in alpha's log only (beta's fetch was paused)
BETA_AFTER_FORCE = [20, 21, 300, 520, 900, 1100, 1700, 2300, 2900, 3500, 4000]  # beta's
#                                                                    writes as the primary
ALPHA_ALONE = [[30, 31, 1400], [600, 2000], [800, 801, 2600, 3200], [1020, 2400, 3800]]
#   alpha alone: one chunk per logfile; with the others, every sync window has a block
DIVERGED = set(ALPHA_BEFORE_KILL) | set(BETA_AFTER_FORCE) | {b for c in ALPHA_ALONE for b in c}

def write_blocks(host: MarsHost, blocks: list[int], seed: int) -> None:
    """Write the 64 KiB blocks ``blocks`` of r0 through ``host``'s NBD export."""
    subprocess.run([SYSTEM_PYTHON, str(NBD_CLIENT), host.nbd_uri("r0"), "blocks", str(seed),
                    *map(str, blocks)], check=True, timeout=60, capture_output=True)


def logfiles(host: MarsHost) -> list[str]:
    return sorted(p.name for p in (host.root / "resource-r0").glob("log-*"))


def tree(host: MarsHost) -> MetaStore:
    """``host``'s metadata tree, read directly (marsd running or not)."""
    return MetaStore(host.root)


def member_view(host: MarsHost, member: str) -> dict:  # type: ignore[type-arg]
    return dict(host.marsadm("view")["resources"]["r0"]["members"][member])


class Split:
    """alpha and beta with a split brain in r0; beta is the designated primary. The data
    devices are plain files (copied with the state for each test)."""

    def __init__(self, base: Path, ips: list[str]) -> None:
        self.base = base
        self.a = MarsHost(base / "a", "alpha", ips[0])
        self.b = MarsHost(base / "b", "beta", ips[1])
        self.img_a = base / "a.img"
        self.img_b = base / "b.img"

    def make(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        for img in (self.img_a, self.img_b):
            with open(img, "wb") as f:
                f.truncate(SIZE)
        a, b = self.a, self.b
        a.serve(str(self.img_a))
        b.join(a, str(self.img_b))
        write_blocks(a, COMMON, seed=1)
        wait_in_sync(a, b)
        b.marsadm("pause-fetch", "r0")
        write_blocks(a, ALPHA_BEFORE_KILL, seed=2)
        a.kill9()  # alpha is gone (crashed, or cut off)
        b.marsadm("primary", "r0", "--force")
        b.marsadm("resume-fetch", "r0")
        write_blocks(b, BETA_AFTER_FORCE, seed=3)
        b.stop()  # the partition: alpha comes back without beta
        a.start()
        wait_until(lambda: a.status().get("role") == "primary", "alpha serves alone")
        for k, chunk in enumerate(ALPHA_ALONE):
            if k:
                a.marsadm("log-rotate", "r0")
            write_blocks(a, chunk, seed=4)
        a.stop()
        a.marsadm("down", "r0")  # alpha must learn who is primary before it runs r0
        b.start()
        a.start()
        wait_until(lambda: a.marsadm("view")["resources"]["r0"]["primary"] == "beta",
                   "alpha learns that beta is the primary")
        a.marsadm("up", "r0")
        self.wait_split_brain()
        b.stop()
        a.stop()

    def start(self) -> None:
        """Both marsd up (beta first), alpha a secondary that sees the split brain."""
        self.b.start()
        self.a.start()
        wait_until(lambda: self.a.status().get("role") == "secondary", "alpha runs r0")
        self.wait_split_brain()

    def wait_split_brain(self) -> None:
        def both_see_it() -> bool:
            views = [h.marsadm("view")["resources"]["r0"] for h in (self.a, self.b)]
            return all(v["split_brain"] for v in views) and \
                views[0]["members"]["alpha"]["state"] == "SplitBrain"
        wait_until(both_see_it, "both hosts see the split brain")

    def identical(self) -> bool:
        """Once alpha has caught up with beta: the devices, byte for byte."""
        wait_in_sync(self.b, self.a)
        self.a.marsadm("pause-replay", "r0")
        try:
            return filecmp.cmp(self.img_a, self.img_b, shallow=False)
        finally:
            self.a.marsadm("resume-replay", "r0")

    def stop(self) -> None:
        for h in (self.a, self.b):
            h.stop()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """The split brain, made once (both marsd stopped): its directory and addresses. A
    copy of it is kept next to it; each test starts from that copy, in the same place
    (the tree holds absolute paths)."""
    base = tmp_path_factory.mktemp("split")
    ips = loopback_ips(2)
    s = Split(base / "made", ips)
    try:
        s.make()
    finally:
        s.stop()
    # -a keeps the tree's symlinks and their times (the metadata's Lamport stamps)
    subprocess.run(["cp", "-a", "--sparse=always", str(base / "made"), str(base / "copy")],
                   check=True)
    yield base, ips


@pytest.fixture
def split(template: tuple[Path, list[str]]) -> Iterator[Split]:
    base, ips = template
    subprocess.run(["rm", "-rf", str(base / "made")], check=True)
    subprocess.run(["cp", "-a", "--sparse=always", str(base / "copy"), str(base / "made")],
                   check=True)
    s = Split(base / "made", ips)
    try:
        yield s
    finally:
        s.stop()


def log_resync_result(r: dict) -> None:  # type: ignore[type-arg]
    assert r["resync"] == "log", r
    assert r["reason"] is None
    since = LogPosition.decode(r["since"])
    assert since.logfile == "log-000000001-alpha"  # where beta's copy of alpha's log ends
    assert 0 < r["blocks"] <= len(DIVERGED), r


# ------------------------------------------------------------ real marsd pairs
@needs_libnbd
def test_a_fork_is_resolved_by_a_log_based_resync_in_place(split: Split) -> None:
    split.start()
    a = split.a
    pid = a.status()["worker_pid"]
    r = a.marsadm("invalidate", "r0", "--wait")
    log_resync_result(r)
    # only the blocks of the set were compared, each once, and the differing ones copied
    assert r["compared"] == r["blocks"] * BLOCK, r
    assert 0 < r["copied"] <= r["compared"] <= len(DIVERGED) * BLOCK < SIZE // 50
    assert split.identical()
    assert a.status()["worker_pid"] == pid, "the secondary's worker was restarted"
    entry = member_view(a, "alpha")
    assert entry["resync"] == {"mode": "log", "since": r["since"], "blocks": r["blocks"],
                               "reason": None}
    assert entry["last_sync"]["compared"] == r["compared"]
    assert not a.marsadm("view-split-brain", "r0")["split_brain"]
    assert "invalidated: fetch and replay stop for a resync in place" in a.logtail(200)


@needs_libnbd
def test_stale_loser_logs_are_not_replayed_after_the_resync(split: Split) -> None:
    """Also: the primary's application keeps writing during the resync."""
    split.start()
    a, b = split.a, split.b
    fork = a.marsadm("view")["resources"]["r0"]["split_brain"][0]["logfile"]
    stale = [n for n in logfiles(a) if n.endswith("-alpha") and int(n.split("-")[1]) > fork]
    assert len(stale) >= 3, f"the test made too few loser logfiles past the fork: {stale}"
    writer = WriterLines(subprocess.Popen(
        [SYSTEM_PYTHON, str(NBD_CLIENT), b.nbd_uri("r0"), "writer", "51", "8", "512",
         "65536", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        writer.wait_acks(50, "beta's writer before the resync")
        before = writer.acks
        r = a.marsadm("invalidate", "r0", "--wait")
        assert r["resync"] == "log", r
        writer.wait_acks(before + 100, "beta's writer after the resync")
    finally:
        writer.writer.send_signal(signal.SIGINT)
    out, err = writer.finish()
    assert "E " not in out, err
    # beta goes on into logfile numbers alpha also wrote while it was alone
    for k in range(3):
        b.marsadm("log-rotate", "r0")
        write_blocks(b, [40 + k, 901 + k], seed=10 + k)
    wait_in_sync(b, a, timeout=20)
    assert split.identical()
    left = set(logfiles(a)) & set(stale)
    assert not left, f"alpha kept its stale logfiles {left}"
    # alpha's copy of the fork's logfile holds beta's history only
    name = f"log-{fork:09d}-alpha"
    assert (a.root / "resource-r0" / name).stat().st_size == \
        (b.root / "resource-r0" / name).stat().st_size


@needs_libnbd
def test_a_loser_logfile_gone_since_the_fork_means_a_full_comparison(split: Split) -> None:
    (split.a.root / "resource-r0" / "log-000000003-alpha").unlink()
    split.start()
    a = split.a
    r = a.marsadm("invalidate", "r0", "--wait")
    assert r["resync"] == "full" and r["since"] is None, r
    assert r["reason"] == "log-000000003-alpha is gone on alpha", r
    assert r["compared"] == SIZE
    assert split.identical()
    entry = member_view(a, "alpha")
    assert entry["resync"]["mode"] == "full"
    assert "log-000000003-alpha is gone" in entry["resync"]["reason"]
    # the primary sees the reason too, with the metadata
    wait_until(lambda: (member_view(split.b, "alpha")["resync"] or {}).get("reason")
               == r["reason"], "beta's view shows why alpha compared everything")


@needs_libnbd
def test_a_primary_log_gone_since_the_fork_means_a_full_comparison(split: Split) -> None:
    """The primary's logs are scanned only at the resync: the secondary falls back."""
    (split.b.root / "resource-r0" / "log-000000001-alpha").unlink()  # cron ran there
    split.start()
    a = split.a
    r = a.marsadm("invalidate", "r0", "--wait")
    assert r["resync"] == "full", r
    assert r["reason"].startswith("beta's logs since the fork: ") and \
        "log-000000001-alpha" in r["reason"], r
    assert r["compared"] == SIZE
    assert "full comparison instead of a log-based resync" in a.logtail(200)
    assert split.identical()


@needs_libnbd
def test_a_killed_loser_resumes_the_resync_with_its_saved_set(split: Split) -> None:
    split.a.env[FAULT_KILL_AFTER] = "1"  # the secondary dies after its first window
    split.start()
    a = split.a
    a.marsadm("invalidate", "r0", check=False)  # marsd may die before it answers
    assert a.proc is not None
    a.proc.wait(timeout=60)
    a.proc = None
    state = SyncStatus.decode(tree(a).get(ResourceKeys("r0").syncstatus("alpha")))
    # killed after its first window: in the middle (with the fault injection, the sync
    # takes windows of 16 MiB one at a time, in order)
    assert state is not None and not state.finished and 0 < state.done < SIZE, state
    saved = ResyncPlan.decode(tree(a).get(ResourceKeys("r0").resync("alpha")))
    assert saved is not None and saved.mode == "log" and saved.blocks, saved
    del a.env[FAULT_KILL_AFTER]
    a.start()
    wait_until(lambda: tree(a).get(ResourceKeys("r0").syncstatus("alpha")) == "done",
               "alpha's resync finishes after the restart")
    logtail = a.logtail(300)
    assert f"full sync resumes at {state.done} of {SIZE} bytes" in logtail
    assert f"the resync resumes with its saved set of {saved.blocks} blocks" in logtail
    assert split.identical()
    assert not (a.root / "resource-r0" / "resync.blocks").exists()
    assert member_view(a, "alpha")["last_sync"]["compared"] < SIZE // 50


@needs_libnbd
def test_a_killed_primary_mid_resync_is_retried(split: Split) -> None:
    split.start()
    a, b = split.a, split.b
    a.marsadm("pause-sync", "r0")
    r = a.marsadm("invalidate", "r0")
    log_resync_result(r)  # the set is computed before the sync's first window
    b.kill9()
    a.marsadm("resume-sync", "r0")
    wait_until(lambda: "sync interrupted" in a.logtail(100), "alpha's sync notices")
    b.start()
    wait_until(lambda: tree(a).get(ResourceKeys("r0").syncstatus("alpha")) == "done",
               "alpha's resync finishes once beta is back", timeout=60)
    assert split.identical()
    # a new start: the set of the first one, and what beta wrote in between (nothing)
    final = ResyncPlan.decode(tree(a).get(ResourceKeys("r0").resync("alpha")))
    assert final is not None and final.mode == "log" and final.blocks == r["blocks"]
    assert member_view(a, "alpha")["last_sync"]["compared"] == r["blocks"] * BLOCK


@needs_libnbd
def test_log_delete_keeps_what_a_resync_needs(split: Split) -> None:
    split.start()
    a, b = split.a, split.b
    fork_log = "log-000000001-alpha"
    # all members have applied logfile 1 (replay positions are past it), but it forks
    assert b.marsadm("log-delete", "r0", "--dry-run")["deleted"] == []
    a.marsadm("pause-sync", "r0")
    a.marsadm("invalidate", "r0")  # the fork's evidence goes, the plan pins
    wait_until(lambda: not b.marsadm("view-split-brain", "r0")["split_brain"],
               "beta sees the fork resolved")
    wait_until(lambda: (member_view(b, "alpha")["resync"] or {}).get("blocks"),
               "beta sees alpha's plan")
    for h in (a, b):
        r = h.marsadm("log-delete", "r0")
        assert fork_log not in r["deleted"], (h.name, r)
        assert fork_log in logfiles(h)
    a.marsadm("resume-sync", "r0")
    wait_until(lambda: b.marsadm("log-delete", "r0")["deleted"] == [fork_log] or
               fork_log not in logfiles(b), "beta deletes the logfile once the resync is done")
    assert split.identical()


# ------------------------------------------------------------ the plan's rules
@pytest.fixture
def bare(tmp_path: Path) -> tuple[MetaStore, MarsPaths]:
    paths = MarsPaths(tmp_path / "mars", tmp_path / "run")
    paths.resource_dir("r0").mkdir(parents=True)
    meta = MetaStore(paths.root)
    k = ResourceKeys("r0")
    meta.set(k.primary, "beta")
    for h in ("alpha", "beta"):
        meta.set(k.data(h), f"/dev/{h}")
        meta.set(k.syncstatus(h), "done")
    # alpha (the loser) wrote logfiles 4 and 5 alone; beta's copy of 4 ends at 4096
    write_link(meta, "r0", "alpha", LogPosition(3, 8192, 9, "alpha"))
    write_link(meta, "r0", "beta", LogPosition(3, 8192, 9, "alpha"))
    write_link(meta, "r0", "alpha", LogPosition(4, 20000, 20, "alpha"))
    write_link(meta, "r0", "beta", LogPosition(4, 4096, 12, "alpha"))
    meta.set(k.replay("alpha"), "log-000000005-alpha,3000,25")
    meta.set(k.replay("beta"), "log-000000005-beta,700,15")
    for name, size in (("log-000000003-alpha", 8192), ("log-000000004-alpha", 20000),
                       ("log-000000005-alpha", 3000)):
        (paths.resource_dir("r0") / name).write_bytes(b"\0" * size)
    return meta, paths


def test_plan_log_based_from_the_fork(bare: tuple[MetaStore, MarsPaths]) -> None:
    meta, paths = bare
    p = plan(meta, paths, "r0", "alpha")
    assert p == ResyncPlan("log", since=LogPosition(4, 4096, 12, "alpha"))
    assert plan(meta, paths, "r0", "alpha", full=True).reason.startswith("asked for")


@pytest.mark.parametrize("change, reason", [
    (lambda m, p: m.set("resource-r0/syncstatus-alpha", "100/999"), "an unfinished sync"),
    (lambda m, p: m.set("resource-r0/actual-alpha/emergency", ON), "emergency mode"),
    (lambda m, p: m.set("resource-r0/actual-beta/emergency", ON), "beta ran in emergency"),
    (lambda m, p: m.set("resource-r0/history-gap", "5"), "a history gap"),
    (lambda m, p: m.set("resource-r0/primary", "(none)"), "no primary"),
    (lambda m, p: m.delete("resource-r0/replay-alpha"), "no replay position"),
    (lambda m, p: m.delete("resource-r0/version-000000004-beta"), "no known fork"),
    (lambda m, p: (p.resource_dir("r0") / "log-000000004-alpha").unlink(),
     "log-000000004-alpha is gone on alpha"),
    (lambda m, p: (p.resource_dir("r0") / "log-000000005-alpha").unlink(),
     "log-000000005-alpha is gone on alpha"),
    (lambda m, p: (p.resource_dir("r0") / "log-000000005-alpha").write_bytes(b"\0" * 10),
     "log-000000005-alpha on alpha has 10 bytes"),
])
def test_plan_full_and_why(bare: tuple[MetaStore, MarsPaths], change, reason) -> None:  # type: ignore[no-untyped-def]
    meta, paths = bare
    change(meta, paths)
    p = plan(meta, paths, "r0", "alpha")
    assert p.mode == "full" and reason in p.reason, p


def test_retention_pins_the_fork_and_unfinished_log_resyncs(
        bare: tuple[MetaStore, MarsPaths]) -> None:
    meta, paths = bare
    k = ResourceKeys("r0")
    for name in ("log-000000001-beta", "log-000000002-beta", "log-000000006-beta"):
        (paths.resource_dir("r0") / name).write_bytes(b"x")
    assert resync_pins(meta, "r0") == {"split brain": 4}
    names = [p.name for p in deletable_logfiles(meta, paths, "r0")]
    assert names == ["log-000000001-beta", "log-000000002-beta", "log-000000003-alpha"]
    # invalidate: the links go, the plan pins while the sync is unfinished
    meta.set(k.resync("alpha"), ResyncPlan("log", since=LogPosition(3, 100, 5, "alpha"))
             .encode())
    meta.set(k.syncstatus("alpha"), "0/999")
    for number in (3, 4):
        meta.delete(k.version_link(number, "alpha"))
    meta.set(k.replay("alpha"), "log-000000006-beta,0,30")  # P0
    assert resync_pins(meta, "r0") == {"the resync of alpha": 3}
    names = [p.name for p in deletable_logfiles(meta, paths, "r0")]
    assert names == ["log-000000001-beta", "log-000000002-beta"]
    meta.set(k.syncstatus("alpha"), "done")  # finished: the plan is only a record now
    assert resync_pins(meta, "r0") == {}
    names = [p.name for p in deletable_logfiles(meta, paths, "r0")]
    assert names == ["log-000000001-beta", "log-000000002-beta", "log-000000003-alpha",
                     "log-000000004-alpha"]
