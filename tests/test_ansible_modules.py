"""The modules of the collection marslib.mars (ansible/ansible_collections/marslib/mars):
their decisions on realistic marsadm views, their documentation (with the collection's doc
fragments) against their argument specs, and real ansible-playbook runs against marsd
processes on loopback addresses (create, join without ssh, sync, handover, resize, leave,
delete, upgrade), each followed by a second run that must change nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from conftest import BIN, IS_ROOT, REPO, BlockDev, MarsHost, loopback_ips

import marslib

COLLECTIONS = REPO / "ansible"  # holds ansible_collections/marslib/mars
PLUGINS = COLLECTIONS / "ansible_collections" / "marslib" / "mars" / "plugins"
LIB = PLUGINS / "modules"
MODULE_UTILS = PLUGINS / "module_utils"
MODULES = ("mars_cluster", "mars_resource", "mars_role", "mars_resize", "mars_upgrade",
           "mars_info", "mars_wait")
FQCN = "marslib.mars."
SIZE = 64 << 20

if str(COLLECTIONS) not in sys.path:  # the modules import the collection's module_utils
    sys.path.insert(0, str(COLLECTIONS))
import ansible_collections.marslib.mars.plugins.module_utils.mars_common as mc  # noqa: E402


def load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_test_{name}", LIB / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


M = {name: load(name) for name in MODULES}


# ------------------------------------------------------------------ views
def member(role: str, state: str, device: str, **kw: Any) -> dict[str, Any]:
    m = {"device": device, "role": role, "attach": True, "is_primary": role == "primary",
         "emergency": False, "open_count": 0, "replay": "log-000000002-alpha@1048784",
         "syncing": False, "sync_progress": None, "syncpos": None, "fetch": True,
         "replaying": True, "error": None, "lag_bytes": 0, "version": "0.2.0",
         "split_brain": False, "state": state}
    m.update(kw)
    return m


def view(host: str = "beta", primary: str = "alpha", **members: dict[str, Any]
         ) -> dict[str, Any]:
    """marsadm view --json of a two-host cluster with r0, as seen on ``host``."""
    members = members or {"alpha": member("primary", "Primary", "/dev/vg0/r0"),
                          "beta": member("secondary", "UpToDate", "/dev/vg1/r0",
                                         lag_seconds=0.0, running=True)}
    return {"cluster": "21ee4249-dfba-446d-8af8-5d6e905c7c87", "host": host, "marsd": True,
            "version": "0.2.0", "marsd_version": "0.2.0", "peers": {}, "space_free": 1 << 35,
            "space_level": "ok",
            "resources": {"r0": {"resource": "r0", "size": SIZE, "primary": primary,
                                 "history_gap": None, "split_brain": [], "members": members,
                                 "logfiles": ["log-000000002-alpha"], "log_bytes": 1048784}}}


def params(module: str, **kw: Any) -> dict[str, Any]:
    """The module's parameters with their defaults, as AnsibleModule would pass them."""
    p = {k: v.get("default") for k, v in M[module].argument_spec().items()}
    p.update(kw)
    return p


# ------------------------------------------------------------- unit tests
def test_sizes_use_binary_units_like_marsadm() -> None:
    assert mc.parse_size("512") == 512
    assert mc.parse_size("64K") == 65536
    assert mc.parse_size("1G") == 1 << 30
    assert mc.parse_size(" 2 tib ") == 2 << 40
    assert mc.parse_size("256MB") == 256 << 20
    assert mc.parse_size(4096) == 4096
    for bad in ("1.5G", "-1", "G", "12X", "", True, -5):
        with pytest.raises(ValueError):
            mc.parse_size(bad)
    assert mc.format_size(1 << 30) == "1G" and mc.format_size(3 << 20) == "3M"
    assert mc.format_size(5000) == "5000"


def validate(module: str, **kw: Any) -> list[str]:
    mod = M[module]
    extra = {k: v for k, v in mod.MODULE_KWARGS.items() if k != "supports_check_mode"}
    result = ArgumentSpecValidator(mod.argument_spec(), **extra).validate(kw)
    return [str(e) for e in result.errors]


def test_argument_specs_reject_what_the_modules_cannot_do() -> None:
    assert validate("mars_cluster", ip="10.0.0.1") == []
    assert any("ip" in e for e in validate("mars_cluster"))  # state=present needs ip
    assert validate("mars_cluster", state="absent") == []
    assert any("peer" in e for e in validate("mars_cluster", ip="10.0.0.2", peer_name="alpha"))
    assert any("must be one of" in e for e in validate("mars_cluster", state="gone"))
    assert any("device" in e for e in validate("mars_resource", name="r0", state="joined"))
    assert any("device" in e for e in validate("mars_resource", name="r0"))
    assert validate("mars_resource", name="r0", state="absent") == []
    assert validate("mars_resource", resource="r0", device="/dev/x") == []  # alias
    assert any("name" in e for e in validate("mars_role"))
    assert any("must be one of" in e for e in validate("mars_role", name="r0", role="tertiary"))
    assert any("float" in e for e in validate("mars_role", name="r0", timeout="soon"))
    assert any("version" in e for e in validate("mars_upgrade", source="/srv/x.whl"))
    assert validate("mars_upgrade", version="0.2.0", source="/srv/x.whl",
                    pip_args=["--no-deps"]) == []
    assert validate("mars_info") == []
    assert validate("mars_resize", name="r0") == []
    for name in MODULES:  # the common options everywhere, the secret never logged
        spec = M[name].argument_spec()
        assert set(mc.COMMON_ARGS) <= set(spec), name
        assert spec["timeout"]["default"] == 600.0
    assert M["mars_cluster"].argument_spec()["secret"]["no_log"] is True


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ANSIBLE_CONFIG")}
    env.update(ANSIBLE_NOCOLOR="1", ANSIBLE_DEPRECATION_WARNINGS="0",
               ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, **kw)


