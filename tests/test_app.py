"""mars-app, the demo application: its record format, writer and verification on plain
directories, then the real thing on a primary's NBD export (nbdfuse + loop + ext4/xfs):
start/stop/verify, idempotence, leftovers of a killed run, corruption, grow, and a handover
to a second host that verifies against the first host's acknowledgement ledger."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, REPO, BlockDev, MarsHost, loopback_ips, wait_in_sync, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from marslib.app.records import (
    CHUNK_SIZE,
    Record,
    RecordError,
    chunk_name,
    decode_from,
    header_len,
)
from marslib.app.verify import VerifyFailed, verify_data
from marslib.app.volume import AppError, process_alive, read_pid
from marslib.app.writer import Writer

HOSTS = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-."), min_size=1,
                max_size=40)


# ------------------------------------------------------------------ the record format
@given(seq=st.integers(1, 2**64 - 1), time_ns=st.integers(0, 2**64 - 1), host=HOSTS,
       payload=st.binary(max_size=5000))
def test_record_round_trip(seq: int, time_ns: int, host: str, payload: bytes) -> None:
    rec = Record(seq, time_ns, host, payload)
    data = rec.encode()
    assert len(data) == rec.size == header_len(host) + len(payload)
    assert Record.decode(data) == rec
    # in a stream: the record ends where the next begins
    back, end = decode_from(data + data, len(data))
    assert back == rec and end == 2 * len(data)


@settings(max_examples=400)
@given(seq=st.integers(1, 2**64 - 1), host=HOSTS, size=st.integers(64, 4096),
       data=st.data())
def test_any_bit_flip_is_detected(seq: int, host: str, size: int, data: st.DataObject) -> None:
    raw = bytearray(Record.make(seq, host, max(size, header_len(host))).encode())
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RecordError):
        Record.decode(raw)


@settings(max_examples=300)
@given(seq=st.integers(1, 2**40), data=st.data())
def test_any_overwrite_of_up_to_four_bytes_is_detected(seq: int, data: st.DataObject) -> None:
    """A burst of at most 32 bits never passes a 32-bit CRC (the length fields are checked
    against each other and against the buffer first)."""
    raw = bytearray(Record.make(seq, "lab1", 4096).encode())
    at = data.draw(st.integers(0, len(raw) - 1))
    new = data.draw(st.binary(min_size=1, max_size=min(4, len(raw) - at)))
    if bytes(raw[at:at + len(new)]) == new:
        return
    raw[at:at + len(new)] = new
    with pytest.raises(RecordError):
        Record.decode(raw)


def test_record_sizes_and_truncation() -> None:
    rec = Record.make(7, "lab1", 4096, time_ns=123)
    raw = rec.encode()
    assert len(raw) == 4096 and rec.payload[:8] == (7).to_bytes(8, "little")
    with pytest.raises(ValueError, match="smaller than its header"):
        Record.make(1, "lab1", 20)
    for cut in (1, 31, 32, len(raw) - 1):
        with pytest.raises(RecordError) as exc:
            decode_from(raw[:cut], 0)
        assert exc.value.incomplete
    with pytest.raises(RecordError, match="bytes after the record"):
        Record.decode(raw + b"\0")


# ------------------------------------------------------------------ writer + verify, no root
def write(data_dir: Path, ledger: Path, n: int, host: str = "lab1",
          size: int = 4096) -> Writer:
    w = Writer(data_dir, ledger, host, "r0", record_size=size, fsync_every=7, rate=0)
    w.recover()
    w.run([False], max_records=n)
    w.close()
    return w


def test_writer_continues_the_sequence_and_verify_counts_hosts(tmp_path: Path) -> None:
    data, ledger = tmp_path / "data", tmp_path / "acked.json"
    w = write(data, ledger, 600, host="lab1")
    assert (w.start_seq, w.seq, w.acked) == (1, 600, 600)
    assert json.loads(ledger.read_text())["seq"] == 600
    # 256 records of 4 KiB per 1 MiB chunk
    assert [p.stat().st_size for p in sorted(data.iterdir())] == [CHUNK_SIZE] * 2 + [88 * 4096]
    w = write(data, ledger, 100, host="lab3", size=1000)  # another host, another size
    assert (w.start_seq, w.seq) == (601, 700)
    ack = json.loads(ledger.read_text())
    assert (ack["seq"], ack["host"], ack["start_seq"], ack["records"]) == (700, "lab3", 601, 100)
    rep = verify_data(data, min_seq=700)
    assert (rep["records"], rep["first_seq"], rep["last_seq"]) == (700, 1, 700)
    assert rep["hosts"] == {"lab1": 600, "lab3": 100} and rep["torn_tail"] is None
    assert rep["bytes"] == 600 * 4096 + 100 * 1000
    with pytest.raises(VerifyFailed, match="seq 701 was acknowledged: 1 acknowledged"):
        verify_data(data, min_seq=701)


def test_writer_keeps_its_rate(tmp_path: Path) -> None:
    w = Writer(tmp_path / "data", tmp_path / "acked.json", "lab1", "r0", record_size=512,
               fsync_every=20, rate=400)
    w.recover()
    t0 = time.monotonic()
    w.run([False], max_records=81)  # the first record is due at once, then one per 2.5 ms
    elapsed = time.monotonic() - t0
    w.close()
    assert 0.19 < elapsed < 5, elapsed
    assert verify_data(tmp_path / "data", min_seq=81)["bytes"] == 81 * 512


def test_torn_tail_is_tolerated_on_request_and_cut_off_by_the_next_writer(
        tmp_path: Path) -> None:
    data, ledger = tmp_path / "data", tmp_path / "acked.json"
    write(data, ledger, 300)
    newest = data / chunk_name(1)
    good = newest.stat().st_size
    with open(newest, "ab") as f:  # a record the crash cut short
        f.write(Record.make(301, "lab1", 4096).encode()[:1500])
    with pytest.raises(VerifyFailed, match=f"chunk-000001 offset {good}: torn record"):
        verify_data(data)
    rep = verify_data(data, allow_torn_tail=True)
    assert rep["last_seq"] == 300 and rep["torn_tail"]["offset"] == good
    # zeros the filesystem allocated but that were never written count as torn too
    with open(newest, "ab") as f:
        f.write(bytes(5000))
    assert verify_data(data, allow_torn_tail=True)["torn_tail"]["chunk"] == "chunk-000001"
    w = write(data, ledger, 5)
    assert w.repaired is not None and w.repaired["offset"] == good
    assert (w.start_seq, w.seq) == (301, 305)
    assert verify_data(data, min_seq=305)["records"] == 305


def test_verify_names_the_chunk_and_offset_of_damage(tmp_path: Path) -> None:
    data, ledger = tmp_path / "data", tmp_path / "acked.json"
    write(data, ledger, 700)
    chunk1 = data / chunk_name(1)
    original = chunk1.read_bytes()
    with open(chunk1, "r+b") as f:  # damage in the middle of record 5 of chunk 1
        f.seek(5 * 4096 + 2000)
        f.write(b"\xff\x00\xff")
    with pytest.raises(VerifyFailed) as exc:
        verify_data(data, allow_torn_tail=True)  # not a torn tail: never tolerated
    assert "chunk-000001 offset 20480" in str(exc.value) and "crc mismatch" in str(exc.value)
    assert exc.value.report["chunk"] == "chunk-000001"
    assert exc.value.report["offset"] == 20480 and exc.value.report["last_seq"] == 256 + 5
    # a damaged data set is not written to
    damaged_newest = data / chunk_name(2)
    saved = damaged_newest.read_bytes()
    with open(damaged_newest, "r+b") as f:
        f.seek(4096 + 100)
        f.write(b"!")
    with pytest.raises(AppError, match="chunk-000002 offset 4096: crc mismatch"):
        write(data, ledger, 1)
    damaged_newest.write_bytes(saved)
    # a record out of place: seq 2 where seq 1 is expected
    chunk1.write_bytes(original)
    chunk0 = data / chunk_name(0)
    c0 = chunk0.read_bytes()
    chunk0.write_bytes(c0[4096:])
    with pytest.raises(VerifyFailed, match="chunk-000000 offset 0: seq 2 where 1 was expected"):
        verify_data(data)
    chunk0.write_bytes(c0)
    # a lost chunk
    chunk1.unlink()
    with pytest.raises(VerifyFailed, match="chunk-000001 is missing"):
        verify_data(data)


# ------------------------------------------------------------------ the real thing
pytest_root = pytest.mark.skipif(
    not IS_ROOT or not all(shutil.which(t) for t in ("nbdfuse", "fusermount3", "nbdinfo",
                                                     "mkfs.ext4", "mkfs.xfs")),
    reason="needs root, nbdfuse and nbdinfo (libnbd-bin), fusermount3, e2fsprogs, xfsprogs")


class App:
    """mars-app as an operator (or Ansible) runs it on one host."""

    def __init__(self, host: MarsHost, state: Path) -> None:
        self.host = host
        self.state = state
        self.env = {**host.env, "MARS_APP_DIR": str(state), "PYTHONPATH": str(REPO)}

    def __call__(self, *args: str, check: bool = True) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "marslib.app.cli", *args, "--json"],
                             capture_output=True, text=True, env=self.env, timeout=120)
        try:
            reply: dict[str, Any] = json.loads(out.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"mars-app {args}: no JSON: {out.stdout!r} {out.stderr}") \
                from None
        reply["rc"] = out.returncode
        if check and out.returncode != 0:
            raise AssertionError(f"mars-app {' '.join(args)} on {self.host.name} failed: "
                                 f"{reply}\n{out.stderr}\n{self.writer_log()}")
        return reply

    def writer_log(self) -> str:
        try:
            return (self.state / "r0" / "writer.log").read_text()[-2000:]
        except FileNotFoundError:
            return "(no writer log)"

    def acked(self) -> int:
        return int(json.loads((self.state / "r0" / "acked.json").read_text())["seq"])

    def wait_acked(self, seq: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.acked() < seq:
            assert time.monotonic() < deadline, f"the writer never acknowledged seq {seq}"
            time.sleep(0.05)

    def cleanup(self) -> None:
        self("stop", "r0", check=False)


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[tuple[MarsHost, BlockDev, App]]:
    dev = BlockDev(tmp_path / "data.img", 64 << 20)
    h = MarsHost(tmp_path, "alpha", loopback_ips(1)[0])
    app = App(h, tmp_path / "app")
    try:
        h.serve(dev.path)
        yield h, dev, app
    finally:
        app.cleanup()
        h.stop()
        dev.close()


@pytest_root
def test_start_stop_verify_and_continue(primary: tuple[MarsHost, BlockDev, App]) -> None:
    host, _, app = primary
    r = app("start", "r0", check=False)
    assert r["rc"] == 1 and "--mkfs" in r["error"]
    r = app("start", "r0", "--mkfs", "--rate", "1000")
    assert r["changed"] and r["mkfs"] and r["fs"] == "ext4" and r["start_seq"] == 1
    assert r["acked_seq"] >= 1  # it returned after the first fsync
    again = app("start", "r0", "--mkfs", "--rate", "1000")
    assert not again["changed"] and again["pid"] == r["pid"]
    app.wait_acked(600)
    st = app("status", "r0")
    assert st["running"] and st["mounted"] and st["pid"] == r["pid"] and st["fs"] == "ext4"
    assert st["last_seq"] >= st["acked_seq"] >= 600 and st["first_seq"] == 1
    live = app("verify", "r0", "--allow-torn-tail")  # while the writer runs
    assert live["ok"] and not live["attached_for_check"] and live["last_seq"] >= 600
    stop = app("stop", "r0")
    assert stop["changed"] and stop["stopped_pid"] == r["pid"] and not stop["killed"]
    acked = stop["acked_seq"]
    assert acked >= live["last_seq"]
    assert not app("stop", "r0")["changed"]
    st = app("status", "r0")
    assert not st["running"] and not st["mounted"] and st["acked_seq"] == acked
    v = app("verify", "r0", "--min-seq", str(acked))
    assert v["attached_for_check"] and v["first_seq"] == 1 and v["last_seq"] == acked
    assert v["records"] == acked and v["hosts"] == {"alpha": acked}
    assert not app("status", "r0")["mounted"]  # the check detached again
    r = app("verify", "r0", "--min-seq", str(acked + 1), check=False)
    assert r["rc"] == 1 and "1 acknowledged record(s) lost" in r["error"]
    # again: the sequence goes on where it ended
    r = app("start", "r0", "--mkfs", "--rate", "1000")
    assert r["changed"] and not r["mkfs"] and r["start_seq"] == acked + 1
    app.wait_acked(acked + 300)
    acked2 = app("stop", "r0")["acked_seq"]
    v = app("verify", "r0", "--min-seq", str(acked2))
    assert v["records"] == v["last_seq"] == acked2 and v["chunks"] == (acked2 + 255) // 256


@pytest_root
def test_leftovers_of_a_killed_run_and_a_corrupted_record(
        primary: tuple[MarsHost, BlockDev, App]) -> None:
    host, _, app = primary
    r = app("start", "r0", "--mkfs", "--rate", "1000")
    app.wait_acked(300)
    # the writer alone dies: the next start reuses the healthy stack
    os.kill(r["pid"], signal.SIGKILL)
    acked = app.acked()
    r = app("start", "r0", "--rate", "1000")
    assert r["changed"] and r["cleaned"] == [] and r["start_seq"] > acked
    app.wait_acked(700)
    # everything dies at once: the writer and nbdfuse (the NBD connection) with kill -9
    state = app.state / "r0"
    nbdfuse = read_pid(state / "nbdfuse.pid")
    os.kill(r["pid"], signal.SIGKILL)
    os.kill(nbdfuse, signal.SIGKILL)
    wait_until(lambda: not process_alive(r["pid"]) and not process_alive(nbdfuse),
               "the writer and nbdfuse are dead")
    acked = app.acked()  # durable: fsynced through FUSE and NBD before it was written
    st = app("status", "r0")
    assert not st["running"] and not st["mounted"] and "writer_died" in st
    r = app("start", "r0", "--rate", "1000")
    assert r["changed"] and r["cleaned"], "the dead mount, loop and FUSE were not cleaned up"
    assert r["start_seq"] > acked, "acknowledged records were lost"
    app.wait_acked(r["start_seq"] + 100)
    # damage a record in the middle of the first chunk through the mount, writer running
    with open(state / "mnt" / "data" / chunk_name(0), "r+b") as f:
        f.seek(3 * 4096 + 1000)
        f.write(b"damage")
        f.flush()
        os.fsync(f.fileno())
    r = app("verify", "r0", "--allow-torn-tail", check=False)
    assert r["rc"] == 1 and "chunk-000000 offset 12288" in r["error"], r
    assert (r["chunk"], r["offset"], r["last_seq"]) == ("chunk-000000", 12288, 3)
    acked = app("stop", "r0")["acked_seq"]
    r = app("verify", "r0", "--min-seq", str(acked), check=False)  # found from scratch too
    assert r["rc"] == 1 and r["attached_for_check"] and "chunk-000000 offset 12288: bad " \
        "record after seq 3: crc mismatch" in r["error"], r


def grow_device(dev: BlockDev, size: int) -> None:
    with open(dev.image, "r+b") as f:
        f.truncate(size)
    if dev.loop:
        subprocess.run(["losetup", "-c", dev.loop], check=True)


@pytest_root
@pytest.mark.parametrize("fs", ["ext4", pytest.param("xfs", marks=pytest.mark.soak)])
def test_grow_after_a_resize(tmp_path: Path, fs: str) -> None:
    """xfs (a soak test: its mkfs takes about a minute through FUSE and NBD here) needs
    300 MiB at least."""
    old, new = (64 << 20, 96 << 20) if fs == "ext4" else (320 << 20, 448 << 20)
    dev = BlockDev(tmp_path / "data.img", old)
    h = MarsHost(tmp_path, "alpha", loopback_ips(1)[0])
    app = App(h, tmp_path / "app")
    try:
        h.serve(dev.path)
        r = app("start", "r0", "--mkfs", "--fs", fs, "--rate", "500", "--fsync-every", "5")
        assert r["fs"] == fs
        g = app("grow", "r0")  # nothing to grow yet
        assert not g["changed"] and g["old_fs_size"] == g["new_fs_size"]
        assert g["pid"] == r["pid"], "the writer was restarted for nothing"
        grow_device(dev, new)
        deadline = time.monotonic() + 20
        while h.marsadm("resize", "r0", str(new), check=False)["rc"] != 0:
            assert time.monotonic() < deadline, "the grown device was never seen"
            time.sleep(0.3)
        app.wait_acked(200)
        g = app("grow", "r0")
        assert g["changed"] and g["reattached"] and g["writer_restarted"]
        assert g["new_fs_size"] > g["old_fs_size"] + (new - old) * 9 // 10
        assert g["pid"] and g["pid"] != r["pid"]
        again = app("grow", "r0")
        assert not again["changed"] and again["pid"] == g["pid"]
        st = app("status", "r0")
        assert st["running"] and st["fs_size"] == g["new_fs_size"]
        assert st["settings"]["rate"] == 500 and st["settings"]["fsync_every"] == 5
        app.wait_acked(st["acked_seq"] + 50)
        acked = app("stop", "r0")["acked_seq"]
        v = app("verify", "r0", "--min-seq", str(acked))
        assert v["last_seq"] == v["records"] == acked
    finally:
        app.cleanup()
        h.stop()
        dev.close()


@pytest_root
def test_handover_to_a_second_host_loses_no_acknowledged_record(tmp_path: Path) -> None:
    """What the football playbook does: stop on the old primary, hand over, verify on the
    new primary against the old one's ledger, start there and go on."""
    ip_a, ip_b = loopback_ips(2)
    a, b = MarsHost(tmp_path / "a", "alpha", ip_a), MarsHost(tmp_path / "b", "beta", ip_b)
    dev_a, dev_b = BlockDev(tmp_path / "a.img", 64 << 20), BlockDev(tmp_path / "b.img", 64 << 20)
    app_a, app_b = App(a, tmp_path / "a" / "app"), App(b, tmp_path / "b" / "app")
    try:
        a.serve(dev_a.path)
        b.join(a, dev_b.path)
        app_a("start", "r0", "--mkfs", "--rate", "1000")
        r = app_b("start", "r0", "--mkfs", check=False)  # beta is a secondary
        assert r["rc"] == 1 and "not the primary" in r["error"]
        app_a.wait_acked(500)
        r = b.marsadm("primary", "r0", check=False)  # the application still runs on alpha
        assert r["rc"] == 1 and "NBD client" in r["error"]
        acked_a = app_a("stop", "r0")["acked_seq"]
        wait_in_sync(a, b)
        assert b.marsadm("primary", "r0")["changed"]
        r = app_a("start", "r0", check=False)
        assert r["rc"] == 1 and "not the primary" in r["error"]
        v = app_b("verify", "r0", "--min-seq", str(acked_a))
        assert v["last_seq"] == acked_a and v["hosts"] == {"alpha": acked_a}
        r = app_b("start", "r0", "--rate", "1000")
        assert r["start_seq"] == acked_a + 1 and not r["mkfs"]
        app_b.wait_acked(acked_a + 300)
        acked_b = app_b("stop", "r0")["acked_seq"]
        v = app_b("verify", "r0", "--min-seq", str(acked_b))
        assert v["records"] == v["last_seq"] == acked_b
        assert v["hosts"] == {"alpha": acked_a, "beta": acked_b - acked_a}
    finally:
        app_a.cleanup()
        app_b.cleanup()
        a.stop()
        b.stop()
        dev_a.close()
        dev_b.close()
