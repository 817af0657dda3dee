"""The operators' path: ansible-playbook over real SSH against the lab, with the demo
application writing into a filesystem on the resource the whole time.

site.yml builds the cluster; football.yml (lab1 -> lab3) and expand.yml run twice each:
the second run must change nothing, and after every run the application's data must
check out (no acknowledged record lost) and the replicas' devices must equal the
primary's. rolling_upgrade.yml upgrades a cluster installed from the previous release
(the commit in scripts/previous-release) to this working tree while the application writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, REPO, wait_until

from marslib import __version__

pytestmark = pytest.mark.skipif(
    not IS_ROOT or not shutil.which("nbdfuse") or not shutil.which("sshd"),
    reason="the lab needs root (namespaces), sshd and nbdfuse (libnbd-bin)")

VENV = REPO / ".venv" / "bin"
RESOURCE = "r0"


@dataclass
class Run:
    rc: int
    output: str
    recap: dict[str, dict[str, int]]
    seconds: float

    def changed(self, host: str | None = None) -> int:
        hosts = [host] if host else list(self.recap)
        return sum(self.recap[h]["changed"] for h in hosts if h != "localhost")


RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


COLLECTIONS: list[Path] = []  # where marslib.mars is installed (use_installed_collection)


@pytest.fixture(autouse=True)
def use_installed_collection(installed_collection: Path) -> Iterator[None]:
    """Every playbook here runs from the built and installed collection."""
    COLLECTIONS[:] = [installed_collection]
    yield
    COLLECTIONS.clear()


def ansible_env() -> dict[str, str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
           "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS[0]),
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{VENV}:{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    return env


def playbook(lab: Any, name: str, *extra: str, check: bool = False,
             expect_ok: bool = True, timeout: float = 1200) -> Run:
    """Run marslib.mars.NAME against the lab's inventory; print its output (timings
    included)."""
    env = ansible_env()
    cmd = [str(VENV / "ansible-playbook"), "-i", str(lab.inventory), f"marslib.mars.{name}",
           "-e", f"mars_wheel_dir={lab.dir / 'dist'}", "-e", f"marslib_source={REPO}", *extra]
    if check:
        cmd.append("--check")
    started = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - started
    text = out.stdout + out.stderr
    print(f"\n===== ansible-playbook {name} {' '.join(extra)}"
          f"{' --check' if check else ''}: rc {out.returncode}, {seconds:.1f} s\n{text}")
    recap = {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]),
                    "failed": int(m[5])}
             for m in (RECAP.match(line) for line in text.splitlines()) if m}
    if expect_ok:
        assert out.returncode == 0, f"{name} failed:\n{text[-6000:]}"
        assert recap and all(r["failed"] == 0 and r["unreachable"] == 0
                             for r in recap.values()), recap
    return Run(out.returncode, text, recap, seconds)


def interrupted_playbook(lab: Any, name: str, kill_at: str, *extra: str) -> str:
    """Start marslib.mars.NAME and SIGKILL it (and its ssh children) once ``kill_at``
    shows."""
    proc = subprocess.Popen([str(VENV / "ansible-playbook"), "-i", str(lab.inventory),
                             f"marslib.mars.{name}", *extra], env=ansible_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if kill_at in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    text = "".join(seen)
    print(f"\n===== ansible-playbook {name} {' '.join(extra)}: killed at {kill_at!r}\n{text}")
    assert kill_at in text, f"{name} never reached {kill_at!r}"
    return text


def app(lab: Any, host: str, *args: str) -> dict[str, Any]:
    h = lab.host(host)
    env = {**h.lab_env, "MARS_APP_DIR": str(h.dir / "app")}
    out = lab.exec(host, "env", *(f"{k}={v}" for k, v in env.items()),
                   str(REPO / "bin" / "mars-app"), *args, RESOURCE, "--json", check=False,
                   timeout=120)
    reply: dict[str, Any] = json.loads(out.stdout)
    return reply


def app_writes(lab: Any, host: str, records: int = 20) -> None:
    """Wait until the application on ``host`` has acknowledged ``records`` more records."""
    start = app(lab, host, "status")["acked_seq"] or 0
    wait_until(lambda: (app(lab, host, "status")["acked_seq"] or 0) >= start + records,
               f"the application on {host} writes {records} records", timeout=120)


def view(lab: Any, host: str) -> dict[str, Any]:
    return dict(lab.marsadm(host, "view", RESOURCE)["resources"][RESOURCE])


def wait_up_to_date(lab: Any, primary: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        v = view(lab, primary)
        states = {h: lab.marsadm(h, "view", RESOURCE)["resources"][RESOURCE]["members"][h]
                  ["state"] for h in v["members"]}
        if all(s == "UpToDate" for h, s in states.items() if h != primary):
            return v
        assert time.monotonic() < deadline, f"replicas never caught up: {states}"
        time.sleep(0.5)


def device_digests(lab: Any, members: list[str], size: int) -> dict[str, str]:
    """sha256 of the first ``size`` bytes of each member's data device."""
    out = {}
    for host in members:
        h = lab.host(host)
        digest = hashlib.sha256()
        with open(h.devices[0], "rb") as f:
            left = size
            while left:
                chunk = f.read(min(left, 4 << 20))
                assert chunk, f"{h.devices[0]} is shorter than {size}"
                digest.update(chunk)
                left -= len(chunk)
        out[host] = digest.hexdigest()
    return out


