"""Data path benchmark: marslib's NBD export against the raw device and nbdkit.

Runs, in one go and each on a fresh 2 GiB file-backed direct-I/O loop device:

* raw           fio libaio O_DIRECT on the loop device (the ceiling, nothing durable per write)
* raw-dsync     the same with O_DSYNC (durable per write: what marslib promises its clients)
* nbdkit        fio's nbd engine against nbdkit's file plugin (a C NBD server without a log)
* marslib       fio's nbd engine against marsd's export (log, group commit, sorted writeback)
* marslib-2res  one marsd with two resources on two loop devices: random 4 KiB writes at
                iodepth 32 to one resource alone, then to both at once (one fio job each)

Jobs on the first 1 GiB of each device: sequential 1 MiB writes at iodepth 4, random 4 KiB
writes at iodepth 1 and at iodepth 32, then (not for raw-dsync, whose reads are raw's)
sequential 1 MiB reads at iodepth 4 and random 4 KiB reads at iodepth 32 of data written
before (a fill pass first writes the whole region when the seq job did not). Prints MB/s,
IOPS, server CPU per I/O, the customer's target ratios with PASS/MISS, and marsd's
counters. Always exits 0 when the measurement itself worked: it is a benchmark, not a test.

    .venv/bin/python bench/write_path.py [--quick] [--runtime S] [--cases LIST] [--json F]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import benchlib as b

CASES = ("raw", "raw-dsync", "nbdkit", "marslib", "marslib-2res")
REGION = 1 << 30  # the first 1 GiB of each device: what every job writes and reads
ONE = b.Job("one", "randwrite 4k qd32, r0 alone", b.RAND32.args)
BOTH = b.Job("both", "randwrite 4k qd32, r0+r1 at once", b.RAND32.args)


@dataclass(frozen=True)
class Target:
    """``num`` / ``den`` of ``metric`` ((case, job) each), or ``num``'s figure itself when
    ``den`` is None. ``goal`` None: printed without a target."""

    label: str
    num: tuple[str, str]
    den: tuple[str, str] | None
    metric: str  # "mb_s", "iops" or "cpu_us" (server CPU microseconds per I/O)
    goal: float | None = None
    at_most: bool = False  # the goal is an upper bound

    def value(self, results: dict[str, dict[str, b.FioResult]]) -> float | None:
        num = _figure(results, *self.num, self.metric)
        if num is None or self.den is None:
            return num
        den = _figure(results, *self.den, self.metric)
        return None if den is None else num / max(den, 1e-9)

    def verdict(self, value: float) -> str:
        if self.goal is None:
            return ""
        return "PASS" if (value <= self.goal if self.at_most else value >= self.goal) else "MISS"

    def goal_text(self) -> str:
        if self.goal is None:
            return "-"
        unit = " us" if self.den is None else ""
        return f"{'<=' if self.at_most else '>='} {self.goal:g}{unit}"


def _figure(results: dict[str, dict[str, b.FioResult]], case: str, job: str,
            metric: str) -> float | None:
    r = results.get(case, {}).get(job)
    if r is None:
        return None
    if metric == "cpu_us":
        value: float | None = r.extra.get("cpu_us_per_io")
        return value
    return float(getattr(r, metric))


MARS, RAW, DSYNC, KIT, TWO = "marslib", "raw", "raw-dsync", "nbdkit", "marslib-2res"
TARGETS = [
    # the customer's (issue 10 and before)
    Target("marslib seq MB/s / raw seq", (MARS, "seq"), (RAW, "seq"), "mb_s", 0.45),
    Target("marslib randwrite qd32 IOPS / nbdkit qd32", (MARS, "qd32"), (KIT, "qd32"), "iops",
           1.0),
    Target("marslib randwrite qd32 IOPS / raw qd32", (MARS, "qd32"), (RAW, "qd32"), "iops", 1.0),
    Target("marslib randwrite qd1 IOPS / raw-dsync qd1", (MARS, "qd1"), (DSYNC, "qd1"), "iops",
           0.5),
    Target("marslib CPU us per 4k write, qd32", (MARS, "qd32"), None, "cpu_us", 25,
           at_most=True),
    Target("2 resources at once / 1 alone, qd32 IOPS", (TWO, "both"), (TWO, "one"), "iops",
           1.7),
    # printed without a target
    Target("marslib randwrite qd1 IOPS / raw qd1", (MARS, "qd1"), (RAW, "qd1"), "iops"),
    Target("marslib randwrite qd1 IOPS / nbdkit qd1", (MARS, "qd1"), (KIT, "qd1"), "iops"),
    Target("marslib seq MB/s / nbdkit seq", (MARS, "seq"), (KIT, "seq"), "mb_s"),
    Target("marslib seq MB/s / raw-dsync seq", (MARS, "seq"), (DSYNC, "seq"), "mb_s"),
    Target("marslib qd32 IOPS / raw-dsync qd32", (MARS, "qd32"), (DSYNC, "qd32"), "iops"),
    Target("marslib randread qd32 IOPS / raw", (MARS, "randread"), (RAW, "randread"), "iops"),
    Target("marslib randread qd32 IOPS / nbdkit", (MARS, "randread"), (KIT, "randread"),
           "iops"),
    Target("marslib seq read MB/s / raw", (MARS, "seqread"), (RAW, "seqread"), "mb_s"),
    Target("marslib seq read MB/s / nbdkit", (MARS, "seqread"), (KIT, "seqread"), "mb_s"),
    Target("marslib CPU us per 4k write, qd1", (MARS, "qd1"), None, "cpu_us"),
    Target("marslib CPU us per 4k read, qd32", (MARS, "randread"), None, "cpu_us"),
    Target("nbdkit CPU us per 4k write, qd32", (KIT, "qd32"), None, "cpu_us"),
    Target("nbdkit CPU us per 4k read, qd32", (KIT, "randread"), None, "cpu_us"),
    Target("marslib-2res CPU us per 4k write, both", (TWO, "both"), None, "cpu_us"),
    Target("marslib-2res r0 alone / marslib qd32 IOPS", (TWO, "one"), (MARS, "qd32"), "iops"),
]


# ------------------------------------------------------------------ around each job
class Probe:
    """What is measured around a fio job besides fio's own figures (nothing, for raw)."""

    def before(self, tag: str, job: b.Job) -> None:
        pass

    def after(self, job: b.Job, res: b.FioResult) -> None:
        pass


