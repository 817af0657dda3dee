"""Replication across the lab's real network (namespaces, veth, bridge, tc, iptables):
a 30 s partition, bandwidth collapsing 100x in bursts, join over ssh. After each fault:
no acknowledged write lost, every sample of the secondary a consistent prefix, and it
catches up by itself."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, NBD_CLIENT, SYSTEM_PYTHON, WriterLines, have_libnbd, state_at

from marslib.position import LogPosition

pytestmark = pytest.mark.skipif(not IS_ROOT or not have_libnbd(),
                                reason="the lab needs root (namespaces) and libnbd")
SIZE = 128 << 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from marslib.lab import Lab
    from marslib.lab.scenario import replicate
    lab = Lab.up(hosts=2, device_size="128M", lab_dir=tmp_path_factory.mktemp("lab"))
    try:
        replicate(lab, timeout=120)  # the real join path: ssh with the lab key into lab1
        yield lab
    finally:
        lab.down()


def status(lab, host: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return lab.marsadm(host, "view")["resources"]["r0"]["members"][host]


def wait_caught_up(lab, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        a, b = status(lab, "lab1"), status(lab, "lab2")
        if b.get("applied") == a.get("log_end") and b.get("state") == "UpToDate":
            return
        assert time.monotonic() < deadline, f"lab2 never caught up: {b} vs {a}"
        time.sleep(0.3)


def sample_is_consistent(lab) -> LogPosition:  # type: ignore[no-untyped-def]
    """Pause replay on lab2, compare its device with lab1's history at that position."""
    lab.marsadm("lab2", "pause-replay", "r0")
    try:
        pos = LogPosition.decode(status(lab, "lab2")["applied"])
        got = lab.host("lab2").images[0].read_bytes()[:SIZE]
        want = state_at(lab.host("lab1").root, pos, SIZE)
        assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), \
            f"lab2 at {pos.encode()} is not lab1's state at that position"
        return pos
    finally:
        lab.marsadm("lab2", "resume-replay", "r0")


def writer(lab, seconds: float, seed: int,  # type: ignore[no-untyped-def]
           min_acks: int = 0) -> subprocess.Popen[str]:
    """A writer on lab1 for ``seconds`` and until ``min_acks`` writes were acknowledged."""
    uri = f"nbd+unix:///r0?socket={lab.host('lab1').run_dir / 'r0.nbd'}"
    return lab.popen("lab1", SYSTEM_PYTHON, str(NBD_CLIENT), uri, "writer", str(seed), "8",
                     "1024", "65536", str(seconds), str(min_acks), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)


def identical(lab) -> None:  # type: ignore[no-untyped-def]
    wait_caught_up(lab)
    lab.marsadm("lab2", "pause-replay", "r0")
    try:
        a = lab.host("lab1").images[0].read_bytes()[:SIZE]
        b = lab.host("lab2").images[0].read_bytes()[:SIZE]
        assert a == b, "devices differ after catching up"
    finally:
        lab.marsadm("lab2", "resume-replay", "r0")


def test_partition_for_30s_then_heal(lab) -> None:  # type: ignore[no-untyped-def]
    w = WriterLines(writer(lab, 40, seed=21, min_acks=501))
    w.wait_acks(50, "before the partition")  # the partition cuts a replicating stream
    lab.partition("lab1", "lab2")
    t = time.monotonic()
    positions = []
    try:
        # at least 30 s and at least four samples, however long a sample takes
        while time.monotonic() - t < 30 or len(positions) < 4:
            time.sleep(6)
            positions.append(sample_is_consistent(lab))
        assert status(lab, "lab2")["state"] == "Disconnected", \
            "lab2 cannot claim to be up to date through a partition while lab1 writes"
    finally:
        lab.heal("lab1", "lab2")
    out, _ = w.finish(timeout=120)
    assert "E " not in out, "the primary stopped serving during the partition"
    assert out.count("\nA ") > 500
    identical(lab)
    assert len(positions) >= 4


def test_bandwidth_collapsing_100x_in_bursts(lab) -> None:  # type: ignore[no-untyped-def]
    stop = threading.Event()

    def flap() -> None:
        fast = True
        while not stop.is_set():
            lab.shape("lab2", rate="100mbit" if fast else "1mbit")
            fast = not fast
            stop.wait(1.0)

    w = writer(lab, 12, seed=22, min_acks=201)
    flapper = threading.Thread(target=flap)
    flapper.start()
    try:
        for _ in range(3):
            time.sleep(3)
            sample_is_consistent(lab)
    finally:
        stop.set()
        flapper.join()
        lab.clear_shape("lab2")
    out, _ = w.communicate(timeout=120)
    assert out.count("\nA ") > 200 and "E " not in out
    t = time.monotonic()
    identical(lab)
    print(f"caught up {time.monotonic() - t:.1f}s after the bursts ended")


def test_kill9_of_secondary_over_the_network(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    w = WriterLines(writer(lab, 120, seed=23))
    w.wait_acks(50, "before lab2's kill")
    lab.marsd_kill("lab2")
    w.wait_acks(100, "while lab2 is down")
    lab.marsd_start("lab2")
    w.wait_acks(150, "after lab2's restart")
    w.writer.terminate()  # the application stops
    out, _ = w.finish(timeout=120)
    assert out.count("\nA ") >= 150
    identical(lab)
