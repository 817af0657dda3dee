"""The operator's first hour: the commands on PATH without knowing about the venv.

`make install PREFIX=...` writes wrappers that work from an empty environment and `make
uninstall` removes exactly them; bin/* scripts started by the system's python3 switch to
the checkout's venv by themselves (and without a venv run with the python they were given);
`. .venv/bin/activate` puts the commands on PATH; the shipped systemd unit and cron line
call what `make install` installs; mars-app prints lines for people, not Python reprs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, REPO, BlockDev, MarsHost, loopback_ips

import marslib
from marslib.app.cli import render_human

COMMANDS = ("marsadm", "marsd", "mars-app")
CLEAN_PATH = "/usr/bin:/bin"  # the system's python3 first, no venv, no pyenv
SYSTEM_PYTHON = shutil.which("python3", path=CLEAN_PATH)
needs_system_python = pytest.mark.skipif(SYSTEM_PYTHON is None,
                                         reason="no python3 in /usr/bin or /bin")
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
PYTHON_REPR = ("{'", "'}", "['", "']", "': ")


def clean_run(*cmd: str | Path, path: str = CLEAN_PATH, extra: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``env -i PATH=path [extra] cmd``: what a new login or a cron job starts with."""
    return subprocess.run([str(c) for c in cmd], env={"PATH": path, **(extra or {})},
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-s", "-C", str(REPO), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def default_prefix() -> str:
    m = re.search(r"^PREFIX \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "the Makefile sets no default PREFIX"
    return m.group(1)


def check_runs(cmd: Path) -> None:
    """``cmd`` works from an empty environment: --version / --help answer."""
    args = ["--version"] if cmd.name == "marsadm" else ["--help"]
    out = clean_run(cmd, *args)
    assert out.returncode == 0, f"{cmd} {args[0]}: rc {out.returncode}: {out.stderr}"
    want = f"marsadm {marslib.__version__}" if cmd.name == "marsadm" else f"usage: {cmd.name}"
    assert want in out.stdout, out.stdout


# ------------------------------------------------------------------ make install
@needs_make
def test_make_install_writes_working_wrappers_and_uninstall_removes_exactly_them(
        tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "mars-lab").write_text("#!/bin/sh\n")  # someone else's files
    (prefix / "share").mkdir()
    before = files_under(prefix)
    out = make("install", f"PREFIX={prefix}")
    assert out.returncode == 0, out.stderr
    for c in COMMANDS:
        wrapper = prefix / "bin" / c
        assert os.access(wrapper, os.X_OK), f"make install wrote no {wrapper}"
        check_runs(wrapper)
    assert files_under(prefix) == before | {f"bin/{c}" for c in COMMANDS}
    # again: the same wrappers, no complaint
    assert make("install", f"PREFIX={prefix}").returncode == 0
    out = make("uninstall", f"PREFIX={prefix}")
    assert out.returncode == 0, out.stderr
    assert files_under(prefix) == before
    assert make("uninstall", f"PREFIX={prefix}").returncode == 0  # nothing left to remove


@needs_make
def test_make_install_and_uninstall_leave_a_foreign_command_alone(tmp_path: Path) -> None:
    """A marsadm that make install did not write (pip's, say) is neither replaced nor
    removed, and the user is told."""
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    foreign = prefix / "bin" / "marsadm"
    foreign.write_text("#!/bin/sh\necho foreign\n")
    out = make("install", f"PREFIX={prefix}")
    assert out.returncode != 0 and "not a marslib wrapper" in out.stderr
    assert foreign.read_text() == "#!/bin/sh\necho foreign\n"
    out = make("uninstall", f"PREFIX={prefix}")
    assert out.returncode == 0 and "left alone" in out.stderr
    assert foreign.read_text() == "#!/bin/sh\necho foreign\n"


# ------------------------------------------------------------------ bin/*
@needs_system_python
@pytest.mark.parametrize("name", [*COMMANDS, "mars-lab"])
def test_bin_scripts_run_from_a_clean_environment(name: str) -> None:
    """Started by the system's python3 (their shebang with PATH=/usr/bin:/bin), which lacks
    marslib's dependencies, they switch to the checkout's venv."""
    check_runs(REPO / "bin" / name)
    # the same, named python3 first (as `python3 bin/marsd`), and through a symlink
    out = clean_run(SYSTEM_PYTHON or "python3", REPO / "bin" / "marsd", "--help")
    assert out.returncode == 0 and "usage: marsd" in out.stdout, out.stderr


@needs_system_python
def test_bin_scripts_do_not_pass_their_switch_on(tmp_path: Path) -> None:
    """A bin/ script switches once, and what it starts (mars-app's writer, a nested bin/
    script under the system's python) sees no marker that would stop its own switch."""
    probe = tmp_path / "probe"
    probe.write_text(f"""import os, subprocess, sys
sys.path.insert(0, {str(REPO / 'bin')!r})
import _checkout
_checkout.enter(__file__)
print(sys.prefix)
print(sorted(k for k in os.environ if k.startswith("MARS_BIN")))
""")
    out = clean_run(SYSTEM_PYTHON or "python3", probe)
    assert out.returncode == 0, out.stderr
    prefix, leaked = out.stdout.splitlines()
    assert Path(prefix).resolve() == (REPO / ".venv").resolve(), out.stdout
    assert leaked == "[]", out.stdout


def test_bin_scripts_without_a_venv_run_with_the_python_they_were_given(
        tmp_path: Path) -> None:
    """An unpacked source tree without .venv, marslib's dependencies in the python that runs
    it (an installed package's python): no switch, this tree's marslib."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "bin", tree / "bin")
    (tree / "marslib").symlink_to(REPO / "marslib")
    out = subprocess.run([sys.executable, str(tree / "bin" / "marsd"), "--help"],
                         capture_output=True, text=True, timeout=120,
                         env={"PATH": CLEAN_PATH})
    assert out.returncode == 0 and "usage: marsd" in out.stdout, out.stderr


def test_activating_the_venv_puts_the_commands_on_path() -> None:
    activate = REPO / ".venv" / "bin" / "activate"
    script = (f". {activate} && for c in {' '.join(COMMANDS)}; do command -v $c; done "
              "&& marsadm --version")
    out = clean_run("bash", "-c", script)
    assert out.returncode == 0, out.stderr
    *found, version = out.stdout.split("\n")[:len(COMMANDS) + 1]
    assert found == [str(REPO / ".venv" / "bin" / c) for c in COMMANDS]
    assert version == f"marsadm {marslib.__version__}"


# ------------------------------------------------------------------ systemd and cron
@needs_make
def test_systemd_unit_and_cron_call_the_installed_commands(tmp_path: Path) -> None:
    """The unit's ExecStart and the cron job's PATH name what `make install` installs with
    its default PREFIX; installed elsewhere, the same unit and cron line work once the
    prefix is changed, as the comments say."""
    prefix = default_prefix()
    unit = (REPO / "systemd" / "marsd.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", unit, re.M)
    assert exec_start and exec_start.group(1) == f"{prefix}/bin/marsd"
    cron = (REPO / "systemd" / "marslib.cron").read_text()
    cron_path = re.search(r"^PATH=(\S+)$", cron, re.M)
    assert cron_path and f"{prefix}/bin" in cron_path.group(1).split(":")
    job = next(line for line in cron.splitlines() if line.startswith("*/"))
    assert " root marsadm cron " in job

    here = tmp_path / "prefix"
    assert make("install", f"PREFIX={here}").returncode == 0
    try:
        # the cron job's PATH finds the wrapper and it runs with cron's bare environment
        path = cron_path.group(1).replace(f"{prefix}/bin", f"{here}/bin")
        out = clean_run("sh", "-c", "command -v marsadm && marsadm --version", path=path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:2] == [f"{here}/bin/marsadm",
                                              f"marsadm {marslib.__version__}"]
        analyze = shutil.which("systemd-analyze")
        if analyze:  # the unit is valid and its ExecStart is there and executable
            (tmp_path / "marsd.service").write_text(
                unit.replace(f"ExecStart={prefix}/bin/marsd", f"ExecStart={here}/bin/marsd"))
            out = subprocess.run([analyze, "verify", str(tmp_path / "marsd.service")],
                                 capture_output=True, text=True, timeout=120)
            problems = [x for x in out.stderr.splitlines() if "marsd.service" in x]
            assert not problems, out.stderr
    finally:
        make("uninstall", f"PREFIX={here}")


# ------------------------------------------------------------------ mars-app for people
def test_render_human_lines() -> None:
    out = render_human({"ok": True, "resource": "r0", "host": "lab1", "changed": False,
                        "running": True, "pid": None, "fs_size": 255 << 20,
                        "hosts": {"lab1": 1200, "lab3": 300}, "detached": ["a", "b"],
                        "acked": {"seq": 7, "time": 0.0}, "seconds": 0.25})
    epoch = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(0))
    assert out.splitlines() == [
        "resource: r0", "host:     lab1", "changed:  no", "running:  yes",
        "fs_size:  255.0 MiB", "seconds:  0.25", "hosts:", "  lab1: 1200", "  lab3: 300",
        "detached:", "  - a", "  - b", "acked:", "  seq:  7", f"  time: {epoch}"]


pytest_root = pytest.mark.skipif(
    not IS_ROOT or SYSTEM_PYTHON is None
    or not all(shutil.which(t) for t in ("nbdfuse", "fusermount3", "nbdinfo", "mkfs.ext4")),
    reason="needs root, nbdfuse and nbdinfo (libnbd-bin), fusermount3, e2fsprogs, "
           "python3 in /usr/bin")


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[MarsHost]:
    dev = BlockDev(tmp_path / "data.img", 64 << 20)
    h = MarsHost(tmp_path, "alpha", loopback_ips(1)[0])
    try:
        h.serve(dev.path)
        yield h
    finally:
        mars_app(h, tmp_path / "app", "stop", "r0")
        h.stop()
        dev.close()


def mars_app(host: MarsHost, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """bin/mars-app as an operator types it: a bare environment, the system's python3."""
    env = {k: host.env[k] for k in ("MARS_ROOT", "MARS_RUN_DIR", "MARS_HOST")}
    return clean_run(REPO / "bin" / "mars-app", *args, path="/usr/sbin:/usr/bin:/sbin:/bin",
                     extra={**env, "MARS_APP_DIR": str(state)})


def human(host: MarsHost, state: Path, *args: str) -> list[str]:
    out = mars_app(host, state, *args)
    assert out.returncode == 0, f"mars-app {' '.join(args)}: {out.stderr}"
    for repr_part in PYTHON_REPR:
        assert repr_part not in out.stdout, f"mars-app {' '.join(args)}:\n{out.stdout}"
    lines = out.stdout.splitlines()
    assert lines and all(re.fullmatch(r" *([a-z_][\w.-]*:( +\S.*)?|- \S.*)", x)
                         for x in lines), out.stdout
    return lines


def value(lines: list[str], key: str) -> str:
    return next(x.split(":", 1)[1].strip() for x in lines if x.startswith(f"{key}:"))


@pytest_root
def test_mars_app_prints_lines_for_people(primary: MarsHost, tmp_path: Path) -> None:
    state = tmp_path / "app"
    start = human(primary, state, "start", "r0", "--mkfs", "--rate", "500")
    assert value(start, "changed") == "yes" and value(start, "fs") == "ext4"
    again = human(primary, state, "start", "r0", "--rate", "100")  # the note names settings
    assert "rate=500" in value(again, "note")
    status = human(primary, state, "status", "r0")
    assert value(status, "running") == "yes" and re.fullmatch(r"[\d.]+ MiB",
                                                              value(status, "fs_size"))
    at = status.index("settings:")
    assert any(re.fullmatch(r"  rate: +500", x) for x in status[at + 1:]), status
    # the same structure as JSON, rendered: every top-level key that has a value shows
    reply: dict[str, Any] = json.loads(mars_app(primary, state, "status", "r0", "--json").stdout)
    keys = {x.split(":", 1)[0] for x in render_human(reply).splitlines()
            if not x.startswith(" ")}
    assert keys == {k for k, v in reply.items() if k != "ok" and v not in (None, "", [], {})}
    verify = human(primary, state, "verify", "r0", "--allow-torn-tail")
    at = verify.index("hosts:")
    assert re.fullmatch(r"  alpha: \d+", verify[at + 1]), verify
    stop = human(primary, state, "stop", "r0")
    at = stop.index("detached:")
    assert value(stop, "changed") == "yes" and stop[at + 1].startswith("  - unmounted ")
    assert "acked:" in stop
    # --json stays JSON
    reply = json.loads(mars_app(primary, state, "status", "r0", "--json").stdout)
    assert reply["ok"] and reply["running"] is False