class ServerProbe(Probe):
    """CPU of a server's process tree: % of one CPU during the job, microseconds per I/O."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu0 = self.t0 = 0.0

    def before(self, tag: str, job: b.Job) -> None:
        self.cpu0, self.t0 = b.cpu_seconds(self.pid), time.monotonic()

    def after(self, job: b.Job, res: b.FioResult) -> None:
        cpu = b.cpu_seconds(self.pid) - self.cpu0
        res.extra["server_cpu"] = 100 * cpu / (time.monotonic() - self.t0)
        res.extra["cpu_s"] = cpu
        res.extra["cpu_us_per_io"] = 1e6 * cpu / max(res.ios, 1)


class MarsdProbe(ServerProbe):
    """marsd's process tree (marsd and its workers): CPU, counters, drain, py-spy.

    After each job it waits until the writeback has drained, so the next job starts idle;
    the CPU per I/O counts marsd's CPU from the job's start until drained (the writeback
    a write causes is part of its cost), ``server_cpu`` only the job itself.
    """

    def __init__(self, marsd: b.Marsd, profile: Path | None, runtime: float) -> None:
        super().__init__(marsd.pid)
        self.marsd = marsd
        self.profile = profile
        self.runtime = runtime
        self.profiles: list[tuple[str, Path]] = []
        self.spy: Any = None
        self.counters0: dict[str, int] = {}

    def counters(self) -> dict[str, int]:
        keys = ("writes", "commits", "device_writes", "writeback_rounds", "pending_bytes")
        sts = [self.marsd.status(r) for r in self.marsd.resources]
        return {k: sum(st[k] for st in sts) for k in keys}

    def before(self, tag: str, job: b.Job) -> None:
        self.counters0 = self.counters()
        super().before(tag, job)
        self.spy = None
        if self.profile is not None:
            out = self.profile / f"{tag}-{job.name}.txt"
            self.spy = b.py_spy_start(self.pid, self.runtime, out)
            self.profiles.append((f"{tag} {job.title}", out))

    def after(self, job: b.Job, res: b.FioResult) -> None:
        cpu_job = b.cpu_seconds(self.pid) - self.cpu0
        res.extra["server_cpu"] = 100 * cpu_job / (time.monotonic() - self.t0)
        res.extra["processes"] = len(b.process_tree(self.pid))
        if self.spy is not None:
            self.spy.wait(60)
        res.extra["pending_at_end_mb"] = self.counters()["pending_bytes"] / 1e6
        res.extra["drain_s"] = self.marsd.wait_drained(poll=0.05)
        cpu = b.cpu_seconds(self.pid) - self.cpu0
        res.extra["cpu_s_job"] = cpu_job
        res.extra["cpu_s"] = cpu
        res.extra["cpu_us_per_io"] = 1e6 * cpu / max(res.ios, 1)
        after = self.counters()
        for key in ("writes", "commits", "device_writes", "writeback_rounds"):
            res.extra[key] = after[key] - self.counters0[key]
        res.extra["writes_per_commit"] = (
            res.extra["writes"] / res.extra["commits"] if res.extra["commits"] else 0.0)


def measure(case: str, tag: str, job: b.Job, probe: Probe,
            run_fio: Callable[[], b.FioResult]) -> b.FioResult:
    load1 = os.getloadavg()[0]
    probe.before(tag, job)
    res = run_fio()
    probe.after(job, res)
    res.extra["load1_before"] = load1
    report(case, job, res)
    return res


def run_jobs(case: str, tag: str, target: list[str], work: Path, runtime: float,
             probe: Probe, reads: bool = True) -> dict[str, b.FioResult]:
    """The write jobs, then (``reads``) a fill pass if needed and the read jobs."""
    out = work / "fio.json"
    results: dict[str, b.FioResult] = {}
    for job in b.JOBS:
        results[job.name] = measure(case, tag, job, probe,
                                    functools.partial(b.fio, job, target, out, runtime))
    if not reads:
        return results
    # the reads must read data, not holes: the seq job covered the region if it wrapped
    if results[b.SEQ.name].ios * (1 << 20) < REGION:
        results[b.FILL.name] = measure(case, tag, b.FILL, probe, lambda: b.fio(
            b.FILL, target, out, runtime, size=str(REGION), time_based=False))
    for job in b.READ_JOBS:
        results[job.name] = measure(case, tag, job, probe,
                                    functools.partial(b.fio, job, target, out, runtime))
    return results


# ------------------------------------------------------------------------ cases
def run_raw(work: Path, runtime: float, sync: bool) -> dict[str, b.FioResult]:
    case = "raw-dsync" if sync else "raw"
    with b.loop_device(work / "dev.img") as dev:
        # O_DSYNC changes nothing for reads: raw-dsync's reads would be raw's
        return run_jobs(case, case, b.libaio(dev, sync), work, runtime, Probe(), reads=not sync)


def run_nbdkit(work: Path, runtime: float) -> dict[str, b.FioResult]:
    sock = work / "nbdkit.sock"
    with b.loop_device(work / "dev.img") as dev, b.nbdkit(sock, dev) as proc:
        return run_jobs("nbdkit", "nbdkit", b.nbd(f"nbd+unix:///?socket={sock}"), work,
                        runtime, ServerProbe(proc.pid))


def run_marslib(work: Path, runtime: float, marsd_args: list[str], profile: Path | None
                ) -> tuple[dict[str, b.FioResult], dict[str, Any], list[tuple[str, Path]]]:
    with b.loop_device(work / "dev.img") as dev, b.Marsd(work, dev, marsd_args) as marsd:
        probe = MarsdProbe(marsd, profile, runtime)
        results = run_jobs("marslib", "marsd", b.nbd(marsd.nbd_uri), work, runtime, probe)
        view = marsd.view()
    return results, view, probe.profiles


def run_marslib_2res(work: Path, runtime: float, marsd_args: list[str], profile: Path | None
                     ) -> tuple[dict[str, b.FioResult], list[tuple[str, Path]]]:
    """r0 alone, then r0 and r1 at once (one fio process, one job per resource, started
    together), both on the same marsd, each resource on its own loop device."""
    case = "marslib-2res"
    out = work / "fio.json"
    with (b.loop_device(work / "dev.img") as dev0, b.loop_device(work / "dev1.img") as dev1,
          b.Marsd(work, dev0, marsd_args, more_devs=[dev1]) as marsd):
        probe = MarsdProbe(marsd, profile, runtime)
        results = {ONE.name: measure(case, "marsd-2res", ONE, probe, lambda: b.fio(
            ONE, b.nbd(marsd.uri("r0")), out, runtime))}

        def both() -> b.FioResult:
            per = b.fio_together([(r, BOTH, b.nbd(marsd.uri(r))) for r in marsd.resources],
                                 out, runtime)
            return summed(dict(zip(marsd.resources, per, strict=True)))

        results[BOTH.name] = measure(case, "marsd-2res", BOTH, probe, both)
    return results, probe.profiles


def summed(per: dict[str, b.FioResult]) -> b.FioResult:
    """The figures of jobs that ran at once, as one: rates and I/Os added up."""
    rs = list(per.values())
    ios = sum(r.ios for r in rs)
    return b.FioResult(
        mb_s=sum(r.mb_s for r in rs), iops=sum(r.iops for r in rs),
        lat_mean_us=sum(r.lat_mean_us * r.ios for r in rs) / max(ios, 1),
        lat_p99_us=max(r.lat_p99_us for r in rs), ios=ios,
        seconds=max(r.seconds for r in rs), fio_cpu=sum(r.fio_cpu for r in rs),
        extra={"per_resource": {name: {"iops": r.iops, "mb_s": r.mb_s, "ios": r.ios,
                                       "lat_mean_us": r.lat_mean_us}
                                for name, r in per.items()}})


def report(case: str, job: b.Job, r: b.FioResult) -> None:
    cpu = ""
    if "server_cpu" in r.extra:
        cpu = (f", server CPU {r.extra['server_cpu']:.0f}%, "
               f"{r.extra['cpu_us_per_io']:.0f} us/IO")
    per = "".join(f", {n} {x['iops']:.0f}" for n, x in r.extra.get("per_resource", {}).items())
    b.say(f"  {case:<12} {job.title:<32} {r.mb_s:8.1f} MB/s {r.iops:9.0f} IOPS{per}  "
          f"lat {r.lat_mean_us:8.0f} us{cpu}")


# ------------------------------------------------------------------------- main
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
                    help="profile marsd and its child processes during each marslib job with "
                         "the venv's py-spy (.venv/bin/pip install py-spy); collapsed stacks "
                         "go to DIR, a summary per job is printed")
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

    started = time.strftime("%Y-%m-%d %H:%M")
    b.banner("data path", f"{runtime:g} s per job, first 1 GiB of a 2 GiB "
             f"loop device (direct I/O) per case, images and log under {args.dir}")
    load_start = b.load_average()
    results: dict[str, dict[str, b.FioResult]] = {}
    view: dict[str, Any] = {}
    profiles: list[tuple[str, Path]] = []
    with b.work_dir(args.dir) as work:
        for case in cases:
            b.say(f"{case}: (load average {b.load_average()})")
            if case == "raw":
                results[case] = run_raw(work, runtime, sync=False)
            elif case == "raw-dsync":
                results[case] = run_raw(work, runtime, sync=True)
            elif case == "nbdkit":
                results[case] = run_nbdkit(work, runtime)
            elif case == "marslib":
                results[case], view, spied = run_marslib(work, runtime, args.marsd_arg,
                                                         args.py_spy)
                profiles += spied
            else:
                results[case], spied = run_marslib_2res(work, runtime, args.marsd_arg,
                                                        args.py_spy)
                profiles += spied
    load_end = b.load_average()

    b.say()
    b.say(f"load average (1/5/15 min): {load_start} at the start, {load_end} at the end")
    b.say("RESULTS (MB/s = 10^6 bytes/s; lat = mean completion latency; server CPU = the "
          "server's process tree during the job, % of one CPU; CPU us/IO = server CPU "
          "microseconds per I/O, for marsd until its writeback drained)")
    titles = {j.name: j.title for j in (*b.JOBS, *b.READ_JOBS, b.FILL, ONE, BOTH)}
    rows = [["case", "job", "MB/s", "IOPS", "lat us", "p99 us", "server CPU", "CPU us/IO"]]
    for case, per_job in results.items():
        for name, r in per_job.items():
            title = titles[name]
            cpu = r.extra.get("server_cpu")
            rows.append([case, title, f"{r.mb_s:.1f}", f"{r.iops:.0f}",
                         f"{r.lat_mean_us:.0f}", f"{r.lat_p99_us:.0f}",
                         "-" if cpu is None else f"{cpu:.0f}%",
                         "-" if cpu is None else f"{r.extra['cpu_us_per_io']:.1f}"])
    b.say(b.table(rows, right={2, 3, 4, 5, 6, 7}))

    marsd_cases = [c for c in (MARS, TWO) if c in results]
    if marsd_cases:
        b.say()
        b.say("MARSD COUNTERS per job (group commit: writes per log fdatasync; writeback: "
              "device writes after merging; drain: writeback catching up after the job; "
              "procs: marsd's processes at the end of the job)")
        rows = [["case", "job", "writes", "commits", "writes/commit", "device writes",
                 "wb rounds", "pending at end", "drain", "procs"]]
        for case in marsd_cases:
            for name, r in results[case].items():
                x = r.extra
                rows.append([case, name, str(x["writes"]), str(x["commits"]),
                             f"{x['writes_per_commit']:.1f}", str(x["device_writes"]),
                             str(x["writeback_rounds"]), f"{x['pending_at_end_mb']:.0f} MB",
                             f"{x['drain_s']:.2f} s", str(x["processes"])])
        b.say(b.table(rows, right=set(range(2, 10))))
    if view:
        b.say("marsadm view --json after the marslib runs: " + json.dumps(
            {k: view.get(k) for k in ("writes", "commits", "writes_per_commit",
                                      "pending_bytes", "log_end", "applied")}))

    for title, path in profiles:
        b.say()
        b.say(f"PY-SPY marsd and its child processes during {title} ({path})")
        b.say(b.py_spy_summary(path))

    b.say()
    b.say("TARGETS")
    rows = [["ratio", "value", "target", ""]]
    figures = []
    for t in TARGETS:
        value = t.value(results)
        if value is None:
            continue
        verdict = t.verdict(value)
        figures.append({"label": t.label, "value": value, "goal": t.goal,
                        "at_most": t.at_most, "verdict": verdict})
        rows.append([t.label, f"{value:.1f}" if t.den is None else f"{value:.2f}",
                     t.goal_text(), verdict])
    if len(rows) > 1:
        b.say(b.table(rows, right={1, 2}))
    else:
        b.say("(needs marslib and the case it is compared with)")
    one_cpu = results.get(TWO, {}).get(ONE.name, b.FioResult(0, 0, 0, 0, 0, 0, 0)).extra.get(
        "server_cpu", 100.0)
    if one_cpu < 90:
        b.say(f"note: marsd used {one_cpu:.0f}% of a CPU for r0 alone, so that job was not "
              "CPU-bound (a busy machine, or waiting for the log flush); the 2-resource "
              "ratio then measures more than the use of a second CPU (two logs also flush "
              "in parallel)")
    b.say()
    b.say("notes: raw and nbdkit acknowledge a write before it is durable (no FUA, no flush); "
          "raw-dsync and marslib acknowledge only durable writes. nbdkit cache=none only "
          "drops the page cache after writing. Reads read the region written before.")

    if args.json:
        args.json.write_text(json.dumps({
            "date": started, "machine": b.machine_description(),
            "code": b.code_version(), "runtime": runtime,
            "load_average": {"start": load_start, "end": load_end},
            "results": {c: {j: asdict(r) for j, r in per.items()} for c, per in results.items()},
            "targets": figures, "marsd_view": view,
        }, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
