"""Replication benchmark: how fast do logs travel from the primary to a secondary?

Runs on the lab (two network namespaces on a bridge, ``marslib.lab``), for each link rate
(default 100mbit and 1gbit, tbf on lab2's link, both directions):

* baseline  plain TCP lab1 -> lab2 for a few seconds (a Python sender in lab1, a receiver
            in lab2 on port 7778, the fetch port), over the same shaped link, in the same run
* backlog   lab2 up to date, ``pause-fetch`` on lab2, a backlog written on lab1 through NBD
            (random data, nbdcopy), ``resume-fetch``: time until lab2's fetched end reaches the
            primary's log end. Replication throughput = log bytes / time; the ratio against
            the baseline should be >= 0.97.
* collapse  a writer at a steady rate below the link rate (fio nbd), the link collapses 100x
            for 3 s and comes back: the backlog at the end of the collapse and the time until
            the lag is back to its steady level, against backlog / spare rate. Where that
            time goes: a timeline in 100 ms bins (log bytes fetched and applied, fetch and
            replay lag, on-CPU and run-queue wait of both marsd and their resource workers,
            the worker's threads on lab2, the machine's CPU), summed per phase (steady,
            collapsed, recovery).

Prints a table with the figures, the ratios and PASS/MISS; exits 0 whenever the
measurement itself worked. Takes ~1.5 min (``--quick`` ~40 s); the lab is taken down on
any exit (error, Ctrl-C, SIGTERM).

    .venv/bin/python bench/replication.py [--quick] [--rates 100mbit,1gbit]
                                          [--connections 2,4] [--py-spy DIR] [--json FILE]
                                          [--timeline] [--collapse-pause-replay]
                                          [--collapse-only]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib as b

from marslib import control
from marslib.lab import Lab
from marslib.layout import parse_logfile_name
from marslib.position import LogPosition

RES = "r0"
BASELINE_PORT = 7778  # the fetch port: same path as marsd's fetch connections
POLL = 0.02  # seconds between status polls (control socket: cheap, no marsadm process)
# seconds between samples of the collapse's probe (both hosts' status, /proc): sampling
# costs CPU in the bench and in both marsd and workers, 27% of one CPU every 20 ms and 4%
# every 100 ms (measured on the idle pair), CPU that the catch-up it measures needs; the
# moment the lag crosses the threshold is interpolated between two samples
PROBE_INTERVAL = 0.1
MB = 1e6
TARGET_RATIO = 0.97
SYSTEM_PYTHON = "/usr/bin/python3"

RECEIVER = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
buf = bytearray(1 << 20)
n = first = 0
t0 = None
while True:
    k = c.recv_into(buf)
    if not k:
        break
    if t0 is None:
        t0, first = time.monotonic(), k
    n += k
print(n - first, time.monotonic() - (t0 or 0), flush=True)
"""

SENDER = r"""
import os, socket, sys, time
c = socket.socket()
if len(sys.argv) > 4 and sys.argv[4]:  # marsd's --tcp-congestion, for a fair baseline
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[4].encode())
c.connect((sys.argv[1], int(sys.argv[2])))
data = os.urandom(1 << 20)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    c.sendall(data)
c.close()
"""


# plain TCP under the same collapse: the sender "writes" at a steady rate into a backlog of
# its own (like the primary's log) and sends it over N connections as fast as TCP lets it;
# the receiver records (time, bytes received) every 10 ms
STREAM_RECEIVER = r"""
import json, socket, sys, threading, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.listen(n)
print("ready", flush=True)
conns = [s.accept()[0] for _ in range(n)]
total, ended, lock = [0], [0], threading.Lock()
def rx(c):
    buf = bytearray(1 << 20)
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        with lock:
            total[0] += k
    with lock:
        ended[0] += 1
for c in conns:
    threading.Thread(target=rx, args=(c,), daemon=True).start()
samples = []
while ended[0] < n:
    samples.append((time.time(), total[0]))
    time.sleep(0.01)
samples.append((time.time(), total[0]))
print(json.dumps(samples), flush=True)
"""

STREAM_SENDER = r"""
import os, socket, sys, threading, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rate, seconds, congestion = float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
CHUNK = 256 << 10
data = os.urandom(CHUNK)
conns = []
for _ in range(n):
    c = socket.socket()
    if congestion:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
    c.connect((ip, port))
    conns.append(c)
t0 = time.time()
print(t0, flush=True)
end = t0 + seconds
sent, lock = [0], threading.Lock()
def tx(c):
    while time.time() < end:
        with lock:
            go = rate * (time.time() - t0) - sent[0] >= CHUNK
            if go:
                sent[0] += CHUNK
        if go:
            c.sendall(data)
        else:
            time.sleep(0.002)
    c.close()
threads = [threading.Thread(target=tx, args=(c,)) for c in conns]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


# ------------------------------------------------------------------ lab plumbing
def rate_bytes(rate: str) -> float:
    """'100mbit' -> bytes per second (10^6 bits per mbit, like tc)."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    if rate in ("none", "off"):
        return float("inf")
    for unit, mult in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * mult / 8
    raise ValueError(f"rate {rate!r}: use e.g. 100mbit or 1gbit")


