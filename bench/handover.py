#!/usr/bin/env python3
"""Handover time of an in-sync resource on the lab (target: < 2 s).

Brings up a 2-host lab (--far: the second host behind 100 Mbit/s and 25 ms each way),
writes between handovers as an application would, waits until the secondary is up to
date, then times `marsadm primary r0` on the secondary, back and forth.

usage: .venv/bin/python bench/handover.py [--rounds 10] [--far] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from marslib.lab import Lab  # noqa: E402
from marslib.lab.scenario import replicate  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"
NBD_CLIENT = REPO / "tests" / "tools" / "nbd_client.py"
TARGET_SECONDS = 2.0


def member(lab: Lab, host: str) -> dict:  # type: ignore[type-arg]
    return lab.marsadm(host, "view")["resources"]["r0"]["members"][host]


def wait_in_sync(lab: Lab, primary: str, secondary: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        p, s = member(lab, primary), member(lab, secondary)
        if s.get("applied") == p.get("log_end") and s.get("state") == "UpToDate":
            return
        time.sleep(0.1)
    raise SystemExit(f"{secondary} did not catch up")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--far", action="store_true", help="lab2 behind a WAN link")
    ap.add_argument("--quick", action="store_true", help="4 rounds")
    args = ap.parse_args()
    rounds = 4 if args.quick else args.rounds
    lab = Lab.up(hosts=2, far=args.far, device_size="128M", lab_dir="/var/tmp/mars-bench-ho")
    try:
        replicate(lab)  # lab1 primary, lab2 joined over ssh and synced
        primary, secondary = "lab1", "lab2"
        marsadm_times, command_times = [], []
        for i in range(rounds):
            uri = f"nbd+unix:///r0?socket={lab.host(primary).run_dir / 'r0.nbd'}"
            w = lab.popen(primary, SYSTEM_PYTHON, str(NBD_CLIENT), uri, "writer", str(i + 1),
                          "8", "512", "65536", "1", stdout=subprocess.PIPE, text=True)
            w.communicate(timeout=60)
            wait_in_sync(lab, primary, secondary)
            t = time.monotonic()
            r = lab.marsadm(secondary, "primary", "r0", timeout=60)
            command_times.append(time.monotonic() - t)
            marsadm_times.append(float(r["seconds"]))
            primary, secondary = secondary, primary
        med = statistics.median(marsadm_times)
        print(f"lab: {'far (100 Mbit/s, 25 ms each way)' if args.far else 'near'}; "
              f"{rounds} handovers of an in-sync resource")
        print(f"handover (as marsadm reports it): median {med:.3f}s, "
              f"min {min(marsadm_times):.3f}s, max {max(marsadm_times):.3f}s")
        print(f"whole marsadm command incl. process start: median "
              f"{statistics.median(command_times):.3f}s")
        verdict = "PASS" if med < TARGET_SECONDS else "MISS"
        print(f"target median < {TARGET_SECONDS:.0f} s: {verdict}")
        return 0
    finally:
        lab.down()


if __name__ == "__main__":
    raise SystemExit(main())
