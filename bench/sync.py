"""Fast full sync benchmark: marslib's block-checksum sync against rsync and nbdcopy.

Runs on the lab (two network namespaces, ``marslib.lab``) with 1 GiB devices: lab1's
resource is filled with random data through NBD, lab2 joins (a full sync), then, on a
1gbit link (tbf on lab2's link):

* 1%    1% of the 64 KiB blocks of lab2's device overwritten behind marsd's back, then
        ``marsadm invalidate r0 --wait`` on lab2: time and bytes on lab2's wire (rx+tx of its
        eth0). Against ``rsync --inplace --no-whole-file -I`` pulling an image file with the
        same 1% difference from lab1 over ssh, in lab2, in the same run, and against the
        disk floor (``dd`` reading both devices at once, measured right before and right
        after the invalidate: other work on the machine moves it).
        Targets: marslib time <= 0.5 x rsync time and <= 1.1 x the disk floor; wire bytes
        <= 1.2 x (changed blocks + one crc32c per block).
* 100%  lab2's device zeroed, invalidate: throughput against the link rate (>= 0.9) and
        against a plain nbdcopy of the primary's export to nbdkit on lab2 over the same link.
* 1%+w  the 1% case while fio writes to lab1 at a moderate rate: time (and the result
        verified identical once the writer stopped and lab2 caught up), and the log bytes
        lab2 fetched after the sync against those it replayed (from its replay start P0 to
        the primary's end). Target: fetched / replayed <= 1.05.

Prints a table with the figures, the ratios and PASS/MISS; exits 0 whenever the
measurement itself worked. Takes ~1.7 min (``--quick``: 256 MiB devices, ~40 s); the lab is
taken down on any exit (error, Ctrl-C, SIGTERM).

    .venv/bin/python bench/sync.py [--quick] [--rate 1gbit] [--fraction 0.01] [--py-spy DIR]
                                   [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as b
from replication import MB, RES, ReplLab, lab_session, random_file, rate_bytes, ratio_row

from marslib.position import LogPosition
from marslib.sizes import parse_size

BLOCK = 64 << 10
CRC = 4  # bytes of checksum per block on the wire
NBD_PORT = 7779  # the sync port: the same path as marsd's sync connections
WRITER_RATE = 10 * 1000 * 1000  # bytes/s of the concurrent writer in the third case


# ------------------------------------------------------------------ helpers
def change_blocks(targets: list[str], size: int, fraction: float, seed: int) -> int:
    """Overwrite ``fraction`` of the 64 KiB blocks (the same blocks, the same random data)
    in every path of ``targets`` (block devices or files); returns the number of blocks."""
    rng = random.Random(seed)
    nblocks = size // BLOCK
    chosen = sorted(rng.sample(range(nblocks), max(1, round(nblocks * fraction))))
    data = {i: rng.randbytes(BLOCK) for i in chosen}
    for path in targets:
        fd = os.open(path, os.O_WRONLY)
        try:
            for i in chosen:
                os.pwrite(fd, data[i], i * BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.startswith("/dev/"):
            b.run(["blockdev", "--flushbufs", path])
    return len(chosen)


def drop_cache(path: Path) -> None:
    """Evict ``path`` from the page cache, so that rsync reads the disk like marsd does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def same(a: Path | str, b_: Path | str, size: int) -> bool:
    out = subprocess.run(["cmp", "-s", "-n", str(size), str(a), str(b_)])
    return out.returncode == 0


def sync_stats(rl: ReplLab) -> tuple[int, int] | None:
    """(compared, copied) bytes of lab2's last full sync, from its marsd log."""
    found = re.findall(r"full sync done: (\d+) bytes compared, (\d+) copied",
                       rl.lab.marsd_log("lab2"))
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def replay_start(rl: ReplLab) -> LogPosition:
    """Where lab2's last sync set its replay to start (P0), from its marsd log."""
    found = re.findall(r"log replay will start at (\S+)", rl.lab.marsd_log("lab2"))
    if not found:
        raise RuntimeError("lab2's marsd log names no replay start")
    return LogPosition.decode(found[-1])


