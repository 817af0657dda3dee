"""The typed status (marslib/status.py): the JSON marsd answers keeps its keys, reads back
into the same records, tolerates newer and older marsds; one lag() for every caller."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    HostPair,
    MarsHost,
    nbd_client,
    needs_libnbd,
    wait_in_sync,
    wait_until,
)

from marslib import control
from marslib.position import LogPosition
from marslib.status import (
    SCHEMA_VERSION,
    DaemonStatus,
    FetchStatus,
    LoggerStatus,
    ReplayStatus,
    ResourceStatus,
    SecondaryStatus,
    lag,
    lag_seconds,
    tree_lag,
    up_to_date,
)
from marslib.worker.messages import StatusReply, decode, encode

SIZE = 16 << 20

# The keys of a resource in marsd's ``status`` reply, as marsadm and the tests read them
# (captured from a running marsd before the status was typed). worker_pid is there when
# the resource runs in a worker (the default), worker_error when that worker is slow.
COMMON = {"role", "device", "open_count", "logfile_count", "logfile_bytes"}
PRIMARY_KEYS = COMMON | {
    "logfile", "log_end", "applied", "next_seq", "pending_bytes", "queued_writes", "writes",
    "bytes_written", "commits", "writes_per_commit", "writeback_rounds", "device_writes",
    "direct_writes", "emergency", "errors", "nbd_socket", "recovery"}
SECONDARY_KEYS = COMMON | {"phase", "fetch_blocked_by_space", "error", "consistent"}
SYNC_KEYS = {"sync_done", "sync_size", "sync_copied", "sync_rate", "sync_paused", "sync_eta"}
REPLAYING_KEYS = SECONDARY_KEYS | {
    "fetch_logfile", "fetch_local_end", "fetch_remote_end", "fetch_bytes", "fetch_rate",
    "fetch_paused", "fetch_connections", "fetch_error", "fetch_contact_age", "fetch_hedges",
    "replay", "replay_records", "replay_bytes", "replay_rate", "replay_paused", "replay_redo",
    "replay_error", "corrupt_refetched", "replay_stamp_ns", "caught_up_at", "applied"}
DAEMON_KEYS = {"ok", "host", "version", "workers", "peers", "space_free", "space_level",
               "space_level_number", "resources", "failures", "retry_in", "schema_version"}


def reply(host: MarsHost) -> dict[str, Any]:
    return control.request(host.run_dir / "marsd.sock", "status")


def assert_round_trip(raw: dict[str, Any]) -> DaemonStatus:
    """marsd's reply reads into a DaemonStatus that writes the very same JSON back."""
    st = DaemonStatus.from_json(raw)
    assert st.to_json() == {k: v for k, v in raw.items() if k != "ok"}
    for name, res in raw["resources"].items():
        assert ResourceStatus.from_json(res).to_json() == res
        assert st.resources[name] == ResourceStatus.from_json(res)
    return st


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[HostPair]:
    p = HostPair(tmp_path)
    yield p
    p.close()


