"""The cron-driven football queue: mars-football-queue (the runner the role
marslib.mars.mars_football_queue installs) runs one move at a time from the head of its
queue, never two at once, loses no move queued while it works, backs off after a failure,
marks a move FAILED after its last attempt (blocking only later moves of that resource), and
keeps its state whole through kill -9. football_cron.yml installs and removes it.

ansible-playbook is replaced by a recording script here (what marslib.mars.football itself
does is tested on the lab, test_ansible_lab.py); the clock is MARS_FOOTBALL_QUEUE_NOW."""

from __future__ import annotations

import fcntl
import glob
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, wait_until

COLLECTION = REPO / "ansible" / "ansible_collections" / "marslib" / "mars"
RUNNER = COLLECTION / "roles" / "mars_football_queue" / "files" / "mars-football-queue"
T0 = 1_700_000_000  # the fake clock's start
BUSY = 75


class Queue:
    """A queue directory, the runner's subcommands on it, and a stand-in ansible-playbook
    that records its arguments, exits with the code given for its n-th call (default 0) and,
    while ``hold()`` is in force, runs until ``release()``."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.dir = tmp_path / "fb"
        self.dir.mkdir()
        self.now = float(T0)
        self.playbook = tmp_path / "ansible-playbook"
        self.playbook.write_text(
            "#!/bin/sh\n"
            f"echo \"$*\" >> {tmp_path}/calls\n"
            f"n=$(wc -l < {tmp_path}/calls)\n"
            f"code=$(sed -n \"${{n}}p\" {tmp_path}/exit-codes 2>/dev/null)\n"
            f"if [ -e {tmp_path}/hold ]; then\n"
            f"  while [ ! -e {tmp_path}/release ]; do sleep 0.02; done\n"
            "fi\n"
            "exit ${code:-0}\n")
        self.playbook.chmod(0o755)

    def exit_codes(self, *codes: int) -> None:
        (self.tmp / "exit-codes").write_text("".join(f"{c}\n" for c in codes))

    def hold(self) -> None:
        (self.tmp / "hold").touch()

    def release(self) -> None:
        (self.tmp / "release").touch()

    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(RUNNER), args[0], "--dir", str(self.dir), *args[1:]]

    def env(self) -> dict[str, str]:
        return {**os.environ, "MARS_FOOTBALL_QUEUE_NOW": str(self.now)}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), env=self.env(), capture_output=True,
                              text=True, timeout=60)

    def run_args(self, *extra: str) -> list[str]:
        return ["run", "--inventory", "inv.ini", "--ansible-playbook", str(self.playbook),
                *extra]

    def run(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self(*self.run_args(*extra))

    def start_run(self, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*self.run_args(*extra)), env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def enqueue(self, resource: str, from_host: str, to_host: str) -> None:
        r = self("enqueue", resource, from_host, to_host)
        assert r.returncode == 0, r.stderr

    def listing(self) -> dict[str, Any]:
        r = self("list", "--json")
        assert r.returncode == 0, r.stderr
        result: dict[str, Any] = json.loads(r.stdout)
        return result

    def pending(self) -> list[str]:
        return [f"{m['resource']} {m['from']} {m['to']}" for m in self.listing()["pending"]]

    def calls(self) -> list[list[str]]:
        path = self.tmp / "calls"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def moved(self) -> list[str]:
        """The resource of each playbook run, in order."""
        return [next(a.split("=", 1)[1] for a in call if a.startswith("resource="))
                for call in self.calls()]


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    q = Queue(tmp_path)
    yield q
    q.release()  # a held stand-in never outlives its test


@contextmanager
def held_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_moves_one_at_a_time_from_the_head(queue: Queue) -> None:
    queue.enqueue("r0", "lab1", "lab3")
    queue.enqueue("r1", "lab2", "lab3")
    r = queue.run("--playbook-arg=-e@/etc/mars/football.yml")
    assert r.returncode == 0, r.stderr
    assert "done: r0 lab1 -> lab3" in r.stdout
    assert queue.calls() == [["-i", "inv.ini", "marslib.mars.football", "-e", "resource=r0",
                              "-e", "from=lab1", "-e", "to=lab3", "-e@/etc/mars/football.yml"]]
    listing = queue.listing()
    assert queue.pending() == ["r1 lab2 lab3"] and listing["failed"] == []
    [done] = listing["done"]
    assert (done["resource"], done["from"], done["to"], done["attempts"]) == \
        ("r0", "lab1", "lab3", 1)
    log = Path(done["log"])
    assert log.parent == queue.dir / "log" and log.name.endswith("-r0-lab1-lab3.log")
    assert "marslib.mars.football -e resource=r0" in log.read_text()

    assert queue.run().returncode == 0 and queue.moved() == ["r0", "r1"]
    r = queue.run()
    assert r.returncode == 0 and "queue empty" in r.stdout and len(queue.calls()) == 2
    assert [d["resource"] for d in queue.listing()["done"]] == ["r0", "r1"]
    assert sorted(p.name.split("-", 1)[1] for p in (queue.dir / "log").glob("*.log")) == \
        ["r0-lab1-lab3.log", "r1-lab2-lab3.log"]


def test_moves_queued_during_a_run_are_not_lost(queue: Queue) -> None:
    """The runner does not hold the queue's lock while the playbook runs: enqueue returns at
    once, and the runner's update after the move keeps what was queued meanwhile, also when
    many enqueue at the same moment."""
    queue.enqueue("r0", "lab1", "lab3")
    queue.hold()
    first = queue.start_run()
    wait_until(queue.calls, "the run starts its move")
    r = queue("enqueue", "r1", "lab2", "lab3", "--lock-wait", "0")
    assert r.returncode == 0, r.stderr
    together = [subprocess.Popen(queue.command("enqueue", f"s{i}", "lab1", "lab2"),
                                 env=queue.env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(8)]
    assert [p.wait(timeout=60) for p in together] == [0] * 8
    assert queue.listing()["running"]["alive"] is True
    queue.release()
    assert first.wait(timeout=60) == 0, first.communicate()
    pending = queue.pending()
    assert pending[0] == "r1 lab2 lab3"
    assert sorted(pending[1:]) == [f"s{i} lab1 lab2" for i in range(8)]  # in any order
    assert [d["resource"] for d in queue.listing()["done"]] == ["r0"]
    assert queue.listing()["running"] is None


def test_enqueue_waits_for_the_queue_lock(queue: Queue) -> None:
    queue.enqueue("r0", "lab1", "lab3")
    with held_lock(queue.dir / "lock"):
        r = queue("enqueue", "r1", "lab2", "lab3", "--lock-wait", "0")
        assert r.returncode == BUSY and "busy" in r.stderr, r.stderr
        out = queue.tmp / "enqueue.out"
        with open(out, "w") as f:
            waiting = subprocess.Popen(queue.command("enqueue", "r1", "lab2", "lab3"),
                                       env=queue.env(), stdout=f, stderr=subprocess.STDOUT)
        wait_until(lambda: "waiting up to 60 s" in out.read_text(), "enqueue waits")
        assert waiting.poll() is None
    assert waiting.wait(timeout=60) == 0, out.read_text()
    assert queue.pending() == ["r0 lab1 lab3", "r1 lab2 lab3"]


def test_two_runs_never_overlap(queue: Queue) -> None:
    queue.enqueue("r0", "lab1", "lab3")
    queue.enqueue("r1", "lab2", "lab3")
    queue.hold()
    first = queue.start_run()
    wait_until(queue.calls, "the first run starts its move")
    second = queue.run()
    assert second.returncode == BUSY, second.stderr
    assert "busy: a move is running: r0 lab1 -> lab3" in second.stderr
    # retry and drop change moves a run may be working on: they wait for the run too
    for command in (("drop", "r1"), ("retry", "r0")):
        r = queue(*command, "--lock-wait", "0")
        assert r.returncode == BUSY, r.stderr
    queue.release()
    assert first.wait(timeout=60) == 0
    assert queue.moved() == ["r0"] and queue.pending() == ["r1 lab2 lab3"]


def test_a_failed_move_waits_doubling_times_and_others_go_on(queue: Queue) -> None:
    queue.enqueue("r0", "lab1", "lab3")
    queue.enqueue("r1", "lab2", "lab3")
    queue.exit_codes(2, 0, 2, 0)
    r = queue.run()
    assert r.returncode == 1 and "FAILED (attempt 1 of 5): r0 lab1 -> lab3" in r.stderr
    [r0] = [m for m in queue.listing()["pending"] if m["resource"] == "r0"]
    assert r0["attempts"] == 1 and r0["status"] == "backoff"
    assert r0["last_error"] == "ansible-playbook exited 2" and Path(r0["last_log"]).exists()

    queue.now = T0 + 1  # r0 waits; r1 goes on
    assert queue.run().returncode == 0 and queue.moved() == ["r0", "r1"]
    queue.now = T0 + 599
    r = queue.run()
    assert r.returncode == 0 and "nothing ready: r0 lab1 -> lab3: next try at" in r.stdout
    assert len(queue.calls()) == 2
    queue.now = T0 + 600  # 10 minutes after the first failure
    assert queue.run().returncode == 1 and queue.moved() == ["r0", "r1", "r0"]
    queue.now = T0 + 600 + 1199
    assert queue.run().returncode == 0 and len(queue.calls()) == 3
    queue.now = T0 + 600 + 1200  # 20 minutes after the second
    r = queue.run()
    assert r.returncode == 0 and queue.moved() == ["r0", "r1", "r0", "r0"], r.stderr
    assert [(d["resource"], d["attempts"]) for d in queue.listing()["done"]] == \
        [("r1", 1), ("r0", 3)]


def test_after_its_last_attempt_a_move_fails_and_blocks_only_its_resource(
        queue: Queue) -> None:
    options = ("--max-attempts", "3", "--backoff-base", "60", "--backoff-max", "90")
    queue.enqueue("r0", "lab1", "lab3")
    queue.enqueue("r0", "lab3", "lab2")  # must not overtake r0's first move
    queue.enqueue("r1", "lab1", "lab2")
    queue.exit_codes(1, 0, 1, 1, 0, 0)
    assert queue.run(*options).returncode == 1
    queue.now = T0 + 1
    assert queue.run(*options).returncode == 0 and queue.moved() == ["r0", "r1"]
    queue.now = T0 + 60
    assert queue.run(*options).returncode == 1
    queue.now = T0 + 60 + 89  # the wait doubled to 120 s, but at most 90
    assert queue.run(*options).returncode == 0 and len(queue.calls()) == 3
    queue.now = T0 + 60 + 90
    r = queue.run(*options)
    assert r.returncode == 1 and "FAILED for good after 3 attempts: r0 lab1 -> lab3" in r.stderr
    assert "mars-football-queue retry r0" in r.stderr

    listing = queue.listing()
    [failed] = listing["failed"]
    assert (failed["resource"], failed["from"], failed["to"], failed["attempts"]) == \
        ("r0", "lab1", "lab3", 3) and failed["failed_at"]
    [later] = listing["pending"]
    assert (later["resource"], later["from"], later["status"]) == ("r0", "lab3", "blocked")
    assert "behind the failed move r0 lab1 -> lab3" in later["reason"]
    queue.now = T0 + 10**6  # never retried by itself
    r = queue.run(*options)
    assert r.returncode == 0 and len(queue.calls()) == 4 and "nothing ready" in r.stdout
    r = queue("enqueue", "r0", "lab1", "lab3")
    assert r.returncode == 1 and "retry r0" in r.stderr

    r = queue("retry", "r0")
    assert r.returncode == 0, r.stderr
    head = queue.listing()["pending"][0]
    assert (head["from"], head["attempts"], head["status"]) == ("lab1", 0, "ready")
    assert queue.run(*options).returncode == 0 and queue.run(*options).returncode == 0
    assert queue.calls()[4][4:] == ["resource=r0", "-e", "from=lab1", "-e", "to=lab3"]
    assert queue.calls()[5][4:] == ["resource=r0", "-e", "from=lab3", "-e", "to=lab2"]
    assert queue.listing()["failed"] == [] and queue.pending() == []


def test_retry_skips_the_backoff_and_drop_forgets_a_move(queue: Queue) -> None:
    queue.enqueue("r0", "lab1", "lab3")
    queue.enqueue("r0", "lab3", "lab2")
    queue.enqueue("r1", "lab1", "lab2")
    queue.exit_codes(1)
    assert queue.run().returncode == 1
    r = queue("retry", "r1")
    assert r.returncode == 1 and "no failed move" in r.stderr
    assert queue("retry", "r0").returncode == 0
    assert queue.listing()["pending"][0]["status"] == "ready"

    r = queue("drop", "r0")
    assert r.returncode == 1 and "name the one to drop" in r.stderr
    assert "drop r0 lab1 lab3" in r.stderr
    r = queue("drop", "r0", "lab3", "lab2")
    assert r.returncode == 0 and "dropped r0 lab3 -> lab2" in r.stdout
    r = queue("drop", "r0")
    assert r.returncode == 0 and "half-moved" in r.stdout  # it had been tried
    assert queue.pending() == ["r1 lab1 lab2"]
    r = queue("drop", "r9")
    assert r.returncode == 1 and "no pending or failed move of r9" in r.stderr


def test_bad_arguments_are_refused(queue: Queue, tmp_path: Path) -> None:
    queue.enqueue("r0", "lab1", "lab3")
    before = (queue.dir / "state.json").read_text()
    refusals = [
        (("enqueue", "r0;rm", "lab1", "lab3"), "bad resource 'r0;rm'"),
        (("enqueue", "r1", "lab1", "lab 2"), "bad TO host 'lab 2'"),
        (("enqueue", "r1", "lab1", "lab1"), "FROM and TO are both lab1"),
        (("enqueue", "r1", "lab1"), "the following arguments are required: TO"),
        (("run", "--ansible-playbook", str(queue.playbook)), "required: --inventory"),
        (("run", "-i", "inv.ini", "--ansible-playbook", str(tmp_path / "nothing")),
         "not found"),
        (("run", "-i", "inv.ini", "--max-attempts", "0"), "at least 1"),
        (("drop", "r0", "lab1"), "give both FROM and TO"),
        (("retry", "../r0"), "bad resource"),
    ]
    for args, message in refusals:
        r = queue(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = queue("enqueue", "r0", "lab1", "lab3")
    assert r.returncode == 1 and "queued already" in r.stderr
    r = subprocess.run([sys.executable, str(RUNNER), "list", "--dir", str(tmp_path / "no")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no queue directory" in r.stderr
    assert (queue.dir / "state.json").read_text() == before and queue.calls() == []


def test_the_shell_runners_queue_is_taken_over_once(queue: Queue) -> None:
    (queue.dir / "queue").write_text("# resource from to\n\nr0 lab1 lab3\nr1 lab2\n"
                                     "r2 lab1 lab1\nr3 lab2 lab1\n")
    r = queue("enqueue", "r4", "lab1", "lab2")
    assert r.returncode == 0
    assert "queue:4: 'r1 lab2' not queued: want RESOURCE FROM TO" in r.stderr
    assert "queue:5: 'r2 lab1 lab1' not queued" in r.stderr
    assert queue.pending() == ["r0 lab1 lab3", "r3 lab2 lab1", "r4 lab1 lab2"]
    assert not (queue.dir / "queue").exists() and (queue.dir / "queue.imported").exists()
    (queue.dir / "queue").write_text("r5 lab1 lab2\n")  # an old habit: echo >> queue
    r = queue.run()
    assert "queue is not read any more" in r.stderr and "r5" not in queue.pending()


def test_list_shows_every_kind_of_move(queue: Queue) -> None:
    queue.enqueue("r0", "lab1", "lab3")
    queue.enqueue("r1", "lab1", "lab2")
    queue.enqueue("r2", "lab1", "lab2")
    queue.enqueue("r2", "lab2", "lab3")
    queue.enqueue("r3", "lab1", "lab2")
    queue.exit_codes(0, 1, 1, 0)
    assert queue.run().returncode == 0  # r0 done
    assert queue.run("--max-attempts", "1").returncode == 1  # r1 FAILED
    assert queue.run().returncode == 1  # r2 waits for its next try
    queue.hold()
    running = queue.start_run()  # r3 runs
    wait_until(lambda: len(queue.calls()) == 4, "r3's move starts")
    listing = queue.listing()
    assert set(listing) == {"version", "now", "running", "pending", "failed", "done"}
    assert listing["version"] == 1 and listing["now"] == "2023-11-14T22:13:20Z"
    move_keys = {"id", "resource", "from", "to", "enqueued", "attempts", "next_try",
                 "last_error", "last_log", "failed_at"}
    assert set(listing["running"]) == {"id", "started", "pid", "log", "alive"}
    assert listing["running"]["alive"] is True
    assert [(m["resource"], m["to"], m["status"]) for m in listing["pending"]] == \
        [("r2", "lab2", "backoff"), ("r2", "lab3", "blocked"), ("r3", "lab2", "running")]
    assert all(set(m) == move_keys | {"status", "reason"} for m in listing["pending"])
    assert listing["pending"][1]["reason"] == "after r2 lab1 -> lab2"
    assert [(m["resource"], m["attempts"]) for m in listing["failed"]] == [("r1", 1)]
    assert set(listing["failed"][0]) == move_keys
    assert [d["resource"] for d in listing["done"]] == ["r0"]
    assert set(listing["done"][0]) == {"id", "resource", "from", "to", "enqueued", "started",
                                       "finished", "seconds", "attempts", "log"}
    text = queue("list").stdout
    assert "running: r3 lab1 -> lab2 since" in text
    assert "1. r2 lab1 -> lab2" in text and "backoff: next try at" in text
    assert "failed: 1\n  r1 lab1 -> lab2" in text and "retry r1" in text
    assert "done: last 1 of 1" in text
    queue.release()
    assert running.wait(timeout=60) == 0


def test_a_run_killed_mid_move_leaves_a_whole_state_and_is_resumed(queue: Queue) -> None:
    """kill -9 of the runner: state.json still says which move was running; the orphaned
    playbook keeps the run lock until it ends, so no second move starts beside it; the next
    run then resumes the interrupted move."""
    queue.enqueue("r0", "lab1", "lab3")
    queue.enqueue("r1", "lab2", "lab3")
    queue.hold()
    runner = queue.start_run()
    wait_until(queue.calls, "the run starts its move")
    runner.kill()
    runner.wait(timeout=30)
    listing = queue.listing()
    assert listing["running"]["alive"] is False
    assert [(m["resource"], m["attempts"], m["status"]) for m in listing["pending"]] == \
        [("r0", 1, "running"), ("r1", 0, "ready")]
    r = queue.run()
    assert r.returncode == BUSY and len(queue.calls()) == 1, r.stderr
    queue.release()
    wait_until(lambda: lock_is_free(queue.dir / "run.lock"), "the orphaned playbook ends")
    r = queue.run()
    assert r.returncode == 0, r.stderr
    assert "interrupted: the run started" in r.stderr and "r0 lab1 -> lab3 is resumed" in r.stderr
    assert queue.moved() == ["r0", "r0"]
    assert [(d["resource"], d["attempts"]) for d in queue.listing()["done"]] == [("r0", 2)]


SAVE_LOOP = """
import importlib.machinery, importlib.util, pathlib, sys
loader = importlib.machinery.SourceFileLoader("mfq", sys.argv[1])
mfq = importlib.util.module_from_spec(importlib.util.spec_from_loader("mfq", loader))
sys.modules["mfq"] = mfq
loader.exec_module(mfq)
qdir = mfq.QueueDir(pathlib.Path(sys.argv[2]))
states = [mfq.QueueState(pending=[mfq.Move(i, f"r{i}", "lab1", "lab2", "2023-11-14T22:13:20Z")
                                   for i in range(size)]) for size in (3000, 2000)]