class ReplLab:
    """A 2-host lab with r0 primary on lab1 (and later secondary on lab2)."""

    def __init__(self, lab: Lab, congestion: str = "") -> None:
        self.lab = lab
        self.l1 = lab.host("lab1")
        self.l2 = lab.host("lab2")
        self.procs: list[subprocess.Popen[Any]] = []  # what this script started in the lab
        self.congestion = congestion  # marsd --tcp-congestion and the baseline's ("": host's)

    def marsd_args(self, *args: str) -> tuple[str, ...]:
        return (*args, *(("--tcp-congestion", self.congestion) if self.congestion else ()))

    # ---------------------------------------------------------------- set-up
    def create_primary(self, *marsd_args: str) -> None:
        lab, l1 = self.lab, self.l1
        lab.marsadm("lab1", "create-cluster", "--ip", l1.ip)
        lab.marsadm("lab1", "create-resource", RES, l1.devices[0])
        lab.marsd_start("lab1", *self.marsd_args(*marsd_args))
        lab.marsadm("lab1", "up", RES)

    def join_cluster(self) -> None:
        self.lab.marsadm("lab2", "join-cluster", self.l1.ip, "--ip", self.l2.ip, "--ssh-key",
                         str(self.lab.key), "--remote-root", str(self.l1.root),
                         "--accept-new-host-key")

    def join_resource(self, timeout: float = 300) -> float:
        t = time.monotonic()
        self.lab.marsadm("lab2", "join-resource", RES, self.l2.devices[0], "--wait",
                         "--timeout", str(timeout), timeout=timeout + 30)
        return time.monotonic() - t

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{RES}?socket={self.l1.run_dir / (RES + '.nbd')}"

    # ---------------------------------------------------------------- status
    def status(self, host: str) -> dict[str, Any]:
        """The live status of r0 in ``host``'s marsd, from its control socket; empty while
        r0 is not running there yet (its worker is starting)."""
        h = self.lab.host(host)
        reply = control.request(h.run_dir / "marsd.sock", "status", timeout=30)
        res: dict[str, Any] = reply["resources"].get(RES, {})
        return res

    def marsd_pid(self, host: str) -> int:
        pid = self.lab.marsd_pid(host)
        if pid is None:
            raise RuntimeError(f"marsd is not running on {host}:\n"
                               f"{self.lab.marsd_log_tail(host)}")
        return pid

    def log_sizes(self) -> list[tuple[int, int]]:
        """(number, size) of lab1's logfiles, oldest first."""
        rdir = self.l1.root / f"resource-{RES}"
        out = []
        for entry in os.scandir(rdir):
            parsed = parse_logfile_name(entry.name)
            if parsed:
                out.append((parsed[0], entry.stat().st_size))
        return sorted(out)

    def absolute(self, logfile: str, offset: int,
                 sizes: list[tuple[int, int]] | None = None) -> int:
        """Bytes of log history before (logfile, offset): logfiles sum up across rotations."""
        parsed = parse_logfile_name(logfile)
        if parsed is None:
            raise ValueError(f"bad logfile name {logfile!r}")
        sizes = self.log_sizes() if sizes is None else sizes
        return sum(size for number, size in sizes if number < parsed[0]) + offset

    def primary_end(self, sizes: list[tuple[int, int]] | None = None) -> int:
        pos = LogPosition.decode(self.status("lab1")["log_end"])
        return self.absolute(pos.logfile, pos.offset, sizes)

    def fetched(self, st: dict[str, Any] | None = None,
                sizes: list[tuple[int, int]] | None = None) -> int:
        st = st or self.status("lab2")
        if st.get("fetch_logfile") is None:
            return -1
        return self.absolute(st["fetch_logfile"], int(st["fetch_local_end"]), sizes)

    def applied(self, st: dict[str, Any] | None = None,
                sizes: list[tuple[int, int]] | None = None) -> int:
        st = st or self.status("lab2")
        if not st.get("applied"):
            return -1
        pos = LogPosition.decode(st["applied"])
        return self.absolute(pos.logfile, pos.offset, sizes)

    def wait_up_to_date(self, timeout: float = 120, applied: bool = True) -> float:
        """Seconds until lab2 has fetched (and applied) the primary's whole log.

        Both: after a full sync lab2 may have applied everything while it still fetches the
        part of the current logfile before the sync's start position."""
        t0 = time.monotonic()
        while True:
            sizes = self.log_sizes()
            end = self.primary_end(sizes)
            st = self.status("lab2")
            done = self.fetched(st, sizes)
            if applied:
                done = min(done, self.applied(st, sizes))
            if done >= end and st.get("phase") == "replaying":
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"lab2 did not catch up within {timeout:g}s: "
                                   f"{end - done} log bytes behind, {st}")
            time.sleep(POLL)

    def netdev(self, host: str, dev: str = "eth0") -> tuple[int, int]:
        """(rx, tx) bytes of ``dev`` inside ``host``'s namespace."""
        text = self.lab.exec(host, "cat", "/proc/net/dev").stdout
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == dev:
                f = rest.split()
                return int(f[0]), int(f[8])
        raise RuntimeError(f"no {dev} in {host}'s /proc/net/dev")

    # ---------------------------------------------------------------- processes
    def popen(self, host: str, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        proc = self.lab.popen(host, *cmd, **kw)
        self.procs.append(proc)
        return proc

    def stop_procs(self) -> None:
        for proc in self.procs:
            b.stop_process(proc, timeout=10)
        self.procs.clear()

    # ---------------------------------------------------------------- baseline
    def tcp_baseline(self, seconds: float, port: int = BASELINE_PORT) -> float:
        """Plain TCP lab1 -> lab2: payload bytes per second seen by the receiver.

        Port ``port`` on lab2's address must be free (stop lab2's marsd first)."""
        recv = self.popen("lab2", SYSTEM_PYTHON, "-c", RECEIVER, self.l2.ip, str(port),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert recv.stdout is not None
            if recv.stdout.readline().strip() != "ready":
                err = recv.stderr.read() if recv.stderr else ""
                raise RuntimeError(f"TCP receiver failed: {err}")
            self.lab.exec("lab1", SYSTEM_PYTHON, "-c", SENDER, self.l2.ip, str(port),
                          str(seconds), self.congestion, timeout=seconds + 60)
            out, err = recv.communicate(timeout=60)
            n, secs = out.split()
            return int(n) / float(secs)
        finally:
            b.stop_process(recv, timeout=5)


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far (for the machine's CPU use in a phase)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(x) for x in fields]
    idle = vals[3] + vals[4]  # idle + iowait
    return float(sum(vals) - idle), float(sum(vals))


@dataclass
class CpuMeter:
    """CPU use of some processes and of the whole machine between start and stop."""

    pids: dict[str, int]
    t0: float = 0.0
    cpu0: dict[str, float] = field(default_factory=dict)
    machine0: tuple[float, float] = (0.0, 0.0)
    result: dict[str, float] = field(default_factory=dict)

    def start(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.cpu0 = {k: b.cpu_seconds(p) for k, p in self.pids.items()}
        self.machine0 = machine_busy()
        return self

    def stop(self) -> dict[str, float]:
        secs = max(time.monotonic() - self.t0, 1e-6)
        self.result = {k: 100 * (b.cpu_seconds(p) - self.cpu0[k]) / secs
                       for k, p in self.pids.items()}
        busy, total = machine_busy()
        dt = max(total - self.machine0[1], 1.0)
        self.result["machine"] = 100 * (busy - self.machine0[0]) / dt  # % of all CPUs
        return self.result


# ------------------------------------------------------------------ catch-up timeline
def worker_pid(marsd_pid: int) -> int | None:
    """The resource worker process under ``marsd_pid`` (``python -m marslib.worker``)."""
    for pid in b.process_tree(marsd_pid)[1:]:
        with contextlib.suppress(OSError):
            if b"marslib.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    return None


def thread_times(pid: int) -> dict[int, tuple[int, int]]:
    """(on-CPU ns, run-queue wait ns) so far of every live thread of ``pid``
    (/proc/PID/task/TID/schedstat): wait = runnable but not running, i.e. CPU contention."""
    out: dict[int, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                run, wait = Path(task.path, "schedstat").read_text().split()[:2]
                out[int(task.name)] = (int(run), int(wait))
    return out


@dataclass
class ProbeSample:
    t: float
    end: int  # the primary's log end (bytes of log history)
    fetched: int  # lab2's fetched end
    applied: int  # lab2's replay position
    cpu: dict[str, tuple[int, int]]  # process -> (on-CPU ns, run-queue wait ns), all threads
    threads: dict[int, tuple[int, int]]  # lab2 worker: thread id -> (on-CPU ns, wait ns)
    machine: tuple[float, float]  # (busy, total) jiffies of all CPUs


@dataclass
class CatchUpProbe:
    """Samples lab2's fetch and replay positions and the CPU of both marsd and their
    workers, for a timeline of a collapse and its recovery."""

    rl: ReplLab
    pids: dict[str, int] = field(default_factory=dict)
    samples: list[ProbeSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        for host in ("lab1", "lab2"):
            marsd = self.rl.marsd_pid(host)
            self.pids[f"{host} marsd"] = marsd
            wpid = worker_pid(marsd)
            if wpid is not None:
                self.pids[f"{host} worker"] = wpid

    def sample(self) -> ProbeSample:
        st2 = self.rl.status("lab2")  # lab2 first: the lag is rather over- than underestimated
        sizes = self.rl.log_sizes()
        end = self.rl.primary_end(sizes)
        cpu = {}
        threads: dict[int, tuple[int, int]] = {}
        for name, pid in self.pids.items():
            tt = thread_times(pid)
            cpu[name] = (sum(x[0] for x in tt.values()), sum(x[1] for x in tt.values()))
            if name == "lab2 worker":
                threads = tt
        s = ProbeSample(time.monotonic(), end, self.rl.fetched(st2, sizes),
                        self.rl.applied(st2, sizes), cpu, threads, machine_busy())
        self.samples.append(s)
        return s

    # ------------------------------------------------------------ evaluation
    def _at(self, t: float, get: Any) -> float:
        """A cumulative figure ``get(sample)`` at time ``t``, interpolated linearly."""
        ss = self.samples
        i = bisect.bisect_left([s.t for s in ss], t)
        if i == 0 or i == len(ss):
            return float(get(ss[min(i, len(ss) - 1)]))
        a, c = ss[i - 1], ss[i]
        va, vc = float(get(a)), float(get(c))
        return va + (vc - va) * (t - a.t) / max(c.t - a.t, 1e-9)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Figures between ``t0`` and ``t1``: rates in B/s, CPU and wait in % of one CPU,
        machine in % of all CPUs; lags (MB) at ``t1``."""
        dt = max(t1 - t0, 1e-9)

        def delta(get: Any) -> float:
            return self._at(t1, get) - self._at(t0, get)

        row: dict[str, Any] = {
            "t0": t0, "t1": t1,
            "fetch_rate": delta(lambda s: s.fetched) / dt,
            "replay_rate": delta(lambda s: s.applied) / dt,
            "write_rate": delta(lambda s: s.end) / dt,
            "fetch_lag_mb": (self._at(t1, lambda s: s.end) - self._at(t1, lambda s: s.fetched))
            / MB,
            "replay_lag_mb": (self._at(t1, lambda s: s.end)
                              - self._at(t1, lambda s: s.applied)) / MB,
        }
        for name in self.pids:
            row[f"{name} cpu"] = 100 * delta(lambda s, n=name: s.cpu.get(n, (0, 0))[0]) / 1e9 / dt
            row[f"{name} wait"] = 100 * delta(lambda s, n=name: s.cpu.get(n, (0, 0))[1]) / 1e9 \
                / dt
        busy = delta(lambda s: s.machine[0])
        total = delta(lambda s: s.machine[1])
        row["machine"] = 100 * busy / total if total > 0 else float("nan")
        return row

    def worker_threads(self, t0: float, t1: float) -> list[tuple[str, float, float]]:
        """lab2 worker's threads between ``t0`` and ``t1``: (name, CPU %, wait %), busiest
        first; the event loop is the main thread (thread id = pid)."""
        a = min(self.samples, key=lambda s: abs(s.t - t0))
        c = min(self.samples, key=lambda s: abs(s.t - t1))
        dt = max(c.t - a.t, 1e-9)
        main = self.pids.get("lab2 worker")
        out = []
        for tid, (run, wait) in c.threads.items():
            run0, wait0 = a.threads.get(tid, (0, 0))
            name = "event loop" if tid == main else f"thread {tid}"
            out.append((name, 100 * (run - run0) / 1e9 / dt, 100 * (wait - wait0) / 1e9 / dt))
        return sorted(out, key=lambda x: -x[1])

    def timeline(self, t0: float, t1: float, step: float = 0.1) -> list[dict[str, Any]]:
        rows, t = [], t0
        while t + step / 2 < t1:
            rows.append(self.window(t, min(t + step, t1)))
            t += step
        return rows


@contextlib.contextmanager
def lab_session(lab_dir: Path, device_size: str, congestion: str = "") -> Iterator[ReplLab]:
    """A fresh lab in ``lab_dir``, always taken down again (also on errors and signals)."""
    lab = Lab.up(hosts=2, device_size=device_size, lab_dir=lab_dir)
    rl = ReplLab(lab, congestion)
    try:
        yield rl
    finally:
        with contextlib.suppress(Exception):
            rl.stop_procs()
        failed = isinstance(sys.exc_info()[1], Exception)  # not for Ctrl-C or SIGTERM
        for host in ("lab1", "lab2"):
            if failed:
                with contextlib.suppress(Exception):
                    tail = lab.marsd_log_tail(host, 15)
                    if tail.strip():
                        print(f"--- marsd log of {host} (tail):\n{tail}", file=sys.stderr)
        left = lab.down()
        if left:
            print(f"WARNING: lab down left: {left}", file=sys.stderr)
        elif sys.exc_info()[0] is not None:
            print(f"stopped early; the lab in {lab.dir} is down", file=sys.stderr)


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    """``size`` random bytes at ``path``, on the disk when this returns: left dirty in the
    page cache, the kernel would write them out about 30 s later (dirty_expire), in the
    middle of a later phase, on the disk the lab hosts share."""
    import random
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return path


def ratio_row(label: str, value: float, goal: float | None, higher_is_better: bool = True,
              fmt: str = "{:.2f}") -> list[str]:
    if goal is None:
        return [label, fmt.format(value), "-", ""]
    ok = value >= goal if higher_is_better else value <= goal
    return [label, fmt.format(value), (">= " if higher_is_better else "<= ") + fmt.format(goal),
            "PASS" if ok else "MISS"]


# ------------------------------------------------------------------ measurements
def measure_backlog(rl: ReplLab, payload: Path, spy: Path | None = None,
                    no_replay: bool = False) -> dict[str, Any]:
    """pause-fetch, write ``payload`` through NBD, resume-fetch, time the fetch.

    ``no_replay``: replay paused during the fetch (a diagnosis: the fetch alone)."""
    rl.wait_up_to_date()
    if no_replay:
        rl.lab.marsadm("lab2", "pause-replay", RES)
    rl.lab.marsadm("lab2", "pause-fetch", RES)
    t = time.monotonic()
    while not rl.status("lab2").get("fetch_paused"):
        if time.monotonic() - t > 30:
            raise RuntimeError("pause-fetch did not take effect")
        time.sleep(POLL)
    t = time.monotonic()
    rl.lab.exec("lab1", "nbdcopy", "--flush", str(payload), rl.uri, timeout=300)
    write_s = time.monotonic() - t
    time.sleep(0.3)  # a fetch request in flight when paused may still land
    sizes = rl.log_sizes()
    target = rl.primary_end(sizes)
    start = rl.fetched(sizes=sizes)
    log_bytes = target - start
    cpu = CpuMeter({"lab1 marsd": rl.marsd_pid("lab1"), "lab2 marsd": rl.marsd_pid("lab2")})
    spies = []
    if spy is not None:
        spy.mkdir(parents=True, exist_ok=True)
        expect = max(2.0, log_bytes / 40e6)
        for host in ("lab1", "lab2"):
            p = b.py_spy_start(rl.marsd_pid(host), expect, spy / f"{host}-backlog.txt")
            if p is not None:
                spies.append(p)
    cpu.start()
    t_cmd = time.monotonic()
    rl.lab.marsadm("lab2", "resume-fetch", RES)
    t0 = time.monotonic()  # marsd resumed the fetcher (reconcile is synchronous)
    samples: list[tuple[float, int]] = []
    while True:
        now = time.monotonic()
        got = rl.fetched(sizes=sizes)
        samples.append((now, got - start))
        if got >= target:
            break
        if now - t0 > 300:
            raise RuntimeError(f"fetch did not finish: {target - got} bytes left")
        time.sleep(POLL)
    t_done = samples[-1][0]
    cpu_pct = cpu.stop()
    if no_replay:
        rl.lab.marsadm("lab2", "resume-replay", RES)
    replay_s = rl.wait_up_to_date(timeout=300)
    for p in spies:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(60)
    secs = t_done - t0

    def at(frac: float) -> float:
        for ts, n in samples:
            if n >= frac * log_bytes:
                return ts
        return t_done

    t10, t90 = at(0.1), at(0.9)
    stall, since, last = 0.0, t0, 0
    for ts, n in samples:  # the longest time without progress (e.g. at a logfile switch)
        if n != last:
            since, last = ts, n
        stall = max(stall, ts - since)
    steady = 0.8 * log_bytes / (t90 - t10) if t90 > t10 else float("nan")
    return {"payload_mb": payload.stat().st_size / MB, "write_s": write_s,
            "log_mb": log_bytes / MB, "resume_cmd_s": t0 - t_cmd, "fetch_s": secs,
            "rate": log_bytes / secs, "steady_rate": steady, "stall_s": stall,
            "replay_after_s": replay_s,
            "cpu": cpu_pct, "first_byte_s": next((ts for ts, n in samples if n > 0),
                                                  t_done) - t0}


def set_rate(rl: ReplLab, rate: str) -> None:
    if rate_bytes(rate) == float("inf"):
        rl.lab.clear_shape("lab2")
    else:
        rl.lab.shape("lab2", rate=rate)


def collapsed(rate: str) -> str:
    """The link rate during a collapse: 100x slower than ``rate``."""
    return f"{rate_bytes(rate) * 8 / 100 / 1e6:g}mbit"


def caught_up_threshold(lags: Sequence[float]) -> int:
    """The lag a catch-up must get back to: 1.5x the steady lags' 95th percentile, at
    least 1 MiB (``lags`` sorted)."""
    return max(1 << 20, int(1.5 * lags[int(0.95 * (len(lags) - 1))]))


def ideal_catch_up(backlog: float, threshold: float, rate: float, write_rate: float) -> float:
    """Seconds to get a ``backlog`` down to ``threshold`` with what ``rate`` leaves
    beside the writes (inf if nothing)."""
    spare = rate - write_rate
    return (backlog - threshold) / spare if spare > 0 else float("inf")


def measure_collapse(rl: ReplLab, rate: str, write_rate: float, steady_s: float,
                     collapse_s: float, link_rate: float, fetch_rate: float,
                     pause_replay: bool = False, spy: Path | None = None,
                     limit: float = 120.0) -> dict[str, Any]:
    """Writer at ``write_rate`` B/s, link collapses 100x for ``collapse_s``; catch-up time.

    ``link_rate``: the TCP baseline; ``fetch_rate``: marslib's backlog rate on this link.
    ``pause_replay``: lab2's replay paused from before the collapse until caught up (a
    diagnosis: the fetch alone). ``spy``: py-spy both marsd and their workers during the
    recovery into this directory. ``limit``: seconds after the restore before giving up."""
    rl.wait_up_to_date()
    # what is still on its way to the disks when the phase starts: the primary's writeback
    # of acknowledged writes, and dirty or in-flight pages of the whole machine
    leftover = {"primary_pending_mb": rl.status("lab1").get("pending_bytes", 0) / MB,
                **dirty_pages_mb()}
    if pause_replay:
        rl.lab.marsadm("lab2", "pause-replay", RES)
    slow = collapsed(rate)
    fio = rl.popen("lab1", "fio", "--name=steady", "--ioengine=nbd", f"--uri={rl.uri}",
                   "--rw=write", "--bs=256k", "--iodepth=2", f"--rate={int(write_rate)}",
                   "--size=1G", "--time_based", "--runtime=300", "--thread",
                   "--output-format=json", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True)
    probe = CatchUpProbe(rl)
    spies: list[subprocess.Popen[bytes]] = []
    caught_up = True
    try:
        time.sleep(1.0)  # fio connects and settles
        t = time.monotonic()
        while time.monotonic() - t < steady_s:
            probe.sample()
            time.sleep(PROBE_INTERVAL)
        steady = list(probe.samples)
        if fio.poll() is not None:
            raise RuntimeError(f"fio ended early: {fio.stderr.read() if fio.stderr else ''}")
        measured_write = (steady[-1].end - steady[0].end) / (steady[-1].t - steady[0].t)
        lags = sorted(s.end - s.fetched for s in steady)
        threshold = caught_up_threshold(lags)
        rl.lab.shape("lab2", rate=slow)
        t_slow = time.monotonic()
        while time.monotonic() - t_slow < collapse_s:
            probe.sample()
            time.sleep(PROBE_INTERVAL)
        last = probe.sample()
        backlog, fetched_restore = last.end - last.fetched, last.fetched
        hedges_before = int(rl.status("lab2").get("fetch_hedges", 0))
        rl.lab.shape("lab2", rate=rate)
        t_restore = time.monotonic()
        restored_at = time.time()  # to match samples taken outside (ss, diskstats)
        if spy is not None:
            spy.mkdir(parents=True, exist_ok=True)
            expect = 2 * backlog / max(link_rate - measured_write, 1.0) + 1
            for host in ("lab1", "lab2"):
                p = b.py_spy_start(rl.marsd_pid(host), expect, spy / f"{host}-recovery.txt")
                if p is not None:
                    spies.append(p)
        peak = backlog
        first_mib = None  # when the fetch had moved 1 MiB past where it was at the restore
        before = (t_restore, backlog)  # the last sample above the threshold
        while True:
            s = probe.sample()
            now, cur = s.t, s.end - s.fetched
            peak = max(peak, cur)
            if first_mib is None and s.fetched - fetched_restore >= 1 << 20:
                first_mib = now - t_restore
            if cur <= threshold:
                # when the lag crossed the threshold, linearly between the two samples
                t_prev, lag_prev = before
                if lag_prev > threshold:
                    now = t_prev + (now - t_prev) * (lag_prev - threshold) / (lag_prev - cur)
                break
            before = (now, cur)
            if now - t_restore > limit:
                b.say(f"WARNING: lag still {cur / MB:.1f} MB {limit:g} s after the link came "
                      "back")
                caught_up = False
                break
            time.sleep(PROBE_INTERVAL)
        catch_up = now - t_restore
        moved = s.fetched - fetched_restore
        hedges = int(rl.status("lab2").get("fetch_hedges", 0)) - hedges_before
        t_after = time.monotonic()
        while time.monotonic() - t_after < 0.5:  # the steady state after it, for the timeline
            probe.sample()
            time.sleep(PROBE_INTERVAL)
    finally:
        if fio.poll() is None:
            fio.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            fio.communicate(timeout=30)
        b.stop_process(fio, timeout=5)
        if pause_replay:
            rl.lab.marsadm("lab2", "resume-replay", RES)
        for p in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(60)
    rl.wait_up_to_date(timeout=300)

    def expect(rate: float) -> float:
        return ideal_catch_up(backlog, threshold, rate, measured_write)

    t_caught = t_restore + catch_up
    phases = {"steady": probe.window(steady[0].t, t_slow),
              "collapsed": probe.window(t_slow, t_restore),
              "recovery": probe.window(t_restore, t_caught)}
    rec = phases["recovery"]
    timeline = probe.timeline(t_restore - 0.5, min(t_caught + 0.5, probe.samples[-1].t))
    for row in timeline:
        row["t"] = round(row.pop("t0") - t_restore, 2)
        row.pop("t1")
    busy_bins = [r for r in timeline if 0 <= r["t"] < catch_up]
    return {"slow": slow, "write_rate": measured_write, "steady_lag_mb": lags[len(lags) // 2] / MB,
            "threshold_mb": threshold / MB, "collapse_s": t_restore - t_slow,
            "backlog_mb": backlog / MB, "peak_mb": peak / MB, "catch_up_s": catch_up,
            "caught_up": caught_up, "replay_paused": pause_replay,
            "first_mib_s": first_mib or catch_up, "recovery_rate": moved / catch_up,
            "expected_s": expect(link_rate), "expected_marslib_s": expect(fetch_rate),
            "phases": phases, "timeline": timeline,
            "threads": probe.worker_threads(t_restore, t_caught),
            "slow_bins": sum(1 for r in busy_bins if r["fetch_rate"] < 0.5 * link_rate),
            "bins": len(busy_bins),
            # CPU seconds per GB fetched while recovering: independent of other load
            "cpu_s_per_gb": {k[:-4]: rec[k] / 100 / max(rec["fetch_rate"], 1.0) * 1e9
                             for k in rec if k.endswith(" cpu")},
            "load": os.getloadavg()[0], "at_start": leftover, "restored_at": restored_at,
            "hedges": hedges}


def measure_tcp_collapse(rl: ReplLab, rate: str, write_rate: float, steady_s: float,
                         collapse_s: float, link_rate: float, connections: int,
                         recovery_s: float = 10.0, port: int = BASELINE_PORT
                         ) -> dict[str, Any]:
    """Plain TCP lab1 -> lab2 on ``connections`` connections under the same collapse as
    :func:`measure_collapse`: a sender producing ``write_rate`` B/s into a backlog of its
    own, the link 100x slower for ``collapse_s``; when the receiver caught up, judged
    like marslib's catch-up (the lag back to 1.5x its steady 95th percentile, at least
    1 MiB). What TCP itself allows after such a collapse. lab2's marsd must be stopped
    (``port`` on its address)."""
    slow = collapsed(rate)
    recv = rl.popen("lab2", SYSTEM_PYTHON, "-c", STREAM_RECEIVER, rl.l2.ip, str(port),
                    str(connections), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    try:
        assert recv.stdout is not None
        if recv.stdout.readline().strip() != "ready":
            raise RuntimeError(f"TCP receiver failed: {recv.stderr.read() if recv.stderr else ''}")
        total_s = 1.0 + steady_s + collapse_s + recovery_s
        send = rl.popen("lab1", SYSTEM_PYTHON, "-c", STREAM_SENDER, rl.l2.ip, str(port),
                        str(connections), str(write_rate), str(total_s), rl.congestion,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert send.stdout is not None
        t0 = float(send.stdout.readline())
        time.sleep(max(0.0, t0 + 1.0 + steady_s - time.time()))
        t_slow = time.time()
        rl.lab.shape("lab2", rate=slow)
        time.sleep(collapse_s)
        rl.lab.shape("lab2", rate=rate)
        t_restore = time.time()
        send.communicate(timeout=total_s + 60)
        out, err = recv.communicate(timeout=60)
        samples: list[tuple[float, int]] = [(float(t), int(n)) for t, n in json.loads(out)]
    finally:
        b.stop_process(recv, timeout=5)

    def lag(t: float, n: int) -> float:
        return write_rate * (min(t, t0 + total_s) - t0) - n

    steady = sorted(lag(t, n) for t, n in samples if t0 + 1.0 <= t < t_slow)
    threshold = caught_up_threshold(steady)
    at_restore = next((i for i, (t, _) in enumerate(samples) if t >= t_restore),
                      len(samples) - 1)
    t_r, n_r = samples[at_restore]
    backlog = lag(t_r, n_r)
    first_mib = next((t - t_restore for t, n in samples[at_restore:] if n - n_r >= 1 << 20),
                     float("inf"))
    caught = next((t - t_restore for t, n in samples[at_restore:] if lag(t, n) <= threshold),
                  float("inf"))
    expected = ideal_catch_up(backlog, threshold, link_rate, write_rate)
    return {"connections": connections, "slow": slow, "backlog_mb": backlog / MB,
            "threshold_mb": threshold / MB, "first_mib_s": first_mib, "catch_up_s": caught,
            "expected_s": expected, "collapse_s": t_restore - t_slow}


def dirty_pages_mb() -> dict[str, float]:
    """The machine's dirty and under-writeback page cache (/proc/meminfo), in MB."""
    out: dict[str, float] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Dirty", "Writeback"):
            out[f"{name.lower()}_mb"] = int(rest.split()[0]) * 1024 / MB
    return out


# ------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller backlogs, shorter phases")
    ap.add_argument("--rates", default="100mbit,1gbit",
                    help="link rates of lab2 (tc tbf; 'none': unshaped veth)")
    ap.add_argument("--connections", default="2,4",
                    help="marsd --connections on lab2: the first for every measurement, the "
                         "others tried when the backlog misses its target (default 2,4)")
    ap.add_argument("--diagnose", action=argparse.BooleanOptionalAction, default=True,
                    help="when the backlog misses its target, also fetch it once with lab2's "
                         "replay paused (the fetch alone; default: yes, not with --quick)")
    ap.add_argument("--lab-dir", type=Path, default=Path("/var/tmp/mars-bench-repl-lab"),
                    help="the lab's directory (its own network; removed at the end)")
    ap.add_argument("--py-spy", type=Path, metavar="DIR",
                    help="profile both marsd (and their workers) during the backlog transfers "
                         "and the recovery from the collapse, into DIR")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    ap.add_argument("--timeline", action="store_true",
                    help="print the collapse's timeline in 100 ms bins (always in --json)")
    ap.add_argument("--collapse-pause-replay", action="store_true",
                    help="pause lab2's replay from before the collapse until caught up (a "
                         "diagnosis: the fetch alone)")
    ap.add_argument("--collapse-only", action="store_true",
                    help="skip the backlog transfer: TCP baseline and collapse only")
    ap.add_argument("--tcp-congestion", default="", metavar="NAME",
                    help="both marsd's --tcp-congestion, and the TCP baseline's (default: "
                         "the host's congestion control)")
    ap.add_argument("--tcp-collapse", action=argparse.BooleanOptionalAction, default=True,
                    help="also put plain TCP through the same collapse: how fast TCP "
                         "itself catches up (default: yes; about 17 s per rate)")
    ap.add_argument("--keep-logs", type=Path, metavar="DIR",
                    help="copy both marsd logs into DIR after each measurement (the lab's "
                         "directory is removed at the end)")
    ap.add_argument("--catch-up-limit", type=float, default=120.0, metavar="SECONDS",
                    help="give up waiting for the catch-up after this long (default 120)")
    args = ap.parse_args()
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    conns = [int(c) for c in args.connections.split(",")]
    if args.quick:
        conns, args.diagnose = conns[:1], False
    baseline_s = 3.0 if args.quick else 5.0
    b.install_signal_handlers()
    b.check_tools("fio", "nbdcopy")

    congestion = args.tcp_congestion or Path(
        "/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    b.banner("replication", f"rates {', '.join(rates)}; marsd --connections "
             f"{', '.join(map(str, conns))}; TCP congestion control {congestion}"
             f"{'' if args.tcp_congestion else ' (the host default)'}")
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    with lab_session(args.lab_dir, "1G", args.tcp_congestion) as rl:
        rl.create_primary()
        rl.join_cluster()
        rl.lab.marsd_start("lab2", *rl.marsd_args("--connections", str(conns[0])))
        join_s = rl.join_resource()
        b.say(f"lab up, lab2 joined (full sync of 1 GiB of zeros) in {join_s:.1f} s")
        for rate in rates:
            link = rate_bytes(rate)
            set_rate(rl, rate)
            rl.lab.marsd_stop("lab2")  # its ports on lab2's address are the baseline's
            base = rl.tcp_baseline(baseline_s)
            nominal = f"{100 * base / link:.0f}% of the nominal {link / MB:.1f} MB/s" \
                if link != float("inf") else "unshaped"
            b.say(f"[{rate}] TCP baseline lab1 -> lab2: {base / MB:.1f} MB/s ({nominal})")
            size = int((0.5 if args.quick else 1.0) * (60 if link < 50e6 else 300) * MB)
            payload = random_file(rl.lab.dir / f"payload-{rate}.bin", size, seed=len(results))
            variants = [(conns[0], False)]
            n = 0
            while n < len(variants):
                c, no_replay = variants[n]
                rl.lab.marsd_start("lab2", *rl.marsd_args("--connections", str(c)))
                tag = f"{rate}-c{c}" + ("-noreplay" if no_replay else "")
                spy = args.py_spy / tag if args.py_spy else None
                if args.collapse_only:
                    r = {"rate": float("nan"), "no_replay": False}
                else:
                    r = measure_backlog(rl, payload, spy, no_replay)
                r.update(link_name=rate, link=link, baseline=base, connections=c, tag=tag,
                         tcp_congestion=congestion,
                         no_replay=no_replay, ratio=r["rate"] / base)
                results.append(r)
                if not args.collapse_only:
                    b.say(f"[{rate}] backlog {r['log_mb']:.0f} MB of log, --connections {c}"
                          f"{', replay paused' if no_replay else ''}: fetched in "
                          f"{r['fetch_s']:.2f} s = {r['rate'] / MB:.1f} MB/s (10-90%: "
                          f"{r['steady_rate'] / MB:.1f} MB/s), ratio {r['ratio']:.2f}; CPU "
                          f"lab1 marsd {r['cpu']['lab1 marsd']:.0f}%, lab2 marsd "
                          f"{r['cpu']['lab2 marsd']:.0f}%, machine {r['cpu']['machine']:.0f}%")
                if n == 0 and link != float("inf"):
                    wr = (0.4 if link < 50e6 else 0.3) * link
                    cr = measure_collapse(rl, rate, wr, 1.5 if args.quick else 2.5, 3.0,
                                          base, r["rate"], args.collapse_pause_replay,
                                          spy, args.catch_up_limit)
                    r["collapse"] = cr
                    b.say(f"[{rate}] collapse to {cr['slow']} for {cr['collapse_s']:.1f} s "
                          f"at {cr['write_rate'] / MB:.1f} MB/s of writes"
                          f"{', replay paused' if cr['replay_paused'] else ''}: backlog "
                          f"{cr['backlog_mb']:.1f} MB, "
                          f"{'caught up' if cr['caught_up'] else 'NOT caught up'} "
                          f"{cr['catch_up_s']:.2f} s after the link came back (backlog / spare "
                          f"rate: "
                          f"{cr['expected_s']:.2f} s at the TCP rate, "
                          f"{cr['expected_marslib_s']:.2f} s at marslib's backlog rate), "
                          f"ratio {_ratio(cr['catch_up_s'], cr['expected_s'])}; load "
                          f"{cr['load']:.1f}")
                if n == 0 and r["ratio"] < TARGET_RATIO:
                    variants += [(x, False) for x in conns[1:]]
                    if args.diagnose:
                        variants.append((conns[0], True))
                n += 1
                if args.keep_logs:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    for host in ("lab1", "lab2"):
                        (args.keep_logs / f"{tag}-{host}-marsd.log").write_text(
                            rl.lab.marsd_log(host))
                rl.lab.marsd_stop("lab2")
            payload.unlink()
            if args.tcp_collapse and link != float("inf"):
                wr = (0.4 if link < 50e6 else 0.3) * link
                tc = measure_tcp_collapse(rl, rate, wr, 1.5 if args.quick else 2.5, 3.0, base,
                                          conns[0])
                results[-1]["tcp_collapse"] = tc
                b.say(f"[{rate}] plain TCP, {tc['connections']} connections, the same "
                      f"collapse to {tc['slow']}: backlog {tc['backlog_mb']:.1f} MB, first MiB "
                      f"{tc['first_mib_s']:.2f} s, caught up {tc['catch_up_s']:.2f} s after the "
                      f"link came back (backlog / spare rate {tc['expected_s']:.2f} s), ratio "
                      f"{_ratio(tc['catch_up_s'], tc['expected_s'])}")
        rl.lab.clear_shape("lab2")

    report(results, args.py_spy, args.timeline)
    b.say(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if 0 < b < float("inf") else "-"


def report(results: list[dict[str, Any]], py_spy: Path | None, timeline: bool) -> None:
    results_all, results = results, [r for r in results if "log_mb" in r]
    b.say()
    b.say("RESULTS (MB = 10^6 bytes; marslib MB/s = log bytes fetched / time from "
          "resume-fetch until lab2 held the primary's log end)")
    rows = [["link", "conns", "TCP MB/s", "backlog MB", "fetch s", "marslib MB/s",
             "10-90% MB/s", "stall s", "ratio", "target", "verdict", "lab1 CPU", "lab2 CPU",
             "machine CPU", "replayed +s"]]
    for r in results:
        target = f">= {TARGET_RATIO}" if not r["no_replay"] else "(diagnosis)"
        verdict = ("PASS" if r["ratio"] >= TARGET_RATIO else "MISS") \
            if not r["no_replay"] else "replay paused"
        rows.append([r["link_name"], str(r["connections"]), f"{r['baseline'] / MB:.1f}",
                     f"{r['log_mb']:.0f}", f"{r['fetch_s']:.2f}", f"{r['rate'] / MB:.1f}",
                     f"{r['steady_rate'] / MB:.1f}", f"{r['stall_s']:.2f}", f"{r['ratio']:.2f}",
                     target, verdict,
                     f"{r['cpu']['lab1 marsd']:.0f}%", f"{r['cpu']['lab2 marsd']:.0f}%",
                     f"{r['cpu']['machine']:.0f}%", f"{r['replay_after_s']:.2f}"])
    b.say(b.table(rows, right=set(range(1, 15)) - {9, 10}))
    b.say("(10-90%: rate between 10% and 90% of the backlog; stall: longest time without "
          "progress; CPU: % of one CPU during the "
          "fetch; machine: % of both CPUs, other sessions included; replayed +s: until lab2 "
          "had also applied it)")
    b.say()
    b.say("LAG RECOVERY after the link collapsed 100x for 3 s (caught up: fetch lag back to "
          "1.5x its steady 95th percentile, at least 1 MiB)")
    rows = [["link", "writes MB/s", "collapsed to", "backlog MB", "first MiB s", "catch-up s",
             "recovery MB/s", "exp. at TCP s", "ratio", "exp. at marslib s", "ratio",
             "hedged"]]
    for r in results_all:
        cr = r.get("collapse")
        if cr:
            rows.append([r["link_name"], f"{cr['write_rate'] / MB:.1f}", cr["slow"],
                         f"{cr['backlog_mb']:.1f}", f"{cr['first_mib_s']:.2f}",
                         f"{cr['catch_up_s']:.2f}", f"{cr['recovery_rate'] / MB:.1f}",
                         f"{cr['expected_s']:.2f}", _ratio(cr["catch_up_s"], cr["expected_s"]),
                         f"{cr['expected_marslib_s']:.2f}",
                         _ratio(cr["catch_up_s"], cr["expected_marslib_s"]),
                         str(cr.get("hedges", "-"))])
    b.say(b.table(rows))
    b.say("(exp.: (backlog - threshold) / (rate - writes), at the TCP baseline and at marslib's "
          "own backlog rate on that link; ratio = catch-up / exp., 1.0 = as fast as that rate "
          "allows; recovery MB/s: log fetched per second while catching up; first MiB: "
          "until the fetch had moved 1 MiB after the restore; hedged: requests lab2 asked "
          "for again on another connection while catching up)")
    for r in results_all:
        if r.get("collapse"):
            report_catch_up(r["link_name"], r["baseline"], r["collapse"], timeline)
    if py_spy:
        for r in results_all:
            for host, phase in (("lab1", "backlog"), ("lab2", "backlog"), ("lab1", "recovery"),
                                ("lab2", "recovery")):
                path = py_spy / r["tag"] / f"{host}-{phase}.txt"
                if path.exists():
                    b.say(f"\npy-spy {host} marsd and worker, {phase}, {r['tag']}:\n"
                          f"{b.py_spy_summary(path)}")


PROCS = ("lab1 marsd", "lab1 worker", "lab2 marsd", "lab2 worker")


def report_catch_up(link_name: str, baseline: float, cr: dict[str, Any],
                    timeline: bool) -> None:
    """Where the catch-up time went: the phases, lab2's worker threads, the timeline."""
    b.say()
    b.say(f"WHERE THE CATCH-UP TIME GOES, {link_name} (TCP {baseline / MB:.1f} MB/s"
          f"{'; replay paused' if cr['replay_paused'] else ''}): MB/s of log; CPU and "
          "run-queue wait (runnable, no CPU free) in % of one CPU; machine: % of all CPUs")
    rows = [["phase", "secs", "written", "fetched", "applied", "fetch lag MB",
             "replay lag MB", *[f"{p} cpu/wait" for p in PROCS], "machine"]]
    for name, ph in cr["phases"].items():
        rows.append([name, f"{ph['t1'] - ph['t0']:.2f}", f"{ph['write_rate'] / MB:.1f}",
                     f"{ph['fetch_rate'] / MB:.1f}", f"{ph['replay_rate'] / MB:.1f}",
                     f"{ph['fetch_lag_mb']:.1f}", f"{ph['replay_lag_mb']:.1f}",
                     *[f"{ph.get(p + ' cpu', 0):.0f}/{ph.get(p + ' wait', 0):.0f}"
                       for p in PROCS], f"{ph['machine']:.0f}"])
    b.say(b.table(rows, right=set(range(1, 12))))
    threads = ", ".join(f"{name} {cpu:.0f}/{wait:.0f}" for name, cpu, wait in cr["threads"]
                        if cpu >= 1)
    b.say(f"lab2 worker threads while recovering (cpu/wait %): {threads}")
    per_gb = ", ".join(f"{k} {v:.2f}" for k, v in cr["cpu_s_per_gb"].items())
    b.say(f"CPU seconds per GB fetched while recovering: {per_gb}")
    b.say(f"100 ms bins of the recovery below half the TCP rate: {cr['slow_bins']} of "
          f"{cr['bins']}")
    start = cr.get("at_start", {})
    b.say(f"still on its way to the disks when the phase started: primary's writeback "
          f"{start.get('primary_pending_mb', 0):.1f} MB, machine's page cache dirty "
          f"{start.get('dirty_mb', 0):.1f} MB, under writeback {start.get('writeback_mb', 0):.1f}"
          " MB")
    if timeline:
        rows = [["t s", "fetched MB/s", "applied MB/s", "fetch lag MB", "replay lag MB",
                 *[f"{p} cpu/wait" for p in PROCS], "machine"]]
        for row in cr["timeline"]:
            rows.append([f"{row['t']:+.1f}", f"{row['fetch_rate'] / MB:.1f}",
                         f"{row['replay_rate'] / MB:.1f}", f"{row['fetch_lag_mb']:.1f}",
                         f"{row['replay_lag_mb']:.1f}",
                         *[f"{row.get(p + ' cpu', 0):.0f}/{row.get(p + ' wait', 0):.0f}"
                           for p in PROCS], f"{row['machine']:.0f}"])
        b.say(b.table(rows, right=set(range(0, 10))))


if __name__ == "__main__":
    sys.exit(main())
