"""The cron-driven football: football-cron.yml installs the cron entry; the queue runner
takes one move at a time from the head of the queue, under a lock, keeps a failed move
queued for the next run, and never runs two moves at once.

The runner's ansible-playbook is replaced by a recording script here: what football.yml
itself does is tested on the lab (test_ansible_lab.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import IS_ROOT, REPO, wait_until

RUNNER = REPO / "scripts" / "football-queue.sh"


def fake_playbook(tmp_path: Path, exit_code: int = 0, until: Path | None = None) -> Path:
    """An ansible-playbook stand-in that records its arguments (and, given ``until``,
    runs until that file exists)."""
    script = tmp_path / f"ansible-playbook-{exit_code}-{'blocked' if until else 'quick'}"
    wait = f"while [ ! -e {until} ]; do sleep 0.05; done\n" if until else ""
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\n{wait}"
                      f"exit {exit_code}\n")
    script.chmod(0o755)
    return script


def run(queue: Path, playbook: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RUNNER), "--queue", str(queue), "--inventory", "inv.ini",
                           "--ansible-playbook", str(playbook), *extra],
                          capture_output=True, text=True, timeout=60)


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_moves_one_at_a_time_from_the_head(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.write_text("# resource from to\n\nr0 lab1 lab3\nr1 lab2 lab3\n")
    ok = fake_playbook(tmp_path)
    r = run(queue, ok)
    assert r.returncode == 0, r.stderr
    assert len(calls(tmp_path)) == 1
    args = calls(tmp_path)[0]
    assert "football.yml" in args and "resource=r0" in args and "from=lab1" in args \
        and "to=lab3" in args and "-i inv.ini" in args
    assert queue.read_text() == "# resource from to\n\nr1 lab2 lab3\n"
    assert (tmp_path / "queue.done").read_text().strip().endswith("r0 lab1 lab3")
    assert run(queue, ok).returncode == 0
    assert "resource=r1" in calls(tmp_path)[1]
    r = run(queue, ok)
    assert r.returncode == 0 and "queue empty" in r.stdout and len(calls(tmp_path)) == 2
    logs = sorted((tmp_path / "log").iterdir())
    assert [p.name.split("-", 1)[1] for p in logs] == ["r0-lab1-lab3.log", "r1-lab2-lab3.log"]


def test_a_failed_move_stays_queued_and_is_resumed(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.write_text("r0 lab1 lab3\nr1 lab2 lab3\n")
    r = run(queue, fake_playbook(tmp_path, exit_code=2))
    assert r.returncode == 2 and "stays queued" in r.stderr
    assert queue.read_text() == "r0 lab1 lab3\nr1 lab2 lab3\n"
    assert not (tmp_path / "queue.done").exists()
    assert run(queue, fake_playbook(tmp_path)).returncode == 0
    assert [c.split("resource=")[1].split()[0] for c in calls(tmp_path)] == ["r0", "r0"]
    assert queue.read_text() == "r1 lab2 lab3\n"


def test_two_runs_never_overlap(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.write_text("r0 lab1 lab3\nr1 lab2 lab3\n")
    release = tmp_path / "release"
    slow = fake_playbook(tmp_path, until=release)  # the first move lasts until released
    first = subprocess.Popen([str(RUNNER), "--queue", str(queue), "--inventory", "inv.ini",
                              "--ansible-playbook", str(slow)], stdout=subprocess.PIPE,
                             text=True)
    try:
        wait_until(lambda: calls(tmp_path), "the first run starts its move")
        second = run(queue, fake_playbook(tmp_path))
        assert second.returncode == 75 and "another migration is running" in second.stdout
    finally:
        release.touch()
    assert first.wait(timeout=30) == 0
    assert len(calls(tmp_path)) == 1 and queue.read_text() == "r1 lab2 lab3\n"


def test_bad_lines_and_arguments_are_refused(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.write_text("r0 lab1\n")
    r = run(queue, fake_playbook(tmp_path))
    assert r.returncode == 1 and "bad queue line" in r.stderr and not calls(tmp_path)
    assert queue.read_text() == "r0 lab1\n"
    r = subprocess.run([str(RUNNER), "--queue", str(queue)], capture_output=True, text=True)
    assert r.returncode == 2 and "required" in r.stderr


@pytest.mark.skipif(not IS_ROOT, reason="installs into /etc/cron.d")
def test_football_cron_installs_and_removes_the_entry(tmp_path: Path) -> None:
    cron_file = Path("/etc/cron.d/mars-football")
    if cron_file.exists():
        pytest.skip("a real /etc/cron.d/mars-football exists; not touching it")
    inv = tmp_path / "inventory.ini"
    inv.write_text("[mars]\n")
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
           "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    base = [str(REPO / ".venv" / "bin" / "ansible-playbook"), "-i", str(inv),
            str(REPO / "ansible" / "football-cron.yml"), "-e", f"football_dir={tmp_path / 'fb'}",
            "-e", "football_schedule='*/5 * * * *'"]
    try:
        r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        entry = cron_file.read_text()
        assert "*/5 * * * * root" in entry and str(RUNNER.resolve()) in entry
        assert f"--queue {tmp_path / 'fb' / 'queue'}" in entry and f"--inventory {inv}" in entry
        assert (tmp_path / "fb" / "queue").exists()
        again = subprocess.run(base, env=env, capture_output=True, text=True, timeout=120)
        assert "changed=0" in again.stdout, again.stdout
        gone = subprocess.run([*base, "-e", "football_cron_state=absent"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert gone.returncode == 0, gone.stdout
        assert not cron_file.exists() or "football" not in cron_file.read_text()
    finally:
        cron_file.unlink(missing_ok=True)
