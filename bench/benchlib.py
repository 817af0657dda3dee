"""Shared plumbing of the marslib benchmarks: loop devices, marsd, nbdkit, fio, cleanup.

Everything a benchmark creates is owned by a context manager that removes it again on the
way out, also after an error, Ctrl-C or SIGTERM (see :func:`install_signal_handlers`).
Only processes started here are ever signalled, and only by their pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
MARSD = str(VENV_BIN / "marsd")
MARSADM = str(VENV_BIN / "marsadm")
RESOURCE = "r0"
HOST = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(text: str = "") -> None:
    print(text, flush=True)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so every ``finally`` runs (cleanup)."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def check_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        sys.exit(f"missing tools: {' '.join(missing)} (apt-get install -y fio nbdkit libnbd-bin)")
    if os.geteuid() != 0:
        sys.exit("the benchmarks need root (loop devices)")
    if not Path(MARSD).exists():
        sys.exit(f"{MARSD} not found: create the venv and 'pip install -e .' first")


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 120.0,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def banner(title: str, setup: str) -> None:
    """The head of a benchmark's output: what runs, when, on which machine and code, with
    which setup, and a warning when the machine is busy."""
    say(f"marslib {title} benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    say(f"machine: {machine_description()}")
    say(f"marslib: {code_version()}; {setup}")
    warn_if_busy()


def read_at_once(paths: list[Any], timeout: float = 600) -> float:
    """Seconds for ``dd`` (O_DIRECT, 16 MiB blocks) to read every one of ``paths`` at the
    same time: the disk floor of any tool that compares them."""
    t = time.monotonic()
    procs = [subprocess.Popen(["dd", f"if={p}", "of=/dev/null", "bs=16M", "iflag=direct"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p in paths]
    try:
        for p in procs:
            p.wait(timeout)
    finally:
        for p in procs:
            stop_process(p, timeout=5)
    return time.monotonic() - t


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """SIGTERM, wait, then SIGKILL: only this process, by its pid."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _proc_stat(pid: int | str) -> tuple[int, int, int] | None:
    """(ppid, CPU ticks of the process, CPU ticks of its waited-for ended children).

    The process's ticks are utime + stime of all its threads (also of ended threads); the
    children's are cutime + cstime. None when the process is gone.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    # fields[0] is field 3 of proc_pid_stat(5) (state): ppid is 4, utime/stime/cutime/cstime
    # are 14-17
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _children() -> dict[int, list[tuple[int, tuple[int, int, int]]]]:
    """Every process on the machine under its parent's pid: ppid -> [(pid, stat)]."""
    kids: dict[int, list[tuple[int, tuple[int, int, int]]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(entry.name)) is not None:
            kids.setdefault(st[0], []).append((int(entry.name), st))
    return kids


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU time of a process (all its threads) so far; with ``tree`` (the
    default) that of its whole process tree: the process, its live descendants (found in
    /proc by their ppid) and the ended descendants that were waited for (cutime/cstime).

    A worker process that ends and is reaped moves its CPU time from its own entry into its
    parent's cutime/cstime, so the sum stays right across a worker's exit. Not counted: a
    descendant that ended without being waited for, or whose parent ended before it.
    """
    own = _proc_stat(pid)
    if own is None:
        return 0.0
    if not tree:
        return own[1] / CLK_TCK
    kids = _children()
    ticks, todo = own[1] + own[2], [pid]
    while todo:
        for child, (_, child_own, child_waited) in kids.get(todo.pop(), []):
            ticks += child_own + child_waited
            todo.append(child)
    return ticks / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """``pid`` and the pids of its live descendants."""
    kids = _children()
    found, todo = [pid], [pid]
    while todo:
        more = [child for child, _ in kids.get(todo.pop(), [])]
        found += more
        todo += more
    return found


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine_description() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB RAM, kernel {os.uname().release}"


def code_version() -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def warn_if_busy() -> None:
    load1 = os.getloadavg()[0]
    say(f"load average (1 min) at start: {load1:.2f}")
    if load1 > 0.5:
        say("WARNING: the machine is not idle; other processes compete for the CPUs and the "
            "disk and the figures below will be lower and noisier than on an idle machine")


# ---------------------------------------------------------------------- resources
def free_ports(count: int) -> int:
    """The first of ``count`` consecutive TCP ports that are free on 127.0.0.1 now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"found no {count} consecutive free TCP ports on 127.0.0.1")


