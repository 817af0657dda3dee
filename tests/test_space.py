"""marsd's space check on a full disk: the level reaches the resources even when the
tree on that disk refuses the key, and the key is written once there is room again."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from marslib import daemon
from marslib.layout import MarsPaths
from marslib.logger import LoggerConfig
from marslib.schema import space_level
from marslib.space import SpaceLimits


class FakeLog:
    """The part of a primary's logger the space check drives."""

    def __init__(self) -> None:
        self.emergency = False
        self.reasons: list[str] = []

    async def enter_emergency(self, reason: str) -> None:
        self.emergency = True
        self.reasons.append(reason)

    async def leave_emergency(self) -> None:
        self.emergency = False


class FakePrimary:
    def __init__(self) -> None:
        self.logger = FakeLog()


def test_a_full_disk_refusing_the_level_key_still_puts_the_primary_in_emergency_mode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = MarsPaths(tmp_path / "mars", tmp_path / "run")
    paths.root.mkdir()
    d = daemon.Marsd(paths, "alpha", LoggerConfig(), metrics=None, workers=False,
                     space=SpaceLimits(warn=40, drop=30, no_fetch=20, emergency=10))
    primary = FakePrimary()
    d.primaries["r0"] = primary  # type: ignore[assignment]
    free = [5]
    monkeypatch.setattr(daemon, "free_bytes", lambda root: free[0])
    real_set = d.meta.set
    full = [True]

    def refusing_set(key: str, value: str, durable: bool = False) -> object:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_set(key, value, durable=durable)

    monkeypatch.setattr(d.meta, "set", refusing_set)

    asyncio.run(d.check_space())  # no exception: the daemon goes on
    assert primary.logger.emergency and "free in" in primary.logger.reasons[0]
    assert d.space_level == 4
    assert d.meta.get(space_level("alpha")) is None  # refused
    full[0] = False
    asyncio.run(d.check_space())  # the same level, written now that there is room
    assert d.meta.get(space_level("alpha")) == "4"
    free[0] = 100
    asyncio.run(d.check_space())
    assert not primary.logger.emergency and d.meta.get(space_level("alpha")) == "0"


def test_a_round_that_hits_a_full_disk_does_not_end_marsd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop logs the error and goes on: a second round runs."""
    paths = MarsPaths(tmp_path / "mars", tmp_path / "run")
    paths.root.mkdir()
    d = daemon.Marsd(paths, "alpha", LoggerConfig(), metrics=None, workers=False)
    rounds: list[int] = []

    async def failing_round() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        d._stop.set()

    monkeypatch.setattr(d, "_round", failing_round)
    monkeypatch.setattr(d, "_start_network", _nothing)
    d.meta.set("uuid", "test-uuid")
    asyncio.run(asyncio.wait_for(d.run(), 60))
    assert rounds == [0, 1]


async def _nothing() -> None:
    return None
