"""Log-based resync after a split brain against a full comparison of the same devices.

Two hosts on this machine, alpha and beta, each a marsd on its own loopback address (as the
tests run them), each with a data device of ``--size`` (default 1 GiB): a file on a real
filesystem, filled with random data, equal on both at the start. A split brain is made the
way a partition makes it, one marsd at a time: alpha (the primary) writes what beta does
not fetch and dies; beta takes over (``primary --force``) and writes; beta stops; alpha
comes back alone, still primary in its own tree, and writes; both come up, beta is the
primary, and alpha is the loser. Each side writes ``--fraction`` (default 0.5%) of the
64 KiB blocks, at random. Then, on alpha:

* log    ``marsadm invalidate r0 --wait``: the blocks either side wrote since the fork;
* full   ``marsadm invalidate r0 --full --wait`` on the same state (both marsd stopped,
         the state roots and devices restored from a copy made before the first run).

Each run is checked: once alpha caught up, its device equals beta's byte for byte. Prints
both times (the whole marsadm command, and the sync's own seconds), the ratio log / full
(target <= 0.1), the disk floor (``dd`` reading both devices at once, O_DIRECT, right
before each run) and the machine's load. Exits 0 whenever the measurement itself worked.

    .venv/bin/python bench/resync.py [--size 1G] [--fraction 0.005] [--dir /var/tmp]
                                     [--json FILE] [--logs DIR] [--profile DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as b

from marslib.sizes import parse_size

BLOCK = 64 << 10
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3 carries libnbd's binding
NBD_CLIENT = Path(__file__).resolve().parent.parent / "tests" / "tools" / "nbd_client.py"


class Host:
    """One host's state root, run dir and marsd, on its own loopback address."""

    def __init__(self, base: Path, name: str, ip: str, port_base: int) -> None:
        self.name = name
        self.ip = ip
        self.port_base = port_base
        self.root = base / name / "mars"
        self.run_dir = base / name / "run"
        self.log_path = base / name / "marsd.log"
        self.env = {**os.environ, "MARS_ROOT": str(self.root),
                    "MARS_RUN_DIR": str(self.run_dir), "MARS_HOST": name}
        self.proc: subprocess.Popen[bytes] | None = None

    def marsadm(self, *args: str, timeout: float = 600.0,
                profile: Path | None = None) -> dict[str, Any]:
        """One marsadm command's JSON reply; with ``profile``, run under cProfile and
        keep its figures in that file."""
        prefix = [str(b.VENV_BIN / "python"), "-m", "cProfile", "-o", str(profile)] \
            if profile else []
        out = b.run([*prefix, b.MARSADM, *args, "--json", "--timeout", str(timeout)],
                    env=self.env, timeout=timeout + 30)
        reply: dict[str, Any] = json.loads(out.stdout)
        return reply

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [b.MARSD, "--listen", self.ip, "--port-base", str(self.port_base),
                 "--metrics", "off", "--log-level", "INFO"], env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        sock = self.run_dir / "marsd.sock"  # a killed marsd leaves its socket file behind
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"marsd on {self.name} did not start: "
                                   f"{self.log_path.read_text()[-2000:]}")
            with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                s.connect(str(sock))
                return
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            b.stop_process(self.proc, timeout=60)
            self.proc = None

    def kill9(self) -> None:
        """SIGKILL to marsd and its workers: the process group of the marsd started here."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def status(self) -> dict[str, Any]:
        from marslib import control
        reply = control.request(self.run_dir / "marsd.sock", "status", timeout=30)
        return dict(reply["resources"].get("r0", {}))

    def view(self) -> dict[str, Any]:
        return dict(self.marsadm("view")["resources"]["r0"])

    def uri(self) -> str:
        return f"nbd+unix:///r0?socket={self.run_dir / 'r0.nbd'}"


def wait(what: str, cond: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def write_blocks(host: Host, blocks: list[int], seed: int) -> None:
    for i in range(0, len(blocks), 200):
        b.run([SYSTEM_PYTHON, str(NBD_CLIENT), host.uri(), "blocks", str(seed),
               *map(str, blocks[i:i + 200])], timeout=300)


def fill_random(path: Path, size: int) -> None:
    chunk = 16 << 20
    with open(path, "wb") as f:
        for _ in range(0, size, chunk):
            f.write(os.urandom(chunk))
        f.truncate(size)
        os.fsync(f.fileno())




def in_sync(primary: Host, secondary: Host) -> bool:
    p, s = primary.status(), secondary.status()
    return bool(s.get("applied") == p.get("log_end") and s.get("consistent"))


class Bench:
    def __init__(self, base: Path, size: int, fraction: float) -> None:
        self.base = base
        self.size = size
        self.fraction = fraction
        tag = os.getpid() % 200 + 20
        port = b.free_ports(3)
        self.state = base / "state"
        self.a = Host(self.state, "alpha", f"127.{tag}.77.1", port)
        self.b = Host(self.state, "beta", f"127.{tag}.77.2", port)
        self.img_a = self.state / "a.img"
        self.img_b = self.state / "b.img"

    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def stop(self) -> None:
        for h in self.hosts():
            h.stop()

    def make_split(self) -> dict[str, Any]:
        a, bb = self.a, self.b
        self.state.mkdir(parents=True)
        t = time.monotonic()
        fill_random(self.img_a, self.size)
        b.run(["cp", "--sparse=never", str(self.img_a), str(self.img_b)], timeout=600)
        fill_s = time.monotonic() - t
        a.marsadm("create-cluster", "--ip", a.ip)
        a.marsadm("create-resource", "r0", str(self.img_a))
        a.start()
        a.marsadm("up", "r0")
        bb.marsadm("join-cluster", "alpha", "--ip", bb.ip, "--from-root", str(a.root))
        bb.start()
        t = time.monotonic()
        bb.marsadm("join-resource", "r0", str(self.img_b), "--wait")
        join_s = time.monotonic() - t
        wait("beta in sync", lambda: in_sync(a, bb))
        rng = random.Random(7)
        nblocks = self.size // BLOCK
        per_side = max(2, round(nblocks * self.fraction))
        mine = rng.sample(range(nblocks), per_side)
        theirs = rng.sample(range(nblocks), per_side)
        half = per_side // 2
        bb.marsadm("pause-fetch", "r0")
        write_blocks(a, sorted(mine[:half]), seed=2)
        a.kill9()  # alpha is gone (crashed, or cut off)
        bb.marsadm("primary", "r0", "--force")
        bb.marsadm("resume-fetch", "r0")
        write_blocks(bb, sorted(theirs), seed=3)
        bb.stop()  # the partition: alpha comes back without beta
        a.start()
        wait("alpha serving alone", lambda: a.status().get("role") == "primary")
        write_blocks(a, sorted(mine[half:]), seed=4)
        a.marsadm("log-rotate", "r0")
        a.stop()
        a.marsadm("down", "r0")  # alpha must learn who is primary before it runs r0
        bb.start()
        a.start()
        wait("alpha learns beta is primary", lambda: a.view()["primary"] == "beta")
        a.marsadm("up", "r0")
        self.wait_split_brain()
        return {"fill_s": fill_s, "join_s": join_s, "blocks_per_side": per_side}

    def wait_split_brain(self) -> None:
        wait("the split brain seen on alpha",
             lambda: self.a.view()["members"]["alpha"]["state"] == "SplitBrain")

    def keep_logs(self, dest: Path | None, case: str) -> None:
        if dest is None:
            return
        dest.mkdir(parents=True, exist_ok=True)
        for h in self.hosts():
            if h.log_path.exists():
                b.run(["cp", str(h.log_path), str(dest / f"{case}-{h.name}.log")])

    def snapshot(self, dest: Path) -> None:
        self.stop()
        b.run(["cp", "-a", str(self.state), str(dest)], timeout=600)

    def restore(self, src: Path) -> None:
        self.stop()
        b.run(["rm", "-rf", str(self.state)])
        b.run(["cp", "-a", str(src), str(self.state)], timeout=600)

    def start(self) -> None:
        self.b.start()
        self.a.start()
        wait("alpha runs r0 as secondary", lambda: self.a.status().get("role") == "secondary")
        self.wait_split_brain()

    def invalidate(self, *extra: str, profile: Path | None = None) -> dict[str, Any]:
        floor = b.read_at_once([self.img_a, self.img_b])
        load = os.getloadavg()
        t, at = time.monotonic(), time.time()
        r = self.a.marsadm("invalidate", "r0", "--wait", *extra, profile=profile)
        secs = time.monotonic() - t
        wait("alpha caught up", lambda: in_sync(self.b, self.a), timeout=300)
        self.a.marsadm("pause-replay", "r0")
        same = filecmp.cmp(self.img_a, self.img_b, shallow=False)
        self.a.marsadm("resume-replay", "r0")
        return {"s": secs, "sync_s": r.get("seconds"), "compared": r.get("compared"),
                "copied": r.get("copied"), "mode": r.get("resync"), "blocks": r.get("blocks"),
                "reason": r.get("reason"), "floor_s": floor, "load": load,
                "identical": same, "started_at": at}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="device size (default 1G)")
    ap.add_argument("--fraction", type=float, default=0.005,
                    help="share of the 64 KiB blocks each side writes (default 0.005)")
    ap.add_argument("--dir", default="/var/tmp", help="a real filesystem for the state and "
                    "the devices (not tmpfs)")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    ap.add_argument("--logs", type=Path, help="keep both marsd logs in this directory")
    ap.add_argument("--profile", type=Path, help="run each invalidate command under cProfile "
                    "and keep its figures in this directory (log.prof, full.prof); the "
                    "profiler slows the command down")
    args = ap.parse_args()
    size = parse_size(args.size)
    b.install_signal_handlers()
    b.check_tools("dd", "cp")
    if not Path(SYSTEM_PYTHON).exists():
        sys.exit(f"{SYSTEM_PYTHON} with libnbd's binding is needed (apt-get install "
                 "python3-libnbd)")
    b.banner("log-based resync", f"{args.size} devices, {args.fraction:.1%} of the "
             f"{size // BLOCK} blocks of 64 KiB written on each side of the split brain")
    started = time.monotonic()
    res: dict[str, Any] = {"size": size, "fraction": args.fraction}
    with b.work_dir(args.dir) as base:
        bench = Bench(base, size, args.fraction)
        try:
            res["setup"] = bench.make_split()
            b.say(f"devices filled in {res['setup']['fill_s']:.1f} s; beta joined (a full "
                  f"comparison of equal devices) in {res['setup']['join_s']:.1f} s; split "
                  f"brain made, {res['setup']['blocks_per_side']} blocks written per side")
            copy = base / "copy"
            bench.snapshot(copy)
            bench.start()
            res["log"] = bench.invalidate(profile=prof(args.profile, "log"))
            b.say(f"[log]  {fmt(res['log'])}")
            bench.keep_logs(args.logs, "log")
            bench.restore(copy)
            bench.start()
            res["full"] = bench.invalidate("--full", profile=prof(args.profile, "full"))
            b.say(f"[full] {fmt(res['full'])}")
        finally:
            bench.stop()
            bench.keep_logs(args.logs, "full")
    report(res)
    b.say(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


def prof(directory: Path | None, case: str) -> Path | None:
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return directory.resolve() / f"{case}.prof"


def fmt(m: dict[str, Any]) -> str:
    return (f"{m['mode']}: {m['s']:.2f} s (sync {m['sync_s']:.2f} s), "
            f"{(m['compared'] or 0) / 2**20:.1f} MiB compared, "
            f"{(m['copied'] or 0) / 2**20:.1f} MiB copied, identical: {m['identical']}; "
            f"disk floor {m['floor_s']:.2f} s; load {m['load'][0]:.2f}"
            + (f"; reason: {m['reason']}" if m["reason"] else ""))


def report(res: dict[str, Any]) -> None:
    lg, fu = res["log"], res["full"]
    rows = [["case", "command s", "sync s", "compared MiB", "copied MiB", "disk floor s",
             "load 1/5/15", "identical"]]
    for name, m in (("log-based", lg), ("full", fu)):
        rows.append([name, f"{m['s']:.2f}", f"{m['sync_s']:.2f}",
                     f"{(m['compared'] or 0) / 2**20:.1f}", f"{(m['copied'] or 0) / 2**20:.2f}",
                     f"{m['floor_s']:.2f}", "/".join(f"{x:.1f}" for x in m["load"]),
                     str(m["identical"])])
    b.say()
    b.say(b.table(rows))
    ratio = lg["s"] / fu["s"]
    sync_ratio = lg["sync_s"] / fu["sync_s"] if fu["sync_s"] else float("nan")
    floor = (lg["floor_s"] + fu["floor_s"]) / 2
    b.say()
    b.say(f"log / full, whole command: {ratio:.3f} (target <= 0.1: "
          f"{'PASS' if ratio <= 0.1 else 'MISS'})")
    b.say(f"log / full, the sync alone: {sync_ratio:.3f}")
    b.say(f"full / disk floor: {fu['s'] / floor:.2f}; log / disk floor: {lg['s'] / floor:.2f}")
    if lg["mode"] != "log":
        b.say(f"WARNING: the first run was not log-based: {lg['reason']}")
    if floor < 2.0:
        b.say("note: the disk floor is short (the host's cache): marsadm's own start and "
              "its polling weigh heavily in the log-based time")


if __name__ == "__main__":
    sys.exit(main())
