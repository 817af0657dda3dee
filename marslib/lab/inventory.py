"""What the lab tells ssh and Ansible: an ssh_config for ``ssh -F`` and an inventory."""

from __future__ import annotations

from pathlib import Path

from marslib.lab.state import LabState, venv_bin


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


def write_inventory(state: LabState, key: Path | None, roots: dict[str, tuple[Path, Path]]) -> Path:
    """``inventory.ini``: group ``mars`` with every host; ``mars_near``/``mars_far`` if far.

    ``roots`` maps each host name to its (MARS_ROOT, MARS_RUN_DIR).
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
        root, run_dir = roots[h.name]
        lines.append(
            f"{h.name} ansible_host={h.ip} {conn} "
            f"ansible_python_interpreter={venv_bin() / 'python'} "
            f"mars_ip={h.ip} mars_host={h.name} mars_root={root} mars_run_dir={run_dir} "
            f"mars_devices={','.join(h.devices)}")
    if state.far:
        lines += ["", "[mars_near]", state.hosts[0].name, "", "[mars_far]",
                  *(h.name for h in state.hosts[1:])]
    path.write_text("\n".join(lines) + "\n")
    return path