def ansible_doc_json() -> dict[str, Any]:
    out = run([str(BIN / "ansible-doc"), "--json", *(FQCN + m for m in MODULES)])
    assert out.returncode == 0, out.stderr
    docs: dict[str, Any] = json.loads(out.stdout)
    assert set(docs) == {FQCN + m for m in MODULES}, out.stderr
    return {name.removeprefix(FQCN): d for name, d in docs.items()}


def test_ansible_doc_renders_every_module_and_matches_the_argument_specs() -> None:
    docs = ansible_doc_json()
    for name in MODULES:
        doc = docs[name]["doc"]
        spec = M[name].argument_spec()
        assert set(doc["options"]) == set(spec), name  # the doc fragment's options included
        for opt, s in spec.items():
            d = doc["options"][opt]
            assert d.get("type", "str") == s.get("type", "str"), (name, opt)
            assert d.get("default") == s.get("default"), (name, opt)
            assert d.get("choices") == s.get("choices"), (name, opt)
            assert bool(d.get("required")) == bool(s.get("required")), (name, opt)
            assert d.get("aliases") == s.get("aliases"), (name, opt)
            assert d.get("elements") == s.get("elements"), (name, opt)
        assert docs[name]["examples"].strip() and docs[name]["return"], name
        assert doc["author"] == ["marslib maintainers (@marslib)"], name
    text = run([str(BIN / "ansible-doc"), *(FQCN + m for m in MODULES)])
    assert text.returncode == 0 and "ERROR" not in text.stderr, text.stderr
    sections = text.stdout.split("> MODULE ")[1:]
    assert len(sections) == len(MODULES)
    for name, section in zip(MODULES, sections, strict=True):
        assert section.startswith(FQCN + name)
        for opt in M[name].argument_spec():
            assert opt in section, (name, opt)


def test_docs_use_the_fragments_and_state_what_each_module_supports() -> None:
    """Shared options come from the doc fragment marslib.mars.common (a module may only
    reword one); check mode and diff mode are stated as the code does them; examples and
    references name modules by their FQCN."""
    docs = ansible_doc_json()
    for name in MODULES:
        doc, source = docs[name]["doc"], (LIB / f"{name}.py").read_text()
        own = yaml.safe_load(M[name].DOCUMENTATION)  # before ansible-doc merges fragments
        assert own["extends_documentation_fragment"] == ["marslib.mars.common",
                                                         "marslib.mars.attributes"], name
        for opt in set(mc.COMMON_ARGS) & set(own["options"]):  # reworded, never copied
            assert set(own["options"][opt]) == {"description"}, (name, opt)
        attrs = doc["attributes"]
        assert M[name].MODULE_KWARGS["supports_check_mode"] is True
        assert attrs["check_mode"]["support"] in ("full", "partial"), name
        returns_diff = 'result["diff"]' in source
        assert (attrs["diff_mode"]["support"] != "N/A") == returns_diff, name
        assert attrs["platform"]["platforms"] == "linux"
        assert attrs["action_group"]["membership"] == ["marslib.mars.mars"]
        for ref in doc["seealso"]:
            if ref.get("module", "").startswith(FQCN):
                assert ref["module"].removeprefix(FQCN) in MODULES, (name, ref)
        tasks = [ln.strip() for ln in docs[name]["examples"].splitlines()]
        assert f"{FQCN}{name}:" in tasks, name
        assert not any(ln.startswith("mars_") for ln in tasks), name  # no short names
    assert "timeout" not in yaml.safe_load(M["mars_resize"].DOCUMENTATION)["options"]
    assert "Not used" in docs["mars_info"]["doc"]["options"]["timeout"]["description"][0]
    assert set(docs["mars_info"]["return"]) == {"mars"}  # not ansible_facts


def test_modules_parse_as_python_3_9() -> None:
    """They run on managed hosts with any python3 >= 3.9 and only the standard library (and
    the collection's own module_utils)."""
    import ast
    allowed = {"__future__", "os", "re", "json", "time", "ansible"}
    own = "ansible_collections.marslib.mars.plugins.module_utils"
    for path in [*(LIB / f"{m}.py" for m in MODULES), MODULE_UTILS / "mars_common.py"]:
        tree = ast.parse(path.read_text(), str(path), feature_version=(3, 9))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            names = [n for n in names if not n.startswith(own + ".")]
            assert {n.split(".")[0] for n in names} <= allowed, (path.name, names)