@needs_libnbd
def test_live_status_of_a_primary_and_a_secondary_round_trips_in_every_phase(
        pair: HostPair) -> None:
    a, b = pair.a, pair.b
    a.serve(pair.dev_a.path)
    nbd_client(a.nbd_uri("r0"), "pwrite", "0", "ab" * 4096, "fua")
    # beta joins with its sync paused while its marsd is down: it starts in the sync phase
    b.join_cluster_of(a)
    wait_until(lambda: "r0" in b.marsadm("view")["resources"], "r0 to be known on beta")
    b.stop()
    b.marsadm("join-resource", "r0", pair.dev_b.path)
    b.marsadm("pause-sync", "r0")
    b.start()

    # the primary
    raw = reply(a)
    assert set(raw) == DAEMON_KEYS and raw["schema_version"] == SCHEMA_VERSION == 1
    prim = assert_round_trip(raw).resources["r0"]
    assert set(raw["resources"]["r0"]) == PRIMARY_KEYS | {"worker_pid"}
    assert prim.role == "primary" and prim.logger is not None and prim.logger.writes == 1
    assert prim.applied == prim.logger.applied
    assert prim.primary is not None and prim.primary.recovery is not None
    assert lag(prim) == 0 and up_to_date(prim) and lag_seconds(prim) == 0.0

    # the secondary while it syncs (paused)
    syncing = wait_until(lambda: (r := reply(b)["resources"].get("r0")) and
                         r.get("sync_paused") and r, "beta's paused sync to show")
    assert set(syncing) == SECONDARY_KEYS | SYNC_KEYS | {"worker_pid"}
    sec = assert_round_trip(reply(b)).resources["r0"]
    assert sec.secondary is not None and sec.secondary.phase == "syncing"
    assert sec.syncer is not None and sec.fetcher is None and sec.replayer is None
    assert lag(sec) is None and not up_to_date(sec)

    # replaying, up to date
    b.marsadm("resume-sync", "r0")
    wait_in_sync(a, b)
    raw = wait_until(lambda: (r := reply(b)) and up_to_date(
        ResourceStatus.from_json(r["resources"]["r0"])) and r, "beta to know it is up to date")
    assert set(raw["resources"]["r0"]) == REPLAYING_KEYS | {"worker_pid"}
    sec = assert_round_trip(raw).resources["r0"]
    assert sec.replayer is not None and sec.applied == sec.replayer.replay
    assert lag(sec) == 0 and lag_seconds(sec) == 0.0
    assert raw["peers"]["alpha"]["connected"] is True

    # replay paused while the primary writes: behind by exactly what it wrote
    b.marsadm("pause-replay", "r0")
    nbd_client(a.nbd_uri("r0"), "pwrite", "8192", "cd" * 4096, "fua")
    end = LogPosition.decode(reply(a)["resources"]["r0"]["log_end"])

    def fetched_all() -> ResourceStatus | None:
        st = control.daemon_status(b.run_dir / "marsd.sock").resources["r0"]
        ok = st.fetcher is not None and st.fetcher.fetch_remote_end == end.offset
        return st if ok else None
    behind = wait_until(fetched_all, "beta to fetch alpha's new write")
    assert behind.replayer is not None and behind.replayer.replay_paused
    applied = LogPosition.decode(behind.replayer.replay)
    assert lag(behind) == end.offset - applied.offset > 4096 and not up_to_date(behind)
    assert lag_seconds(behind, time.time() + 5) >= 5
    raw = reply(b)
    assert set(raw["resources"]["r0"]) == REPLAYING_KEYS | {"worker_pid"}
    assert_round_trip(raw)

    # and the tree's view of the same
    tree = b.marsadm("view", "r0")["resources"]["r0"]["members"]
    assert tree_lag(tree["alpha"]["replay"], tree["beta"]["replay"]) is not None
    b.marsadm("resume-replay", "r0")
    wait_until(lambda: up_to_date(ResourceStatus.from_json(reply(b)["resources"]["r0"])),
               "beta to catch up again")


@needs_libnbd
def test_in_process_resources_have_the_same_keys_without_a_worker(pair: HostPair) -> None:
    a = pair.a
    a.serve(pair.dev_a.path, "--workers", "off")
    raw = reply(a)
    assert raw["workers"] is False
    assert set(raw["resources"]["r0"]) == PRIMARY_KEYS
    st = assert_round_trip(raw)
    assert st.resources["r0"].worker_pid is None


# ------------------------------------------------------------------ without marsd
def secondary(replay: str | None, fetch_logfile: str = "log-000000002-alpha",
              remote_end: int = 1000, caught_up_at: float | None = None) -> ResourceStatus:
    return ResourceStatus(
        role="secondary", device="/dev/x",
        secondary=SecondaryStatus(phase="replaying", consistent=True),
        fetcher=FetchStatus(fetch_logfile=fetch_logfile, fetch_local_end=remote_end,
                            fetch_remote_end=remote_end),
        replayer=ReplayStatus(replay=replay, caught_up_at=caught_up_at)
        if replay is not None else None)


def test_the_worker_channel_carries_a_status_unchanged() -> None:
    st = secondary("log-000000002-alpha,400,7", caught_up_at=12.5)
    pieces = encode(StatusReply(phase="replaying", status=st.to_json()), id=3)
    header = pieces[1]
    _, msg = decode(header)
    assert isinstance(msg, StatusReply)
    assert ResourceStatus.from_json(msg.status) == st


