"""What the lab tells ssh and Ansible: an ssh_config for ``ssh -F`` and an inventory."""

from __future__ import annotations

from pathlib import Path

from marslib.lab.state import REPO, LabState, venv_bin


def write_ssh_config(state: LabState, key: Path) -> Path:
    path = Path(state.lab_dir) / "ssh_config"
    lines = [f"# mars-lab: ssh -F {path} lab1"]
    for h in state.hosts:
        lines += [f"Host {h.name}", f"  HostName {h.ip}"]
    lines += ["Host *", "  User root", f"  IdentityFile {key}", "  IdentitiesOnly yes",
              "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null",
              "  LogLevel ERROR", "  BatchMode yes", "  ConnectTimeout 10"]
    path.write_text("\n".join(lines) + "\n")
    return path


def host_vars(host_dir: Path, root: Path, run_dir: Path, devices: list[str],
              images: list[Path]) -> dict[str, str]:
    """The variables the roles and playbooks of the collection marslib.mars read for one
    lab host."""
    return {
        "mars_root": str(root), "mars_run_dir": str(run_dir),
        "mars_devices": ",".join(devices), "mars_images": ",".join(str(p) for p in images),
        "mars_prefix": str(host_dir / "opt"),  # per-host venvs: /opt/marslib on real hosts
        "mars_app_dir": str(host_dir / "app"),
        # the lab's own marsd pidfile and log, so `mars-lab marsd stop` and the role agree
        "mars_pidfile": str(host_dir / "marsd.pid"),
        "mars_logfile": str(host_dir / "log" / "marsd.log"),
    }


def write_inventory(state: LabState, key: Path | None,
                    hosts_vars: dict[str, dict[str, str]]) -> Path:
    """``inventory.ini``: group ``mars`` with every host; ``mars_near``/``mars_far`` if far.

    ``hosts_vars`` maps each host name to its variables (:func:`host_vars`).
    """
    path = Path(state.lab_dir) / "inventory.ini"
    if key is None:
        conn = "ansible_connection=local"
    else:
        conn = (f"ansible_user=root ansible_ssh_private_key_file={key} "
                "ansible_ssh_common_args='-o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null'")
    lines = [f"# mars-lab inventory: ansible -i {path} mars -m ping", "[mars]"]
    for h in state.hosts:
        extra = " ".join(f"{k}={v}" for k, v in hosts_vars[h.name].items())
        lines.append(
            f"{h.name} ansible_host={h.ip} {conn} "
            f"ansible_python_interpreter={venv_bin() / 'python'} "
            f"mars_ip={h.ip} mars_host={h.name} {extra}")
    site_packages = next((venv_bin().parent / "lib").glob("python3*/site-packages"), None)
    lines += ["", "[mars:vars]",
              "mars_supervisor=pidfile",  # no systemd inside a lab namespace
              f"mars_lab_dir={state.lab_dir}",
              f"mars_repo={REPO}",
              # the demo application that stands in for a customer's container
              f"mars_app_command={REPO / 'bin' / 'mars-app'}",
              # offline installs into per-host venvs reuse the repo venv's dependencies
              f"mars_deps_site_packages={site_packages or ''}",
              f"mars_python={_base_python()}",
              # releases before 0.2 join over ssh: the lab key works between lab hosts
              f"mars_join_ssh_key={key or ''}",
              # grow a lab "LV": its backing file, then tell the loop device
              'mars_grow_device_command="truncate -s {size} {image} && losetup -c {device}"']
    if state.far:
        lines += ["", "[mars_near]", state.hosts[0].name, "", "[mars_far]",
                  *(h.name for h in state.hosts[1:])]
    path.write_text("\n".join(lines) + "\n")
    return path


def _base_python() -> str:
    """The interpreter the repo venv was made from: per-host venvs made with it can use
    the repo venv's compiled dependencies."""
    try:
        cfg = (venv_bin().parent / "pyvenv.cfg").read_text()
    except OSError:
        return "/usr/bin/python3"
    values = {k.strip(): v.strip() for k, _, v in
              (line.partition("=") for line in cfg.splitlines())}
    if values.get("executable"):
        return values["executable"]
    return f"{values['home']}/python3" if values.get("home") else "/usr/bin/python3"