@contextlib.contextmanager
def work_dir(base: str) -> Iterator[Path]:
    """A temporary directory on a real filesystem (the log area must not be tmpfs)."""
    path = Path(tempfile.mkdtemp(prefix="marsbench.", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def loop_device(image: Path, size: int = 2 << 30) -> Iterator[str]:
    """A fresh sparse file of ``size`` bytes attached as a direct-I/O loop device."""
    with open(image, "wb") as f:
        f.truncate(size)
    dev = run(["losetup", "--direct-io=on", "-f", "--show", str(image)]).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(50):  # a closing holder can keep it busy for a moment
            if run(["losetup", "-d", dev], check=False).returncode == 0:
                break
            time.sleep(0.1)
        with contextlib.suppress(FileNotFoundError):
            image.unlink()


def device_number(dev: str) -> str:
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


@contextlib.contextmanager
def write_iops_limit(dev: str, iops: int) -> Iterator[Path | None]:
    """A blkio cgroup (v1) limiting writes to ``dev`` to ``iops`` requests per second.

    Yields the cgroup directory (write a pid to ``cgroup.procs`` to limit that process),
    or None when the kernel offers no blkio throttling here.
    """
    base = Path("/sys/fs/cgroup/blkio")
    if not (base / "blkio.throttle.write_iops_device").exists():
        yield None
        return
    cg = base / f"marsbench-{os.getpid()}-{time.monotonic_ns()}"
    cg.mkdir()
    try:
        (cg / "blkio.throttle.write_iops_device").write_text(f"{device_number(dev)} {iops}\n")
        yield cg
    finally:
        # processes still inside are moved back before the cgroup can go
        for _ in range(50):
            with contextlib.suppress(OSError):
                for pid in (cg / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (base / "cgroup.procs").write_text(pid + "\n")
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


class Marsd:
    """One marsd serving resource r0 on ``dev`` (and r1, r2, ... on ``more_devs``), its
    state in a new directory in ``base``."""

    def __init__(self, base: Path, dev: str, args: list[str] | None = None,
                 cgroup: Path | None = None, more_devs: Sequence[str] = ()) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="marsd.", dir=base))  # removed on exit
        base = self.base
        self.dev = dev
        self.devs = {RESOURCE: dev, **{f"r{i}": d for i, d in enumerate(more_devs, 1)}}
        self.args = args or []
        self.cgroup = cgroup
        self.root = base / "mars"
        self.run_dir = base / "run"
        self.log_path = base / "marsd.log"
        self.env = {**os.environ, "MARS_ROOT": str(self.root), "MARS_RUN_DIR": str(self.run_dir),
                    "MARS_HOST": HOST}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def resources(self) -> list[str]:
        return list(self.devs)

    @property
    def nbd_uri(self) -> str:
        return self.uri(RESOURCE)

    def uri(self, resource: str) -> str:
        return f"nbd+unix:///{resource}?socket={self.run_dir / (resource + '.nbd')}"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "marsd.sock"

    def marsadm(self, *args: str, timeout: float = 120.0) -> str:
        return run([MARSADM, *args], env=self.env, timeout=timeout).stdout

    def __enter__(self) -> Marsd:
        try:
            self.marsadm("create-cluster")
            for res, dev in self.devs.items():
                self.marsadm("create-resource", res, dev)
            # its own network ports: another marsd on this machine (a test, a lab) may
            # hold the default ones; no metrics endpoint (nobody scrapes it here)
            ports = ([] if any(a.startswith("--port-base") for a in self.args)
                     else ["--listen", "127.0.0.1", "--port-base", str(free_ports(3))])
            if not any(a.startswith("--metrics") for a in self.args):
                ports += ["--metrics", "off"]
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [MARSD, "--log-level", "WARNING", *ports, *self.args], env=self.env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self.cgroup is not None:
                (self.cgroup / "cgroup.procs").write_text(f"{self.pid}\n")
            self._wait_for_control()
            for res in self.devs:
                self.marsadm("up", res, "--timeout", "30")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_for_control(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.control_socket.exists():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"marsd exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("marsd did not open its control socket")
            time.sleep(0.05)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.proc is None:
            shutil.rmtree(self.base, ignore_errors=True)
            return
        if exc_type is not None or self.proc.poll() is not None:
            self.show_log(f"marsd (pid {self.pid}, exit code {self.proc.poll()})")
        try:
            for res in self.devs:
                if self.proc.poll() is None:
                    # down writes everything back first; give a lagging writeback time
                    run([MARSADM, "down", res, "--force", "--timeout", "120"], env=self.env,
                        timeout=150, check=False)
        finally:
            stop_process(self.proc)
            self.proc = None
            shutil.rmtree(self.base, ignore_errors=True)

    def _gone(self) -> str:
        """Why marsd no longer answers: its exit status, as far as it can be told."""
        assert self.proc is not None
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return f"marsd (pid {self.pid}) is running but its control socket is gone"
        why = {0: "exited cleanly: someone sent it SIGTERM or SIGINT",
               -9: "was killed with SIGKILL"}.get(code, f"exited with status {code}")
        return f"marsd (pid {self.pid}) {why} during the benchmark"

    def show_log(self, what: str) -> None:
        with contextlib.suppress(OSError):
            tail = self.log_path.read_text(errors="replace")[-3000:].strip()
            if tail:
                print(f"--- last lines of the log of {what}:\n{tail}\n---",
                      file=sys.stderr, flush=True)

    def status(self, resource: str = RESOURCE) -> dict[str, Any]:
        """The resource's live counters, straight from marsd's control socket."""
        from marslib import control  # the venv's marslib: run the benches with .venv/bin/python

        try:
            reply = control.request(self.control_socket, "status", timeout=30)
        except control.DaemonNotRunning:
            raise RuntimeError(self._gone()) from None
        res: dict[str, Any] = reply["resources"][resource]
        return res

    def view(self, resource: str = RESOURCE) -> dict[str, Any]:
        out = json.loads(self.marsadm("view", resource, "--json"))
        member: dict[str, Any] = out["resources"][resource]["members"][HOST]
        return member

    def wait_drained(self, timeout: float = 120.0, poll: float = 0.02,
                     resources: Sequence[str] | None = None) -> float:
        """Seconds until the writeback has caught up (nothing pending, applied == log end)
        on ``resources`` (default: all of this marsd's)."""
        t0 = time.monotonic()
        for res in resources if resources is not None else self.devs:
            while True:
                st = self.status(res)
                if st["pending_bytes"] == 0 and st["applied"] == st["log_end"]:
                    break
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"writeback of {res} did not drain within {timeout:g}s: "
                                       f"{st['pending_bytes']} bytes pending")
                time.sleep(poll)
        return time.monotonic() - t0


@contextlib.contextmanager
def nbdkit(sock: Path, dev: str) -> Iterator[subprocess.Popen[bytes]]:
    """nbdkit's file plugin on ``dev`` (page cache dropped after each write) on ``sock``."""
    proc = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "file", f"file={dev}",
         "cache=none"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"nbdkit exited ({proc.returncode}): {err}")
            if time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not open its socket")
            time.sleep(0.02)
        yield proc
    finally:
        stop_process(proc, timeout=10)