class FakeModule:
    """Just enough of AnsibleModule for Marsadm: records commands, returns canned output."""

    def __init__(self, replies: list[tuple[int, str, str]], **p: Any) -> None:
        self.params = {"marsadm": "/opt/x/marsadm", "root": None, "run_dir": None,
                       "host": None, "timeout": 600.0, **p}
        self.replies = replies
        self.calls: list[tuple[list[str], Any, str | None]] = []
        self.failed: dict[str, Any] | None = None

    def run_command(self, cmd: list[str], data: Any = None, **kw: Any) -> tuple[int, str, str]:
        self.calls.append((cmd, data, os.environ.get("PYTHONPATH")))
        return self.replies.pop(0)

    def fail_json(self, **kw: Any) -> None:
        self.failed = kw
        raise SystemExit(1)


def test_marsadm_runner_argv_stdin_environment_and_errors(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    ok = (0, json.dumps({"ok": True, "changed": True}), "")
    usage = (2, json.dumps({"ok": False, "error": "usage error (see marsadm --help)",
                            "code": 2}), "marsadm: error: argument --ip: expected one argument")
    fake = FakeModule([ok, usage], root="/srv/mars", host="alpha", timeout=30.0)
    m = mc.Marsadm(fake)
    res = m.run(["join-cluster", "10.0.0.1", "--secret-file", "-"], wait=True, data="s3cret" * 4)
    assert res.ok
    cmd, data, pythonpath = fake.calls[0]
    assert cmd == ["/opt/x/marsadm", "join-cluster", "10.0.0.1", "--secret-file", "-", "--json",
                   "--root", "/srv/mars", "--host", "alpha", "--timeout", "30"]
    assert data == "s3cret" * 4 and pythonpath is None  # secret on stdin; PYTHONPATH gone
    with pytest.raises(SystemExit):
        m.run_or_fail(["view"], dry_run=True)
    assert fake.calls[1][0][-1] == "--dry-run" and "--timeout" not in fake.calls[1][0]
    failed = fake.failed or {}
    assert failed["rc"] == 2 and "argument --ip" in failed["msg"]
    assert failed["cmd"][1] == "view" and "expected one" in failed["stderr"]
    nocluster = (1, json.dumps({"ok": False, "code": 1, "error":
                                "/srv/mars holds no cluster: run 'marsadm create-cluster'"}), "")
    assert mc.Marsadm(FakeModule([nocluster])).view() is None
    broken = FakeModule([(1, "Traceback ...", "ImportError: no module named marslib")])
    with pytest.raises(SystemExit):
        mc.Marsadm(broken).view()
    assert broken.failed and broken.failed["msg"] == "ImportError: no module named marslib"


def test_cluster_plan() -> None:
    plan = M["mars_cluster"].plan
    secret = "0123456789abcdef0123"
    t = plan(None, params("mars_cluster", ip="10.0.0.1"))
    assert t["changed"] and t["args"] == ["create-cluster", "--ip", "10.0.0.1"]
    t = plan(None, params("mars_cluster", ip="10.0.0.1", uuid="u-1", secret=secret))
    assert t["args"] == ["create-cluster", "--ip", "10.0.0.1", "--uuid", "u-1",
                         "--secret-file", "-"] and t["data"] == secret
    t = plan(None, params("mars_cluster", ip="10.0.0.2", peer="10.0.0.1", peer_name="alpha",
                          uuid="u-1", secret=secret))
    assert t["action"] == "join-cluster" and secret not in t["args"] and t["data"] == secret
    assert t["args"] == ["join-cluster", "10.0.0.1", "--ip", "10.0.0.2", "--uuid", "u-1",
                         "--secret-file", "-", "--peer-name", "alpha"]
    t = plan(None, params("mars_cluster", ip="10.0.0.2", peer="10.0.0.1", ssh_key="/k",
                          ssh_port=2222, accept_new_host_key=True))
    assert t["args"] == ["join-cluster", "10.0.0.1", "--ip", "10.0.0.2", "--ssh-key", "/k",
                         "--ssh-port", "2222", "--accept-new-host-key"] and t["data"] is None
    t = plan(None, params("mars_cluster", ip="10.0.0.2", peer="10.0.0.1", uuid="u-1"))
    assert not t["changed"] and "together" in t["fail"]
    v = view()
    assert plan(v, params("mars_cluster", ip="10.0.0.2"), "10.0.0.2") == \
        dict(changed=False, action=None, args=[], data=None, fail=None)
    same = plan(v, params("mars_cluster", ip="x", uuid=v["cluster"].upper()), "x")
    assert same["fail"] is None and not same["changed"]
    assert "not u-2" in plan(v, params("mars_cluster", ip="x", uuid="u-2"), "x")["fail"]
    assert "left cluster" in plan(v, params("mars_cluster", ip="x"), None)["fail"]
    t = plan(v, params("mars_cluster", state="absent"), "10.0.0.2")
    assert t["changed"] and t["args"] == ["leave-cluster"]
    assert not plan(v, params("mars_cluster", state="absent"), None)["changed"]
    assert not plan(None, params("mars_cluster", state="absent"))["changed"]


def test_resource_plan(tmp_path: Path) -> None:
    plan = M["mars_resource"].plan
    p = lambda **kw: params("mars_resource", name="r0", **kw)  # noqa: E731
    t = plan(view() | {"resources": {}}, p(device="/dev/vg0/r0", size="32M", wait=True))
    assert t["args"] == ["create-resource", "r0", "/dev/vg0/r0", "--size", str(32 << 20),
                         "--wait"]
    alpha = view(host="alpha")
    assert plan(alpha, p(device="/dev/vg0/r0")) == \
        dict(changed=False, action=None, args=[], fail=None, warnings=[])
    link = tmp_path / "r0-link"
    dev = tmp_path / "dev-r0"
    dev.write_bytes(b"")
    link.symlink_to(dev)
    linked = view(host="alpha", alpha=member("primary", "Primary", str(dev)))
    assert not plan(linked, p(device=str(link)))["changed"]  # the same device, another name
    assert "not /dev/sdz" in plan(alpha, p(device="/dev/sdz"))["fail"]
    assert "size is used only when creating" in \
        plan(alpha, p(device="/dev/vg0/r0", size="1G"))["warnings"][0]
    gamma = view(host="gamma")
    assert "state=joined" in plan(gamma, p(device="/dev/vg0/r0"))["fail"]
    t = plan(gamma, p(state="joined", device="/dev/vg2/r0"))
    assert t["args"] == ["join-resource", "r0", "/dev/vg2/r0", "--wait"]
    t = plan(gamma, p(state="joined", device="/dev/vg2/r0", wait=False))
    assert t["args"] == ["join-resource", "r0", "/dev/vg2/r0"]
    # not known here yet: marsadm waits until it arrives with the metadata
    assert plan(view(host="gamma") | {"resources": {}},
                p(state="joined", device="/d"))["action"] == "join-resource"
    assert plan(view(), p(state="joined", device="/dev/vg1/r0")) == \
        dict(changed=False, action=None, args=[], fail=None, warnings=[])
    syncing = view(beta=member("secondary", "Syncing", "/dev/vg1/r0", syncing=True,
                               sync_progress=0.25), alpha=member("primary", "Primary", "/e"))
    t = plan(syncing, p(state="joined", device="/dev/vg1/r0"))
    assert not t["changed"] and t["args"] == ["wait-resource", "r0", "sync-off"]
    assert plan(syncing, p(state="joined", device="/dev/vg1/r0", wait=False))["args"] == []
    t = plan(view(), p(state="absent"))
    assert t["args"] == ["leave-resource", "r0"]
    assert "force=true" in plan(alpha, p(state="absent"))["fail"]
    t = plan(alpha, p(state="absent", force=True))
    assert t["args"] == ["delete-resource", "r0", "--force"]
    assert not plan(gamma, p(state="absent"))["changed"]
    assert not plan(None, p(state="absent"))["changed"]
    assert "no cluster" in plan(None, p(device="/d"))["fail"]


def test_role_plan() -> None:
    plan = M["mars_role"].plan
    p = lambda **kw: params("mars_role", name="r0", **kw)  # noqa: E731
    assert plan(view(), p())["args"] == ["primary", "r0"]
    assert plan(view(), p(force=True))["args"] == ["primary", "r0", "--force"]
    assert not plan(view(host="alpha"), p())["changed"]
    assert plan(view(host="alpha"), p(role="secondary"))["args"] == ["secondary", "r0"]
    assert not plan(view(), p(role="secondary"))["changed"]
    assert plan(view(primary="(none)"), p())["args"] == ["primary", "r0"]  # after secondary
    assert "not a member" in plan(view(host="gamma"), p())["fail"]
    assert "does not exist" in plan(view(), params("mars_role", name="r9"))["fail"]
    forced = plan(view(host="alpha"), p(role="secondary", force=True))
    assert "role=primary only" in forced["fail"] and not forced["args"]


def test_resize_plan() -> None:
    plan = M["mars_resize"].plan
    p = lambda **kw: params("mars_resize", name="r0", **kw)  # noqa: E731
    alpha = view(host="alpha")
    t = plan(alpha, p(size="64M"))
    assert not t["changed"] and t["old_size"] == t["new_size"] == SIZE
    assert not plan(alpha, p(size=str(SIZE + 100)))["changed"]  # rounded down to 4 KiB
    t = plan(alpha, p(size="1G"))
    assert t["changed"] and t["args"] == ["resize", "r0", str(1 << 30)]
    assert t["new_size"] == 1 << 30
    assert "shrinking" in plan(alpha, p(size="32M"))["fail"]
    assert "on its primary (alpha)" in plan(view(), p(size="1G"))["fail"]
    t = plan(alpha, p())
    assert t["changed"] is None and t["args"] == ["resize", "r0"] and t["new_size"] is None
    assert plan(alpha, p(size="12X"))["fail"].startswith("invalid size '12X'")


def test_info_from_new_and_old_views() -> None:
    facts = M["mars_info"].info
    f = facts(view())
    assert f["cluster"] == view()["cluster"] and f["host"] == "beta" and f["marsd"] is True
    r0 = f["resources"]["r0"]
    assert r0["primary"] == "alpha" and r0["split_brain"] is False and r0["size"] == SIZE
    assert r0["members"]["beta"]["state"] == "UpToDate"
    assert r0["members"]["beta"]["lag_seconds"] == 0.0
    assert r0["members"]["alpha"]["version"] == "0.2.0"
    assert facts(view(), name="r9")["resources"] == {}
    old = view()
    for key in ("version", "marsd_version", "peers"):
        del old[key]
    for m in old["resources"]["r0"]["members"].values():
        del m["version"]
    f = facts(old, version="0.1.0")
    assert f["version"] == "0.1.0" and f["marsd_version"] is None
    assert f["resources"]["r0"]["members"]["alpha"]["version"] is None
    none = facts(None, host="alpha", version="0.2.0")
    assert none["cluster"] is None and none["resources"] == {} and none["marsd"] is False


def test_upgrade_decisions() -> None:
    up = M["mars_upgrade"]
    v = view()
    assert up.up_to_date("0.2.0", v, "0.2.0")
    assert not up.up_to_date("0.2.0", v | {"marsd_version": None}, "0.2.0")  # old marsd
    assert not up.up_to_date("0.1.0", v, "0.2.0")
    assert up.up_to_date("0.2.0", None, "0.2.0")  # no cluster: no marsd to restart
    assert mc.health_problems(v, 64 << 20) == []
    assert mc.health_problems(v | {"marsd": False}, 64 << 20) == ["marsd is not running"]
    lagging = view(beta=member("secondary", "Replaying", "/d", lag_bytes=100 << 20),
                   alpha=member("primary", "Primary", "/e"))
    assert "lags 104857600 bytes" in mc.health_problems(lagging, 64 << 20)[0]
    unknown = view(beta=member("secondary", "Replaying", "/d", lag_bytes=None),
                   alpha=member("primary", "Primary", "/e"))
    assert mc.health_problems(unknown, 64 << 20) == []
    syncing = view(beta=member("secondary", "Syncing", "/d", sync_progress=0.4),
                   alpha=member("primary", "Primary", "/e", error=None))
    assert mc.health_problems(syncing, 64 << 20) == ["r0@beta: Syncing"]
    broken = view(beta=member("secondary", "Error", "/d", error="replay: bad record"),
                  alpha=member("primary", "Primary", "/e"))
    assert mc.health_problems(broken) == ["r0@beta: Error (replay: bad record)"]
    split = view()
    split["resources"]["r0"]["split_brain"] = [{"logfile": 3, "views": {}}]
    assert "split brain" in mc.health_problems(split)[0]
    assert mc.health_problems(view(host="gamma") | {"marsd": True}) == []  # not a member
    wants = up.wanted_states(v)
    assert wants == {"r0": ["UpToDate", "Replaying"]}
    assert up.wanted_states(view(host="alpha")) == {"r0": ["Primary"]}
    assert up.pending(v, "0.2.0", wants) == []
    assert up.pending(v | {"marsd": False}, "0.2.0", wants) == ["marsd is not answering"]
    assert "not 0.3.0" in up.pending(v, "0.3.0", wants)[0]
    down = view(beta=member("secondary", "Detached", "/d"), alpha=member("primary", "Primary",
                                                                          "/e"))
    assert up.pending(down, "0.2.0", wants) == ["r0 is Detached, waiting for UpToDate or "
                                               "Replaying"]
    assert up.wanted_states(down) == {"r0": None}  # detached before: nothing to wait for
    p = params("mars_upgrade", version="0.3.0", source="/srv/m.whl", pip_args=["--no-deps"],
               prefix="/opt/marslib", python="/usr/bin/python3")
    acts = up.plan_actions(p, "/opt/marslib/venv-0.3.0", False, True, True)
    assert acts[1] == "pip install --no-deps /srv/m.whl"
    assert acts[-2] == "restart marsd: systemctl restart marsd"


# ------------------------------------------------------- ansible, for real
def on(h: MarsHost) -> dict[str, str]:
    """Module options that make a task act as host ``h`` (the play has no MARS_* variables)."""
    return {"root": str(h.root), "run_dir": str(h.run_dir), "host": h.name,
            "marsadm": str(BIN / "marsadm")}


def task(module: str, args: dict[str, Any], check: bool = False,
         diff: bool = False) -> dict[str, Any]:
    return {"name": module, FQCN + module: args, "check_mode": check, "diff": diff,
            "ignore_errors": True}


def marsadm_task(h: MarsHost, *args: str) -> dict[str, Any]:
    o = on(h)
    argv = [o["marsadm"], *args, "--root", o["root"], "--run-dir", o["run_dir"], "--host",
            h.name]
    return {"name": "marsadm " + " ".join(args), "ansible.builtin.command": {"argv": argv}}


def play(tmp: Path, *tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the tasks as one ansible-playbook run on localhost; their registered results."""
    n = len(list(tmp.glob("play-*.json")))
    regs = [t.get("register", f"r{i}") for i, t in enumerate(tasks)]
    dest = tmp / f"results-{n}.json"
    body = [dict(t, register=r) for t, r in zip(tasks, regs, strict=True)]
    body.append({"name": "save the results", "ansible.builtin.copy": {
        "content": "{{ [" + ", ".join(regs) + "] | to_json }}", "dest": str(dest)}})
    pb = tmp / f"play-{n}.json"  # JSON is YAML
    pb.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": body}]))
    env = {k: v for k, v in os.environ.items()  # the tasks name their host themselves
           if k not in ("PYTHONPATH", "ANSIBLE_CONFIG") and not k.startswith("MARS_")}
    env.update(ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS),
               ANSIBLE_NOCOLOR="1", ANSIBLE_DEPRECATION_WARNINGS="0",
               ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_RETRY_FILES_ENABLED="0")
    out = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                          "-e", f"ansible_python_interpreter={sys.executable}", str(pb)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp)
    assert out.returncode == 0 and dest.exists(), out.stdout[-3000:] + out.stderr[-2000:]
    results: list[dict[str, Any]] = json.loads(dest.read_text())
    for r in results:
        r["_stdout"] = out.stdout
    return results


def ok(r: dict[str, Any]) -> dict[str, Any]:
    assert not r.get("failed"), r.get("msg")
    return r


STUB_MARSADM = """#!/bin/sh
# marsadm stand-in: `view --json` prints the view in $0.json, `--version` a version
case "$1" in
  view) cat "$0.json" ;;
  --version) echo "marsadm 0.2.0" ;;
  *) echo '{"ok": false, "code": 1, "error": "stub marsadm: only view"}'; exit 1 ;;
