"""Molecule scenarios on the lab, as `molecule test` runs them: create (mars-lab up),
prepare, converge, idempotence (a second converge must change nothing), verify (the
application's data and the members' device checksums), destroy (mars-lab down).

The default suite runs `default` and `handover`; `make molecule` runs all six."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, REPO

VENV = REPO / ".venv" / "bin"
pytestmark = pytest.mark.skipif(
    not IS_ROOT or not shutil.which("nbdfuse") or not (VENV / "molecule").exists(),
    reason="needs root (the lab), nbdfuse and molecule in the venv")

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def molecule_test(scenario: str, lab_prefix: Path, collections: Path) -> str:
    """`molecule test -s SCENARIO` with marslib.mars from ``collections`` (installed)."""
    env = {**os.environ, "PATH": f"{VENV}:{os.environ.get('PATH', '')}",
           "MARS_MOLECULE_LAB_PREFIX": str(lab_prefix), "NO_COLOR": "1",
           "MARS_COLLECTIONS_PATH": str(collections)}
    env.pop("PYTHONPATH", None)
    env.pop("MARS_LAB_DIR", None)
    started = time.monotonic()
    out = subprocess.run([str(VENV / "molecule"), "test", "-s", scenario], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    text = ANSI.sub("", out.stdout + out.stderr)
    print(f"\n===== molecule test -s {scenario}: rc {out.returncode}, "
          f"{time.monotonic() - started:.0f} s\n{text[-8000:]}")
    assert out.returncode == 0, f"molecule test -s {scenario} failed:\n{text[-8000:]}"
    return text


def lab_left_behind(lab_dir: Path) -> bool:
    return (lab_dir / "state.json").exists()


# `default` in every run; `handover` (1.5-2 min, handover.yml twice) with `make soak`, and
# with the other four in `make molecule`, to keep `make test` under 25 minutes
@pytest.mark.parametrize("scenario", ["default", pytest.param("handover",
                                                              marks=pytest.mark.soak)])
def test_scenario(scenario: str, tmp_path: Path, installed_collection: Path) -> None:
    prefix = tmp_path / "mol"
    text = molecule_test(scenario, prefix, installed_collection)
    # create checked that the scenario runs the installed collection, not the tree
    assert f"from {installed_collection}/ansible_collections" in text
    # every step ran, idempotence held, and the data checks ran and passed
    steps = ["create", "converge", "idempotence", "verify", "destroy"]
    if scenario != "default":
        steps.append("prepare")  # site.yml and the application; converge is the handover
    for step in steps:
        # "default ➜ create: Executed: Successful" on a terminal, "[default > create]
        # Executed: Successful" without one
        assert re.search(rf"\[?{scenario} (?:➜|>) {step}\]?:? Executed: Successful", text), \
            f"step {step} did not run successfully"
    assert re.search(r"2 members hold the same [0-9.]+ MB: sha256", text), \
        "verify did not compare the members' devices"
    assert re.search(r"\d+ records, last seq \d+", text), "verify did not check the app data"
    if scenario == "handover":
        assert re.search(r"r0 lab1 -> lab2: stop application [0-9.]+ s, handover", text)
    assert not lab_left_behind(Path(f"{prefix}-{scenario}")), "destroy left the lab up"
