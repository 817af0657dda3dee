"""Version links: where two members' histories fork (``fork_point``) and where a resync's
scan of both logs starts (``effective_fork_point``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from marslib.history import effective_fork_point, fork_point, forks, write_link
from marslib.meta import MetaStore
from marslib.position import LogPosition
from marslib.schema import replay_value


@pytest.fixture
def meta(tmp_path: Path) -> MetaStore:
    return MetaStore(tmp_path)


def link(meta: MetaStore, writer: str, number: int, host: str, end: int, seq: int) -> None:
    write_link(meta, "r0", writer, LogPosition(number, end, seq, host))


def test_same_host_fork_lies_in_the_logfile_at_the_shorter_copy(meta: MetaStore) -> None:
    # alpha wrote logfiles 1 and 2; beta had fetched 2 up to 4096 when it took over
    for w in ("alpha", "beta"):
        link(meta, w, 1, "alpha", 9000, 10)
    link(meta, "alpha", 2, "alpha", 20000, 30)
    link(meta, "beta", 2, "alpha", 4096, 14)
    link(meta, "beta", 3, "beta", 7000, 20)  # beta's own log after the takeover
    assert [f.number for f in forks(meta, "r0")] == [2]  # 3: only beta has a link
    assert fork_point(meta, "r0", "alpha", "beta") == LogPosition(2, 4096, 14, "alpha")
    # the same from the other side
    assert fork_point(meta, "r0", "beta", "alpha") == LogPosition(2, 4096, 14, "alpha")


def test_cross_host_fork_lies_at_the_end_of_the_last_shared_logfile(meta: MetaStore) -> None:
    for w in ("alpha", "beta"):
        link(meta, w, 4, "alpha", 9000, 10)
        link(meta, w, 5, "alpha", 500, 12)
    link(meta, "alpha", 6, "alpha", 8000, 40)  # both wrote a logfile 6 of their own
    link(meta, "beta", 6, "beta", 3000, 25)
    assert fork_point(meta, "r0", "alpha", "beta") == LogPosition(5, 500, 12, "alpha")


def test_a_late_joiner_has_no_links_of_the_logfiles_before_its_join(meta: MetaStore) -> None:
    link(meta, "alpha", 1, "alpha", 9000, 10)
    link(meta, "alpha", 2, "alpha", 9500, 20)  # beta joined during logfile 3
    for w in ("alpha", "beta"):
        link(meta, w, 3, "alpha", 100, 21)
    link(meta, "alpha", 4, "alpha", 300, 30)
    link(meta, "beta", 4, "alpha", 200, 25)
    assert fork_point(meta, "r0", "beta", "alpha") == LogPosition(4, 200, 25, "alpha")


def test_a_link_missing_on_one_side_after_the_shared_part(meta: MetaStore) -> None:
    for w in ("alpha", "beta"):
        link(meta, w, 1, "alpha", 9000, 10)
    link(meta, "alpha", 2, "alpha", 100, 11)  # beta never finished a logfile 2
    link(meta, "alpha", 3, "alpha", 200, 12)
    link(meta, "beta", 3, "beta", 50, 11)
    assert fork_point(meta, "r0", "beta", "alpha") == LogPosition(1, 9000, 10, "alpha")


def test_no_common_history_gives_none(meta: MetaStore) -> None:
    link(meta, "alpha", 1, "alpha", 9000, 10)
    link(meta, "beta", 1, "beta", 9000, 10)
    assert fork_point(meta, "r0", "alpha", "beta") is None
    assert fork_point(meta, "r0", "alpha", "gamma") is None  # no links at all


def test_equal_histories_share_everything_up_to_the_last_link(meta: MetaStore) -> None:
    for w in ("alpha", "beta"):
        link(meta, w, 1, "alpha", 9000, 10)
        link(meta, w, 2, "alpha", 700, 14)
    assert fork_point(meta, "r0", "alpha", "beta") == LogPosition(2, 700, 14, "alpha")


def test_the_scan_starts_at_a_lagging_replay_position() -> None:
    fork = LogPosition(7, 50000, 90, "alpha")
    # a crashed primary's saved position lags its device: in the same logfile ...
    assert effective_fork_point(fork, "log-000000007-alpha,12000,40") == \
        LogPosition(7, 12000, 40, "alpha")
    # ... or in an earlier one
    assert effective_fork_point(fork, "log-000000006-alpha,300,30") == \
        LogPosition(6, 300, 30, "alpha")
    # a replay position past the fork changes nothing
    assert effective_fork_point(fork, "log-000000009-beta,10,200") == fork
    assert effective_fork_point(fork, "log-000000007-alpha,60000,99") == fork
    # in another logfile of the same number: all of that number is scanned
    assert effective_fork_point(fork, "log-000000007-beta,60000,99") == \
        LogPosition(7, 0, 90, "alpha")
    # no position (or a damaged one): the device's state is unknown
    assert effective_fork_point(fork, None) is None
    assert effective_fork_point(fork, "garbage") is None


def test_an_interrupted_replay_batch_counts_from_its_start() -> None:
    """A batch interrupted by a crash may have left any part of its records on the device:
    the scan starts at the position the batch started from, not at its end."""
    fork = LogPosition(3, 90000, 70, "alpha")
    value = replay_value(LogPosition(3, 40000, 50, "alpha"), LogPosition(3, 95000, 75, "alpha"))
    assert value.count(",") == 4  # the batch end is in the value
    assert effective_fork_point(fork, value) == LogPosition(3, 40000, 50, "alpha")
    # a batch that began before the fork and ended after it: the same
    value = replay_value(LogPosition(3, 89000, 69, "alpha"), LogPosition(3, 99000, 80, "alpha"))
    assert effective_fork_point(fork, value) == LogPosition(3, 89000, 69, "alpha")
