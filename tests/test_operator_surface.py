"""What an operator meets around the edges: malformed control requests, advice that works
on the host that shows it, `up` after a failed start, and the OPEN column after a crash."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import (
    BIN,
    NBD_CLIENT,
    SYSTEM_PYTHON,
    BlockDev,
    MarsHost,
    loopback_ips,
    nbd_client,
    needs_libnbd,
    wait_until,
)

from marslib import control
from marslib.errors import UsageError
from marslib.history import write_link
from marslib.meta import MetaStore
from marslib.position import LogPosition


def raw_control(host: MarsHost, payload: bytes) -> list[bytes]:
    """Send ``payload`` on marsd's control socket as is; every line marsd answers before
    it closes the connection (the test times out if it never does)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(host.run_dir / "marsd.sock"))
    try:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # marsd stopped reading after its limit: its answer is still there
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return buf.splitlines()


def marsadm_text(host: MarsHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "marsadm"), *args], capture_output=True, text=True,
                          env=host.env, timeout=60)


def test_malformed_control_requests_get_a_usage_error_and_marsd_keeps_serving(
        host: MarsHost) -> None:
    host.marsadm("create-cluster", "--ip", host.ip)
    host.start()
    bad = {
        "line over 64 KiB": b'{"cmd": "status", "pad": "' + b"a" * 70_000 + b'"}\n',
        "1 MiB without a newline": b"x" * (1 << 20),
        "JSON nested 30,000 deep": b'{"cmd": ' + b"[" * 30_000 + b"]" * 30_000 + b"}\n",
        "array nested 30,000 deep": b"[" * 30_000 + b"]" * 30_000 + b"\n",
        "not UTF-8": b'{"cmd": "\xff\xfe"}\n',
    }
    for what, payload in bad.items():
        lines = raw_control(host, payload)
        assert len(lines) == 1, f"{what}: marsd answered {lines!r}\n{host.logtail()}"
        reply = json.loads(lines[0])
        assert reply["ok"] is False and reply["code"] == 2, (what, reply)
        assert reply["error"].startswith("bad control request: "), (what, reply)
    assert "64 KiB" in json.loads(raw_control(host, bad["line over 64 KiB"])[0])["error"]
    # marsadm's side of the socket: marsd's usage error is a usage error (exit code 2)
    with pytest.raises(UsageError, match="bad control request: .*64 KiB"):
        control.request(host.run_dir / "marsd.sock", "status", pad="a" * 70_000)
    # marsd is still there for everybody else, and logged no traceback
    assert host.proc is not None and host.proc.poll() is None
    assert host.marsadm("view")["marsd"] is True
    assert host.status() == {}
    log = host.log_path.read_text()
    assert "Traceback" not in log and "Unhandled exception" not in log, host.logtail()


def test_view_says_on_which_host_to_run_advice(host: MarsHost, blockdev: BlockDev) -> None:
    """Advice recorded by another member ('resync this host with marsadm invalidate') must
    not read as advice for the host that shows it: the primary refuses invalidate."""
    host.marsadm("create-cluster", "--ip", host.ip)
    host.marsadm("create-resource", "r0", blockdev.path)
    meta = MetaStore(host.root)
    meta.set("resource-r0/data-beta", "/dev/vg0/r0")
    meta.set("resource-r0/todo-beta/attach", "1")
    advice = ("log-000000001-alpha: corrupt log record at offset 4096: the primary's copy "
              "fails the same check: its log is damaged; resync this host with 'marsadm "
              "invalidate r0' once the primary is repaired")
    meta.set("resource-r0/actual-beta/error", advice)
    out = marsadm_text(host, "view")
    assert out.returncode == 0, out.stderr
    note = next(line for line in out.stdout.splitlines() if line.startswith("note: r0@beta"))
    assert advice in note and 'reported by beta: "this host" and "here" mean beta, not ' \
        'alpha' in note, note
    # a split brain names the hosts that need invalidate (never the designated primary)
    write_link(meta, "r0", "alpha", LogPosition(1, 8192, 2, "alpha"))
    write_link(meta, "r0", "beta", LogPosition(1, 4096, 1, "alpha"))
    out = marsadm_text(host, "view")
    line = next(x for x in out.stdout.splitlines() if x.startswith("SPLIT BRAIN in r0"))
    assert "'marsadm invalidate r0' on beta" in line and "on alpha" not in line, line