n = 0
while True:
    qdir.save(states[n % 2])
    print(n, flush=True)
    n += 1
"""


def test_the_state_file_is_never_half_written(queue: Queue) -> None:
    """kill -9 at random points of writers that replace a large state.json over and over:
    every time the file holds one whole state."""
    rng = random.Random(7)
    for _ in range(12):
        writer = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(RUNNER),
                                   str(queue.dir)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None
        for _ in range(rng.randint(1, 4)):
            writer.stdout.readline()
        writer.kill()
        writer.wait(timeout=30)
        writer.stdout.close()
        pending = json.loads((queue.dir / "state.json").read_text())["pending"]
        assert len(pending) in (3000, 2000)
    queue.enqueue("x0", "lab1", "lab2")
    assert list(queue.dir.glob(".state.*")) == []  # what a killed writer left is gone


def python39() -> str | None:
    for candidate in (shutil.which("python3.9"),
                      *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))):
        if candidate and subprocess.run([candidate, "-c", "pass"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(python39() is None, reason="no Python 3.9 here")
def test_runs_with_python_3_9(queue: Queue) -> None:
    """The oldest Python the controller may have."""
    python = python39()
    assert python is not None

    def runner(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, *queue.command(*args)[1:]], env=queue.env(),
                              capture_output=True, text=True, timeout=60)

    assert runner("enqueue", "r0", "lab1", "lab3").returncode == 0
    queue.exit_codes(1)
    r = runner(*queue.run_args())
    assert r.returncode == 1 and "next try at" in r.stderr
    assert runner("retry", "r0").returncode == 0
    assert runner(*queue.run_args()).returncode == 0
    assert json.loads(runner("list", "--json").stdout)["done"][0]["attempts"] == 1


@pytest.mark.skipif(shutil.which("crontab") is None, reason="the cron module wants crontab")
def test_football_cron_installs_and_removes_the_queue(queue: Queue, tmp_path: Path) -> None:
    """The collection's playbook on localhost, with its paths in tmp_path: check mode
    changes nothing, a second run changes nothing, the cron job runs the installed runner,
    state=absent removes the entry and the runner but keeps the queue."""
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[controller]\nlocalhost\n\n[mars]\n")  # localhost named too
    fb, bin_dir, cron_file = tmp_path / "var-fb", tmp_path / "bin", tmp_path / "cron.d" / "fb"
    bin_dir.mkdir()
    cron_file.parent.mkdir()
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(REPO / "ansible"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
           "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    env.pop("ANSIBLE_CONFIG", None)
    base = [str(REPO / ".venv" / "bin" / "ansible-playbook"), "-i", str(inventory),
            "marslib.mars.football_cron",
            "-e", f"mars_football_queue_dir={fb}", "-e", f"mars_football_queue_bin_dir={bin_dir}",
            "-e", f"mars_football_queue_cron_file={cron_file}",
            "-e", "mars_football_queue_schedule='*/5 * * * *'",
            "-e", f"mars_football_queue_ansible_playbook={queue.playbook}",
            "-e", json.dumps({"mars_football_queue_playbook_args": ["-e@/etc/mars/fb.yml"]})]

    def playbook(*extra: str) -> str:
        r = subprocess.run([*base, *extra], env=env, capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    assert "changed=3" in playbook("--check")
    assert not cron_file.exists() and not fb.exists() and list(bin_dir.iterdir()) == []
    playbook()
    installed = bin_dir / "mars-football-queue"
    assert installed.read_bytes() == RUNNER.read_bytes()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o755
    assert stat.S_IMODE(fb.stat().st_mode) == stat.S_IMODE((fb / "log").stat().st_mode) == 0o750
    [job] = [line for line in cron_file.read_text().splitlines() if not line.startswith("#")]
    assert job.startswith("*/5 * * * * root ")
    assert f"ANSIBLE_COLLECTIONS_PATH={REPO / 'ansible'} {installed} run --dir={fb} " \
           f"--inventory={inventory} --ansible-playbook={queue.playbook} " in job
    assert "--playbook-arg=-e@/etc/mars/fb.yml" in job
    assert "changed=0" in playbook()

    # what cron would do, in cron's bare environment, through the script's own #! line
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MARS_FOOTBALL_QUEUE_NOW": str(T0)}
    r = subprocess.run([str(installed), "enqueue", "--dir", str(fb), "r0", "lab1", "lab3"],
                       env=bare, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    subprocess.run(["sh", "-c", job.split(" root ", 1)[1]], env=bare, check=True, timeout=60)
    assert queue.calls() == [["-i", str(inventory), "marslib.mars.football", "-e",
                              "resource=r0", "-e", "from=lab1", "-e", "to=lab3",
                              "-e@/etc/mars/fb.yml"]]
    assert "done: r0 lab1 -> lab3" in (fb / "log" / "cron.log").read_text()

    playbook("-e", "mars_football_queue_state=absent")
    assert not cron_file.exists() or "football" not in cron_file.read_text()
    assert not installed.exists() and (fb / "state.json").exists()