esac
"""


def test_info_returns_mars_and_sets_no_fact(tmp_path: Path) -> None:
    """mars_info is an _info module: the view is the result's ``mars``, never a host fact
    (``ansible_facts`` is for *_facts modules), in check mode too."""
    stub = tmp_path / "marsadm"
    stub.write_text(STUB_MARSADM)
    stub.chmod(0o755)
    (tmp_path / "marsadm.json").write_text(json.dumps({"ok": True, **view()}))
    args = {"marsadm": str(stub)}
    facts_seen = "{{ [ansible_facts.mars is defined, mars is defined] }}"
    info, checked, r0, seen = play(
        tmp_path,
        task("mars_info", args),
        task("mars_info", args, check=True),
        task("mars_info", {**args, "name": "r0"}),
        {"name": "no fact", "ansible.builtin.debug": {"msg": facts_seen}})
    for r in (info, checked, r0):
        assert not ok(r)["changed"] and "ansible_facts" not in r, r
        assert r["mars"]["cluster"] == view()["cluster"] and r["mars"]["host"] == "beta"
        assert r["mars"]["resources"]["r0"]["members"]["beta"]["state"] == "UpToDate"
    assert info["mars"] == checked["mars"] == r0["mars"]
    assert seen["msg"] == [False, False]


def grow(dev: BlockDev, size: int) -> None:
    with open(dev.image, "r+b") as f:
        f.truncate(size)
    if dev.loop:
        subprocess.run(["losetup", "-c", dev.loop], check=True)


def wait_link(path: Path, value: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_symlink() and os.readlink(path) == value):
        assert time.monotonic() < deadline, f"{path} never became {value}"
        time.sleep(0.2)


@pytest.mark.skipif(not IS_ROOT, reason="needs root (loop devices)")
def test_modules_drive_a_two_host_cluster(tmp_path: Path) -> None:
    """A cluster's life through the modules. After each check-mode task the real task that
    follows finds the state unchanged (it still changes something)."""
    ip_a, ip_b = loopback_ips(2)
    a = MarsHost(tmp_path / "a", "alpha", ip_a)
    b = MarsHost(tmp_path / "b", "beta", ip_b)
    devs = {"alpha": BlockDev(tmp_path / "a.img", SIZE),
            "beta": BlockDev(tmp_path / "b.img", SIZE)}
    A, B = on(a), on(b)
    r0 = {"name": "r0"}
    uuid, secret = "6f1c3a52-8d0e-4b7a-9c1f-2e5d7a9b0c11", "a" * 12 + os.urandom(16).hex()
    create = {**A, "ip": a.ip, "uuid": uuid, "secret": secret}
    join = {**B, "ip": b.ip, "peer": a.ip, "peer_name": "alpha", "uuid": uuid,
            "secret": secret}
    try:
        # the cluster, the resource (marsd starts it later), beta joins without ssh
        results = play(
            tmp_path,
            task("mars_cluster", create, check=True, diff=True),
            task("mars_cluster", create),
            task("mars_cluster", {**A, "ip": a.ip}),
            task("mars_resource", {**A, **r0, "device": devs["alpha"].path}),
            task("mars_resource", {**A, **r0, "device": devs["alpha"].path}),
            task("mars_cluster", join, check=True),
            task("mars_cluster", join))
        check, created, again, present, again2, join_check, joined = results
        assert ok(check)["changed"] and check["action"] == "create-cluster"
        assert check["diff"] == {"before": {"cluster": None, "member": False},
                                 "after": {"cluster": uuid, "member": True}}
        assert ok(created)["changed"] and created["uuid"] == uuid and created["host"] == "alpha"
        assert (a.root / "secret").read_text().strip() == secret
        assert not ok(again)["changed"] and again["uuid"] == uuid
        assert again["secret_file"] == str(a.root / "secret")
        assert ok(present)["changed"] and present["action"] == "create-resource"
        assert present["state"] == "PrimaryDown" and present["size"] == SIZE
        assert present["device"] == devs["alpha"].path
        assert not ok(again2)["changed"] and again2["action"] is None
        assert ok(join_check)["changed"] and join_check["action"] == "join-cluster"
        assert ok(joined)["changed"] and joined["uuid"] == uuid and joined["host"] == "beta"
        assert (b.root / "secret").read_text().strip() == secret
        assert secret not in joined["_stdout"] and secret not in json.dumps(results)

        new = SIZE + (16 << 20)  # grow both devices now: resized below, after the handover
        grow(devs["alpha"], new)
        grow(devs["beta"], new)
        a.start()
        b.start()
        departed = "'alpha' not in departed.mars.resources.r0.members"
        results = play(
            tmp_path,
            task("mars_resource", {**B, **r0, "state": "joined", "device": devs["beta"].path,
                                   "timeout": 120}),
            task("mars_resource", {**B, **r0, "state": "joined", "device": devs["beta"].path}),
            task("mars_info", B),
            marsadm_task(b, "pause-replay", "r0"),
            task("mars_role", {**B, **r0, "timeout": 60}, check=True),
            marsadm_task(b, "resume-replay", "r0"),
            task("mars_role", {**B, **r0, "timeout": 60}, check=True, diff=True),
            task("mars_info", B, check=True),
            task("mars_role", {**B, **r0, "timeout": 60}),
            task("mars_role", {**B, **r0}),
            task("mars_resize", {**B, **r0}, check=True, diff=True),
            task("mars_resize", {**B, **r0}),
            task("mars_resize", {**B, **r0, "size": "80M"}),
            task("mars_resource", {**A, **r0, "state": "absent"}, diff=True),
            task("mars_resource", {**A, **r0, "state": "absent"}),
            task("mars_resource", {**B, **r0, "state": "absent"}),
            # alpha's departure travels to beta with the metadata
            {"name": "wait", FQCN + "mars_info": B, "register": "departed", "until": departed,
             "retries": 30, "delay": 1},
            task("mars_resource", {**B, **r0, "state": "absent", "force": True}),
            task("mars_cluster", {**A, "state": "absent"}),
            task("mars_cluster", {**A, "state": "absent"}))
        (joined, again, info, _, refused, _, check, info2, role, again2, resize_check, grown,
         again3, left, again4, refused2, _, deleted, gone, again5) = results
        assert ok(joined)["changed"] and joined["bytes"] == SIZE and joined["sync_seconds"] > 0
        assert joined["state"] in ("UpToDate", "Replaying"), joined
        assert not ok(again)["changed"]
        assert "ansible_facts" not in info
        facts = ok(info)["mars"]
        assert facts["cluster"] == uuid and facts["host"] == "beta" and facts["marsd"]
        assert facts["version"] == facts["marsd_version"] == marslib.__version__
        res = facts["resources"]["r0"]
        assert res["primary"] == "alpha" and res["size"] == SIZE and not res["split_brain"]
        assert res["members"]["alpha"]["state"] == "Primary"
        assert res["members"]["beta"]["role"] == "secondary"
        assert res["members"]["beta"]["device"] == devs["beta"].path
        # marsadm refuses the handover (replay paused): its reason, rc and command come
        # through, and check mode already sees it
        assert refused["failed"] and refused["rc"] == 1 and "paused" in refused["msg"], refused
        assert refused["cmd"][1:3] == ["primary", "r0"] and "--dry-run" in refused["cmd"]
        assert ok(check)["changed"] and check["diff"] == {"before": {"primary": "alpha"},
                                                          "after": {"primary": "beta"}}
        after = ok(info2)["mars"]["resources"]["r0"]  # the view is unchanged
        assert {k: after[k] for k in ("primary", "size", "split_brain")} == \
            {k: res[k] for k in ("primary", "size", "split_brain")}
        assert {h: (m["role"], m["device"]) for h, m in after["members"].items()} == \
            {h: (m["role"], m["device"]) for h, m in res["members"].items()}
        assert ok(role)["changed"] and role["old_primary"] == "alpha"
        assert role["new_primary"] == "beta" and role["seconds"] > 0
        assert role["state"] == "Primary" and not role["forced"]
        assert not ok(again2)["changed"] and again2["old_primary"] == "beta"
        # the resource grows to the smallest member device
        assert ok(resize_check)["changed"] and resize_check["old_size"] == SIZE
        assert resize_check["diff"]["before"] == {"size": SIZE}
        assert ok(grown)["changed"] and grown["old_size"] == SIZE and grown["new_size"] == new
        assert not ok(again3)["changed"] and again3["new_size"] == new == 80 << 20
        # alpha leaves; the last member deletes only with force
        assert ok(left)["changed"] and left["action"] == "leave-resource"
        assert left["state"] is None and left["diff"] == {
            "before": {"member": True, "exists": True, "role": "secondary",
                       "device": devs["alpha"].path},
            "after": {"member": False, "exists": True}}
        assert not ok(again4)["changed"]
        assert refused2["failed"] and "force=true" in refused2["msg"]
        assert ok(deleted)["changed"] and deleted["action"] == "delete-resource"
        assert deleted["resource"] is None and b.marsadm("view")["resources"] == {}
        assert ok(gone)["changed"] and not gone["member"]
        assert not ok(again5)["changed"]
    finally:
        for h in (a, b):
            h.stop()
        for d in devs.values():
            d.close()


def make_wheel(out_dir: Path, version: str) -> Path:
    """The working tree's marslib as a wheel of ``version`` (pure Python; built here, so the
    test needs neither a build backend nor a package index)."""
    import base64
    import hashlib
    import zipfile

    dist = f"marslib-{version}.dist-info"
    files: dict[str, bytes] = {}
    for path in sorted((REPO / "marslib").rglob("*.py")):
        data = path.read_bytes()
        if path.relative_to(REPO) == Path("marslib/__init__.py"):
            data = data.replace(f'"{marslib.__version__}"'.encode(), f'"{version}"'.encode())
        files[path.relative_to(REPO).as_posix()] = data
    files[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: marslib\nVersion: {version}\n"
                                 ).encode()
    files[f"{dist}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: marslib-tests\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    files[f"{dist}/entry_points.txt"] = (b"[console_scripts]\nmarsadm = marslib.cli:main\n"
                                         b"marsd = marslib.daemon:main\n")
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out_dir / f"marslib-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return wheel


def stop_pid(pid: int, timeout: float = 30) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


RESTART = """\
import os, signal, subprocess, sys, time
pidfile, marsd, log, *args = sys.argv[1:]