def check_identical(lab: Any, primary: str) -> dict[str, str]:
    """Stop the application, let the replicas catch up, compare every member's device."""
    app(lab, primary, "stop")
    v = wait_up_to_date(lab, primary)
    digests = device_digests(lab, sorted(v["members"]), v["size"])
    assert len(set(digests.values())) == 1, f"devices differ: {digests}"
    return digests


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from marslib.lab import Lab
    lab = Lab.up(hosts=3, device_size="256M", lab_dir=tmp_path_factory.mktemp("alab") / "lab")
    try:
        yield lab
    finally:
        lab.down()


def test_site_football_expand(lab: Any) -> None:
    """site.yml, then football lab1 -> lab3 (after a --check run) and expand, each twice.
    (site.yml twice runs as Molecule's default scenario in every run, and handover.yml
    twice as its handover scenario in `make soak`, tests/test_molecule.py; football's
    handover goes through the same role.)"""
    times: dict[str, float] = {}
    site = playbook(lab, "site", "-e", "@" + str(REPO / "ansible" / "lab-vars.yml"))
    assert site.changed() > 0
    times["site"] = site.seconds
    v = view(lab, "lab1")
    assert v["primary"] == "lab1" and sorted(v["members"]) == ["lab1", "lab2"]

    # -- marsd's arguments change: the handler restarts marsd on each host, one at a time
    pids = {h: (lab.host(h).dir / "marsd.pid").read_text().strip() for h in ("lab1", "lab2")}
    site2 = playbook(lab, "site", "-e", "@" + str(REPO / "ansible" / "lab-vars.yml"),
                     "-e", '{"mars_marsd_args": ["--connections", "3"]}')
    assert site2.output.count("RUNNING HANDLER [marslib.mars.mars_node : Restart marsd]") == 1
    for h, pid in pids.items():
        new = (lab.host(h).dir / "marsd.pid").read_text().strip()
        assert new != pid, f"marsd on {h} was not restarted"
        assert "--connections 3" in Path(f"/proc/{new}/cmdline").read_text().replace("\0", " ")
    wait_up_to_date(lab, "lab1")

    # -- the application writes into a filesystem on r0, on lab1
    started = app(lab, "lab1", "start", "--mkfs", "--rate", "50")
    assert started["ok"], started
    app_writes(lab, "lab1")

    # -- football lab1 -> lab3: a dry run first changes nothing
    before = view(lab, "lab1")
    dry = playbook(lab, "football", "-e", f"resource={RESOURCE}", "-e", "from=lab1",
                   "-e", "to=lab3", check=True)
    assert "join lab3: to do" in dry.output
    after = view(lab, "lab1")
    assert sorted(after["members"]) == sorted(before["members"]) and after["primary"] == "lab1"
    assert app(lab, "lab1", "status")["running"]

    # the first run dies after the join, while it waits for the sync (the operator's
    # laptop goes away): running it again finishes the move
    killed = interrupted_playbook(lab, "football",
                                  "TASK [Wait until the resource is up to date on lab3]",
                                  "-e", f"resource={RESOURCE}", "-e", "from=lab1",
                                  "-e", "to=lab3")
    assert "lab3" in view(lab, "lab1")["members"], killed
    assert view(lab, "lab1")["primary"] == "lab1"
    # the run after it moves r0 and lab1 leaves, but removing lab1's old device fails:
    # the run fails, and the next run finishes that removal (recorded before the leave)
    old_device = view(lab, "lab1")["members"]["lab1"]["device"]
    removed = lab.dir / "removed-devices"
    fb = playbook(lab, "football", "-e", f"resource={RESOURCE}", "-e", "from=lab1",
                  "-e", "to=lab3",
                  "-e", json.dumps({"football_remove_device_command": "false {device}"}),
                  "-e", f"football_remove_confirm={RESOURCE}", expect_ok=False)
    assert fb.rc != 0 and fb.recap["lab1"]["failed"] == 1, fb.recap
    assert "TASK [Remove the old device]" in fb.output
    assert sorted(view(lab, "lab3")["members"]) == ["lab2", "lab3"]
    record = f"sh -c 'echo {{device}} >> {removed}'"
    fixed = playbook(lab, "football", "-e", f"resource={RESOURCE}", "-e", "from=lab1",
                     "-e", "to=lab3",
                     "-e", json.dumps({"football_remove_device_command": record}),
                     "-e", f"football_remove_confirm={RESOURCE}")
    assert removed.read_text().split() == [old_device], "the old device was not removed"
    assert fixed.changed("lab1") > 0 and fixed.changed("lab3") == 0, fixed.recap
    assert "join lab3: done" in fb.output
    assert re.search(r"r0 lab1 -> lab3: stop application [0-9.]+ s, handover [0-9.]+ s",
                     fb.output), "no handover timings printed"
    # the re-run reports what it finished, with the figures of the sync
    assert re.search(r"join \+ sync: [0-9.]+ s; the last sync compared 256", fixed.output), \
        "no sync figures"
    assert f"old device {old_device} removed on lab1" in fixed.output
    v = view(lab, "lab3")
    assert v["primary"] == "lab3" and sorted(v["members"]) == ["lab2", "lab3"], v
    status = app(lab, "lab3", "status")
    assert status["running"], status
    assert not app(lab, "lab1", "status")["running"]
    moved = v["members"]["lab3"]["last_sync"]
    assert moved and moved["compared"] == v["size"], moved
    times["football"] = fb.seconds
    fb2 = playbook(lab, "football", "-e", f"resource={RESOURCE}", "-e", "from=lab1",
                   "-e", "to=lab3")
    assert fb2.changed() == 0, fb2.recap
    assert "nothing to move" in fb2.output
    app_writes(lab, "lab3")  # after the move, too
    check = app(lab, "lab3", "verify", "--allow-torn-tail")
    assert check["ok"], check

    # -- expand to 384 MiB with the filesystem, twice
    ex = playbook(lab, "expand", "-e", f"resource={RESOURCE}", "-e", "size=384M")
    assert view(lab, "lab3")["size"] == 384 << 20
    grown = app(lab, "lab3", "status")
    assert grown["running"] and grown["fs_size"] > 300 << 20, grown
    ex2 = playbook(lab, "expand", "-e", f"resource={RESOURCE}", "-e", "size=384M")
    assert ex2.changed() == 0, ex2.recap
    times["expand"] = ex.seconds

    # -- the data: every acknowledged record, and the replicas equal the primary
    digests = check_identical(lab, "lab3")
    final = app(lab, "lab3", "verify", "--min-seq", str(app(lab, "lab3", "status")["acked_seq"]))
    assert final["ok"] and final["records"] > 0, final
    print(f"\nplaybook times: {times}; records {final['records']}; devices {digests}; "
          f"football sync: {moved}")


