"""Online verify (``marsadm verify``): a secondary compared with its primary by block
checksums while the application writes, on real marsd pairs; and the parts it rests on
(the replay's device lock, the verify's saved state, the refusals), directly."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BIN,
    NBD_CLIENT,
    SYSTEM_PYTHON,
    HostPair,
    MarsHost,
    WriterLines,
    needs_libnbd,
    wait_in_sync,
    wait_until,
)

from marslib.admin.context import Admin
from marslib.admin.snapshot import MemberSnapshot, ResourceSnapshot
from marslib.admin.verify import state_file, verify_refusal
from marslib.blockset import BlockSet
from marslib.device import Device
from marslib.layout import MarsPaths
from marslib.meta import MAX_VALUE_LEN, MetaStore
from marslib.replay import DeviceQuiesce, Replayer
from marslib.schema import ResourceKeys, SyncStatus, VerifyDiff, VerifyStatus
from marslib.status import OnlineVerifyStatus, ResourceStatus, SecondaryStatus
from marslib.verify import FAULT_KILL_AFTER, VerifyState, diff_value, state_path

SIZE = 64 << 20  # four verify windows of 16 MiB
BS = 64 << 10
WRITER_SLOTS = 512  # the writer writes 64 KiB slots of the first 32 MiB only


# --------------------------------------------------------------- a real pair
class Pair(HostPair):
    def __init__(self, base: Path) -> None:
        super().__init__(base, SIZE)

    def writer(self, seed: int, seconds: float = 600) -> WriterLines:
        """The application on alpha: random writes at queue depth 8 to the first 32 MiB."""
        return WriterLines(subprocess.Popen(
            [SYSTEM_PYTHON, str(NBD_CLIENT), self.a.nbd_uri("r0"), "writer", str(seed), "8",
             str(WRITER_SLOTS), str(BS), str(seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    def damage_beta(self, offset: int, length: int, seed: int) -> None:
        """Change beta's device behind marsd's back (outside the writer's range)."""
        data = (bytes([seed]) * 7 + b"\x5a") * (length // 8)
        fd = os.open(self.dev_b.image, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def view_member(self, host: MarsHost, member: str) -> dict:  # type: ignore[type-arg]
        return host.marsadm("view", "r0")["resources"]["r0"]["members"][member]

@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    p.replicate()
    yield p
    p.close()


def finished_verify(pair: Pair) -> dict:  # type: ignore[type-arg]
    """Once beta's verify under way has ended (it may end before a marsadm that would
    wait for it starts): beta's view entry, with ``last_verify`` and ``verify_diff``."""
    status = pair.b.root / "resource-r0" / "verifystatus-beta"
    wait_until(lambda: os.readlink(status) == "done", "beta's verify ends", timeout=60)
    return pair.view_member(pair.b, "beta")


def saved_state(pair: Pair) -> dict:  # type: ignore[type-arg]
    """beta's verify state file."""
    return json.loads((pair.b.root / "resource-r0" / "verify-beta.json").read_text())


def stop_writer(w: WriterLines) -> None:
    if w.writer.poll() is None:
        w.writer.send_signal(2)
    out, err = w.finish()
    assert "E " not in out, err


def identical_after_catching_up(pair: Pair) -> None:
    wait_in_sync(pair.a, pair.b)
    pair.b.marsadm("pause-replay", "r0")
    assert pair.dev_a.read() == pair.dev_b.read(), "the devices differ"
    pair.b.marsadm("resume-replay", "r0")


@needs_libnbd
def test_a_busy_healthy_pair_shows_no_difference(pair: Pair) -> None:
    w = pair.writer(seed=11)
    try:
        w.wait_acks(300, "before the verify")
        r = pair.b.marsadm("verify", "r0")
        acks_during = w.acks
        w.wait_acks(acks_during + 100, "after the verify")  # it was writing all along
    finally:
        stop_writer(w)
    assert r["compared"] == SIZE
    assert r["differing"] == 0 and r["ranges"] == [] and r["range_count"] == 0, r
    # blocks written between the primary's and the replica's positions were seen, and
    # compared again instead of being reported: the test could have failed
    assert r["touched"] > 0, r
    assert r["unsettled"] <= 8 * BS, r
    v = pair.view_member(pair.b, "beta")
    assert not v["verifying"] and v["last_verify"]["differing"] == 0
    identical_after_catching_up(pair)


@needs_libnbd
def test_a_changed_block_is_reported_exactly_and_repaired(pair: Pair) -> None:
    pair.damage_beta((48 << 20) + 3 * BS, 2 * BS, seed=1)
    pair.damage_beta(60 << 20, BS, seed=2)
    w = pair.writer(seed=12)
    try:
        w.wait_acks(200, "before the verify")
        r = pair.b.marsadm("verify", "r0")
        assert r["differing"] == 3 * BS and r["repaired"] == 0, r
        assert r["ranges"] == [[(48 << 20) + 3 * BS, 2 * BS], [60 << 20, BS]], r
        # the view says so on both hosts (on alpha through the metadata)
        for h in (pair.b, pair.a):
            info = wait_until(lambda h=h: (m := pair.view_member(h, "beta"))["last_verify"]
                              and m["last_verify"]["differing"] == 3 * BS and m,
                              f"{h.name}'s view shows beta's last verify")
            assert info["verify_diff"]["ranges"] == r["ranges"]
        text = subprocess.run([str(BIN / "marsadm"), "view", "r0"],
                              capture_output=True, text=True, env=pair.b.env).stdout
        assert "last verify: 192KB in 2 range(s) differed" in text, text
        # repair, with replay held so that the view shows the replica inconsistent
        pair.b.marsadm("pause-replay", "r0")
        r = pair.b.marsadm("verify", "r0", "--repair")
        assert r["differing"] == 3 * BS and r["repaired"] == 3 * BS, r
        w.wait_acks(w.acks + 50, "after the repair")  # the log moved past the new syncpos
        assert pair.view_member(pair.b, "beta")["state"] == "Inconsistent"
        pair.b.marsadm("resume-replay", "r0")
    finally:
        stop_writer(w)
    wait_until(lambda: pair.view_member(pair.b, "beta")["state"] == "UpToDate",
               "beta is UpToDate after the repair")
    identical_after_catching_up(pair)
    r = pair.b.marsadm("verify", "r0")
    assert r["differing"] == 0, r


@needs_libnbd
def test_a_verify_killed_midway_resumes_and_loses_nothing(pair: Pair) -> None:
    a, b = pair.a, pair.b
    pair.damage_beta(8 << 20, BS, seed=3)  # in the first window: found before the kill
    pair.damage_beta(63 << 20, BS, seed=4)  # in the last one
    b.stop()
    b.env[FAULT_KILL_AFTER] = "2"
    b.start()
    wait_until(lambda: b.status().get("consistent"), "beta runs r0 again, consistent")
    r = b.marsadm("verify", "r0", "--no-wait")
    assert r["changed"] and r["waiting"] is False
    wait_until(lambda: b.proc is not None and b.proc.poll() is not None,
               "the fault-injected kill of beta's marsd", timeout=60)
    assert "fault injection: killing this process group after" in b.logtail(200)
    st = VerifyStatus.decode(os.readlink(b.root / "resource-r0" / "verifystatus-beta"))
    assert st is not None and 0 < st.done < SIZE, st
    del b.env[FAULT_KILL_AFTER]
    b.proc = None
    b.start()  # the verify under way resumes by itself
    info = finished_verify(pair)
    assert saved_state(pair)["resumed_at"] >= st.done > 0
    assert info["verify_diff"]["ranges"] == [[8 << 20, BS], [63 << 20, BS]], info
    assert info["last_verify"]["differing"] == 2 * BS
    assert re.search(r"verify resumes at (\d+)", b.logtail(400))
    # asked from the primary's host (--host names the secondary): through the metadata
    r = a.marsadm("verify", "r0", "--host", "beta")
    assert r["changed"] and r["ranges"] == [[8 << 20, BS], [63 << 20, BS]], r
    assert "touched" not in r  # the state file is on beta only


@needs_libnbd
def test_a_repair_cut_short_is_done_again(pair: Pair) -> None:
    b = pair.b
    keys = ResourceKeys("r0")
    # beta died while copying the differences of a verify: its list is on disk
    b.stop()
    pair.damage_beta(40 << 20, BS, seed=5)
    differ = BlockSet(SIZE, BS)
    differ.add((40 << 20) // BS)
    state = VerifyState(SIZE, BS, repair=True, phase="repair", done=SIZE, compared=SIZE,
                        differ=differ)
    (b.root / "resource-r0" / "verify-beta.json").write_text(json.dumps(state.to_json()))
    MetaStore(b.root).set(keys.verifystatus("beta"), "repairing")
    b.start()  # the repair under way is done again
    info = finished_verify(pair)
    assert info["last_verify"]["repaired"] == BS, info
    assert info["verify_diff"]["ranges"] == [[40 << 20, BS]], info
    assert "copying them again" in b.logtail(200)
    wait_in_sync(pair.a, b)
    # the same with the list gone: it verifies from the start, and repairs
    b.stop()
    pair.damage_beta(44 << 20, BS, seed=6)
    (b.root / "resource-r0" / "verify-beta.json").unlink()
    MetaStore(b.root).set(keys.verifystatus("beta"), "repairing")
    b.start()
    info = finished_verify(pair)
    assert info["last_verify"]["repaired"] == BS, info
    assert info["verify_diff"]["ranges"] == [[44 << 20, BS]], info
    assert "its list of differences" in b.logtail(200)
    identical_after_catching_up(pair)


@needs_libnbd
def test_status_metrics_and_view_follow_a_verify(pair: Pair) -> None:
    b = pair.b
    w = pair.writer(seed=13)
    try:
        w.wait_acks(100, "before pausing the fetch")
        # beta's log stops short of the primary's: the windows the writer changes wait
        # for the log to reach the primary's position, the others are compared
        b.marsadm("pause-fetch", "r0")
        w.wait_acks(w.acks + 200, "with beta's fetch paused")
        b.marsadm("verify", "r0", "--no-wait")
        st = wait_until(lambda: (s := b.status()).get("verify_compared", 0) >= 32 << 20 and s,
                        "the windows beyond the writer compared")
        assert st["verify_size"] == SIZE and st["verify_done"] == 0, st
        assert st["verify_differing"] == 0 and st["verify_pass"] == 0
        view = pair.view_member(b, "beta")
        assert view["verifying"] and view["verify_progress"] == 0.0
        metrics = urllib.request.urlopen(f"http://{b.ip}:9577/metrics", timeout=10).read()
        assert b'mars_verify_size_bytes{resource="r0"} 6.7108864e+07' in metrics
        assert b'mars_verify_done_bytes{resource="r0"} 0.0' in metrics
        assert b'mars_verify_differing_bytes{resource="r0"} 0.0' in metrics
        # while it runs: another request joins it, one with --repair is refused
        r = b.marsadm("verify", "r0", "--repair", check=False)
        assert r["rc"] == 1 and "without --repair is running" in r["error"], r
        r = b.marsadm("verify", "r0", "--no-wait")
        assert not r["changed"]
        b.marsadm("resume-fetch", "r0")
        r = b.marsadm("verify", "r0")
    finally:
        stop_writer(w)
    assert r["differing"] == 0 and r["touched"] > 0, r
    st = b.status()
    assert "verify_done" not in st  # no verify running
    metrics = urllib.request.urlopen(f"http://{b.ip}:9577/metrics", timeout=10).read()
    assert b"mars_verify_done_bytes{" not in metrics
    assert not pair.view_member(b, "beta")["verifying"]


@needs_libnbd
def test_refusals_on_a_real_pair(pair: Pair) -> None:
    a, b = pair.a, pair.b
    r = a.marsadm("verify", "r0", check=False)
    assert r["rc"] == 1 and "alpha is the primary of r0" in r["error"], r
    r = a.marsadm("verify", "r0", "--host", "gamma", check=False)
    assert r["rc"] == 1 and "gamma is not a member of r0" in r["error"], r
    b.marsadm("down", "r0")
    r = b.marsadm("verify", "r0", check=False)
    assert r["rc"] == 1 and "not running here as a secondary" in r["error"], r
    assert not (b.root / "resource-r0" / "verifystatus-beta").exists()  # nothing asked


# ------------------------------------------------------------------ refusals
def member(host: str, **kw: object) -> MemberSnapshot:
    base: dict[str, object] = {"device": "/dev/x", "replay": "log-000000003-alpha,100,7",
                               "sync": SyncStatus(0, 0, finished=True),
                               "syncpos": "log-000000003-alpha,50,3"}
    base.update(kw)
    return MemberSnapshot(host=host, **base)  # type: ignore[arg-type]


def snap(beta: MemberSnapshot | None = None, alpha: MemberSnapshot | None = None,
         gap: str | None = None, primary: str = "alpha") -> ResourceSnapshot:
    members = {"alpha": alpha or member("alpha"), "beta": beta or member("beta")}
    return ResourceSnapshot("r0", SIZE, primary, history_gap=gap, members=members)


def live(consistent: bool = True) -> ResourceStatus:
    return ResourceStatus(role="secondary",
                          secondary=SecondaryStatus(phase="replaying", consistent=consistent))


@pytest.mark.parametrize("case, why", [
    (lambda: verify_refusal(snap(), "alpha", None, False), "alpha is the primary of r0"),
    (lambda: verify_refusal(snap(), "gamma", None, False), "gamma is not a member of r0"),
    (lambda: verify_refusal(snap(primary="(none)"), "beta", None, False), "has no primary"),
    (lambda: verify_refusal(snap(beta=member("beta", sync=SyncStatus(5, 9))), "beta", None,
                            False), "syncing on beta"),
    (lambda: verify_refusal(snap(alpha=member("alpha", emergency=True)), "beta", None, False),
     "emergency mode"),
    (lambda: verify_refusal(snap(gap="4"), "beta", None, False), "gap before logfile 4"),
    (lambda: verify_refusal(snap(), "beta", live(consistent=False), True),
     "not consistent on beta"),
    (lambda: verify_refusal(snap(), "beta", None, True), "not running here"),
    (lambda: verify_refusal(snap(), "beta", ResourceStatus(role="secondary", secondary=(
        SecondaryStatus(phase="error", error="boom", consistent=True))), True),
     "not replaying here (it is error: boom)"),
    (lambda: verify_refusal(snap(beta=member("beta", syncpos="log-000000004-alpha,0,9")),
                            "beta", None, False), "not consistent on beta"),
    (lambda: verify_refusal(snap(beta=member("beta", verify=VerifyStatus(
        repair=True, repairing=True))), "beta", None, False), "not consistent on beta"),
])
def test_refusals(case, why: str) -> None:  # type: ignore[no-untyped-def]
    assert why in (case() or "")


def test_a_consistent_secondary_may_be_verified_locally_and_from_afar() -> None:
    assert verify_refusal(snap(), "beta", live(), True) is None
    assert verify_refusal(snap(gap="3"), "beta", None, False) is None  # gap passed already


# ------------------------------------------------------------------ the parts
def test_the_device_lock_keeps_batches_and_readers_apart_and_starves_neither() -> None:
    async def scenario() -> list[str]:
        lock = DeviceQuiesce()
        order: list[str] = []

        async def reader(name: str, hold: asyncio.Event | None = None) -> None:
            async with lock.shared():
                order.append(f"{name} in")
                if hold is not None:
                    await hold.wait()
                order.append(f"{name} out")

        async def batch(name: str, hold: asyncio.Event | None = None) -> None:
            async with lock.exclusive():
                order.append(name)
                if hold is not None:
                    await hold.wait()

        async def settle() -> None:
            for _ in range(20):
                await asyncio.sleep(0)

        release_r1, release_b1 = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(reader("r1", release_r1))]
        await settle()
        tasks.append(asyncio.create_task(batch("b1", release_b1)))  # waits for r1
        await settle()
        tasks.append(asyncio.create_task(reader("r2")))  # after the waiting batch
        await settle()
        assert order == ["r1 in"], order
        release_r1.set()
        await settle()
        assert order == ["r1 in", "r1 out", "b1"], order
        tasks.append(asyncio.create_task(batch("b2")))  # the replay goes on at once...
        await settle()
        release_b1.set()  # ...but r2, which waited for b1, goes first
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["r1 in", "r1 out", "b1", "r2 in", "r2 out", "b2"]


class _Fetcher:
    def __init__(self, logfile: str) -> None:
        self.logfile = logfile


def test_replay_moves_on_only_along_the_fetchers_chain(tmp_path: Path) -> None:
    paths = MarsPaths(tmp_path / "mars", tmp_path / "run")
    rdir = paths.resource_dir("r0")
    rdir.mkdir(parents=True)
    for name in ("log-000000003-alpha", "log-000000004-alpha", "log-000000004-beta",
                 "log-000000005-beta"):
        (rdir / name).touch()
    meta = MetaStore(paths.root)
    meta.set(ResourceKeys("r0").replay("gamma"), "log-000000003-alpha,0,0")
    image = tmp_path / "dev.img"
    image.write_bytes(bytes(1 << 20))
    dev = Device(str(image), buffered=True)
    try:
        fetcher = _Fetcher("log-000000004-beta")
        rp = Replayer("r0", "gamma", paths, meta, dev, fetcher)  # type: ignore[arg-type]
        # beta's log 4 is the chain's; alpha's log 4 is from another history
        assert rp._next_in_chain(3) == (4, "beta")
        assert rp._next_in_chain(4) is None  # 5 is beyond what the fetch has reached
        fetcher.logfile = "log-000000005-beta"
        assert rp._next_in_chain(4) == (5, "beta")
    finally:
        dev.close()


def test_the_saved_state_round_trips_and_the_diff_key_fits() -> None:
    differ = BlockSet(SIZE, BS)
    differ.add(3)
    differ.add(4)
    st = VerifyState(SIZE, BS, repair=True, phase="retry", done=SIZE, compared=SIZE + BS,
                     differ=differ, retry={9, 10, 700}, touched=5, passes=2, resumed_at=BS)
    again = VerifyState.from_json(st.to_json())
    assert again == st
    with pytest.raises(ValueError):
        VerifyState.from_json({**st.to_json(), "differ": "bm90IGEgc2V0"})
    ranges = [((1 << 40) + i * 2 * BS, BS) for i in range(200)]  # long offsets
    value = diff_value(ranges)
    assert len(value) <= MAX_VALUE_LEN
    decoded = VerifyDiff.decode(value)
    assert decoded is not None and list(decoded.ranges) == ranges[:len(decoded.ranges)]
    assert decoded.more == 200 - len(decoded.ranges) > 0


def test_marsadm_and_marsd_agree_on_the_state_file(tmp_path: Path) -> None:
    paths = MarsPaths(tmp_path / "mars", tmp_path / "run")
    admin = Admin(paths, "beta", MetaStore(paths.root))
    assert state_file(admin, "r0", "beta") == state_path(paths, "r0", "beta") == \
        paths.root / "resource-r0" / "verify-beta.json"


def test_status_fields_travel_through_the_flat_json() -> None:
    v = OnlineVerifyStatus(verify_done=5, verify_size=9, verify_differing=BS, verify_pass=1)
    st = ResourceStatus(role="secondary", secondary=SecondaryStatus(), verifier=v)
    assert ResourceStatus.from_json(st.to_json()).verifier == v
    assert ResourceStatus.from_json(ResourceStatus(role="secondary").to_json()).verifier \
        is None