# --------------------------------------------------------------------------- fio
@dataclass(frozen=True)
class Job:
    name: str
    title: str
    args: tuple[str, ...]

    @property
    def reads(self) -> bool:
        """A read job (fio reports it under "read", not "write")."""
        return any(a in ("--rw=read", "--rw=randread") for a in self.args)


SEQ = Job("seq", "seq write 1M qd4", ("--rw=write", "--bs=1M", "--iodepth=4"))
RAND1 = Job("qd1", "randwrite 4k qd1", ("--rw=randwrite", "--bs=4k", "--iodepth=1"))
RAND32 = Job("qd32", "randwrite 4k qd32", ("--rw=randwrite", "--bs=4k", "--iodepth=32"))
JOBS = (SEQ, RAND1, RAND32)
# reads, on a region that was written completely before (see FILL): no holes
SEQ_READ = Job("seqread", "seq read 1M qd4", ("--rw=read", "--bs=1M", "--iodepth=4"))
RAND_READ = Job("randread", "randread 4k qd32", ("--rw=randread", "--bs=4k", "--iodepth=32"))
READ_JOBS = (SEQ_READ, RAND_READ)
# one pass of sequential writes over the whole region (not time-based): what the reads read
FILL = Job("fill", "fill: seq write 1M qd4", ("--rw=write", "--bs=1M", "--iodepth=4"))


@dataclass
class FioResult:
    mb_s: float  # MB/s, 10^6 bytes per second
    iops: float
    lat_mean_us: float
    lat_p99_us: float
    ios: int
    seconds: float
    fio_cpu: float  # fio's own CPU use, % of one CPU
    extra: dict[str, Any] = field(default_factory=dict)


