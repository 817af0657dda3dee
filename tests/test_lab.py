"""The test lab itself: real namespaces, sshd, loop devices, shaped links, partitions, marsd.

One 2-host lab serves the module (in its own directory and lab net, so a developer's lab
at /var/tmp/mars-lab is never touched). Without root the lab runs hosts as processes on
127.0.N.x; what needs namespaces is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from marslib.lab import Lab, LabError, LabHost, LabUnsupported, down_dir
from marslib.lab.profiles import StormSpec, parse_loss, parse_rate, parse_storm, parse_time
from marslib.lab.state import MARKER
from marslib.lab.wanproxy import Storm

REPO = Path(__file__).resolve().parent.parent
PORT = 7778  # a MARS port: a --delay or --storm routes it through the WAN proxy

# A tiny network tool run inside lab hosts: TCP throughput, TCP connect+echo round trips,
# UDP loss, throughput over time. The receiver sends its measurement back to the sender.
NETTOOL = r'''
import json, socket, sys, time

def listen(ip, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, int(port))); s.listen(16); s.settimeout(60)
    print("ready", flush=True)  # a connect would not tell: the WAN proxy accepts at once
    return s

def connect(ip, port):
    return socket.create_connection((ip, int(port)), timeout=10)

def sink(ip, port, width="0.25"):
    s = listen(ip, port)
    c, _ = s.accept()
    t0 = None; total = 0; bins = {}
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        now = time.monotonic()
        t0 = t0 or now
        total += len(d)
        k = int((now - t0) / float(width)); bins[k] = bins.get(k, 0) + len(d)
    secs = time.monotonic() - t0
    series = [bins.get(k, 0) * 8 / float(width) / 1e6 for k in range(max(bins) + 1)]
    c.sendall(json.dumps({"bytes": total, "secs": secs, "mbit": total * 8 / secs / 1e6,
                          "series": series}).encode())
    c.close()

def source(ip, port, secs):
    c = connect(ip, port)
    buf = b"x" * (256 << 10); end = time.monotonic() + float(secs)
    while time.monotonic() < end:
        c.sendall(buf)
    c.shutdown(socket.SHUT_WR)
    c.settimeout(120)
    reply = b""
    while (d := c.recv(1 << 16)):
        reply += d
    print(reply.decode())

def echo(ip, port):
    s = listen(ip, port)
    while True:
        c, _ = s.accept(); c.sendall(c.recv(100)); c.close()

def rtt(ip, port, n):
    out = []
    for _ in range(int(n)):
        t0 = time.monotonic()
        c = socket.create_connection((ip, int(port)), timeout=10)
        c.sendall(b"ping"); assert c.recv(100) == b"ping"; c.close()
        out.append((time.monotonic() - t0) * 1000)
    print(json.dumps(out))

def udpsink(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((ip, int(port)))
    print("ready", flush=True)
    s.settimeout(3); got = 0
    try:
        while True:
            s.recv(100); got += 1; s.settimeout(1)
    except socket.timeout:
        pass
    print(json.dumps({"received": got}))

def udpsource(ip, port, n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(int(n)):
        s.sendto(b"x" * 64, (ip, int(port))); time.sleep(0.0001)

def tryconnect(ip, port, timeout):
    try:
        socket.create_connection((ip, int(port)), timeout=float(timeout)).close()
        print("connected")
    except OSError as exc:
        print(type(exc).__name__)

globals()[sys.argv[1]](*sys.argv[2:])
'''


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # /var/tmp: loop device backing files belong on a disk filesystem, not tmpfs
    base = Path(tempfile.mkdtemp(prefix="mars-lab-test-", dir="/var/tmp"))
    (base / "nettool.py").write_text(NETTOOL)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    lab_dir = workdir / "lab"
    try:
        lab = Lab.up(hosts=2, device_size="64M", lab_dir=lab_dir)
        yield lab
    finally:
        left = down_dir(lab_dir)
        assert not left, f"lab teardown left {left}"


@pytest.fixture
def netlab(lab: Lab) -> Iterator[Lab]:
    """The module's lab, for tests that shape or cut links; they are undone afterwards."""
    if lab.local:
        pytest.skip("needs a netns lab (root): this lab runs hosts as local processes")
    yield lab
    for h in lab.hosts:
        lab.clear_shape(h)
    lab.heal_all()