def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True

pid = int(open(pidfile).read())
os.kill(pid, signal.SIGTERM)
deadline = time.monotonic() + 60
while not gone(pid):
    if time.monotonic() > deadline:
        sys.exit("the old marsd did not stop")
    time.sleep(0.05)
with open(log, "ab") as out:
    p = subprocess.Popen([marsd, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True)
with open(pidfile, "w") as f:
    f.write(str(p.pid))
"""


@pytest.mark.skipif(not IS_ROOT, reason="needs root (loop devices)")
def test_upgrade_installs_switches_and_restarts_marsd(tmp_path: Path) -> None:
    new_version = marslib.__version__ + ".post1"
    wheel = make_wheel(tmp_path, new_version)
    prefix = tmp_path / "opt"
    h = MarsHost(tmp_path / "g", "gamma", loopback_ips(1)[0])
    dev = BlockDev(tmp_path / "g.img", SIZE)
    pidfile = tmp_path / "marsd.pid"
    script = tmp_path / "restart.py"
    script.write_text(RESTART)
    G = on(h)
    args = {**G, "version": new_version, "source": str(wheel), "prefix": str(prefix),
            "python": "/usr/bin/python3" if os.path.exists("/usr/bin/python3")
            else sys.executable,
            "pip_args": ["--no-deps", "--no-index"],
            "deps_site_packages": sysconfig.get_paths()["purelib"],
            "restart_command": [sys.executable, str(script), str(pidfile),
                                str(prefix / "current" / "bin" / "marsd"), str(h.log_path),
                                "--root", G["root"], "--run-dir", G["run_dir"], "--host",
                                h.name, "--listen", h.ip, "--metrics", "off"],
            "timeout": 120}
    try:
        h.serve(dev.path)
        assert h.proc is not None
        old_pid = h.proc.pid
        pidfile.write_text(str(old_pid))
        check, probe, upgrade, again = play(
            tmp_path,
            task("mars_upgrade", args, check=True, diff=True),
            {"name": "stat", "ansible.builtin.stat": {"path": str(prefix)}},
            task("mars_upgrade", args),
            task("mars_upgrade", args))
        assert ok(check)["changed"] and check["health"] == {"checked": True, "ok": True,
                                                            "problems": []}
        assert check["diff"] == {"before": {"version": marslib.__version__},
                                 "after": {"version": new_version}}
        assert [a.split()[0] for a in check["actions"]] == ["create", "add", "pip", "switch",
                                                             "restart", "wait"]
        assert check["actions"][2] == "pip install --no-deps --no-index " + str(wheel)
        assert probe["stat"]["exists"] is False  # check mode touched nothing
        assert "install_seconds" not in check
        assert ok(upgrade)["changed"]
        assert upgrade["before"] == {"marsadm": marslib.__version__,
                                     "marsd": marslib.__version__}
        assert upgrade["after"] == {"marsadm": new_version, "marsd": new_version}
        assert upgrade["previous_venv"] is None and upgrade["venv"] == \
            str(prefix / f"venv-{new_version}")
        assert os.readlink(prefix / "current") == f"venv-{new_version}"
        assert upgrade["install_seconds"] > 0 and upgrade["catchup_seconds"] >= 0
        assert upgrade["health"]["problems_after"] == []
        new_pid = int(pidfile.read_text())
        assert new_pid != old_pid and h.proc.poll() is not None  # the old marsd has exited
        view_after = h.marsadm("view")
        assert view_after["marsd_version"] == new_version
        assert view_after["resources"]["r0"]["members"]["gamma"]["state"] == "Primary"
        assert not ok(again)["changed"] and again["health"]["ok"] and again["actions"] == []
        assert again["previous_venv"] == str(prefix / f"venv-{new_version}")

        # an unhealthy host is refused before anything is touched
        stop_pid(new_pid)
        (refused,) = play(tmp_path, task("mars_upgrade", {**args, "version": "9.9.9"}))
        assert refused["failed"] and "not healthy" in refused["msg"]
        assert "marsd is not running" in refused["msg"]
        assert not (prefix / "venv-9.9.9").exists()
    finally:
        if pidfile.exists():
            stop_pid(int(pidfile.read_text()))
        h.stop()
        dev.close()
