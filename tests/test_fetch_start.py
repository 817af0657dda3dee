"""After a join the fetch starts where the replay starts: the primary begins a new
logfile at the sync's start (STATUS_REQ{rotate}), so the replica never downloads the
history before its replay position."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    NBD_CLIENT,
    SYSTEM_PYTHON,
    HostPair,
    WriterLines,
    needs_libnbd,
    wait_in_sync,
    wait_until,
)

from marslib.position import LogPosition

pytestmark = needs_libnbd
PREFIX = 48 << 20  # logged before the join, in the logfile the join starts in


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[HostPair]:
    p = HostPair(tmp_path)
    p.a.serve(p.dev_a.path)
    p.b.join_cluster_of(p.a)
    yield p
    p.close()


def log_bytes_from(root: Path, start: LogPosition) -> int:
    """Bytes of the logfiles in ``root`` from ``start`` on (what a replay from there
    reads)."""
    total = 0
    for path in (root / "resource-r0").glob("log-*"):
        number = int(path.name.split("-")[1])
        if number > start.number:
            total += path.stat().st_size
        elif number == start.number:
            total += path.stat().st_size - start.offset
    return total


def test_a_join_under_a_writer_fetches_only_what_it_replays(pair: HostPair,
                                                           tmp_path: Path) -> None:
    a, b = pair.a, pair.b
    payload = tmp_path / "prefix"
    payload.write_bytes(os.urandom(PREFIX))
    subprocess.run(["nbdcopy", str(payload), a.nbd_uri("r0")], check=True, timeout=300)
    assert LogPosition.decode(a.status()["log_end"]).offset >= PREFIX, \
        "the prefix is not in the current logfile: the test proves nothing"
    writer = WriterLines(subprocess.Popen(
        [SYSTEM_PYTHON, str(NBD_CLIENT), a.nbd_uri("r0"), "writer", "2", "8", "512",
         str(65536), "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    writer.wait_acks(20, "before the join")  # the join starts while the application writes
    b.marsadm("join-resource", "r0", pair.dev_b.path)
    wait_until(lambda: b.status().get("phase") == "replaying", "beta's sync", timeout=120)
    writer.wait_acks(writer.acks + 300, "after the sync")
    writer.writer.send_signal(signal.SIGINT)
    writer.finish(timeout=60)
    status = wait_in_sync(a, b)
    starts = re.findall(r"log replay will start at (\S+)", b.logtail(400))
    assert len(starts) == 1, starts
    p0 = LogPosition.decode(starts[0])
    assert p0.offset == 0, f"the replay starts inside a logfile: {p0.encode()}"
    replayed = log_bytes_from(a.root, p0)
    fetched = status["fetch_bytes"]
    local = sum(p.stat().st_size for p in (b.root / "resource-r0").glob("log-*"))
    assert replayed > 1 << 20, "the writer wrote too little after the join"
    assert fetched <= 1.05 * replayed, (fetched, replayed)
    assert local <= 1.05 * replayed, (local, replayed)
    b.marsadm("pause-replay", "r0")
    assert pair.dev_a.read() == pair.dev_b.read(), "devices differ after catching up"