def invalidate(rl: ReplLab) -> dict[str, Any]:
    """``marsadm invalidate r0 --wait`` on lab2: seconds, lab2's wire bytes, bytes copied,
    and when (from the command's start) the sync started and ended, from lab2's status."""
    pids = {"lab1": rl.marsd_pid("lab1"), "lab2": rl.marsd_pid("lab2")}
    cpu0 = {k: b.cpu_seconds(p) for k, p in pids.items()}
    rx0, tx0 = rl.netdev("lab2")
    t = time.monotonic()
    cmd = rl.popen("lab2", "marsadm", "invalidate", RES, "--wait", "--timeout", "600", "--json",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}
    try:
        while cmd.poll() is None:
            try:
                st = rl.status("lab2")
            except KeyError:  # the secondary is being restarted
                st = {}
            now = time.monotonic() - t
            if st.get("phase") == "syncing":
                marks.setdefault("syncing", now)
                if st.get("sync_done", 0) > 0:
                    marks.setdefault("first_window", now)
            elif "syncing" in marks and st.get("phase") == "replaying":
                marks.setdefault("replaying", now)
            time.sleep(0.02)
        secs = time.monotonic() - t
        cpu = {k: 100 * (b.cpu_seconds(p) - cpu0[k]) / secs for k, p in pids.items()}
        out, err = cmd.communicate(timeout=30)
    finally:
        b.stop_process(cmd, timeout=5)
        rl.procs.remove(cmd)
    if cmd.returncode != 0:
        raise RuntimeError(f"marsadm invalidate failed ({cmd.returncode}): {out} {err}")
    rx1, tx1 = rl.netdev("lab2")
    stats = sync_stats(rl)
    return {"s": secs, "rx": rx1 - rx0, "tx": tx1 - tx0, "wire": rx1 - rx0 + tx1 - tx0,
            "copied": stats[1] if stats else None, "marks": marks, "cpu": cpu}


def restart_with_changes(rl: ReplLab, size: int, fraction: float, seed: int,
                         also: list[str]) -> int:
    """Stop lab2's marsd, change ``fraction`` of its device's blocks (and the same in the
    files ``also``), start it again."""
    rl.lab.marsd_stop("lab2")
    n = change_blocks([rl.l2.devices[0], *also], size, fraction, seed)
    rl.lab.marsd_start("lab2")
    return n


def rsync_pull(rl: ReplLab, src: Path, dst: Path) -> dict[str, Any]:
    """rsync in lab2 pulling ``src`` from lab1 over ssh into ``dst`` (delta transfer)."""
    drop_cache(src)
    drop_cache(dst)
    rx0, tx0 = rl.netdev("lab2")
    t = time.monotonic()
    out = rl.lab.exec("lab2", "rsync", "--inplace", "--no-whole-file", "--ignore-times",
                      "--stats", "-e", f"ssh -F {rl.lab.ssh_config}", f"lab1:{src}", str(dst),
                      timeout=600)
    secs = time.monotonic() - t
    rx1, tx1 = rl.netdev("lab2")

    def stat(label: str) -> int:
        m = re.search(rf"{label}: ([\d,.]+)", out.stdout)
        return int(float(m.group(1).replace(",", ""))) if m else -1

    return {"s": secs, "rx": rx1 - rx0, "tx": tx1 - tx0, "wire": rx1 - rx0 + tx1 - tx0,
            "literal": stat("Literal data"), "matched": stat("Matched data"),
            "sent": stat("Total bytes sent"), "received": stat("Total bytes received")}