def test_unknown_keys_from_a_newer_marsd_are_ignored() -> None:
    res = secondary("log-000000002-alpha,400,7").to_json()
    newer = {**res, "fetch_compression": "zstd", "replay_lanes": 4}
    assert ResourceStatus.from_json(newer) == ResourceStatus.from_json(res)
    assert ResourceStatus.from_json(newer).to_json() == res
    daemon = {"ok": True, "host": "beta", "version": "9.0", "workers": True,
              "schema_version": 2, "cluster_epoch": 17,
              "peers": {"alpha": {"connected": True, "error": None, "rtt_ms": 0.3}},
              "resources": {"r0": newer}}
    st = DaemonStatus.from_json(daemon)
    assert st.schema_version == 2 and st.peers["alpha"].connected
    assert st.resources["r0"] == ResourceStatus.from_json(res)


def test_missing_keys_from_an_older_marsd_take_defaults() -> None:
    old = DaemonStatus.from_json({"ok": True, "host": "beta", "resources": {"r0": {
        "role": "secondary", "phase": "replaying", "replay": "log-000000002-alpha,400,7",
        "fetch_logfile": "log-000000002-alpha"}}})
    assert old.schema_version == 0 and old.peers == {} and old.failures == {}
    r0 = old.resources["r0"]
    assert r0.secondary == SecondaryStatus(phase="replaying")
    assert r0.fetcher is not None and r0.fetcher.fetch_remote_end == -1
    assert r0.replayer is not None and r0.replayer.caught_up_at is None
    assert r0.syncer is None and r0.logger is None and r0.worker_pid is None
    assert lag(r0) is None and not up_to_date(r0)  # the primary's end is not known
    primary = ResourceStatus.from_json({"role": "primary", "log_end": "log-000000001-a,0,0"})
    assert primary.logger == LoggerStatus(log_end="log-000000001-a,0,0")
    assert primary.primary is None and lag(primary) == 0


def test_lag_in_the_same_logfile() -> None:
    behind = secondary("log-000000002-alpha,400,7")
    assert lag(behind) == 600 and not up_to_date(behind)
    done = secondary("log-000000002-alpha,1000,9")
    assert lag(done) == 0 and up_to_date(done)
    # a replay batch in progress is recorded with its end; it counts from the position
    assert lag(secondary("log-000000002-alpha,400,7,1000,9")) == 600


def test_lag_while_the_replay_is_in_an_older_logfile() -> None:
    older = secondary("log-000000001-alpha,5000,3", fetch_logfile="log-000000002-alpha")
    assert lag(older) == 1000 and not up_to_date(older)  # at least the newer logfile
    # nothing known of the newer logfile yet: how much of the older one is left is not
    # in the status; never 0, which would say it is up to date
    empty = secondary("log-000000001-alpha,5000,3", fetch_logfile="log-000000002-alpha",
                      remote_end=0)
    assert lag(empty) is None and not up_to_date(empty)


def test_lag_of_a_primary_and_when_unknown() -> None:
    assert lag(ResourceStatus(role="primary")) == 0
    assert up_to_date(ResourceStatus(role="primary"))
    assert lag(secondary(None)) is None  # not replaying yet (syncing)
    assert lag(secondary("log-000000002-alpha,0,0", remote_end=-1)) is None  # no answer yet
    assert lag(secondary("garbage")) is None
    assert lag(ResourceStatus()) is None  # a worker that never answered


def test_lag_seconds_counts_from_when_it_last_had_everything() -> None:
    behind = secondary("log-000000002-alpha,400,7", caught_up_at=100.0)
    assert lag_seconds(behind, now=130.0) == 30.0
    assert lag_seconds(secondary("log-000000002-alpha,1000,9", caught_up_at=100.0),
                       now=130.0) == 0.0
    assert lag_seconds(secondary("log-000000002-alpha,400,7"), now=130.0) == 0.0


def test_tree_lag() -> None:
    assert tree_lag("log-000000003-alpha,9000,50", "log-000000003-alpha,4000,20") == 5000
    assert tree_lag("log-000000003-alpha,4000,20", "log-000000003-alpha,9000,50") == 0
    assert tree_lag("log-000000003-alpha,9000,50", "log-000000003-alpha,4000,20,6000,30") \
        == 5000
    assert tree_lag("log-000000003-alpha,9000,50", "log-000000002-alpha,4000,20") is None
    # the same number written by two hosts (a split brain): not the same logfile
    assert tree_lag("log-000000003-alpha,9000,50", "log-000000003-beta,4000,20") is None
    assert tree_lag(None, "log-000000003-alpha,4000,20") is None
    assert tree_lag("log-000000003-alpha,9000,50", "") is None
    assert tree_lag("log-000000003-alpha,9000,50", "not a position") is None
