"""The collection marslib.mars as a user gets it: built and installed with ansible-galaxy,
its playbooks parse and say how to use them when arguments are missing, its roles check
their arguments, and a --check run of site builds nothing on the controller.

Runs against the installed copy (the ``installed_collection`` fixture), not the tree."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import COLLECTION, REPO

from marslib import __version__

BIN = REPO / ".venv" / "bin"
PLAYBOOKS = sorted(p.stem for p in (COLLECTION / "playbooks").glob("*.yml"))
ROLES = sorted(p.name for p in (COLLECTION / "roles").iterdir() if p.is_dir())
SCENARIO_PLAYBOOKS = sorted(p for p in (REPO / "molecule").glob("*/*.yml")
                            if p.name != "molecule.yml" and p.parent.name != "shared")
ARGS = ["-e", "resource=r0", "-e", "target=lab1", "-e", "from=lab1", "-e", "to=lab2",
        "-e", "size=1G"]
# playbooks that act on one resource and name it in their usage message
NEEDS_ARGUMENTS = ["app", "expand", "failover", "football", "handover"]


def ansible(collections: Path, tmp_path: Path, *cmd: str,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith(("ANSIBLE_", "MARS_"))}
    env.update(ANSIBLE_CONFIG=str(REPO / "ansible" / "ansible.cfg"),
               ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"), ANSIBLE_LOCALHOST_WARNING="0",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)


def inventory(tmp_path: Path, hosts: str = "lab1\nlab2\n") -> Path:
    path = tmp_path / "inventory.ini"
    path.write_text(f"[mars]\n{hosts}")
    return path


def test_installed_collection_holds_everything(installed_collection: Path) -> None:
    root = installed_collection / "ansible_collections" / "marslib" / "mars"
    manifest = json.loads((root / "MANIFEST.json").read_text())["collection_info"]
    assert (manifest["namespace"], manifest["name"]) == ("marslib", "mars")
    assert manifest["version"] == __version__, "galaxy.yml's version must follow marslib's"
    assert manifest["license"] == ["GPL-2.0-only"]
    modules = {p.stem for p in (root / "plugins" / "modules").glob("mars_*.py")}
    assert modules == {"mars_cluster", "mars_info", "mars_resize", "mars_resource",
                       "mars_role", "mars_upgrade", "mars_wait"}
    assert (root / "plugins" / "action" / "mars_wait.py").exists()
    assert (root / "plugins" / "module_utils" / "mars_common.py").exists()
    assert sorted(p.stem for p in (root / "playbooks").glob("*.yml")) == PLAYBOOKS
    assert sorted(p.name for p in (root / "roles").iterdir()) == ROLES
    runtime = yaml.safe_load((root / "meta" / "runtime.yml").read_text())
    assert runtime["requires_ansible"].startswith(">=")
    assert (root / "README.md").read_text().startswith("# ")


def test_playbooks_parse_without_and_with_arguments(installed_collection: Path,
                                                     tmp_path: Path) -> None:
    """Without -e the plays must still parse: a required variable in a play's name or
    host pattern would fail before the usage message could be shown."""
    inv = inventory(tmp_path)
    fqcns = [f"marslib.mars.{p}" for p in PLAYBOOKS]
    for extra in ([], ARGS):
        out = ansible(installed_collection, tmp_path, "ansible-playbook", "-i", str(inv),
                      "--syntax-check", *fqcns, *map(str, SCENARIO_PLAYBOOKS), *extra)
        assert out.returncode == 0, out.stdout + out.stderr
        for name in PLAYBOOKS:
            assert f"playbooks/{name}.yml" in out.stdout, f"{name} was not checked"


@pytest.mark.parametrize("name", NEEDS_ARGUMENTS)
def test_missing_arguments_give_the_usage(installed_collection: Path, tmp_path: Path,
                                          name: str) -> None:
    # hosts that do not exist: the usage check must stop the run before any is contacted
    inv = inventory(tmp_path, "nowhere1 ansible_host=192.0.2.1\nnowhere2 ansible_host=192.0.2.2\n")
    out = ansible(installed_collection, tmp_path, "ansible-playbook", "-i", str(inv),
                  f"marslib.mars.{name}", timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "usage: -e resource=NAME" in text, text
    assert "nowhere" not in text.split("PLAY RECAP")[-1], "a host was contacted"


def test_forced_failover_and_device_removal_need_confirmation(installed_collection: Path,
                                                              tmp_path: Path) -> None:
    inv = inventory(tmp_path, "lab1 ansible_host=192.0.2.1\nlab3 ansible_host=192.0.2.3\n")
    out = ansible(installed_collection, tmp_path, "ansible-playbook", "-i", str(inv),
                  "marslib.mars.football", "-e", "resource=r0", "-e", "from=lab1",
                  "-e", "to=lab3", "-e", "football_remove_device_command=lvremove -y {device}",
                  timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "confirm with -e football_remove_confirm=r0" in text, text
    # confirming another resource does not confirm this one
    out = ansible(installed_collection, tmp_path, "ansible-playbook", "-i", str(inv),
                  "marslib.mars.football", "-e", "resource=r0", "-e", "from=lab1",
                  "-e", "to=lab3", "-e", "football_remove_device_command=lvremove -y {device}",
                  "-e", "football_remove_confirm=r1", timeout=120)
    assert "confirm with -e football_remove_confirm=r0" in out.stdout + out.stderr
    playbook = (COLLECTION / "playbooks" / "failover.yml").read_text()
    plays = yaml.safe_load(playbook)
    gate = "failover_confirm | default('') == resource"
    gates = [t for play in plays for t in play.get("tasks", [])
             if gate in str(t.get("ansible.builtin.assert"))]
    # the forced failover and the resolve (which drops a host's history) are both gated,
    # and neither gate applies to --check
    assert len(gates) == 2 and all("not ansible_check_mode" in str(t["when"]) for t in gates)


def fake_checkout(tmp_path: Path) -> Path:
    """A marslib checkout whose build-wheel.sh records that it ran."""
    src = tmp_path / "checkout"
    (src / "scripts").mkdir(parents=True)
    script = src / "scripts" / "build-wheel.sh"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/built\n"
                      "echo /wheels/marslib-9.8.7-py3-none-any.whl\n")
    script.chmod(0o755)
    return src


def test_site_check_builds_no_wheel(installed_collection: Path, tmp_path: Path) -> None:
    src = fake_checkout(tmp_path)
    inv = inventory(tmp_path, "")  # no hosts: only the controller's play runs
    run = ["ansible-playbook", "-i", str(inv), "marslib.mars.site", "-e",
           f"marslib_source={src}", "-v"]
    out = ansible(installed_collection, tmp_path, *run, "--check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (tmp_path / "built").exists(), "--check built a wheel"
    out = ansible(installed_collection, tmp_path, *run)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "built").read_text().split() == [str(src / "dist")]
    assert re.search(r"mars_wheel_path: /wheels/marslib-9\.8\.7-py3-none-any\.whl\n", out.stdout)
    assert re.search(r"mars_wheel_version: '?9\.8\.7'?\n", out.stdout), out.stdout
    # and without a wheel or a checkout it says what to give
    out = ansible(installed_collection, tmp_path, "ansible-playbook", "-i", str(inv),
                  "marslib.mars.site")
    assert out.returncode == 2 and "-e marslib_wheel=PATH" in out.stdout, out.stdout


def test_roles_check_their_arguments(installed_collection: Path, tmp_path: Path) -> None:
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{
        "name": "Run mars_app with a bad action", "hosts": "localhost",
        "gather_facts": False, "connection": "local",
        "roles": [{"role": "marslib.mars.mars_app", "vars": {
            "mars_app_resource": "r0", "mars_app_action": "explode"}}]}]))
    out = ansible(installed_collection, tmp_path, "ansible-playbook", "-i", "localhost,",
                  str(play))
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "mars_app_action" in text and "explode" in text and "start, stop" in text, text


@pytest.mark.parametrize("role", ROLES)
def test_role_argument_specs_match_defaults(role: str) -> None:
    """Every role documents its arguments; a documented default is the real one, and a
    required argument has none."""
    base = COLLECTION / "roles" / role
    spec = yaml.safe_load((base / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    assert spec["argument_specs"]["main"]["short_description"]
    defaults_file = base / "defaults" / "main.yml"
    defaults = yaml.safe_load(defaults_file.read_text()) or {} if defaults_file.exists() else {}
    for name, opt in options.items():
        assert opt.get("type") and opt.get("description"), f"{role}: {name} undocumented"
        if opt.get("required"):
            assert name not in defaults, f"{role}: required {name} has a default"
        elif "default" in opt and name in defaults:
            assert opt["default"] == defaults[name], f"{role}: {name}'s documented default"
    meta = yaml.safe_load((base / "meta" / "main.yml").read_text())
    assert meta["galaxy_info"]["role_name"] == role
    assert meta["galaxy_info"]["license"] == "GPL-2.0-only"


def test_every_playbook_and_scenario_is_there() -> None:
    assert {"site", "handover", "rolling_upgrade", "football", "football_cron",
            "failover", "expand", "app"} <= set(PLAYBOOKS)
    scenarios = {p.parent.name for p in SCENARIO_PLAYBOOKS}
    assert scenarios == {"default", "handover", "failover", "resize", "rolling_upgrade",
                         "football"}