def fio(job: Job, target: list[str], out: Path, runtime: float,
        size: str = "1G", time_based: bool = True) -> FioResult:
    """Run one job against ``target`` (engine options) and parse its JSON.

    Time-based (``runtime`` seconds, wrapping around the region) unless ``time_based`` is
    false: then one pass over ``size`` bytes.
    """
    return fio_together([(job.name, job, target)], out, runtime, size, time_based)[0]


def fio_together(specs: list[tuple[str, Job, list[str]]], out: Path, runtime: float,
                 size: str = "1G", time_based: bool = True) -> list[FioResult]:
    """Run one fio job per (name, job, target) in one fio process, started together, and
    return their results in that order."""
    timing = ["--time_based", f"--runtime={runtime:g}"] if time_based else []
    cmd = [
        "fio", *timing, "--norandommap", "--randrepeat=0",
        "--thread",  # one process: killing it on an interrupt leaves no job process behind
        "--output-format=json", f"--output={out}",
    ]
    for name, job, target in specs:
        cmd += [f"--name={name}", *target, *job.args, f"--size={size}", "--offset=0"]
    run(cmd, timeout=(runtime if time_based else 600) + 120)
    text = out.read_text()
    data = json.loads(text[text.index("{"):])  # the nbd engine may print a line first
    results = []
    for (name, job, _), j in zip(specs, data["jobs"], strict=True):
        if j.get("error"):
            raise RuntimeError(f"fio job {name} failed with error {j['error']}")
        io = j["read" if job.reads else "write"]
        clat = io.get("clat_ns", {})
        pct = clat.get("percentile", {})
        results.append(FioResult(
            mb_s=io["bw_bytes"] / 1e6,
            iops=io["iops"],
            lat_mean_us=clat.get("mean", 0.0) / 1000,
            lat_p99_us=pct.get("99.000000", 0) / 1000,
            ios=io["total_ios"],
            seconds=io["runtime"] / 1000,
            fio_cpu=j.get("usr_cpu", 0.0) + j.get("sys_cpu", 0.0),
        ))
    return results


def libaio(dev: str, sync: bool = False) -> list[str]:
    return [f"--filename={dev}", "--ioengine=libaio", "--direct=1",
            *(["--sync=1"] if sync else [])]


def nbd(uri: str) -> list[str]:
    return ["--ioengine=nbd", f"--uri={uri}"]


def table(rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(rows[0])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------- py-spy
PY_SPY = VENV_BIN / "py-spy"


def py_spy_start(pid: int, seconds: float, out: Path, subprocesses: bool = True
                 ) -> subprocess.Popen[bytes] | None:
    """Sample ``pid`` (and, with ``subprocesses``, its child processes: marsd's workers)
    for ``seconds`` into collapsed stacks at ``out`` (None: no py-spy)."""
    if not PY_SPY.exists():
        return None
    return subprocess.Popen(
        [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
         "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(out),
         *(["--subprocesses"] if subprocesses else [])],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def py_spy_summary(path: Path, top: int = 12) -> str:
    """Self and inclusive shares of the busiest functions in a collapsed-stack file.

    Self: the function was on top of the stack. Inclusive (marslib's functions only, the
    asyncio and threading frames around them would top that list): anywhere in it.
    """
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [f for f in map(_frame, stack.split(";")) if f is not None]
            if not frames:
                continue
            top_name = frames[-1][0]
            self_n[top_name] = self_n.get(top_name, 0) + n
            for name in {name for name, ours in frames if ours}:
                incl_n[name] = incl_n.get(name, 0) + n
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; self% = on top of the stack (where the time is spent), "
             "incl% = marslib function anywhere in the stack"]
    lines.append("  self%  function")
    for name, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}  {name}")
    lines.append("  incl%  function")
    for name, n in sorted(incl_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}  {name}")
    return "\n".join(lines)


def _frame(frame: str) -> tuple[str, bool] | None:
    """('func (module.py)', is marslib's) of a py-spy frame 'func (path/module.py:123)'."""
    if frame.startswith(("process ", "thread ")) or " (" not in frame:
        return None
    func, loc = frame.rsplit(" (", 1)
    file = loc.rstrip(")").rsplit(":", 1)[0]
    ours = (file.startswith("marslib/") or "/marslib/" in file) and func != "main"
    return f"{func} ({Path(file).name})", ours
