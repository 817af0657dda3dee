"""marsadm and marsd as an operator uses them: verbs, JSON, exit codes, clear refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import (
    BIN,
    NBD_CLIENT,
    SYSTEM_PYTHON,
    BlockDev,
    MarsHost,
    nbd_client,
    needs_libnbd,
    wait_until,
)


def make_cluster(host: MarsHost, dev: BlockDev, start: bool = True) -> None:
    host.marsadm("create-cluster")
    host.marsadm("create-resource", "r0", dev.path)
    if start:
        host.start()
        host.marsadm("up", "r0")


def test_create_and_view(host: MarsHost, blockdev: BlockDev) -> None:
    make_cluster(host, blockdev)
    view = host.marsadm("view")
    r0 = view["resources"]["r0"]
    assert view["marsd"] is True and r0["primary"] == "alpha" and r0["size"] == 64 << 20
    me = r0["members"]["alpha"]
    assert me["state"] == "Primary" and me["device"] == blockdev.path and me["running"]
    human = subprocess.run([str(BIN / "marsadm"), "view"], env=host.env, capture_output=True,
                           text=True)
    assert human.returncode == 0
    row = next(line for line in human.stdout.splitlines() if line.startswith("r0 "))
    assert row.split()[:4] == ["r0", "alpha", "primary", "Primary"]


def test_refusals_have_clear_messages_and_exit_codes(host: MarsHost, tmp_path: Path,
                                                     blockdev: BlockDev) -> None:
    r = host.marsadm("view", check=False)
    assert r["rc"] == 1 and "create-cluster" in r["error"]
    host.marsadm("create-cluster")
    r = host.marsadm("create-cluster", check=False)
    assert r["rc"] == 1 and "already belongs" in r["error"]
    r = host.marsadm("create-resource", "Bad/Name", blockdev.path, check=False)
    assert r["rc"] == 2 and "invalid resource name" in r["error"]
    r = host.marsadm("create-resource", "r0", str(tmp_path / "nope"), check=False)
    assert r["rc"] == 1 and "does not exist" in r["error"]
    r = host.marsadm("create-resource", "r0", blockdev.path, "--size", "1T", check=False)
    assert r["rc"] == 1 and "larger than" in r["error"]
    r = host.marsadm("up", "nosuch", check=False)
    assert r["rc"] == 1 and "does not exist" in r["error"]
    host.marsadm("create-resource", "r0", blockdev.path)
    r = host.marsadm("create-resource", "r1", blockdev.path, check=False)
    assert r["rc"] == 1 and "already the data device of resource r0" in r["error"]
    r = host.marsadm("up", "r0", check=False)  # no marsd yet
    assert r["rc"] == 1 and "marsd is not running" in r["error"]
    r = host.marsadm("no-such-verb", check=False)
    assert r["rc"] == 2
    # the dry run changes nothing
    r = host.marsadm("create-resource", "r2", blockdev.path, "--dry-run", check=False)
    assert r["rc"] == 1  # same device as r0: refused even in a dry run
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 << 20))
    r = host.marsadm("create-resource", "r2", str(other), "--dry-run")
    assert r["dry_run"] and r["changed"]
    assert host.marsadm("view")["resources"].keys() == {"r0"}


def test_missing_device_at_start_is_reported(host: MarsHost, tmp_path: Path) -> None:
    img = tmp_path / "vanishing.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    host.marsadm("create-cluster")
    host.marsadm("create-resource", "r0", str(img))
    img.unlink()
    host.start()
    r = host.marsadm("up", "r0", check=False, timeout=30)
    assert r["rc"] == 1 and "does not exist" in r["error"]
    me = host.marsadm("view")["resources"]["r0"]["members"]["alpha"]
    assert me["state"] == "Error" and "does not exist" in me["error"]
    # other resources are unaffected: the daemon keeps serving
    assert host.proc is not None and host.proc.poll() is None


@needs_libnbd
def test_wrong_export_name_is_refused(host: MarsHost, blockdev: BlockDev) -> None:
    make_cluster(host, blockdev)
    sock = host.run_dir / "r0.nbd"
    out = nbd_client(f"nbd+unix:///nosuch?socket={sock}", "info", check=False)
    assert out.returncode != 0 and "nosuch" in out.stderr + out.stdout
    out = nbd_client(host.nbd_uri("r0"), "info")
    assert out.stdout.split()[0] == str(64 << 20)


@needs_libnbd
def test_down_refused_while_in_use_then_allowed(host: MarsHost, blockdev: BlockDev) -> None:
    make_cluster(host, blockdev)
    writer = subprocess.Popen([SYSTEM_PYTHON, str(NBD_CLIENT), host.nbd_uri("r0"), "writer",
                               "1", "4", "64", "65536", "30"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: host.marsadm("view")["resources"]["r0"]["members"]["alpha"][
            "open_count"] >= 1, "the open count rises")
        r = host.marsadm("down", "r0", check=False)
        assert r["rc"] == 1 and "in use by 1 NBD client" in r["error"]
        assert host.marsadm("view")["resources"]["r0"]["members"]["alpha"]["running"]
    finally:
        writer.kill()
        writer.wait()
    wait_until(lambda: host.marsadm("view")["resources"]["r0"]["members"]["alpha"][
        "open_count"] == 0, "the open count falls")
    assert host.marsadm("down", "r0")["changed"] is True
    assert host.marsadm("down", "r0")["changed"] is False
    assert not (host.run_dir / "r0.nbd").exists()
    assert host.marsadm("up", "r0")["changed"] is True
    assert host.marsadm("up", "r0")["changed"] is False


@needs_libnbd
def test_log_rotate_delete_and_cron(host: MarsHost, blockdev: BlockDev) -> None:
    make_cluster(host, blockdev)
    uri = host.nbd_uri("r0")
    nbd_client(uri, "pwrite", "0", "aa" * 4096)
    first = host.marsadm("view")["resources"]["r0"]["logfiles"]
    rot = host.marsadm("log-rotate", "r0")
    assert rot["logfile"] not in first
    nbd_client(uri, "pwrite", "4096", "bb" * 4096)
    # the applied position, saved within position_interval, moves past the first logfile
    wait_until(lambda: host.marsadm("log-delete", "r0", "--dry-run")["deleted"] == first,
               "log-delete --dry-run offers the applied first logfile")
    assert host.marsadm("view")["resources"]["r0"]["logfiles"][0] == first[0]
    done = host.marsadm("log-delete", "r0")
    assert done["deleted"] == first and done["bytes_freed"] > 4096
    assert host.marsadm("log-delete", "r0")["changed"] is False
    # cron rotates an old logfile and deletes what is applied
    current = host.marsadm("view")["resources"]["r0"]["logfiles"]
    assert current == [rot["logfile"]]
    cron = host.marsadm("cron", "--rotate-age", "0")
    assert cron["actions"]["r0"]["rotated_to"] != rot["logfile"]
    assert cron["actions"]["r0"]["deleted"] == [rot["logfile"]]
    nbd_client(uri, "pwrite", "8192", "cc" * 4096)
    assert host.marsadm("cron")["changed"] is False
    # data survives all of it
    assert nbd_client(uri, "pread", "0", "12288").stdout.strip() == \
        "aa" * 4096 + "bb" * 4096 + "cc" * 4096


def test_options_before_the_verb(host: MarsHost, blockdev: BlockDev) -> None:
    host.marsadm("create-cluster")
    env = {k: v for k, v in host.env.items() if k != "MARS_ROOT"}
    out = subprocess.run([str(Path(host.env["PYTHONPATH"]) / "bin" / "marsadm"), "--json",
                          "--root", str(host.root), "view"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0 and '"ok": true' in out.stdout


def test_cluster_from_a_given_id_and_secret_needs_no_ssh(tmp_path: Path) -> None:
    """What Ansible does: it holds the cluster id and secret (from a vault) and hands them
    to every host; the joining host names one member and learns the rest from it."""
    from conftest import loopback_ips
    ip_a, ip_b = loopback_ips(2)
    a = MarsHost(tmp_path / "a", "alpha", ip_a)
    b = MarsHost(tmp_path / "b", "beta", ip_b)
    secret = tmp_path / "secret"
    secret.write_text("short\n")
    cluster = "0b5a6f0e-53c6-4c1e-9a57-8a4f7d0c2f11"
    r = a.marsadm("create-cluster", "--ip", ip_a, "--uuid", cluster, "--secret-file",
                  str(secret), check=False)
    assert r["rc"] == 2 and "at least 16" in r["error"] and not a.root.exists()
    r = a.marsadm("create-cluster", "--uuid", "not-a-uuid", check=False)
    assert r["rc"] == 2 and "not a UUID" in r["error"]
    secret.write_text("f" * 64 + "\n")
    assert a.marsadm("create-cluster", "--ip", ip_a, "--uuid", cluster, "--secret-file",
                     str(secret))["uuid"] == cluster
    assert (a.root / "secret").read_text() == "f" * 64 + "\n"
    assert (a.root / "secret").stat().st_mode & 0o077 == 0
    r = b.marsadm("join-cluster", ip_a, "--ip", ip_b, "--uuid", cluster, check=False)
    assert r["rc"] == 2 and "go together" in r["error"]
    b.marsadm("join-cluster", ip_a, "--ip", ip_b, "--uuid", cluster, "--secret-file",
              str(secret), "--peer-name", "alpha")
    dev_a = BlockDev(tmp_path / "a.img", 16 << 20)
    dev_b = BlockDev(tmp_path / "b.img", 16 << 20)
    try:
        a.start()
        b.start()
        a.marsadm("create-resource", "r0", dev_a.path, "--wait")
        # beta learns the resource (and alpha's own stamped address) over the mesh
        b.marsadm("join-resource", "r0", dev_b.path, "--wait", timeout=90)
        view = a.marsadm("view", "r0")
        assert set(view["resources"]["r0"]["members"]) == {"alpha", "beta"}
        assert view["version"] == view["marsd_version"]
        assert view["resources"]["r0"]["members"]["beta"]["version"] == view["version"]
        # a wrong secret is refused by the peers: that host never learns anything
        c = MarsHost(tmp_path / "c", "gamma", loopback_ips(3)[2])
        secret.write_text("0" * 64 + "\n")
        c.marsadm("join-cluster", ip_a, "--ip", c.ip, "--uuid", cluster, "--secret-file",
                  str(secret), "--peer-name", "alpha")
        c.start()
        try:
            # gamma tries (it dials from 127.0.0.1: only its failed authentication names it)
            wait_until(lambda: "authentication failed: the peer does not know the cluster "
                       "secret" in a.logtail(500), "alpha refuses gamma's connection")
            assert c.marsadm("view")["resources"] == {}
            assert "gamma" not in str(a.marsadm("view")["peers"])
        finally:
            c.stop()
    finally:
        a.stop()
        b.stop()
        dev_a.close()
        dev_b.close()


def test_json_usage_errors_say_what_is_wrong_and_leave_cluster_is_idempotent(
        host: MarsHost) -> None:
    r = host.marsadm("resize", check=False)
    assert r["rc"] == 2 and "required: resource" in r["error"]
    r = host.marsadm("create-cluster", "--ip", "10.0.0.1", "--bogus", check=False)
    assert r["rc"] == 2 and "--bogus" in r["error"]
    host.marsadm("create-cluster", "--ip", "127.0.0.1")
    assert host.marsadm("view")["ip"] == "127.0.0.1"
    assert host.marsadm("leave-cluster")["changed"] is True
    assert host.marsadm("view")["ip"] is None
    assert host.marsadm("leave-cluster")["changed"] is False
