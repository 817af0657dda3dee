"""Writeback order benchmark: marsd's sorted writeback against arrival order.

The application's writes are acknowledged once they are in the log; the writeback copies
them to the data device later. With ``--writeback-order sorted`` each writeback round writes
what accumulated since the last one sorted by offset, adjacent blocks merged into one device
write and overwritten blocks written once; ``arrival`` writes every logged write as it came.
Sorting only has something to sort when the writeback lags behind the application, so marsd
runs with ``--memory-limit 1G`` (up to 1 GiB may wait for writeback before writers block),
and the comparison is made twice, on fresh 2 GiB direct-I/O loop devices:

* fast device: the loop device as it is. Its random writes are fast; where the writeback
  lags here, marsd's own writeback thread (one write at a time, sharing the GIL with the
  NBD event loop) is the limit, not the device, and sorting changes little
* IOPS-bound device: the same, but marsd's writes to it limited to N requests per second
  with a blkio cgroup (default 2000, a few disks that seek): every device write
  costs the same whatever its size, so merging and skipping overwritten blocks pay off

Workload: fio random 4 KiB writes at iodepth 32 through the NBD export for 10 s (--quick:
4 s) on the first 1 GiB. Reported: application IOPS, how much was left to write back when
fio stopped, how long the writeback needed to drain it (until pending_bytes == 0 and
applied == log_end), and marsd's device_writes count.

    .venv/bin/python bench/writeback_order.py [--quick] [--device-iops N] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import benchlib as b

ORDERS = ("sorted", "arrival")

EXPLANATION = (
    "What the ratios mean. The application is acknowledged from the log, so its IOPS do not "
    "depend on the writeback order (ratio ~1, within the noise) as long as the backlog stays "
    "under --memory-limit; a writer that fills the limit is throttled to the writeback's "
    "pace, and then the writeback order is the application's speed.",
    "The order decides how fast the backlog reaches the data device. 'drain time "
    "arrival/sorted' of 2 would mean the sorted writeback catches up in half the time after "
    "the writer stops (the device is consistent and the log deletable sooner). It depends "
    "on the backlog left, so 'wb writes/s' is the fairer figure: logged writes that reached "
    "the device per second from fio's start until the backlog was gone, the writeback's "
    "throughput. 'writes per device write' is the merging factor: logged writes per device "
    "request, > 1 when adjacent blocks were merged and overwritten blocks written once "
    "(arrival order is always 1.00). In arrival order pending_bytes counts each block once "
    "although every overwritten version still waits to be written, so there the backlog "
    "is bigger than 'pending' says.",
    "How much sorting gains depends on how dense a writeback round is: a round takes "
    "everything logged since the previous round, so the more the writeback lags, the "
    "bigger and denser the rounds. Uniform 4 KiB writes over 1 GiB leave few neighbours to "
    "merge even in a round of 200 MB, so expect ratios of 1.05-1.3; writes with locality "
    "(--distribution zipf:1.2) merge and overwrite far more. An IOPS limit charges each "
    "request the same, whatever its offset: a seeking disk would profit more from sorted "
    "rounds (shorter seeks), which this does not model. On the fast device the writeback "
    "is limited by marsd's CPU rather than by the device, so both orders drain at about "
    "the same pace there.",
)


def measure(work: Path, order: str, runtime: float, size: str, iops_limit: int,
            memory_limit: str, job: b.Job) -> dict[str, Any]:
    """One run: fresh device, marsd with ``order``, fio, then wait for the writeback."""
    with b.loop_device(work / "dev.img") as dev, \
            b.write_iops_limit(dev, iops_limit) if iops_limit else nullcontext() as cgroup:
        if iops_limit and cgroup is None:
            raise RuntimeError("no blkio cgroup throttling here (cgroup v1 blkio needed)")
        args = ["--memory-limit", memory_limit, "--writeback-order", order]
        with b.Marsd(work, dev, args, cgroup=cgroup) as marsd:
            peak = [0]
            stop = threading.Event()

            def sample() -> None:  # the largest backlog seen while fio runs
                while not stop.wait(0.25):
                    try:
                        peak[0] = max(peak[0], marsd.status()["pending_bytes"])
                    except Exception:  # noqa: BLE001 - a missed sample is no problem
                        pass

            sampler = threading.Thread(target=sample, daemon=True)
            cpu0 = b.cpu_seconds(marsd.pid)
            t0 = time.monotonic()
            sampler.start()
            try:
                res = b.fio(job, b.nbd(marsd.nbd_uri), work / "fio.json", runtime, size)
            finally:
                stop.set()
                sampler.join()
            t_end = time.monotonic()
            at_end = marsd.status()
            marsd.wait_drained(timeout=300)
            drain = time.monotonic() - t_end  # from fio's end until the backlog is gone
            final = marsd.status()
            cpu = b.cpu_seconds(marsd.pid) - cpu0
            wall = time.monotonic() - t0
    pending_mb = at_end["pending_bytes"] / 1e6
    return {
        "order": order,
        "app_iops": res.iops,
        "app_lat_us": res.lat_mean_us,
        "writes": final["writes"],
        "peak_pending_mb": max(peak[0], at_end["pending_bytes"]) / 1e6,
        "pending_at_end_mb": pending_mb,
        "drain_s": drain,
        "clean_s": t_end - t0 + drain,  # from fio's start until all of it is on the device
        # logged writes that reached the device per second, over the whole run: the
        # writeback's throughput, whatever moment the rounds happened to start at
        "wb_writes_s": final["writes"] / (t_end - t0 + drain),
        "device_writes": final["device_writes"],
        "writeback_rounds": final["writeback_rounds"],
        "writes_per_device_write": final["writes"] / max(final["device_writes"], 1),
        "total_s": wall,
        "marsd_cpu_pct": 100 * cpu / wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 s of writes instead of 10 s")
    ap.add_argument("--runtime", type=float, help="seconds of writes (overrides --quick)")
    ap.add_argument("--device-iops", type=int, default=2000,
                    help="write IOPS of the IOPS-bound device (0: only the fast device)")
    ap.add_argument("--fast-device", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure on the unthrottled loop device (default: yes)")
    ap.add_argument("--size", default="1G", help="range written at random (default 1G)")
    ap.add_argument("--distribution", default="random",
                    help="fio random_distribution of the offsets: random (uniform, default), "
                         "or e.g. zipf:1.2 for hot blocks that are overwritten again and again")
    ap.add_argument("--memory-limit", default="1G", help="marsd --memory-limit (default 1G)")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the device images and the log area go (not tmpfs)")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = ap.parse_args()
    runtime = args.runtime or (4.0 if args.quick else 10.0)
    devices: list[tuple[str, int]] = []
    if args.fast_device:
        devices.append(("fast", 0))
    if args.device_iops:
        devices.append((f"{args.device_iops} IOPS", args.device_iops))
    if not devices:
        ap.error("nothing to measure: --no-fast-device and --device-iops 0")
    job = b.Job(b.RAND32.name, b.RAND32.title,
                (*b.RAND32.args, f"--random_distribution={args.distribution}"))
    b.install_signal_handlers()
    b.check_tools("fio", "losetup")

    b.banner("writeback order", f"fio randwrite 4k iodepth 32 for {runtime:g} s on the "
             f"first {args.size} of a 2 GiB loop device ({args.distribution} offsets), "
             f"marsd --memory-limit {args.memory_limit}")
    results: list[dict[str, Any]] = []
    with b.work_dir(args.dir) as work:
        for dev_name, iops in devices:
            for order in ORDERS:
                r = measure(work, order, runtime, args.size, iops, args.memory_limit, job)
                r["device"] = dev_name
                results.append(r)
                b.say(f"  {dev_name:<10} {order:<8} app {r['app_iops']:6.0f} IOPS, "
                      f"{r['pending_at_end_mb']:5.0f} MB pending at the end, drained in "
                      f"{r['drain_s']:6.2f} s, {r['device_writes']} device writes")

    b.say()
    b.say("RESULTS (MB = 10^6 bytes; pending = acknowledged, not yet on the device)")
    rows = [["device", "order", "app IOPS", "app lat us", "peak pending", "pending at end",
             "drain", "wb writes/s", "device writes", "writes/dev write", "wb rounds",
             "marsd CPU"]]
    for r in results:
        rows.append([
            r["device"], r["order"], f"{r['app_iops']:.0f}", f"{r['app_lat_us']:.0f}",
            f"{r['peak_pending_mb']:.0f} MB", f"{r['pending_at_end_mb']:.0f} MB",
            f"{r['drain_s']:.2f} s", f"{r['wb_writes_s']:.0f}",
            str(r["device_writes"]), f"{r['writes_per_device_write']:.2f}",
            str(r["writeback_rounds"]), f"{r['marsd_cpu_pct']:.0f}%",
        ])
    b.say(b.table(rows, right=set(range(2, 12))))

    b.say()
    b.say("SORTED vs ARRIVAL (ratio > 1: sorted is better; the two runs' application writes "
          "differ a little, the rate ratios allow for that)")
    rows = [["device", "drain time arrival/sorted", "wb writes/s sorted/arrival",
             "writes per device write sorted/arrival", "app IOPS sorted/arrival"]]
    for dev_name, _ in devices:
        s = next(r for r in results if r["device"] == dev_name and r["order"] == "sorted")
        a = next(r for r in results if r["device"] == dev_name and r["order"] == "arrival")
        rows.append([
            dev_name, f"{a['drain_s'] / max(s['drain_s'], 1e-9):.2f}",
            f"{s['wb_writes_s'] / a['wb_writes_s']:.2f}",
            f"{s['writes_per_device_write'] / a['writes_per_device_write']:.2f}",
            f"{s['app_iops'] / max(a['app_iops'], 1e-9):.2f}",
        ])
    b.say(b.table(rows))
    b.say()
    for paragraph in EXPLANATION:
        b.say(textwrap.fill(paragraph, 100))
        b.say()

    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": b.machine_description(),
            "code": b.code_version(), "runtime": runtime, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
