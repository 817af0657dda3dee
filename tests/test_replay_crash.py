"""A secondary's marsd killed in the middle of a replay batch, then paused while it is down:
the restarted replayer first redoes the interrupted batch, and only then is the member
ReplayPaused and consistent, with exactly the primary's state at its replay position."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    NBD_CLIENT,
    SYSTEM_PYTHON,
    MarsHost,
    needs_libnbd,
    state_at,
    wait_in_sync,
)
from test_replication import Pair

from marslib.position import LogPosition
from marslib.replay import FAULT_KILL_AFTER
from marslib.schema import interrupted_batch, replay_value

pytestmark = needs_libnbd
SIZE = 64 << 20
SLOT = 64 << 10
SLOTS = 512  # the writes spread over 32 MiB: a batch takes many separate device writes


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    p.replicate()
    yield p
    p.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _member(host: MarsHost) -> dict[str, Any]:
    members: dict[str, Any] = host.marsadm("view", "r0")["resources"]["r0"]["members"]
    return dict(members[host.name])


def _tree_replay(host: MarsHost) -> str:
    return os.readlink(host.root / "resource-r0" / f"replay-{host.name}")


def test_pause_after_a_crash_in_a_batch_redoes_it_first(pair: Pair) -> None:
    a, b = pair.a, pair.b
    wait_in_sync(a, b)
    b.marsadm("pause-replay", "r0")
    # many writes of random data into 512 slots, all fetched by beta but not applied
    w = subprocess.run([SYSTEM_PYTHON, str(NBD_CLIENT), a.nbd_uri("r0"), "writer", "7", "8",
                        str(SLOTS), str(SLOT), "1.5", "101"], capture_output=True, text=True,
                       timeout=60)
    assert w.stdout.count("\nA ") > 100, w.stderr
    # the writer may leave with writes in flight: alpha's log can still grow a little, so
    # compare with alpha's log end as it is at each look
    deadline = time.monotonic() + 60
    while True:
        log_end = LogPosition.decode(a.status()["log_end"])
        st = b.status()
        if (st.get("fetch_logfile"), st.get("fetch_local_end")) == (log_end.logfile,
                                                                      log_end.offset):
            break
        assert time.monotonic() < deadline, f"beta did not fetch up to {log_end}: {st}"
        time.sleep(0.1)

    # marsd on beta dies by SIGKILL after 3 device writes of the first replay batch
    b.stop()
    b.env[FAULT_KILL_AFTER] = "3"
    b.start()
    b.marsadm("resume-replay", "r0", check=False)  # marsd may be dead before it answers
    assert b.proc is not None
    try:
        rc = b.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"fault injection did not kill marsd: {b.logtail()}") from None
    assert rc == -9, f"marsd exited with {rc}: {b.logtail()}"
    b.proc = None
    del b.env[FAULT_KILL_AFTER]

    crashed_at = LogPosition.decode(_tree_replay(b))
    batch_end = interrupted_batch(_tree_replay(b))
    assert batch_end is not None and crashed_at < batch_end <= log_end, _tree_replay(b)
    torn = pair.dev_b.read()
    assert _sha(torn) != _sha(state_at(a.root, crashed_at, SIZE)), \
        "the crash left no write of the batch on the device: the test proves nothing"

    # paused while marsd is down: the device is torn, and view must say so
    b.marsadm("pause-replay", "r0")
    down = _member(b)
    assert down["state"] == "Inconsistent", \
        f"marsd down after a crash in a batch, device torn, but view says {down}"

    b.start()
    deadline = time.monotonic() + 30
    samples = []
    while True:
        st = b.status()
        if "applied" in st:
            applied = LogPosition.decode(st["applied"])
            samples.append((applied.encode(), st["consistent"], st["replay_paused"]))
            if st["consistent"] or st["replay_paused"]:
                # never before the interrupted batch is redone
                assert applied > crashed_at, \
                    f"beta reports consistent/paused at the crash position: {samples}"
            if st["consistent"] and st["replay_paused"]:
                break
        assert time.monotonic() < deadline, f"beta never paused consistently: {samples} " \
            f"{b.logtail()}"
        time.sleep(0.05)
    assert b.marsadm("pause-replay", "r0")["changed"] is False
    up = _member(b)
    assert up["state"] == "ReplayPaused" and up["consistent"] is True, up
    assert up["applied"] == applied.encode(), "beta's replay moved while paused"
    assert applied == batch_end, "the redo is exactly the interrupted batch"
    got = pair.dev_b.read()
    want = state_at(a.root, applied, SIZE)
    assert _sha(got) == _sha(want), \
        f"beta paused at {applied.encode()} does not hold the primary's state there"
    assert "redo" in b.logtail(200)

    b.marsadm("resume-replay", "r0")
    wait_in_sync(a, b)
    b.marsadm("pause-replay", "r0")
    assert _sha(pair.dev_a.read()) == _sha(pair.dev_b.read())


def test_replay_value_with_a_batch_in_progress() -> None:
    pos = LogPosition(3, 1000, 7, "alpha")
    end = LogPosition(3, 5000, 12, "alpha")
    value = replay_value(pos, end)
    assert value == "log-000000003-alpha,1000,7,5000,12"
    assert LogPosition.decode(value) == pos  # older readers see the position only
    assert interrupted_batch(value) == end
    assert replay_value(pos, None) == replay_value(pos, pos) == pos.encode()
    assert interrupted_batch(pos.encode()) is None
    assert interrupted_batch(None) is None
    assert interrupted_batch("log-000000003-alpha,1000,7,x,y") is None