def nbdcopy_over_link(rl: ReplLab, size: int) -> float:
    """Seconds for nbdcopy in lab1 from the primary's export to nbdkit on lab2's device
    (lab2's marsd must be stopped: nbdkit listens on its sync port)."""
    dev = rl.l2.devices[0]
    srv = rl.popen("lab2", "nbdkit", "-f", "--exit-with-parent", "-i", rl.l2.ip, "-p",
                   str(NBD_PORT), "file", f"file={dev}", stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    try:
        uri = f"nbd://{rl.l2.ip}:{NBD_PORT}"
        deadline = time.monotonic() + 15
        while rl.lab.exec("lab1", "nbdinfo", "--size", uri, check=False).returncode != 0:
            if srv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit on lab2 did not come up")
            time.sleep(0.1)
        t = time.monotonic()
        rl.lab.exec("lab1", "nbdcopy", "--flush", rl.uri, uri, timeout=600)
        return time.monotonic() - t
    finally:
        b.stop_process(srv, timeout=10)
        rl.procs.remove(srv)


def read_both(rl: ReplLab) -> float:
    """Seconds to read lab1's and lab2's devices at the same time (what any tool comparing
    them has to do; the lab's two hosts share one disk)."""
    return b.read_at_once([rl.l1.devices[0], rl.l2.devices[0]], timeout=300)


def zero_device(dev: str) -> None:
    if b.run(["blkdiscard", "-z", dev], check=False).returncode != 0:
        b.run(["dd", "if=/dev/zero", f"of={dev}", "bs=16M", "oflag=direct"], timeout=300)
    b.run(["blockdev", "--flushbufs", dev])


def start_writer(rl: ReplLab) -> subprocess.Popen[str]:
    return rl.popen("lab1", "fio", "--name=writer", "--ioengine=nbd", f"--uri={rl.uri}",
                    "--rw=randwrite", "--bs=64k", "--iodepth=4", f"--rate={WRITER_RATE}",
                    "--size=100%", "--time_based", "--runtime=600", "--thread",
                    "--norandommap", "--randrepeat=0", "--output-format=json",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_writer(rl: ReplLab, fio: subprocess.Popen[str]) -> float:
    """Stop fio (SIGINT, by pid); its write rate in bytes/s."""
    if fio.poll() is None:
        fio.send_signal(signal.SIGINT)
    try:
        out, _ = fio.communicate(timeout=60)
        data = json.loads(out[out.index("{"):])
        return float(data["jobs"][0]["write"]["bw_bytes"])
    except (subprocess.TimeoutExpired, ValueError, KeyError):
        return float("nan")
    finally:
        b.stop_process(fio, timeout=5)
        rl.procs.remove(fio)


def wait_primary_drained(rl: ReplLab, timeout: float = 120) -> None:
    t = time.monotonic()
    while True:
        st = rl.status("lab1")
        if st["pending_bytes"] == 0 and st["applied"] == st["log_end"]:
            return
        if time.monotonic() - t > timeout:
            raise RuntimeError("lab1's writeback did not drain")
        time.sleep(0.05)


# ------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB devices, shorter baseline")
    ap.add_argument("--size", default=None, help="device size (default 1G; --quick 256M)")
    ap.add_argument("--rate", default="1gbit", help="link rate of lab2 (tc tbf)")
    ap.add_argument("--fraction", type=float, default=0.01,
                    help="share of 64 KiB blocks changed (default 0.01)")
    ap.add_argument("--lab-dir", type=Path, default=Path("/var/tmp/mars-bench-sync-lab"),
                    help="the lab's directory (its own network; removed at the end)")
    ap.add_argument("--py-spy", type=Path, metavar="DIR",
                    help="profile both marsd during the 100%% sync into DIR")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = ap.parse_args()
    size_text = args.size or ("256M" if args.quick else "1G")
    size = parse_size(size_text)
    link = rate_bytes(args.rate)
    b.install_signal_handlers()
    b.check_tools("fio", "nbdcopy", "nbdkit", "nbdinfo", "rsync", "ssh", "cmp", "blockdev")

    b.banner("fast full sync", f"{size_text} devices, {args.rate} link, "
             f"{args.fraction:.0%} of {size // BLOCK} blocks of 64 KiB changed")
    started = time.monotonic()
    res: dict[str, Any] = {"size": size, "link": link, "rate": args.rate,
                           "fraction": args.fraction}
    with lab_session(args.lab_dir, size_text) as rl:
        l1, l2 = rl.l1, rl.l2
        rl.create_primary()
        src = random_file(l1.dir / "image-a.img", size, seed=1)  # lab1's data, rsync's source
        t = time.monotonic()
        rl.lab.exec("lab1", "nbdcopy", "--flush", str(src), rl.uri, timeout=600)
        res["fill_s"] = time.monotonic() - t
        b.say(f"filled lab1's r0 with {size / MB:.0f} MB of random data through NBD in "
              f"{res['fill_s']:.1f} s")
        rl.join_cluster()
        rl.lab.marsd_start("lab2")
        res["join_s"] = rl.join_resource()
        b.say(f"lab2 joined: initial full sync (every block differs), unshaped link: "
              f"{res['join_s']:.1f} s = {size / res['join_s'] / MB:.0f} MB/s")
        # the fetch starts at the logfile's start: if the replay starts inside it, what
        # lies before is fetched and never replayed (the primary rotates at a sync's start
        # so that this is nothing)
        start_pos = replay_start(rl)
        res["prefix_bytes"] = start_pos.offset
        res["prefix_s"] = rl.wait_up_to_date()
        b.say(f"after the join lab2's replay starts at offset {start_pos.offset} of "
              f"{start_pos.logfile}: {start_pos.offset / MB:.1f} MB fetched before it (never "
              f"replayed); caught up in {res['prefix_s']:.1f} s")
        res["disk_floor_s"] = read_both(rl)
        b.say(f"disk floor: reading both devices at once (dd, O_DIRECT) takes "
              f"{res['disk_floor_s']:.2f} s (the lab's hosts share one disk)")

        rl.lab.shape("lab2", rate=args.rate)
        rl.lab.marsd_stop("lab2")
        res["tcp"] = rl.tcp_baseline(3.0 if args.quick else 5.0, port=NBD_PORT)
        b.say(f"[{args.rate}] TCP baseline lab1 -> lab2: {res['tcp'] / MB:.1f} MB/s")

        # ------------------------------------------------------ 1% changed
        dst = l2.dir / "image-b.img"
        shutil.copyfile(src, dst)
        n = change_blocks([str(dst)], size, args.fraction, seed=2)  # rsync's copy
        change_blocks([l2.devices[0]], size, args.fraction, seed=2)  # the same in lab2's r0
        rl.lab.marsd_start("lab2")
        res["changed_blocks"] = n
        res["changed_bytes"] = n * BLOCK
        res["sums_bytes"] = size // BLOCK * CRC
        # the disk floor again, right before and after: other work on the machine moves it
        floor_before = read_both(rl)
        m = invalidate(rl)
        floor_after = read_both(rl)
        res["m1_floor_s"] = [floor_before, floor_after]
        res["m1"] = m
        rl.wait_up_to_date()
        res["m1_identical"] = same(src, l2.images[0], size)
        b.say(f"[1%] marslib invalidate --wait: {m['s']:.2f} s, {m['wire'] / MB:.2f} MB on "
              f"lab2's wire, {(m['copied'] or 0) / MB:.2f} MB copied; identical to lab1: "
              f"{res['m1_identical']}; disk floor {floor_before:.2f} s before it, "
              f"{floor_after:.2f} s after")
        r = rsync_pull(rl, src, dst)
        res["r1"] = r
        res["r1_identical"] = same(src, dst, size)
        b.say(f"[1%] rsync: {r['s']:.2f} s, {r['wire'] / MB:.2f} MB on lab2's wire "
              f"(literal {r['literal'] / MB:.2f} MB, sent {r['sent'] / MB:.2f} MB, received "
              f"{r['received'] / MB:.2f} MB); identical: {res['r1_identical']}")
        dst.unlink()

        # ------------------------------------------------------ 100% different
        rl.lab.marsd_stop("lab2")
        res["nbdcopy_s"] = nbdcopy_over_link(rl, size)
        b.say(f"[100%] nbdcopy lab1 export -> nbdkit on lab2: {res['nbdcopy_s']:.2f} s = "
              f"{size / res['nbdcopy_s'] / MB:.1f} MB/s")
        zero_device(l2.devices[0])
        rl.lab.marsd_start("lab2")
        spies = []
        if args.py_spy:
            args.py_spy.mkdir(parents=True, exist_ok=True)
            for host in ("lab1", "lab2"):
                pid = rl.marsd_pid(host)
                p = b.py_spy_start(pid, size / 100e6, args.py_spy / f"{host}-sync100.txt")
                if p is not None:
                    spies.append(p)
        m = invalidate(rl)
        for p in spies:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                b.stop_process(p, timeout=5)
        res["m100"] = m
        rl.wait_up_to_date()
        res["m100_identical"] = same(src, l2.images[0], size)
        b.say(f"[100%] marslib invalidate --wait: {m['s']:.2f} s = {size / m['s'] / MB:.1f} "
              f"MB/s, {m['wire'] / MB:.0f} MB on the wire; CPU lab1 marsd "
              f"{m['cpu']['lab1']:.0f}%, lab2 marsd {m['cpu']['lab2']:.0f}%; identical: "
              f"{res['m100_identical']}")

        # ------------------------------------------------------ 1% with a writer
        restart_with_changes(rl, size, args.fraction, seed=3, also=[])
        fio = start_writer(rl)
        time.sleep(1.0)
        try:
            m = invalidate(rl)
        finally:
            res["writer_rate"] = stop_writer(rl, fio)
        res["mw"] = m
        rl.wait_up_to_date()
        wait_primary_drained(rl)
        p0 = replay_start(rl)
        res["mw_fetched"] = int(rl.status("lab2")["fetch_bytes"])
        res["mw_replayed"] = rl.primary_end() - rl.absolute(p0.logfile, p0.offset)
        rl.lab.marsadm("lab2", "pause-replay", RES)
        res["mw_identical"] = same(l1.images[0], l2.images[0], size)
        rl.lab.marsadm("lab2", "resume-replay", RES)
        b.say(f"[1% + writer] marslib invalidate --wait while fio wrote "
              f"{res['writer_rate'] / MB:.1f} MB/s to lab1: {m['s']:.2f} s, "
              f"{m['wire'] / MB:.1f} MB on the wire; identical after catching up: "
              f"{res['mw_identical']}; replay from {p0.encode()}: "
              f"{res['mw_fetched'] / MB:.1f} MB fetched, {res['mw_replayed'] / MB:.1f} MB "
              "replayed")
        rl.lab.clear_shape("lab2")

    report(res)
    if args.py_spy:
        for host in ("lab1", "lab2"):
            path = args.py_spy / f"{host}-sync100.txt"
            if path.exists():
                b.say(f"\npy-spy {host} marsd during the 100% sync:\n{b.py_spy_summary(path)}")
    b.say(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


def report(res: dict[str, Any]) -> None:
    size, link = res["size"], res["link"]
    m1, r1, m100, mw = res["m1"], res["r1"], res["m100"], res["mw"]
    budget = res["changed_bytes"] + res["sums_bytes"]
    b.say()
    b.say(f"RESULTS (MB = 10^6 bytes; {size / MB:.0f} MB devices, {res['rate']} link, wire = "
          "rx+tx bytes of lab2's eth0, headers and ssh included)")
    def phase(m: dict[str, Any]) -> str:
        mk = m["marks"]
        if "syncing" not in mk or "replaying" not in mk:
            return "-"
        return f"{mk['syncing']:.2f}-{mk['replaying']:.2f}"

    frac = f"{res['fraction']:.0%}"
    rows = [["case", "tool", "time s", "sync phase s", "MB/s", "wire MB", "copied MB",
             "lab1 CPU", "lab2 CPU", "identical"]]

    def cpu(m: dict[str, Any]) -> list[str]:
        return [f"{m['cpu']['lab1']:.0f}%", f"{m['cpu']['lab2']:.0f}%"]

    rows.append([f"{frac} changed", "marslib invalidate", f"{m1['s']:.2f}", phase(m1), "-",
                 f"{m1['wire'] / MB:.2f}", f"{(m1['copied'] or 0) / MB:.2f}", *cpu(m1),
                 str(res["m1_identical"])])
    rows.append(["(disk floor)", "the same around the 1% case",
                 " / ".join(f"{x:.2f}" for x in res["m1_floor_s"]), "-", "-", "-", "-", "-",
                 "-", "-"])
    rows.append([f"{frac} changed", "rsync --inplace", f"{r1['s']:.2f}", "-", "-",
                 f"{r1['wire'] / MB:.2f}", f"{r1['literal'] / MB:.2f}", "-", "-",
                 str(res["r1_identical"])])
    rows.append(["(disk floor)", "dd both devices at once", f"{res['disk_floor_s']:.2f}", "-",
                 f"{2 * size / res['disk_floor_s'] / MB:.0f}", "-", "-", "-", "-", "-"])
    rows.append(["100% different", "marslib invalidate", f"{m100['s']:.2f}", phase(m100),
                 f"{size / m100['s'] / MB:.1f}", f"{m100['wire'] / MB:.0f}",
                 f"{(m100['copied'] or 0) / MB:.0f}", *cpu(m100), str(res["m100_identical"])])
    rows.append(["100% different", "nbdcopy to nbdkit", f"{res['nbdcopy_s']:.2f}", "-",
                 f"{size / res['nbdcopy_s'] / MB:.1f}", "-", f"{size / MB:.0f}", "-", "-", "-"])
    rows.append(["100% different", "TCP baseline", "-", "-", f"{res['tcp'] / MB:.1f}", "-",
                 "-", "-", "-", "-"])
    rows.append([f"{frac} + writer {res['writer_rate'] / MB:.0f} MB/s", "marslib invalidate",
                 f"{mw['s']:.2f}", phase(mw), "-", f"{mw['wire'] / MB:.1f}",
                 f"{(mw['copied'] or 0) / MB:.2f}", *cpu(mw), str(res["mw_identical"])])
    b.say(b.table(rows, right={2, 3, 4, 5, 6, 7, 8}))
    b.say("(time: the whole marsadm command; sync phase: from when lab2's status said "
          "'syncing' until it said 'replaying' again, seconds after the command started; "
          "CPU: marsd, % of one CPU over the command)")
    b.say(f"(initial join: {res['join_s']:.1f} s on the unshaped link, then "
          f"{res['prefix_bytes'] / MB:.1f} MB of log fetched that is never replayed; changed "
          f"data {res['changed_bytes'] / MB:.2f} MB in {res['changed_blocks']} blocks, checksums "
          f"{res['sums_bytes'] / MB:.3f} MB; rsync: literal data {r1['literal'] / MB:.2f} MB, "
          f"its block checksums from lab2 {r1['sent'] / MB:.2f} MB, from lab1 "
          f"{r1['received'] / MB:.2f} MB)")
    b.say()
    rows = [["ratio", "value", "target", "verdict"]]
    rows.append(ratio_row("1%: marslib time / rsync time", m1["s"] / r1["s"], 0.5,
                          higher_is_better=False))
    floor = sum(res["m1_floor_s"]) / 2  # measured right before and after the 1% case
    rows.append(ratio_row("1%: marslib time / disk floor around it", m1["s"] / floor, 1.1,
                          higher_is_better=False))
    mk = m1["marks"]
    if "syncing" in mk and "replaying" in mk:
        rows.append(ratio_row("1%: sync phase / disk floor around it",
                              (mk["replaying"] - mk["syncing"]) / floor, None))
        rows.append(ratio_row("1%: before the sync phase, s", mk["syncing"], None))
    rows.append(ratio_row("1%: rsync time / disk floor around marslib's", r1["s"] / floor,
                          None))
    rows.append(ratio_row("1%: marslib wire / (changed + checksums)", m1["wire"] / budget, 1.2,
                          higher_is_better=False))
    rows.append(ratio_row("1%: rsync wire / (changed + checksums)", r1["wire"] / budget, None))
    rows.append(ratio_row("100%: marslib MB/s / link rate", size / m100["s"] / link, 0.9))
    rows.append(ratio_row("100%: marslib MB/s / TCP baseline", size / m100["s"] / res["tcp"],
                          None))
    rows.append(ratio_row("100%: marslib MB/s / nbdcopy MB/s", res["nbdcopy_s"] / m100["s"],
                          None))
    rows.append(ratio_row("1% + writer: time / 1% alone", mw["s"] / m1["s"], None))
    if res["mw_replayed"] > 0:
        rows.append(ratio_row("1% + writer: log fetched / replayed",
                              res["mw_fetched"] / res["mw_replayed"], 1.05,
                              higher_is_better=False))
    b.say(b.table(rows, right={1}))


if __name__ == "__main__":
    sys.exit(main())
