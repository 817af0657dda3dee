"""Roles between two real marsd processes: planned handover back and forth under an
application that stops and restarts around it; refusals leave the cluster unchanged."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    NBD_CLIENT,
    SYSTEM_PYTHON,
    BlockDev,
    MarsHost,
    loopback_ips,
    needs_libnbd,
    wait_in_sync,
    wait_until,
)

from marslib import control
from marslib.position import LogPosition

pytestmark = needs_libnbd
SIZE = 64 << 20


class Pair:
    def __init__(self, base: Path) -> None:
        ip_a, ip_b = loopback_ips(2)
        self.hosts = {"alpha": MarsHost(base / "a", "alpha", ip_a),
                      "beta": MarsHost(base / "b", "beta", ip_b)}
        self.devs = {"alpha": BlockDev(base / "a.img", SIZE),
                     "beta": BlockDev(base / "b.img", SIZE)}

    def status(self, name: str) -> dict:  # type: ignore[type-arg]
        return self.hosts[name].status()

    def primary_in_view(self, name: str) -> str:
        """Who ``name`` believes is the primary of r0."""
        return str(self.hosts[name].marsadm("view")["resources"]["r0"]["primary"])

    def writer(self, name: str, seconds: float, seed: int,
               min_acks: int = 0) -> subprocess.Popen[str]:
        """Writes for ``seconds`` and until ``min_acks`` writes were acknowledged."""
        return subprocess.Popen(
            [SYSTEM_PYTHON, str(NBD_CLIENT), self.hosts[name].nbd_uri("r0"), "writer",
             str(seed), "8", "512", "65536", str(seconds), str(min_acks)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_in_sync(self, primary: str, secondary: str, timeout: float = 60) -> None:
        wait_in_sync(self.hosts[primary], self.hosts[secondary], timeout)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    a, b = p.hosts["alpha"], p.hosts["beta"]
    a.serve(p.devs["alpha"].path)
    b.join(a, p.devs["beta"].path)
    yield p
    for h in p.hosts.values():
        h.stop()
    for d in p.devs.values():
        d.close()


def test_handover_back_and_forth_loses_nothing(pair: Pair) -> None:
    primary, secondary = "alpha", "beta"
    acked = 0
    times = []
    for round_no in range(4):
        w = pair.writer(primary, 2, seed=100 + round_no)
        out, err = w.communicate(timeout=60)  # the application stops
        assert "E " not in out, err
        acked += out.count("\nA ")
        pair.wait_in_sync(primary, secondary)
        r = pair.hosts[secondary].marsadm("primary", "r0")
        assert r["changed"] and r["previous"] == primary
        times.append(r["seconds"])
        # the new primary's name reaches the old primary with the metadata
        wait_until(lambda old=primary, new=secondary: pair.primary_in_view(old) == new,
                   f"{primary}'s view shows {secondary} as the primary")
        wait_until(lambda old=primary: pair.status(old).get("role") == "secondary",
                   f"the old primary {primary} becomes a secondary")
        primary, secondary = secondary, primary
    pair.wait_in_sync(primary, secondary)
    pair.hosts[secondary].marsadm("pause-replay", "r0")
    assert pair.devs["alpha"].read() == pair.devs["beta"].read()
    assert acked > 200
    # each handover started a new logfile on the new primary
    names = [p.name for p in sorted((pair.hosts[primary].root / "resource-r0").glob("log-*"))]
    assert len({n.split("-")[1] for n in names}) >= 4
    print(f"handover times: {times}")


def test_handover_refused_while_the_export_is_open(pair: Pair) -> None:
    w = pair.writer("alpha", 20, seed=7)
    try:
        # the open-count travels to beta with the metadata
        wait_until(lambda: pair.hosts["beta"].marsadm("view")["resources"]["r0"]["members"][
            "alpha"]["open_count"] == 1, "beta sees alpha's NBD client")
        r = pair.hosts["beta"].marsadm("primary", "r0", check=False)
        assert r["rc"] == 1 and "still has 1 NBD client" in r["error"]
        assert pair.hosts["beta"].marsadm("view")["resources"]["r0"]["primary"] == "alpha"
        assert pair.status("alpha").get("role") == "primary"
    finally:
        w.kill()
        w.wait()


def test_handover_refused_while_replay_is_paused_then_succeeds(pair: Pair) -> None:
    pair.hosts["beta"].marsadm("pause-replay", "r0")
    r = pair.hosts["beta"].marsadm("primary", "r0", check=False)
    assert r["rc"] == 1 and "paused" in r["error"]
    assert pair.hosts["alpha"].marsadm("view")["resources"]["r0"]["primary"] == "alpha"
    pair.hosts["beta"].marsadm("resume-replay", "r0")
    assert pair.hosts["beta"].marsadm("primary", "r0")["changed"]


def test_failover_split_brain_detected_and_resolved_by_invalidate(pair: Pair) -> None:
    a, b = pair.hosts["alpha"], pair.hosts["beta"]
    pair.wait_in_sync("alpha", "beta")
    b.marsadm("pause-fetch", "r0")
    w = pair.writer("alpha", 2, seed=31, min_acks=51)  # alpha writes what beta never gets
    assert w.communicate(timeout=60)[0].count("\nA ") > 50
    a.kill9()  # alpha is gone (crashed, or cut off)
    r = b.marsadm("primary", "r0", "--force")
    assert r["changed"] and r["forced"]
    w = pair.writer("beta", 2, seed=32, min_acks=51)  # beta's applications go on
    assert w.communicate(timeout=60)[0].count("\nA ") > 50
    a.start()  # alpha comes back with its own history
    deadline = time.monotonic() + 60
    while True:
        va = a.marsadm("view")["resources"]["r0"]
        vb = b.marsadm("view")["resources"]["r0"]
        if va["split_brain"] and vb["split_brain"]:
            break
        assert time.monotonic() < deadline, f"split brain not detected: {va} {vb}"
        time.sleep(0.3)
    assert va["primary"] == vb["primary"] == "beta"
    assert va["members"]["alpha"]["state"] == "SplitBrain"
    sb = a.marsadm("view-split-brain", "r0")
    assert sb["split_brain"] and sb["losers"] == ["alpha"]
    # alpha never replays beta's history past the fork
    before = pair.devs["alpha"].read()
    time.sleep(2)
    assert pair.devs["alpha"].read() == before
    a.marsadm("invalidate", "r0", "--wait")
    pair.wait_in_sync("beta", "alpha")
    a.marsadm("pause-replay", "r0")
    assert pair.devs["alpha"].read() == pair.devs["beta"].read()
    deadline = time.monotonic() + 30
    while a.marsadm("view-split-brain", "r0")["split_brain"]:
        assert time.monotonic() < deadline, "the split brain did not clear after invalidate"
        time.sleep(0.3)


def test_three_replicas_handover_to_any_and_log_deletion_waits_for_the_slowest(
        tmp_path: Path) -> None:
    ips = loopback_ips(3)
    names = ("alpha", "beta", "gamma")
    hosts = {n: MarsHost(tmp_path / n, n, ip) for n, ip in zip(names, ips, strict=True)}
    devs = {n: BlockDev(tmp_path / f"{n}.img", SIZE) for n in names}
    try:
        a = hosts["alpha"]
        a.serve(devs["alpha"].path)
        for n in ("beta", "gamma"):
            hosts[n].join(a, devs[n].path)

        def status(n: str) -> dict:  # type: ignore[type-arg]
            return control.request(hosts[n].run_dir / "marsd.sock", "status")[
                "resources"]["r0"]

        def in_sync(primary: str) -> None:
            deadline = time.monotonic() + 60
            while True:
                end = status(primary).get("log_end")
                if all(status(n).get("applied") == end for n in names if n != primary):
                    return
                assert time.monotonic() < deadline, "replicas did not catch up"
                time.sleep(0.1)

        def write(n: str, seed: int) -> None:
            w = subprocess.Popen([SYSTEM_PYTHON, str(NBD_CLIENT), hosts[n].nbd_uri("r0"),
                                  "writer", str(seed), "8", "512", "65536", "1.5", "21"],
                                 stdout=subprocess.PIPE, text=True)
            assert w.communicate(timeout=60)[0].count("\nA ") > 20

        write("alpha", 41)
        in_sync("alpha")
        hosts["gamma"].marsadm("primary", "r0")  # hand over to the second secondary
        write("gamma", 42)
        in_sync("gamma")
        # gamma is the slowest now: its fetch is paused; deletion must wait for it
        hosts["beta"].marsadm("primary", "r0")
        hosts["gamma"].marsadm("pause-fetch", "r0")
        write("beta", 43)
        for _ in range(2):
            hosts["beta"].marsadm("log-rotate", "r0")
        time.sleep(1.0)
        hosts["beta"].marsadm("log-delete", "r0")
        gamma_pos = status("gamma")["applied"].split(",")[0]
        kept = [p.name for p in (hosts["beta"].root / "resource-r0").glob("log-*")]
        assert gamma_pos in kept, "deleted a logfile the slowest member still needs"
        hosts["gamma"].marsadm("resume-fetch", "r0")
        in_sync("beta")
        for n in ("alpha", "gamma"):
            hosts[n].marsadm("pause-replay", "r0")
        assert devs["alpha"].read() == devs["beta"].read() == devs["gamma"].read()
    finally:
        for h in hosts.values():
            h.stop()
        for d in devs.values():
            d.close()


def grow(dev: BlockDev, size: int) -> None:
    with open(dev.image, "r+b") as f:
        f.truncate(size)
    if dev.loop:
        subprocess.run(["losetup", "-c", dev.loop], check=True)


def test_online_resize_syncs_the_new_tail(pair: Pair) -> None:
    a, b = pair.hosts["alpha"], pair.hosts["beta"]
    new = SIZE + (16 << 20)
    r = a.marsadm("resize", "r0", str(new), check=False)
    assert r["rc"] == 1 and "grow the device first" in r["error"]
    grow(pair.devs["alpha"], new)
    # garbage in beta's new tail: the sync must replace it with the primary's
    grow(pair.devs["beta"], new)
    with open(pair.devs["beta"].image, "r+b") as f:
        f.seek(SIZE)
        f.write(b"\xab" * (1 << 20))
    r = a.marsadm("resize", "r0", str(SIZE - 4096), check=False)
    assert r["rc"] == 1 and "shrinking" in r["error"]
    deadline = time.monotonic() + 20
    while a.marsadm("resize", "r0")["size"] != new:  # grown sizes travel with the metadata
        assert time.monotonic() < deadline, "the grown devices were never seen"
        time.sleep(0.5)
    assert a.marsadm("resize", "r0")["changed"] is False
    w = pair.writer("alpha", 1.5, seed=61, min_acks=21)  # a new client sees the new size
    assert w.communicate(timeout=60)[0].count("\nA ") > 20
    from conftest import nbd_client
    assert nbd_client(a.nbd_uri("r0"), "info").stdout.split()[0] == str(new)
    nbd_client(a.nbd_uri("r0"), "pwrite", str(new - 4096), "5a" * 4096)
    pair.wait_in_sync("alpha", "beta")
    b.marsadm("pause-replay", "r0")
    assert pair.devs["alpha"].read() == pair.devs["beta"].read()
    assert pair.devs["beta"].read(new - 4096, 4096) == b"\x5a" * 4096


def test_leave_and_delete_resource(pair: Pair) -> None:
    a, b = pair.hosts["alpha"], pair.hosts["beta"]
    r = a.marsadm("leave-resource", "r0", check=False)
    assert r["rc"] == 1 and "primary" in r["error"]
    r = a.marsadm("delete-resource", "r0", check=False)
    assert r["rc"] == 1 and "beta" in r["error"]
    assert b.marsadm("leave-resource", "r0")["changed"]
    # the departure travels with the metadata
    wait_until(lambda: list(a.marsadm("view")["resources"]["r0"]["members"]) == ["alpha"],
               "alpha sees beta gone")
    assert a.marsadm("delete-resource", "r0")["changed"]
    assert a.marsadm("view")["resources"] == {}
    assert not list((a.root / "resource-r0").glob("log-*"))


def test_handover_times_out_while_lagging_and_leaves_everything_as_it_was(pair: Pair) -> None:
    a, b = pair.hosts["alpha"], pair.hosts["beta"]
    b.marsadm("pause-replay", "r0")
    src = pair.hosts["alpha"].root.parent / "backlog"
    import os
    src.write_bytes(os.urandom(60 << 20))
    subprocess.run(["nbdcopy", str(src), a.nbd_uri("r0")], check=True, timeout=120)
    # beta knows the whole backlog (else it has nothing to catch up with yet)
    end = LogPosition.decode(pair.status("alpha")["log_end"])
    wait_until(lambda: (pair.status("beta").get("fetch_logfile"),
                        pair.status("beta").get("fetch_local_end")) == (end.logfile, end.offset),
               "beta fetches alpha's log")
    b.marsadm("resume-replay", "r0")
    r = b.marsadm("primary", "r0", "--timeout", "0.01", check=False)
    if r["rc"] == 0:
        pytest.skip("beta replayed 60 MiB before the timeout could expire")
    # the timeout expires while beta catches up (no change yet) or, when beta replayed the
    # backlog before its first look (a busy machine's marsadm starts slowly), while it waits
    # for alpha to end its log: then alpha is made the primary again
    assert r["rc"] == 3, r
    # (or, on a busy machine, before marsd even answered the first status question)
    assert any(why in r["error"] for why in ("catch up", "to end its log", "did not answer")), r
    assert b.marsadm("view")["resources"]["r0"]["primary"] == "alpha"
    wait_until(lambda: pair.status("alpha").get("role") == "primary", "alpha is the primary")
    assert a.marsadm("view")["resources"]["r0"]["primary"] == "alpha"
    r = b.marsadm("primary", "r0", "--timeout", "60")
    assert r["changed"] and pair.status("beta").get("role") == "primary"


def test_resize_while_a_secondary_is_down_syncs_its_tail_when_it_returns(pair: Pair) -> None:
    a, b = pair.hosts["alpha"], pair.hosts["beta"]
    new = SIZE + (8 << 20)
    grow(pair.devs["alpha"], new)
    grow(pair.devs["beta"], new)
    with open(pair.devs["beta"].image, "r+b") as f:
        f.seek(SIZE)
        f.write(b"\xcd" * (1 << 20))
    deadline = time.monotonic() + 20
    while b.marsadm("view")["resources"]["r0"]["members"]["beta"]["device"] and \
            int((a.root / "resource-r0" / "device-size-beta").readlink().name
                if (a.root / "resource-r0" / "device-size-beta").is_symlink() else 0) < new:
        assert time.monotonic() < deadline, "beta's grown device was never published"
        time.sleep(0.3)
    b.marsadm("down", "r0")
    assert a.marsadm("resize", "r0", str(new))["size"] == new
    from conftest import nbd_client
    nbd_client(a.nbd_uri("r0"), "pwrite", str(new - 8192), "77" * 8192)
    b.marsadm("up", "r0")
    pair.wait_in_sync("alpha", "beta")
    b.marsadm("pause-replay", "r0")
    assert pair.devs["alpha"].read() == pair.devs["beta"].read()