def tool(lab: Lab, host: LabHost, workdir: Path, *args: str,
         timeout: float = 60) -> str:
    return lab.exec(host, sys.executable, str(workdir / "nettool.py"), *args,
                    timeout=timeout).stdout


def bg_tool(lab: Lab, host: LabHost, workdir: Path, *args: str) -> subprocess.Popen[str]:
    """Start a server of the tool in ``host``; returns once it listens."""
    proc = lab.popen(host, sys.executable, str(workdir / "nettool.py"), *args,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise AssertionError(f"nettool {args} did not start: {proc.communicate()}")
    return proc


def throughput(lab: Lab, src: LabHost, dst: LabHost, workdir: Path,
               secs: float = 2.0) -> dict[str, Any]:
    server = bg_tool(lab, dst, workdir, "sink", dst.ip, str(PORT))
    try:
        out = tool(lab, src, workdir, "source", dst.ip, str(PORT), str(secs))
    finally:
        server.wait(timeout=60)
    result: dict[str, Any] = json.loads(out)
    return result


def round_trips(lab: Lab, src: LabHost, dst: LabHost, workdir: Path, n: int = 7) -> list[float]:
    server = bg_tool(lab, dst, workdir, "echo", dst.ip, str(PORT))
    try:
        out = tool(lab, src, workdir, "rtt", dst.ip, str(PORT), str(n))
    finally:
        server.kill()
        server.wait(timeout=60)
    result: list[float] = json.loads(out)
    return result


def udp_received(lab: Lab, src: LabHost, dst: LabHost, workdir: Path, n: int) -> int:
    sink = bg_tool(lab, dst, workdir, "udpsink", dst.ip, "7000")
    tool(lab, src, workdir, "udpsource", dst.ip, "7000", str(n))
    out, err = sink.communicate(timeout=30)
    received: int = json.loads(out)["received"]
    return received


# ---------------------------------------------------------------- profiles (no lab needed)
def test_link_profile_values_parse_or_say_what_is_wrong() -> None:
    assert parse_rate("100mbit") == 100e6 and parse_rate("1gbit") == 1e9
    assert parse_time("25ms") == pytest.approx(0.025) and parse_time("2s") == 2.0
    assert parse_loss("1%") == pytest.approx(0.01) and parse_loss("0.5") == pytest.approx(0.005)
    assert parse_storm("100x:2s/10s") == StormSpec(100, 2.0, 10.0)
    for bad in (lambda: parse_rate("fast"), lambda: parse_loss("120%"),
                lambda: parse_storm("100x:10s/2s"), lambda: parse_time("soon")):
        with pytest.raises(LabError):
            bad()
    storm = Storm(factor=100, duration=2, period=10, base_bps=100e6, start=1000.0)
    assert storm.rate_at(1001.0) == 1e6 and storm.rate_at(1005.0) is None
    assert storm.rate_at(1011.5) == 1e6


# ---------------------------------------------------------------- hosts
def test_hosts_have_their_own_address_root_and_devices(lab: Lab) -> None:
    assert [h.name for h in lab.hosts] == ["lab1", "lab2"]
    assert len({h.ip for h in lab.hosts}) == 2
    for h in lab.hosts:
        out = lab.exec(h, "sh", "-c",
                       "echo $MARS_HOST $MARS_ROOT $MARS_RUN_DIR; command -v marsadm")
        name, root, run_dir, marsadm = out.stdout.split()
        assert (name, root, run_dir) == (h.name, str(h.root), str(h.run_dir))
        assert marsadm == str(Path(sys.executable).parent / "marsadm")
        assert len(h.devices) == 1 and h.images[0].stat().st_size == 64 << 20
        if lab.local:
            assert h.devices == [str(h.images[0])]
            continue
        addrs = lab.exec(h, "ip", "-4", "-o", "addr", "show").stdout
        assert f"inet {h.ip}/24" in addrs
        assert [other.ip for other in lab.hosts if other.ip in addrs] == [h.ip]
        back = subprocess.run(["losetup", "-n", "-O", "BACK-FILE,DIO", h.devices[0]],
                              capture_output=True, text=True, check=True).stdout.split()
        assert back == [str(h.images[0]), "1"]  # direct I/O on the backing file


def test_ssh_with_the_lab_key_lands_in_the_host(lab: Lab) -> None:
    if lab.local:
        with pytest.raises(LabUnsupported):
            lab.ssh(lab.hosts[0], "true")
        pytest.skip("no sshd in a local lab")
    for h in lab.hosts:
        out = lab.ssh(h, "hostname -I; echo $MARS_HOST; command -v marsadm").stdout.split()
        assert out == [h.ip, h.name, str(Path(sys.executable).parent / "marsadm")]


def test_ansible_reaches_every_host(lab: Lab) -> None:
    ansible = Path(sys.executable).parent / "ansible"
    if not ansible.exists():
        pytest.skip("ansible-core is not installed in the venv")
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1"}
    out = subprocess.run([str(ansible), "-i", str(lab.inventory), "mars", "-m", "ping"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(lab.hosts)
    facts = subprocess.run([str(ansible), "-i", str(lab.inventory), "lab2", "-m", "command",
                            "-a", "printenv MARS_ROOT"], capture_output=True, text=True,
                           timeout=120, env=env)
    assert str(lab.hosts[1].root) in facts.stdout


def test_cli_status_and_exec(lab: Lab) -> None:
    env = {**os.environ, "MARS_LAB_DIR": str(lab.dir)}
    cli = [sys.executable, str(REPO / "bin" / "mars-lab")]
    status = json.loads(subprocess.run([*cli, "status", "--json"], capture_output=True,
                                       text=True, env=env, check=True).stdout)
    assert [h["ip"] for h in status["hosts"]] == [h.ip for h in lab.hosts]
    out = subprocess.run([*cli, "exec", "lab2", "--", "sh", "-c", "echo $MARS_HOST"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "lab2"
    inv = subprocess.run([*cli, "inventory"], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    text = Path(inv).read_text()
    assert "[mars]" in text and f"mars_devices={lab.hosts[0].devices[0]}" in text


# ---------------------------------------------------------------- links
def test_unshaped_tcp_is_fast(netlab: Lab, workdir: Path) -> None:
    a, b = netlab.hosts
    r = throughput(netlab, a, b, workdir, 1.0)
    assert r["mbit"] > 1000, r


def test_rate_limits_both_directions(netlab: Lab, workdir: Path) -> None:
    a, b = netlab.hosts
    netlab.shape(a, rate="100mbit")
    up = throughput(netlab, a, b, workdir)
    down = throughput(netlab, b, a, workdir)
    assert 85 <= up["mbit"] <= 101, up
    assert 85 <= down["mbit"] <= 101, down
    netlab.clear_shape(a)
    assert throughput(netlab, a, b, workdir, 1.0)["mbit"] > 1000


def added_ms(base: list[float], shaped: list[float]) -> tuple[float, float]:
    """(fastest, typical) extra round-trip time: the minimum is immune to load spikes."""
    return min(shaped) - min(base), statistics.median(shaped) - statistics.median(base)


def test_delay_adds_round_trip_time_both_ways(netlab: Lab, workdir: Path) -> None:
    a, b = netlab.hosts
    base = round_trips(netlab, a, b, workdir)
    netlab.shape(b, delay="25ms")
    for src, dst in ((a, b), (b, a)):
        fastest, typical = added_ms(base, round_trips(netlab, src, dst, workdir))
        assert 48 <= fastest and typical <= 75, (src.name, dst.name, fastest, typical)
    # the delay adds latency only: throughput through the proxy stays high
    assert throughput(netlab, a, b, workdir, 1.0)["mbit"] > 500
    netlab.shape(a, delay="25ms")  # both links delayed: the path has 50 ms each way
    fastest, typical = added_ms(base, round_trips(netlab, a, b, workdir))
    assert 98 <= fastest and typical <= 125, (fastest, typical)


def test_storm_drops_throughput_in_bursts(netlab: Lab, workdir: Path) -> None:
    a, b = netlab.hosts
    netlab.shape(b, rate="100mbit", storm="100x:1s/2s")
    r = throughput(netlab, a, b, workdir, 4.0)
    series = r["series"][:-1]  # the last bin is partial
    assert sum(1 for x in series if x < 5) >= 4, series  # 1 Mbit/s in a storm
    assert sum(1 for x in series if x > 60) >= 4, series  # ~95 Mbit/s between storms
    assert 25 < r["mbit"] < 80, r


def test_loss_drops_that_share_of_packets(netlab: Lab, workdir: Path) -> None:
    a, b = netlab.hosts
    n = 2000
    assert udp_received(netlab, a, b, workdir, n) >= n * 0.99
    netlab.shape(b, loss="20%")
    for src, dst in ((a, b), (b, a)):
        got = udp_received(netlab, src, dst, workdir, n)
        assert 0.72 * n <= got <= 0.88 * n, (src.name, dst.name, got)


def test_partition_blocks_and_heal_restores(netlab: Lab, workdir: Path) -> None:
    a, b = netlab.hosts
    netlab.partition(a, b)
    for src, dst in ((a, b), (b, a)):
        server = bg_tool(netlab, dst, workdir, "echo", dst.ip, str(PORT))
        try:
            out = tool(netlab, src, workdir, "tryconnect", dst.ip, str(PORT), "1.5")
            assert out.strip() == "TimeoutError", out
        finally:
            server.kill()
            server.wait()
    assert netlab.ssh(a, "echo reachable").stdout.strip() == "reachable"  # control path
    netlab.heal(a, b)
    assert len(round_trips(netlab, a, b, workdir, 2)) == 2
    # a shaped (proxied) path is cut just the same
    netlab.shape(b, delay="10ms")
    netlab.partition(b, a)
    out = tool(netlab, a, workdir, "tryconnect", b.ip, str(PORT), "1.5")
    assert out.strip() == "TimeoutError", out
    netlab.heal_all()
    assert len(round_trips(netlab, a, b, workdir, 2)) == 2


# ---------------------------------------------------------------- marsd
def test_marsd_start_view_and_kill(lab: Lab) -> None:
    h = lab.hosts[0]
    lab.marsadm(h, "create-cluster", "--ip", h.ip)
    pid = lab.marsd_start(h)
    try:
        view = lab.marsadm(h, "view")
        assert view["marsd"] is True and view["rc"] == 0
        assert lab.marsd_pid(h) == pid
        if not lab.local:
            listening = lab.exec(h, "ss", "-Hltn").stdout
            assert f"{h.ip}:7777" in listening
    finally:
        lab.marsd_kill(h)
    assert lab.marsd_pid(h) is None
    assert not _alive(pid)
    assert "marsd" in lab.marsd_log(h)
    assert lab.marsadm(h, "view")["marsd"] is False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# ---------------------------------------------------------------- cleanup
def _lab_traces(lab_dir: Path, netns_prefix: str, bridge: str) -> list[str]:
    traces = []
    if Path("/run/netns").exists():
        traces += [n for n in os.listdir("/run/netns") if n.startswith(netns_prefix)]
    if Path(f"/sys/class/net/{bridge}").exists():
        traces.append(bridge)
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True,
                           text=True).stdout
    traces += [line for line in loops.splitlines() if str(lab_dir) in line]
    marker = f"{MARKER}={lab_dir}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and _alive(int(pid)):
            traces.append(f"process {pid}")
    if lab_dir.exists():
        traces.append(str(lab_dir))
    return traces


@pytest.mark.parametrize("crash", [False, True], ids=["down", "down-after-crash"])
def test_down_leaves_nothing(workdir: Path, crash: bool) -> None:
    """A second lab (its own net) beside the module's; down removes all of it, also when
    state.json is gone (the lab crashed while it was set up)."""
    lab_dir = workdir / f"lab-down-{crash}"
    lab = Lab.up(hosts=2, device_size="16M", lab_dir=lab_dir)
    try:
        sleeper = lab.popen(lab.hosts[1], "sleep", "600")
        prefix = lab.net.netns_prefix
        if not lab.local:
            lab.shape(lab.hosts[0], delay="5ms")  # a WAN proxy process
            assert _lab_traces(lab_dir, prefix, lab.net.bridge)
        if crash:
            (lab_dir / "state.json").unlink()
            left = down_dir(lab_dir)
        else:
            left = lab.down()
        assert left == []
        sleeper.wait(timeout=10)
        assert _lab_traces(lab_dir, prefix, lab.net.bridge) == []
    finally:
        down_dir(lab_dir)


def test_down_removes_mounts_and_loop_devices_on_them(workdir: Path) -> None:
    """A filesystem on a loop device on an nbdfuse file of marsd's export, all under the
    lab directory: down unmounts, detaches and stops all of it."""
    if os.geteuid() != 0 or not shutil.which("nbdfuse") or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root, nbdfuse (libnbd-bin) and mkfs.ext4")
    lab_dir = workdir / "lab-mounts"
    lab = Lab.up(hosts=1, device_size="64M", lab_dir=lab_dir)
    try:
        h = lab.hosts[0]
        lab.marsadm(h, "create-cluster", "--ip", h.ip)
        lab.marsd_start(h)
        lab.marsadm(h, "create-resource", "r0", h.devices[0], "--wait")
        mnt, fs = lab_dir / "mnt", lab_dir / "fs"
        mnt.mkdir()
        fs.mkdir()
        fuse = lab.popen(h, "nbdfuse", str(mnt), "--unix", str(h.run_dir / "r0.nbd"))
        wait_until(lambda: (mnt / "nbd").exists() or fuse.poll() is not None,
                   "nbdfuse starts")
        assert fuse.poll() is None, "nbdfuse exited"
        loop = subprocess.run(["losetup", "-f", "--show", str(mnt / "nbd")], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", loop], check=True)
        subprocess.run(["mount", loop, str(fs)], check=True)
        (fs / "hello").write_text("hello\n")
        assert lab.down() == []
        fuse.wait(timeout=10)
        assert not [m for m in Path("/proc/self/mountinfo").read_text().splitlines()
                    if str(lab_dir) in m]
        backing = Path(f"/sys/block/{Path(loop).name}/loop/backing_file")
        assert not backing.exists() or "nbd" not in backing.read_text(), backing.read_text()
    finally:
        down_dir(lab_dir)


def test_a_directory_that_is_not_a_lab_is_left_alone(workdir: Path) -> None:
    precious = workdir / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine\n")
    with pytest.raises(LabError, match="not a lab directory"):
        Lab.up(hosts=1, lab_dir=precious, mode="local")
    left = down_dir(precious)
    assert left and "not a lab directory" in left[-1]
    assert (precious / "keep.txt").read_text() == "mine\n"


def test_local_lab_runs_without_namespaces(workdir: Path) -> None:
    lab = Lab.up(hosts=2, device_size="1M", lab_dir=workdir / "local", mode="local")
    try:
        assert [h.ip.rsplit(".", 1)[1] for h in lab.hosts] == ["11", "12"]
        assert all(h.netns is None and h.devices == [str(h.images[0])] for h in lab.hosts)
        out = lab.exec(lab.hosts[1], "sh", "-c", "echo $MARS_HOST").stdout
        assert out.strip() == "lab2"
        for fault in (lambda: lab.shape("lab1", delay="5ms"),
                      lambda: lab.partition("lab1", "lab2")):
            with pytest.raises(LabUnsupported, match="netns lab"):
                fault()
    finally:
        assert lab.down() == []


def test_far_secondaries_sit_behind_a_wan_link(workdir: Path) -> None:
    lab = Lab.up(hosts=3, far=True, device_size="1M", lab_dir=workdir / "far")
    try:
        if lab.local:
            pytest.skip("no WAN profile in a local lab")
        shapes = {h["name"]: h["shape"] for h in lab.status()["hosts"]}
        assert shapes["lab1"] is None
        for far in ("lab2", "lab3"):
            assert (shapes[far]["rate"], shapes[far]["delay"]) == ("100mbit", "25ms")
        assert "[mars_far]\nlab2\nlab3" in lab.inventory.read_text()
        near, far1, _ = lab.hosts
        rtt = round_trips(lab, near, far1, workdir, 5)
        assert 48 <= min(rtt) and statistics.median(rtt) <= 75, rtt
    finally:
        assert lab.down() == []
