"""Replication between two real marsd processes on loopback addresses: join with a full
sync under writes, fetch and replay, consistency of every sample, faults."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    NBD_CLIENT,
    SYSTEM_PYTHON,
    BlockDev,
    HostPair,
    MarsHost,
    WriterLines,
    loopback_ips,
    nbd_client,
    needs_libnbd,
    state_at,
    wait_in_sync,
    wait_until,
)

from marslib.formats.frame import MAGIC
from marslib.position import LogPosition

pytestmark = needs_libnbd
SIZE = 64 << 20


class Pair(HostPair):
    def status(self, host: MarsHost) -> dict:  # type: ignore[type-arg]
        return host.status()

    def wait_up_to_date(self, timeout: float = 60) -> dict:  # type: ignore[type-arg]
        return wait_in_sync(self.a, self.b, timeout)

    def writer(self, seconds: float, seed: int = 1, qd: int = 8,
               min_acks: int = 0) -> subprocess.Popen[str]:
        """Writes for ``seconds`` and until ``min_acks`` writes were acknowledged."""
        return subprocess.Popen([SYSTEM_PYTHON, str(NBD_CLIENT), self.a.nbd_uri("r0"),
                                 "writer", str(seed), str(qd), "512", str(65536), str(seconds),
                                 str(min_acks)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    p.a.serve(p.dev_a.path)
    p.b.join_cluster_of(p.a)
    yield p
    p.close()


def test_join_under_writes_then_identical(pair: Pair) -> None:
    w = WriterLines(pair.writer(6, min_acks=101))
    w.wait_acks(20, "before the join")  # the join starts while the application writes
    pair.b.marsadm("join-resource", "r0", pair.dev_b.path)
    out, _ = w.finish(timeout=60)
    assert out.count("\nA ") > 100
    pair.wait_up_to_date()
    view = pair.b.marsadm("view")["resources"]["r0"]["members"]
    assert set(view) == {"alpha", "beta"} and view["beta"]["role"] == "secondary"
    assert view["beta"]["state"] == "UpToDate" and view["beta"]["lag_bytes"] == 0
    assert view["alpha"]["state"] == "Primary"
    pair.b.marsadm("pause-replay", "r0")
    assert pair.b.marsadm("view")["resources"]["r0"]["members"]["beta"]["state"] == \
        "ReplayPaused"
    assert pair.dev_a.read() == pair.dev_b.read(), "devices differ after catching up"


def test_every_sample_is_a_consistent_prefix(pair: Pair) -> None:
    pair.b.marsadm("join-resource", "r0", pair.dev_b.path, "--wait")
    w = pair.writer(8, seed=3)
    samples = 0
    try:
        for _ in range(5):
            time.sleep(random.uniform(0.5, 1.2))
            pair.b.marsadm("pause-replay", "r0")
            pos = LogPosition.decode(pair.status(pair.b)["applied"])
            got = pair.dev_b.read()
            want = state_at(pair.a.root, pos, SIZE)
            assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), \
                f"secondary at {pos.encode()} is not the primary's state at that position"
            samples += 1
            pair.b.marsadm("resume-replay", "r0")
    finally:
        w.communicate(timeout=60)
    assert samples == 5
    pair.wait_up_to_date()


def test_bit_flip_in_fetched_logfile_is_never_applied(pair: Pair) -> None:
    pair.b.marsadm("join-resource", "r0", pair.dev_b.path, "--wait")
    pair.wait_up_to_date()
    pair.b.marsadm("pause-replay", "r0")
    for i in range(50):
        nbd_client(pair.a.nbd_uri("r0"), "pwrite", str(i * 65536), f"{i:02x}" * 8192)
    applied = LogPosition.decode(pair.status(pair.b)["applied"])
    path = pair.b.root / "resource-r0" / applied.logfile
    # fetch has brought all of them (and appends no more while the flip is written)
    end = LogPosition.decode(pair.status(pair.a)["log_end"])
    assert end.logfile == applied.logfile
    wait_until(lambda: (pair.status(pair.b).get("fetch_logfile"),
                        pair.status(pair.b).get("fetch_local_end")) == (end.logfile, end.offset),
               "fetch brings the new records")
    with open(path, "r+b") as f:
        f.seek(applied.offset + 3000)  # inside the first unapplied record's payload
        byte = f.read(1)[0]
        f.seek(applied.offset + 3000)
        f.write(bytes([byte ^ 0x10]))
    pair.b.marsadm("resume-replay", "r0")
    st = pair.wait_up_to_date()
    assert st["corrupt_refetched"] >= 1
    assert "not applied, fetching it again" in pair.b.logtail(200)
    pair.b.marsadm("pause-replay", "r0")
    assert pair.dev_a.read() == pair.dev_b.read()


def test_kill9_of_either_side_while_writing(pair: Pair) -> None:
    pair.b.marsadm("join-resource", "r0", pair.dev_b.path, "--wait")
    w = WriterLines(pair.writer(120, seed=5))
    w.wait_acks(40, "before beta's kill")
    pair.b.kill9()
    w.wait_acks(80, "while beta is down")
    pair.b.start()
    w.wait_acks(120, "after beta's restart")
    pair.a.kill9()  # the writer sees its connection die
    out, _ = w.finish(timeout=60)
    pair.a.start()
    pair.a.marsadm("up", "r0")
    pair.wait_up_to_date()
    pair.b.marsadm("pause-replay", "r0")
    assert pair.dev_a.read() == pair.dev_b.read()
    assert out.count("\nA ") > 100


def _raw_connect(ip: str, port: int) -> socket.socket:
    s = socket.create_connection((ip, port), timeout=5)
    s.settimeout(5)
    return s


def test_bad_peers_are_refused_and_the_daemon_keeps_serving(pair: Pair) -> None:
    pair.b.marsadm("join-resource", "r0", pair.dev_b.path, "--wait")
    import asyncio

    from marslib.net.conn import connect

    async def wrong_secret(channel: str, port: int) -> str:
        try:
            await connect(pair.a.ip, port, host="mallory", uuid=pair.a.marsadm("view")["cluster"],
                          secret=b"not-the-cluster-secret", channel=channel)
        except Exception as exc:  # noqa: BLE001 - any refusal is what we want
            return str(exc)
        return "accepted"

    for channel, port in (("meta", 7777), ("fetch", 7778), ("sync", 7779)):
        assert "authentication failed" in asyncio.run(wrong_secret(channel, port))
        # garbage: the connection is closed, nothing is sent back but an error
        s = _raw_connect(pair.a.ip, port)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        assert s.recv(65536) == b"", "garbage did not close the connection"
        s.close()
        # an oversized frame
        s = _raw_connect(pair.a.ip, port)
        s.sendall(struct.pack("<IHHII", MAGIC, 1, 1, 1 << 30, 0))
        assert s.recv(65536) == b"", "an oversized frame did not close the connection"
        s.close()
    log = pair.a.logtail(300)
    assert "authentication failed" in log and "bad frame magic" in log
    assert "oversized frame" in log
    # a wrong cluster uuid
    async def wrong_uuid() -> str:
        try:
            await connect(pair.a.ip, 7777, host="x", uuid="other-cluster",
                          secret=b"another-clusters-secret", channel="meta")
        except Exception as exc:  # noqa: BLE001
            return str(exc)
        return "accepted"
    assert "wrong cluster" in asyncio.run(wrong_uuid())
    # still replicating
    nbd_client(pair.a.nbd_uri("r0"), "pwrite", "0", "ee" * 4096)
    pair.wait_up_to_date()
    pair.b.marsadm("pause-replay", "r0")
    assert pair.dev_b.read(0, 4096) == b"\xee" * 4096


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    import os
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small filesystem as /mars")
    image, mnt = tmp_path / "small.img", tmp_path / "small"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(48 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_emergency_mode_keeps_the_primary_writing(tmp_path: Path, small_fs: Path) -> None:
    import os
    ip_a, ip_b = loopback_ips(2)
    a = MarsHost(small_fs, "alpha", ip_a)
    b = MarsHost(tmp_path / "b", "beta", ip_b)
    dev_a, dev_b = BlockDev(tmp_path / "a.img", SIZE), BlockDev(tmp_path / "b.img", SIZE)
    limits = ("--space-limits", "warn=24M,drop=20M,no-fetch=16M,emergency=12M")
    try:
        a.serve(dev_a.path, *limits)
        b.join(a, dev_b.path)
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        (small_fs / "filler").write_bytes(bytes(free - (14 << 20)))
        w = subprocess.Popen([SYSTEM_PYTHON, str(NBD_CLIENT), a.nbd_uri("r0"), "writer", "9",
                              "4", "512", "65536", "8", "101"], stdout=subprocess.PIPE,
                             text=True)
        out, _ = w.communicate(timeout=120)
        assert "E " not in out, "the primary stopped serving in emergency mode"
        assert out.count("\nA ") > 100
        from marslib import control
        st = control.request(a.run_dir / "marsd.sock", "status")["resources"]["r0"]
        assert st["emergency"] and st["direct_writes"] > 0
        # the secondary is consistent at the last logged position
        bst = control.request(b.run_dir / "marsd.sock", "status")["resources"]["r0"]
        b.marsadm("pause-replay", "r0")
        pos = LogPosition.decode(control.request(b.run_dir / "marsd.sock", "status")
                                 ["resources"]["r0"]["applied"])
        assert dev_b.read() == state_at(a.root, pos, SIZE)
        assert dev_b.read() != dev_a.read(), "direct writes reached the secondary?"
        b.marsadm("resume-replay", "r0")
        # room again: the primary logs in a new logfile after a history gap
        (small_fs / "filler").unlink()
        deadline = time.monotonic() + 30
        while control.request(a.run_dir / "marsd.sock", "status")["resources"]["r0"][
                "emergency"]:
            assert time.monotonic() < deadline, "primary never left emergency mode"
            time.sleep(0.2)
        nbd_client(a.nbd_uri("r0"), "pwrite", "0", "ab" * 4096)
        deadline = time.monotonic() + 30
        while "outdated" not in str(bst.get("replay_error")):
            assert time.monotonic() < deadline, f"secondary did not report the gap: {bst}"
            time.sleep(0.2)
            bst = control.request(b.run_dir / "marsd.sock", "status")["resources"]["r0"]
        b.marsadm("invalidate", "r0", "--wait")
        wait_in_sync(a, b)
        b.marsadm("pause-replay", "r0")
        assert dev_a.read() == dev_b.read()
    finally:
        a.stop()
        b.stop()
        dev_a.close()
        dev_b.close()


def test_prometheus_metrics_show_roles_lag_and_space(pair: Pair) -> None:
    import urllib.request
    pair.b.marsadm("join-resource", "r0", pair.dev_b.path, "--wait")
    pair.b.marsadm("pause-replay", "r0")
    for i in range(20):
        nbd_client(pair.a.nbd_uri("r0"), "pwrite", str(i * 4096), "cd" * 4096)

    def scrape(h: MarsHost) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://{h.ip}:9577/metrics", timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    deadline = time.monotonic() + 20
    while True:
        b = scrape(pair.b)
        if b.get('mars_replica_lag_bytes{resource="r0"}', 0) > 20 * 4096:
            break
        assert time.monotonic() < deadline, f"lag never showed: {b}"
        time.sleep(0.3)
    assert b['mars_resource_role{resource="r0",role="secondary"}'] == 1.0
    assert b['mars_replica_lag_seconds{resource="r0"}'] > 0
    assert b["mars_free_bytes"] > 0 and b["mars_space_level"] == 0
    assert b['mars_peer_connected{peer="alpha"}'] == 1.0
    a = scrape(pair.a)
    assert a['mars_resource_role{resource="r0",role="primary"}'] == 1.0
    assert a['mars_primary_writes_total{resource="r0"}'] >= 20
    pair.b.marsadm("resume-replay", "r0")
    pair.wait_up_to_date()
    deadline = time.monotonic() + 20
    while scrape(pair.b)['mars_replica_lag_bytes{resource="r0"}'] != 0:
        assert time.monotonic() < deadline, "lag did not return to 0"
        time.sleep(0.3)
    assert scrape(pair.b)['mars_replica_lag_seconds{resource="r0"}'] == 0


def test_sync_resumes_after_a_crash_of_the_secondary(tmp_path: Path) -> None:
    ip_a, ip_b = loopback_ips(2)
    a, b = MarsHost(tmp_path / "a", "alpha", ip_a), MarsHost(tmp_path / "b", "beta", ip_b)
    big = 256 << 20
    dev_a, dev_b = BlockDev(tmp_path / "a.img", big), BlockDev(tmp_path / "b.img", big)
    try:
        a.serve(dev_a.path)
        src = tmp_path / "payload"
        src.write_bytes(os.urandom(big))
        subprocess.run(["nbdcopy", str(src), a.nbd_uri("r0")], check=True, timeout=300)
        b.join_cluster_of(a)
        b.marsadm("join-resource", "r0", dev_b.path)
        key = b.root / "resource-r0" / "syncstatus-beta"
        deadline = time.monotonic() + 60
        while True:
            done = int(os.readlink(key).split("/")[0]) if "/" in os.readlink(key) else -1
            if 0 < done < big:
                break
            assert done != -1 and time.monotonic() < deadline, "sync finished too fast"
            time.sleep(0.05)
        b.kill9()
        b.start()
        b.marsadm("wait-resource", "r0", "sync-off", "--timeout", "300")
        assert "resumes at" in b.logtail(400), "the sync started over instead of resuming"
        nbd_client(a.nbd_uri("r0"), "pwrite", "0", "99" * 4096)
        wait_in_sync(a, b)
        b.marsadm("pause-replay", "r0")
        assert hashlib.sha256(dev_a.read()).digest() == hashlib.sha256(dev_b.read()).digest()
    finally:
        a.stop()
        b.stop()
        dev_a.close()
        dev_b.close()


def test_logfiles_are_kept_until_every_member_applied_them(pair: Pair) -> None:
    pair.b.marsadm("join-resource", "r0", pair.dev_b.path, "--wait")
    pair.wait_up_to_date()
    pair.b.marsadm("pause-fetch", "r0")
    uri = pair.a.nbd_uri("r0")
    rotated = []
    for i in range(3):
        nbd_client(uri, "pwrite", str(i * 4096), f"{i + 1:02x}" * 4096)
        rotated.append(pair.a.marsadm("log-rotate", "r0")["logfile"])
    time.sleep(1.0)  # a negative check: what beta's positions could tell alpha by now
    kept = pair.a.marsadm("log-delete", "r0")
    assert kept["deleted"] == [], "deleted logfiles that beta has not fetched yet"
    pair.b.marsadm("resume-fetch", "r0")
    pair.wait_up_to_date()
    # beta's applied position reaches alpha with the metadata
    wait_until(lambda: len(pair.a.marsadm("log-delete", "r0", "--dry-run")["deleted"]) >= 3,
               "alpha learns that beta applied the rotated logfiles")
    done = pair.a.marsadm("log-delete", "r0")
    assert len(done["deleted"]) >= 3
    left = pair.a.marsadm("view")["resources"]["r0"]["logfiles"]
    assert left == [rotated[-1]]
    pair.b.marsadm("pause-replay", "r0")
    assert pair.dev_b.read(0, 3 * 4096) == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096
