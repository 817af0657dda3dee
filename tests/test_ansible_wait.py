"""marslib.mars.mars_wait: a wait of hours is a loop with constant memory, and it says where it is.

The module's loop is driven with a stub look and a fake clock for thousands of polls;
the action plugin and the module are driven through ansible-playbook with a stub marsadm
for over 2,000 polls.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

from conftest import REPO

COLLECTIONS = REPO / "ansible"  # holds ansible_collections/marslib/mars
MODULE = COLLECTIONS / "ansible_collections/marslib/mars/plugins/modules/mars_wait.py"
if str(COLLECTIONS) not in sys.path:  # the module imports the collection's module_utils
    sys.path.insert(0, str(COLLECTIONS))


def load() -> Any:
    spec = importlib.util.spec_from_file_location("_test_mars_wait", MODULE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = load()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def syncing_then_up_to_date(done_after: int) -> Any:
    """A member that syncs for ``done_after`` looks, then is up to date."""
    looks = [0]

    def look() -> tuple[str, dict[str, Any]]:
        looks[0] += 1
        if looks[0] < done_after:
            return "beta", {"role": "secondary", "state": "Syncing", "syncing": True,
                            "sync_progress": looks[0] / done_after, "lag_bytes": None,
                            "sync_eta": float(done_after - looks[0])}
        return "beta", {"role": "secondary", "state": "UpToDate", "syncing": False,
                        "sync_progress": None, "lag_bytes": 0, "running": True}
    return look


def test_thousands_of_polls_in_slices_with_constant_memory() -> None:
    clock = FakeClock()
    look = syncing_then_up_to_date(5000)
    deadline = clock.now + 36000  # ten hours
    polls = runs = 0
    tracemalloc.start()
    peaks = []
    while True:  # what the action plugin does: one module run per slice
        out = W.wait(look, "up-to-date", "r0", deadline, 5.0, 60.0, clock.time, clock.sleep)
        polls += out["polls"]
        runs += 1
        peaks.append(tracemalloc.get_traced_memory()[0])
        if out["done"] or out.get("failed"):
            break
        assert "synced" in out["msg"] and "ETA" in out["msg"] and "s left" in out["msg"]
    tracemalloc.stop()
    assert out["done"] and not out.get("failed") and polls == 5000
    assert 5000 // 13 <= runs <= 5000 // 12 + 1  # 12-13 looks of 5 s in a 60 s slice
    assert clock.now - 1_000_000.0 < 36000
    assert peaks[-1] - peaks[10] < 64 << 10, "memory grows with the number of polls"


def test_the_deadline_and_a_split_brain_end_the_wait_with_the_last_progress() -> None:
    clock = FakeClock()
    look = syncing_then_up_to_date(10**9)
    out = W.wait(look, "up-to-date", "r0", clock.now + 12, 5.0, 60.0, clock.time, clock.sleep)
    assert out["failed"] and "not up-to-date by the deadline" in out["msg"]
    assert "Syncing" in out["msg"] and out["polls"] == 4

    def split() -> tuple[str, dict[str, Any]]:
        return "beta", {"role": "secondary", "state": "SplitBrain", "split_brain": True}
    out = W.wait(split, "up-to-date", "r0", clock.now + 99, 5.0, 60.0, clock.time,
                 clock.sleep)
    assert out["failed"] and "split brain" in out["msg"] and out["polls"] == 1


def test_conditions_and_progress_lines() -> None:
    up = {"role": "secondary", "state": "UpToDate", "lag_bytes": 0, "running": True}
    assert W.reached("up-to-date", up) and W.reached("consistent", up)
    assert W.reached("sync-off", up) and W.reached("secondary", up)
    assert not W.reached("primary", up) and not W.reached("up-to-date", None)
    assert W.reached("up-to-date", {"role": "primary", "state": "Primary"})
    behind = {**up, "state": "Replaying", "lag_bytes": 3 << 20, "replay_rate": 1 << 20,
              "lag_seconds": 7.0}
    assert not W.reached("up-to-date", behind) and W.reached("consistent", behind)
    line = W.progress("r0", "beta", behind, 100.0)
    assert line == "r0@beta: Replaying, lag 3.0 MiB, 7 s behind, ETA 3 s, 100 s left"
    assert "lag none" in W.progress("r0", "beta", up, 5.0)
    assert "not a member yet" in W.progress("r0", "beta", None, 5.0)


STUB = r"""#!/bin/bash
# marsadm stand-in: the first $DONE_AFTER views show beta syncing, then up to date
n=$(( $(cat "$COUNTER" 2>/dev/null || echo 0) + 1 ))
echo $n > "$COUNTER"
if [ $n -lt $DONE_AFTER ]; then
  p=$(( n * 1000 / DONE_AFTER ))
  m='{"role":"secondary","state":"Syncing","syncing":true,'
  m+='"sync_progress":0.'$(printf %03d $p)',"lag_bytes":null,"sync_eta":9}'
else
  m='{"role":"secondary","state":"UpToDate","syncing":false,'
  m+='"sync_progress":null,"lag_bytes":0,"running":true}'
fi
echo '{"ok":true,"host":"beta","marsd":true,"resources":{"r0":{"members":{"beta":'"$m"'}}}}'
"""


def test_a_playbook_waits_over_2000_polls_and_shows_progress(tmp_path: Path) -> None:
    stub = tmp_path / "marsadm"
    stub.write_text(STUB)
    stub.chmod(0o755)
    counter = tmp_path / "count"
    play = tmp_path / "wait.yml"
    play.write_text(json.dumps([{
        "hosts": "localhost", "gather_facts": False,
        "tasks": [{"name": "wait", "marslib.mars.mars_wait": {
            "name": "r0", "marsadm": str(stub), "poll": 0, "slice": 2,
            "deadline": "{{ now().timestamp() + 600 }}"}, "register": "w"},
            {"ansible.builtin.debug": {"msg": "POLLS={{ w.polls }} RUNS={{ w.runs }} "
                                              "DONE={{ w.done }}"}}]}]))
    # the checkout's ansible.cfg (pipelining, as a run from the checkout has it) and the
    # collection named explicitly
    env = {**os.environ, "ANSIBLE_CONFIG": str(COLLECTIONS / "ansible.cfg"),
           "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
           "COUNTER": str(counter), "DONE_AFTER": "2100", "ANSIBLE_NOCOLOR": "1"}
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={REPO / '.venv' / 'bin' / 'python'}", str(play)],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert int(counter.read_text()) == 2100
    assert "POLLS=2100" in out.stdout and "DONE=True" in out.stdout
    runs = int(out.stdout.split("RUNS=")[1].split()[0])
    assert runs >= 2, "the wait never came back to show its progress"
    lines = [x for x in out.stdout.splitlines() if "r0@beta: Syncing, synced" in x]
    assert len(lines) == runs - 1, out.stdout[-3000:]
