"""Log-based resync after a split brain, between two real marsd processes.

The split brain is made the way a network partition makes it, one marsd at a time: alpha
(the primary) writes what beta does not fetch and dies; beta takes over with ``primary
--force`` and writes; beta stops; alpha comes back alone, still primary in its own tree,
writes and rotates its log; alpha stops; both come up, the tree says beta is the primary,
and both see the split brain. Each side wrote known 64 KiB blocks, so the divergence is
known exactly.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    SYSTEM_PYTHON,
    BlockDev,
    MarsHost,
    loopback_ips,
    needs_libnbd,
    wait_in_sync,
    wait_until,
)

pytestmark = needs_libnbd
SIZE = 64 << 20  # four sync windows of 16 MiB
BLOCK = 64 << 10
COMMON = [3, 700, 1000]  # written before the split: equal on both sides
ALPHA_BEFORE_KILL = [10, 11, 12, 300]  # in alpha's log only (beta's fetch was paused)
BETA_AFTER_FORCE = [20, 21, 300, 520, 900]  # beta's writes as the new primary
ALPHA_ALONE = [[30, 31], [600], [800, 801], [1020]]  # alpha alone: one chunk per logfile
DIVERGED = set(ALPHA_BEFORE_KILL) | set(BETA_AFTER_FORCE) | {b for c in ALPHA_ALONE for b in c}

WRITE_BLOCKS = """
import random, sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
seed = int(sys.argv[2])
for i in map(int, sys.argv[3:]):
    h.pwrite(random.Random(seed * 1000003 + i).randbytes(65536), i * 65536)
h.flush()
h.shutdown()
"""


def write_blocks(host: MarsHost, blocks: list[int], seed: int) -> None:
    """Write the 64 KiB blocks ``blocks`` of r0 through ``host``'s NBD export."""
    subprocess.run([SYSTEM_PYTHON, "-c", WRITE_BLOCKS, host.nbd_uri("r0"), str(seed),
                    *map(str, blocks)], check=True, timeout=60, capture_output=True)


def logfiles(host: MarsHost) -> list[str]:
    return sorted(p.name for p in (host.root / "resource-r0").glob("log-*"))


class Split:
    """alpha and beta with a split brain in r0; beta is the designated primary."""

    def __init__(self, base: Path) -> None:
        ip_a, ip_b = loopback_ips(2)
        self.a = MarsHost(base / "a", "alpha", ip_a)
        self.b = MarsHost(base / "b", "beta", ip_b)
        self.dev_a = BlockDev(base / "a.img", SIZE)
        self.dev_b = BlockDev(base / "b.img", SIZE)

    def make(self) -> None:
        a, b = self.a, self.b
        a.serve(self.dev_a.path)
        b.join(a, self.dev_b.path)
        write_blocks(a, COMMON, seed=1)
        wait_in_sync(a, b)
        b.marsadm("pause-fetch", "r0")
        write_blocks(a, ALPHA_BEFORE_KILL, seed=2)
        a.kill9()  # alpha is gone (crashed, or cut off)
        b.marsadm("primary", "r0", "--force")
        b.marsadm("resume-fetch", "r0")
        write_blocks(b, BETA_AFTER_FORCE, seed=3)
        b.stop()  # the partition: alpha comes back without beta
        a.start()
        wait_until(lambda: a.status().get("role") == "primary", "alpha serves alone")
        for k, chunk in enumerate(ALPHA_ALONE):
            if k:
                a.marsadm("log-rotate", "r0")
            write_blocks(a, chunk, seed=4)
        a.stop()
        a.marsadm("down", "r0")  # alpha must learn who is primary before it runs r0
        b.start()
        a.start()
        wait_until(lambda: a.marsadm("view")["resources"]["r0"]["primary"] == "beta",
                   "alpha learns that beta is the primary")
        a.marsadm("up", "r0")

        def both_see_it() -> bool:
            views = [h.marsadm("view")["resources"]["r0"] for h in (a, b)]
            return all(v["split_brain"] for v in views) and \
                views[0]["members"]["alpha"]["state"] == "SplitBrain"
        wait_until(both_see_it, "both hosts see the split brain")

    def identical(self) -> bool:
        """Once alpha has caught up with beta: the devices, byte for byte."""
        wait_in_sync(self.b, self.a)
        self.a.marsadm("pause-replay", "r0")
        try:
            return self.dev_a.read() == self.dev_b.read()
        finally:
            self.a.marsadm("resume-replay", "r0")

    def close(self) -> None:
        for h in (self.a, self.b):
            h.stop()
        self.dev_a.close()
        self.dev_b.close()


@pytest.fixture
def split(tmp_path: Path) -> Iterator[Split]:
    s = Split(tmp_path)
    try:
        s.make()
        yield s
    finally:
        s.close()


def test_stale_loser_logs_are_not_replayed_after_the_resync(split: Split) -> None:
    a, b = split.a, split.b
    fork = a.marsadm("view")["resources"]["r0"]["split_brain"][0]["logfile"]
    stale = [n for n in logfiles(a) if n.endswith("-alpha") and int(n.split("-")[1]) > fork]
    assert len(stale) >= 3, f"the test made too few loser logfiles past the fork: {stale}"
    a.marsadm("invalidate", "r0", "--wait")
    # beta goes on into logfile numbers alpha also wrote while it was alone
    for k in range(3):
        b.marsadm("log-rotate", "r0")
        write_blocks(b, [40 + k, 901 + k], seed=10 + k)
    wait_in_sync(b, a, timeout=20)
    assert split.identical()
    left = set(logfiles(a)) & set(stale)
    assert not left, f"alpha kept its stale logfiles {left}"