@needs_libnbd
def test_a_damaged_primary_log_gives_advice_that_works_where_it_is_shown(
        tmp_path: Path) -> None:
    """A secondary stops on a record the primary's copy fails too: every view says to
    invalidate that secondary, and on which host; the advice works there."""
    ip_a, ip_b = loopback_ips(2)
    alpha = MarsHost(tmp_path / "a", "alpha", ip_a)
    beta = MarsHost(tmp_path / "b", "beta", ip_b)
    dev_a = BlockDev(tmp_path / "a.img", 16 << 20)
    dev_b = BlockDev(tmp_path / "b.img", 16 << 20)
    try:
        alpha.serve(dev_a.path)
        beta.join(alpha, dev_b.path)
        beta.stop()
        nbd_client(alpha.nbd_uri("r0"), "pwrite", "0", "ab" * 4096)
        logfile = sorted((alpha.root / "resource-r0").glob("log-*"))[-1]
        raw = bytearray(logfile.read_bytes())
        at = raw.find(b"\xab" * 4096)
        assert at > 0, "the write is not in the primary's log"
        raw[at + 100] ^= 0xFF  # the primary's copy of the record is damaged now
        logfile.write_bytes(bytes(raw))
        beta.start()

        def beta_error() -> str:
            err = alpha.marsadm("view")["resources"]["r0"]["members"]["beta"]["error"]
            return str(err or "")
        error = wait_until(lambda: "damaged" in beta_error() and beta_error(),
                           "alpha learns that beta stopped on the damaged record")
        assert "'marsadm invalidate r0'" in error, error
        note = next(x for x in marsadm_text(alpha, "view").stdout.splitlines()
                    if x.startswith("note: r0@beta"))
        assert '(reported by beta: "this host" and "here" mean beta, not alpha)' in note, note
        # the advice as shown on beta is beta's own: no hint needed there
        note = next(x for x in marsadm_text(beta, "view").stdout.splitlines()
                    if x.startswith("note: r0@beta"))
        assert "'marsadm invalidate r0'" in note and "reported by" not in note, note
        r = alpha.marsadm("invalidate", "r0", check=False)
        assert r["rc"] == 1 and "only a secondary" in r["error"]
        beta.marsadm("invalidate", "r0", "--wait")
        wait_until(lambda: beta.marsadm("view")["resources"]["r0"]["members"]["beta"]
                   ["state"] == "UpToDate", "beta up to date again after invalidate")
        assert dev_b.read(0, 8192) == dev_a.read(0, 8192)
    finally:
        alpha.stop()
        beta.stop()
        dev_a.close()
        dev_b.close()


def test_up_retries_a_failed_start_at_once(host: MarsHost, tmp_path: Path) -> None:
    img = tmp_path / "data.img"
    away = tmp_path / "moved-away.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    host.marsadm("create-cluster", "--ip", host.ip)
    host.marsadm("create-resource", "r0", str(img))
    img.rename(away)
    host.start()  # marsd tries to start r0 at once, and fails
    r = host.marsadm("up", "r0", check=False)
    assert r["rc"] == 1 and "does not exist" in r["error"], r
    # the message says that marsd retries by itself, and when
    assert "marsd retries by itself at about " in r["error"] and " s)" in r["error"], r
    # the operator fixes the cause; `up` within the retry interval tries again now
    away.rename(img)
    r = host.marsadm("up", "r0", timeout=30)
    assert r["status"]["role"] == "primary", r
    me = host.marsadm("view")["resources"]["r0"]["members"]["alpha"]
    assert me["state"] == "Primary" and not me["error"], me


@needs_libnbd
def test_open_count_is_not_stale_once_the_resource_is_not_running(
        host: MarsHost, blockdev: BlockDev) -> None:
    host.serve(blockdev.path)
    key = "resource-r0/actual-alpha/open-count"
    writer = subprocess.Popen([SYSTEM_PYTHON, str(NBD_CLIENT), host.nbd_uri("r0"), "writer",
                               "1", "2", "64", "65536", "120"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: host.marsadm("view")["resources"]["r0"]["members"]["alpha"]
                   ["open_count"] >= 1, "the NBD client counted as open")
        host.kill9()  # the export goes away without marsd resetting anything
    finally:
        writer.kill()
        writer.wait()
    assert MetaStore(host.root).get(key) == "1"  # what the crash left in the tree
    me = host.marsadm("view")["resources"]["r0"]["members"]["alpha"]
    assert me["open_count"] == 0, me
    row = next(x for x in marsadm_text(host, "view").stdout.splitlines() if x.startswith("r0 "))
    assert row.split()[:4] == ["r0", "alpha", "primary", "PrimaryDown"]
    assert row.split()[8] == "0", row
    # marsd starting resets the count of a resource it does not run
    host.marsadm("down", "r0")  # marsd is not running: only the switch
    host.start()
    wait_until(lambda: MetaStore(host.root).get(key) == "0",
               "marsd resets the open count of a resource it does not run")
    me = host.marsadm("view")["resources"]["r0"]["members"]["alpha"]
    assert me["open_count"] == 0 and me["state"] == "Detached", me
