"""Write path benchmark: marslib's NBD export against the raw device and nbdkit.

Runs, in one go and each on a fresh 2 GiB file-backed direct-I/O loop device:

* raw        fio libaio O_DIRECT on the loop device (the ceiling, nothing durable per write)
* raw-dsync  the same with O_DSYNC (durable per write: what marslib promises its clients)
* nbdkit     fio's nbd engine against nbdkit's file plugin (a C NBD server without a log)
* marslib    fio's nbd engine against marsd's export (log, group commit, sorted writeback)

and three time-based jobs on the first 1 GiB of each: sequential 1 MiB writes at iodepth 4,
random 4 KiB writes at iodepth 1 and at iodepth 32. Prints MB/s and IOPS per case, the
customer's target ratios with PASS/MISS, and marsd's group-commit counters. Always exits 0
when the measurement itself worked: it is a benchmark, not a test.

    .venv/bin/python bench/write_path.py [--quick] [--runtime S] [--dir /var/tmp] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import benchlib as b

CASES = ("raw", "raw-dsync", "nbdkit", "marslib")

# (label, numerator, denominator, job, metric, goal)
TARGETS: list[tuple[str, str, str, str, str, float | None]] = [
    ("marslib seq MB/s / raw seq", "marslib", "raw", "seq", "mb_s", 0.45),
    ("marslib randwrite qd32 IOPS / raw qd32", "marslib", "raw", "qd32", "iops", 1.0),
    ("marslib randwrite qd32 IOPS / nbdkit qd32", "marslib", "nbdkit", "qd32", "iops", 1.0),
    ("marslib randwrite qd1 IOPS / raw qd1", "marslib", "raw", "qd1", "iops", None),
    ("marslib randwrite qd1 IOPS / nbdkit qd1", "marslib", "nbdkit", "qd1", "iops", None),
    ("marslib seq MB/s / raw-dsync seq", "marslib", "raw-dsync", "seq", "mb_s", None),
    ("marslib qd1 IOPS / raw-dsync qd1", "marslib", "raw-dsync", "qd1", "iops", None),
    ("marslib qd32 IOPS / raw-dsync qd32", "marslib", "raw-dsync", "qd32", "iops", None),
]


def run_raw(work: Path, runtime: float, sync: bool) -> dict[str, b.FioResult]:
    results = {}
    with b.loop_device(work / "dev.img") as dev:
        for job in b.JOBS:
            results[job.name] = b.fio(job, b.libaio(dev, sync), work / "fio.json", runtime)
            report(("raw-dsync" if sync else "raw"), job, results[job.name])
    return results


def run_nbdkit(work: Path, runtime: float) -> dict[str, b.FioResult]:
    results = {}
    sock = work / "nbdkit.sock"
    with b.loop_device(work / "dev.img") as dev, b.nbdkit(sock, dev) as proc:
        for job in b.JOBS:
            cpu0, t0 = b.cpu_seconds(proc.pid), time.monotonic()
            res = b.fio(job, b.nbd(f"nbd+unix:///?socket={sock}"), work / "fio.json", runtime)
            res.extra["server_cpu"] = 100 * (b.cpu_seconds(proc.pid) - cpu0) / (
                time.monotonic() - t0)
            results[job.name] = res
            report("nbdkit", job, res)
    return results


def run_marslib(work: Path, runtime: float, marsd_args: list[str], profile: Path | None
                ) -> tuple[dict[str, b.FioResult], dict[str, Any]]:
    results = {}
    with b.loop_device(work / "dev.img") as dev, b.Marsd(work, dev, marsd_args) as marsd:
        for job in b.JOBS:
            before = marsd.status()
            cpu0, t0 = b.cpu_seconds(marsd.pid), time.monotonic()
            spy = b.py_spy_start(marsd.pid, runtime, profile / f"marsd-{job.name}.txt"
                                 ) if profile else None
            res = b.fio(job, b.nbd(marsd.nbd_uri), work / "fio.json", runtime)
            res.extra["server_cpu"] = 100 * (b.cpu_seconds(marsd.pid) - cpu0) / (
                time.monotonic() - t0)
            if spy is not None:
                spy.wait(60)
            after = marsd.status()
            res.extra["pending_at_end_mb"] = after["pending_bytes"] / 1e6
            # the next job starts with an idle writeback, like on the other cases
            res.extra["drain_s"] = marsd.wait_drained()
            after = marsd.status()
            for key in ("writes", "commits", "device_writes", "writeback_rounds"):
                res.extra[key] = after[key] - before[key]
            res.extra["writes_per_commit"] = (
                res.extra["writes"] / res.extra["commits"] if res.extra["commits"] else 0.0)
            results[job.name] = res
            report("marslib", job, res)
        view = marsd.view()
    return results, view


def report(case: str, job: b.Job, r: b.FioResult) -> None:
    cpu = f", server CPU {r.extra['server_cpu']:.0f}%" if "server_cpu" in r.extra else ""
    b.say(f"  {case:<9} {job.title:<18} {r.mb_s:8.1f} MB/s {r.iops:9.0f} IOPS  "
          f"lat {r.lat_mean_us:8.0f} us{cpu}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per job instead of 10 s")
    ap.add_argument("--runtime", type=float, help="seconds per fio job (overrides --quick)")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the device images and the log area go (a real filesystem, "
                         "not tmpfs; default /var/tmp)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--marsd-arg", action="append", default=[],
                    help="extra marsd argument (repeatable), e.g. --marsd-arg=--memory-limit=1G")
    ap.add_argument("--py-spy", type=Path, metavar="DIR",
                    help="profile marsd during each marslib job with the venv's py-spy "
                         "(.venv/bin/pip install py-spy); collapsed stacks go to DIR")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = ap.parse_args()
    runtime = args.runtime or (3.0 if args.quick else 10.0)
    cases = [c for c in args.cases.split(",") if c]
    if unknown := set(cases) - set(CASES):
        ap.error(f"unknown cases: {', '.join(sorted(unknown))}")
    if args.py_spy:
        if not b.PY_SPY.exists():
            ap.error(f"--py-spy needs {b.PY_SPY}: .venv/bin/pip install py-spy")
        args.py_spy.mkdir(parents=True, exist_ok=True)
    b.install_signal_handlers()
    b.check_tools("fio", "losetup", *(["nbdkit"] if "nbdkit" in cases else []))

    b.say(f"marslib write path benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    b.say(f"machine: {b.machine_description()}")
    b.say(f"marslib: {b.code_version()}; {runtime:g} s per job, first 1 GiB of a 2 GiB "
          f"loop device (direct I/O) per case, images and log under {args.dir}")
    b.warn_if_busy()
    results: dict[str, dict[str, b.FioResult]] = {}
    view: dict[str, Any] = {}
    with b.work_dir(args.dir) as work:
        for case in cases:
            b.say(f"{case}:")
            if case == "raw":
                results[case] = run_raw(work, runtime, sync=False)
            elif case == "raw-dsync":
                results[case] = run_raw(work, runtime, sync=True)
            elif case == "nbdkit":
                results[case] = run_nbdkit(work, runtime)
            else:
                results[case], view = run_marslib(work, runtime, args.marsd_arg, args.py_spy)

    b.say()
    b.say("RESULTS (MB/s = 10^6 bytes/s; lat = mean completion latency; CPU = server process, "
          "% of one CPU)")
    rows = [["case", "job", "MB/s", "IOPS", "lat us", "p99 us", "server CPU"]]
    for case, per_job in results.items():
        for job in b.JOBS:
            r = per_job[job.name]
            cpu = r.extra.get("server_cpu")
            rows.append([case, job.title, f"{r.mb_s:.1f}", f"{r.iops:.0f}",
                         f"{r.lat_mean_us:.0f}", f"{r.lat_p99_us:.0f}",
                         "-" if cpu is None else f"{cpu:.0f}%"])
    b.say(b.table(rows, right={2, 3, 4, 5, 6}))

    if "marslib" in results:
        b.say()
        b.say("MARSD COUNTERS per job (group commit: writes per log fdatasync; writeback: "
              "device writes after merging; drain: writeback catching up after the job)")
        rows = [["job", "writes", "commits", "writes/commit", "device writes",
                 "wb rounds", "pending at end", "drain"]]
        for job in b.JOBS:
            x = results["marslib"][job.name].extra
            rows.append([job.title, str(x["writes"]), str(x["commits"]),
                         f"{x['writes_per_commit']:.1f}", str(x["device_writes"]),
                         str(x["writeback_rounds"]), f"{x['pending_at_end_mb']:.0f} MB",
                         f"{x['drain_s']:.2f} s"])
        b.say(b.table(rows))
        b.say("marsadm view --json after the marslib runs: " + json.dumps(
            {k: view.get(k) for k in ("writes", "commits", "writes_per_commit",
                                      "pending_bytes", "log_end", "applied")}))

    if args.py_spy and "marslib" in results:
        for job in b.JOBS:
            b.say()
            b.say(f"PY-SPY marsd during {job.title} ({args.py_spy}/marsd-{job.name}.txt)")
            b.say(b.py_spy_summary(args.py_spy / f"marsd-{job.name}.txt"))

    b.say()
    b.say("TARGETS")
    rows = [["ratio", "value", "target", ""]]
    for label, num, den, job_name, metric, goal in TARGETS:
        if num not in results or den not in results:
            continue
        value = (getattr(results[num][job_name], metric)
                 / max(getattr(results[den][job_name], metric), 1e-9))
        verdict = "" if goal is None else ("PASS" if value >= goal else "MISS")
        rows.append([label, f"{value:.2f}", "-" if goal is None else f">= {goal:g}", verdict])
    if len(rows) > 1:
        b.say(b.table(rows, right={1, 2}))
    else:
        b.say("(needs marslib and the case it is compared with)")
    b.say()
    b.say("notes: raw and nbdkit acknowledge a write before it is durable (no FUA, no flush); "
          "raw-dsync and marslib acknowledge only durable writes. nbdkit cache=none only "
          "drops the page cache after writing.")

    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": b.machine_description(),
            "code": b.code_version(), "runtime": runtime,
            "results": {c: {j: asdict(r) for j, r in per.items()} for c, per in results.items()},
            "marsd_view": view,
        }, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
