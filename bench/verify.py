"""Online verify benchmark: ``marsadm verify`` against the disk floor, under a writer.

Runs on the lab (two network namespaces, ``marslib.lab``) with 1 GiB devices (``--size``):
lab1's resource is filled with random data through NBD, lab2 joins (a full sync) and
catches up. Then, in the same run:

* floor    ``dd`` reading both devices at once (O_DIRECT): what any comparison of the two
           has to read; measured right before and right after the verifies (other work on
           the machine moves it).
* idle     ``marsadm verify r0`` on lab2 with no writer.
* writer   the same while fio writes 64 KiB blocks at random at 10 MB/s (``--writer-rate``)
           to lab1's export all the time (the writer of bench/sync.py). Target: verify time
           <= 1.2 x the floor, and 0 differences reported: the devices are identical (checked
           with ``cmp`` once the writer stopped and lab2 caught up), so every reported
           difference would be false.

Prints a table with the figures, the ratios and PASS/MISS and the machine's load; exits 0
whenever the measurement itself worked. Takes ~1 min (``--quick``: 256 MiB devices); the
lab is taken down on any exit (error, Ctrl-C, SIGTERM).

    .venv/bin/python bench/verify.py [--quick] [--size 1G] [--writer-rate 10000000]
                                     [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as b
from replication import MB, RES, ReplLab, lab_session, random_file, ratio_row
from sync import read_both, same, stop_writer, wait_primary_drained

from marslib.sizes import parse_size

TARGET = 1.2  # verify time under the writer / disk floor
WRITER_RATE = 10 * 1000 * 1000


def start_writer(rl: ReplLab, rate: int) -> subprocess.Popen[str]:
    """fio on lab1: 64 KiB random writes at ``rate`` bytes/s to r0's export, until stopped
    (bench/sync.py's writer, with the rate as an option)."""
    return rl.popen("lab1", "fio", "--name=writer", "--ioengine=nbd", f"--uri={rl.uri}",
                    "--rw=randwrite", "--bs=64k", "--iodepth=4", f"--rate={rate}",
                    "--size=100%", "--time_based", "--runtime=600", "--thread",
                    "--norandommap", "--randrepeat=0", "--output-format=json",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_log_grows(rl: ReplLab, timeout: float = 30) -> None:
    """Until the primary's log end moves: the writer is writing."""
    start = rl.status("lab1")["log_end"]
    deadline = time.monotonic() + timeout
    while rl.status("lab1")["log_end"] == start:
        if time.monotonic() > deadline:
            raise RuntimeError("the writer does not write")
        time.sleep(0.05)


def verify_span(rl: ReplLab) -> tuple[float, float] | None:
    """When (``time.time()``) lab2's last verify started and ended, from its marsd log."""
    log = rl.lab.marsd_log("lab2")
    stamp = r"^(\S+ \S+) marsd-worker INFO \S+ marslib\.verify: "
    starts = re.findall(stamp + r"verify of \d+ bytes against the primary starts", log, re.M)
    ends = re.findall(stamp + r"verify done in", log, re.M)
    if not starts or not ends:
        return None

    def wall(text: str) -> float:
        return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()

    return wall(starts[-1]), wall(ends[-1])


def verify(rl: ReplLab) -> dict[str, Any]:
    """``marsadm verify r0`` on lab2: its result, seconds, the CPU of both marsd, the
    load average around it, and how long marsadm took before and after the verify ran in
    lab2's marsd (its own start, the request, marsd noticing it; reading the result)."""
    pids = {"lab1": rl.marsd_pid("lab1"), "lab2": rl.marsd_pid("lab2")}
    cpu0 = {k: b.cpu_seconds(p) for k, p in pids.items()}
    load_before = b.load_average()
    wall0 = time.time()
    t = time.monotonic()
    out = rl.lab.marsadm("lab2", "verify", RES, "--timeout", "600", timeout=630)
    secs = time.monotonic() - t
    wall1 = time.time()
    cpu = {k: 100 * (b.cpu_seconds(p) - cpu0[k]) / secs for k, p in pids.items()}
    span = verify_span(rl)
    before, after = (span[0] - wall0, wall1 - span[1]) if span else (None, None)
    return {**out, "s": secs, "cpu": cpu, "load": [load_before, b.load_average()],
            "before_s": before, "after_s": after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB devices")
    ap.add_argument("--size", default=None, help="device size (default 1G; --quick 256M)")
    ap.add_argument("--writer-rate", type=int, default=WRITER_RATE,
                    help="bytes/s the writer writes during the verify (default 10 MB/s)")
    ap.add_argument("--lab-dir", type=Path, default=Path("/var/tmp/mars-bench-verify-lab"),
                    help="the lab's directory (its own network; removed at the end)")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = ap.parse_args()
    size_text = args.size or ("256M" if args.quick else "1G")
    size = parse_size(size_text)
    b.install_signal_handlers()
    b.check_tools("fio", "nbdcopy", "cmp", "dd")

    b.banner("online verify", f"{size_text} devices, writer "
             f"{args.writer_rate / MB:.0f} MB/s of 64 KiB random writes")
    started = time.monotonic()
    res: dict[str, Any] = {"size": size, "writer_target": args.writer_rate}
    with lab_session(args.lab_dir, size_text) as rl:
        l1, l2 = rl.l1, rl.l2
        rl.create_primary()
        src = random_file(l1.dir / "image-a.img", size, seed=1)
        t = time.monotonic()
        rl.lab.exec("lab1", "nbdcopy", "--flush", str(src), rl.uri, timeout=600)
        res["fill_s"] = time.monotonic() - t
        src.unlink()
        b.say(f"filled lab1's r0 with {size / MB:.0f} MB of random data through NBD in "
              f"{res['fill_s']:.1f} s")
        rl.join_cluster()
        rl.lab.marsd_start("lab2")
        res["join_s"] = rl.join_resource()
        rl.wait_up_to_date()
        b.say(f"lab2 joined (full sync) in {res['join_s']:.1f} s and caught up")

        floor_before = read_both(rl)
        b.say(f"disk floor: reading both devices at once takes {floor_before:.2f} s")
        idle = verify(rl)
        res["idle"] = idle
        b.say(f"[idle] marsadm verify: {idle['s']:.2f} s, {idle['differing']} bytes differ, "
              f"{idle['unsettled']} unsettled; CPU lab1 marsd {idle['cpu']['lab1']:.0f}%, "
              f"lab2 marsd {idle['cpu']['lab2']:.0f}%")

        fio = start_writer(rl, args.writer_rate)
        try:
            wait_log_grows(rl)
            busy = verify(rl)
        finally:
            res["writer_rate"] = stop_writer(rl, fio)
        res["busy"] = busy
        floor_after = read_both(rl)
        res["floor_s"] = [floor_before, floor_after]
        b.say(f"[writer {res['writer_rate'] / MB:.1f} MB/s] marsadm verify: {busy['s']:.2f} s "
              f"(the verify itself {busy['seconds']:.2f} s), {busy['differing']} bytes "
              f"differ, {busy['touched']} blocks compared again because they were being "
              f"written ({busy['passes']} passes), {busy['unsettled']} bytes unsettled; CPU "
              f"lab1 marsd {busy['cpu']['lab1']:.0f}%, lab2 marsd {busy['cpu']['lab2']:.0f}%; "
              f"load {busy['load'][0]} before, {busy['load'][1]} after")
        b.say(f"disk floor after: {floor_after:.2f} s")

        rl.wait_up_to_date()
        wait_primary_drained(rl)
        rl.lab.marsadm("lab2", "pause-replay", RES)
        res["identical"] = same(l1.images[0], l2.images[0], size)
        rl.lab.marsadm("lab2", "resume-replay", RES)
        b.say(f"devices identical once lab2 caught up: {res['identical']}")

    report(res)
    b.say(f"\ntotal {time.monotonic() - started:.0f} s; load average at the end "
          f"{b.load_average()}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


def report(res: dict[str, Any]) -> None:
    size = res["size"]
    idle, busy = res["idle"], res["busy"]
    floor = sum(res["floor_s"]) / 2
    b.say()
    b.say(f"RESULTS (MB = 10^6 bytes; {size / MB:.0f} MB devices; floor = dd of both devices "
          "at once, mean of before and after)")
    rows = [["case", "time s", "verify s", "MB/s", "differ B", "retried blocks",
             "unsettled B", "lab1 CPU", "lab2 CPU", "load before/after"]]
    for label, m in (("idle", idle), (f"writer {res['writer_rate'] / MB:.1f} MB/s", busy)):
        rows.append([label, f"{m['s']:.2f}", f"{m['seconds']:.2f}",
                     f"{size / m['s'] / MB:.0f}", str(m["differing"]), str(m.get("touched")),
                     str(m["unsettled"]),
                     f"{m['cpu']['lab1']:.0f}%", f"{m['cpu']['lab2']:.0f}%",
                     " / ".join(m["load"])])
    rows.append(["(disk floor)", " / ".join(f"{x:.2f}" for x in res["floor_s"]), "-",
                 f"{2 * size / floor / MB:.0f}", "-", "-", "-", "-", "-", "-"])
    b.say(b.table(rows, right={1, 2, 3, 4, 5, 6, 7, 8}))
    b.say("(time: the whole marsadm command; verify: the verify's own seconds in its result; "
          "MB/s: device bytes per second, the floor's counts both devices; CPU: marsd and its "
          "workers, % of one CPU over the command)")
    for label, m in (("idle", idle), ("writer", busy)):
        if m.get("before_s") is not None:
            b.say(f"({label}: marsadm's start and the request until the verify ran "
                  f"{m['before_s']:.2f} s, from its end to marsadm's exit {m['after_s']:.2f} "
                  "s)")
    b.say()
    rows = [["ratio", "value", "target", "verdict"]]
    rows.append(ratio_row("writer: verify time / disk floor", busy["s"] / floor, TARGET,
                          higher_is_better=False))
    rows.append(ratio_row("writer: the verify's own time / disk floor", busy["seconds"] / floor,
                          None))
    rows.append(ratio_row("idle: verify time / disk floor", idle["s"] / floor, None))
    rows.append(ratio_row("writer: false differences, bytes", float(busy["differing"]), 0.0,
                          higher_is_better=False, fmt="{:.0f}"))
    rows.append(["devices identical after catching up", str(res["identical"]), "True",
                 "PASS" if res["identical"] else "MISS"])
    b.say(b.table(rows, right={1}))


if __name__ == "__main__":
    sys.exit(main())
