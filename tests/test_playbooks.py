"""Every playbook and Molecule scenario parses (`ansible-playbook --syntax-check`), so a
typo is found in seconds rather than half way through a lab run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO

PLAYBOOKS = sorted(p for p in (REPO / "ansible").glob("*.yml") if p.name != "lab-vars.yml")
SCENARIO_PLAYBOOKS = sorted(p for p in (REPO / "molecule").glob("*/*.yml")
                            if p.name != "molecule.yml" and p.parent.name != "shared")
ARGS = ["-e", "resource=r0", "-e", "target=lab1", "-e", "from=lab1", "-e", "to=lab2",
        "-e", "size=1G"]


def test_syntax(tmp_path: Path) -> None:
    """One ansible-playbook run checks them all (it names the file that fails)."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
           "ANSIBLE_LIBRARY": str(REPO / "ansible" / "library"),
           "ANSIBLE_MODULE_UTILS": str(REPO / "ansible" / "module_utils"),
           "ANSIBLE_ROLES_PATH": str(REPO / "ansible" / "roles"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path)}
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[mars]\nlab1\nlab2\n")
    out = subprocess.run([str(REPO / ".venv" / "bin" / "ansible-playbook"), "-i",
                          str(inventory), "--syntax-check",
                          *map(str, PLAYBOOKS + SCENARIO_PLAYBOOKS), *ARGS],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for playbook in PLAYBOOKS + SCENARIO_PLAYBOOKS:
        assert f"playbook: {playbook}" in out.stdout, f"{playbook} was not checked"


def test_every_playbook_is_covered() -> None:
    names = {p.name for p in PLAYBOOKS}
    assert {"site.yml", "handover.yml", "rolling_upgrade.yml", "football.yml",
            "football-cron.yml", "failover.yml", "expand.yml"} <= names
    scenarios = {p.parent.name for p in SCENARIO_PLAYBOOKS}
    assert scenarios == {"default", "handover", "failover", "resize", "rolling_upgrade",
                         "football"}