@pytest.fixture(scope="module")
def old_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from marslib.lab import Lab
    lab = Lab.up(hosts=3, device_size="256M",
                 lab_dir=tmp_path_factory.mktemp("ulab") / "lab")
    try:
        yield lab
    finally:
        lab.down()


def build_previous_release(dest: Path) -> tuple[str, str]:
    """The previous release's wheel (scripts/previous-release: a commit, which every
    clone carries, unlike a tag) and its version. Not buildable is a failure, not a skip:
    the upgrade path is tested on every run."""
    built = subprocess.run([str(REPO / "scripts" / "build-wheel.sh"), "--previous", str(dest)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail(f"cannot build the previous release from scripts/previous-release: "
                    f"{built.stderr.strip()}", pytrace=False)
    wheel = built.stdout.strip().splitlines()[-1]
    version = Path(wheel).name.split("-")[1]
    return wheel, version


@pytest.mark.soak  # about 4-5 min; `make molecule`'s rolling_upgrade scenario covers it too
def test_rolling_upgrade_from_previous_release(old_lab: Any) -> None:
    lab = old_lab
    wheel, old_version = build_previous_release(lab.dir / "dist")
    assert old_version != __version__, f"scripts/previous-release names {__version__} itself"
    lab_vars = str(REPO / "ansible" / "lab-vars.yml")
    # three members: a secondary stays while lab1 and lab2 swap roles
    playbook(lab, "site", "-e", f"@{lab_vars}", "-e", f"marslib_wheel={wheel}",
             "-e", f"marslib_version={old_version}",
             "-e", '{"lab_members": ["lab1", "lab2", "lab3"]}')
    for host in ("lab1", "lab2", "lab3"):
        old = subprocess.run([str(lab.host(host).dir / "opt" / "current" / "bin" / "marsadm"),
                              "--version"], capture_output=True, text=True)
        assert old.stdout.strip() == f"marsadm {old_version}", old
    assert app(lab, "lab1", "start", "--mkfs", "--rate", "50")["ok"]
    app_writes(lab, "lab1")

    up = playbook(lab, "rolling_upgrade", "-e", "hand_back=true")
    for host in ("lab1", "lab2", "lab3"):
        v = lab.marsadm(host, "view")
        assert v["marsd_version"] == __version__, (host, v)
    v = view(lab, "lab1")
    assert v["primary"] == "lab1", "hand_back=true returns r0 to lab1"
    assert {m["version"] for m in v["members"].values()} == {__version__}
    assert app(lab, "lab1", "status")["running"]
    up2 = playbook(lab, "rolling_upgrade", "-e", "hand_back=true")
    assert up2.changed() == 0, up2.recap
    check_identical(lab, "lab1")
    final = app(lab, "lab1", "verify", "--min-seq", str(app(lab, "lab1", "status")["acked_seq"]))
    assert final["ok"], final
    print(f"\nrolling upgrade {old_version} -> {__version__}: {up.seconds:.1f} s "
          f"(second run {up2.seconds:.1f} s); records {final['records']}")


@pytest.mark.soak
def test_football_with_a_sync_of_more_than_ten_minutes(tmp_path_factory: pytest.TempPathFactory
                                                       ) -> None:
    """A football whose full sync takes longer than ten minutes finishes, printing progress
    all along: r0 holds 256 MiB of random data (every block differs from the new host's
    empty device) and the new host's link is shaped to 3 Mbit/s, so the sync alone takes
    about twelve minutes. The wait must neither recurse nor give up, and the application's
    data must check out at the end."""
    from marslib.lab import Lab
    lab = Lab.up(hosts=3, device_size="256M", lab_dir=tmp_path_factory.mktemp("slab") / "lab")
    try:
        device = lab.host("lab1").devices[0]
        subprocess.run(["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=256",
                        "oflag=direct", "status=none"], check=True, timeout=600)
        playbook(lab, "site", "-e", "@" + str(REPO / "ansible" / "lab-vars.yml"))
        assert app(lab, "lab1", "start", "--mkfs", "--rate", "10")["ok"]
        app_writes(lab, "lab1")
        lab.shape("lab3", rate="3mbit")
        fb = playbook(lab, "football", "-e", f"resource={RESOURCE}", "-e", "from=lab1",
                      "-e", "to=lab3", "-e", "football_progress_every=30", timeout=4 * 3600)
        lines = re.findall(r"\[lab3\] r0@lab3: Syncing, synced ([0-9.]+)%", fb.output)
        print(f"\nfootball with a slow sync: {fb.seconds:.0f} s, {len(lines)} progress lines, "
              f"synced % seen: {lines[:3]} ... {lines[-3:]}")
        assert fb.seconds > 600, "the sync was not slow enough to test a long wait"
        # one line per 30 s slice of the wait (the sync is most of the run)
        assert len(lines) >= 0.6 * fb.seconds / 30, "no progress line every 30 s"
        percents = [float(p) for p in lines]
        assert percents == sorted(percents) and percents[-1] > percents[0]
        v = view(lab, "lab3")
        assert v["primary"] == "lab3" and sorted(v["members"]) == ["lab2", "lab3"], v
        assert v["members"]["lab3"]["last_sync"]["copied"] > 200 << 20
        lab.shape("lab3")
        check_identical(lab, "lab3")
        final = app(lab, "lab3", "verify", "--min-seq",
                    str(app(lab, "lab3", "status")["acked_seq"]))
        assert final["ok"], final
    finally:
        lab.down()
