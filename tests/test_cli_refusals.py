"""A refused command changes nothing, verb by verb; bad options are usage errors.

marsadm runs in this process (``cli.main``) on a real state root; marsd is not running,
which is itself the refusal for every verb that needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from marslib import cli
from marslib.meta import MetaStore
from marslib.schema import ResourceKeys


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """Every link and file under the root with its value (or size) and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            value = os.readlink(path) if os.path.islink(path) else str(st.st_size)
            out[os.path.relpath(path, root)] = (value, st.st_mtime_ns)
    return out


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "mars"
        self.common = ["--root", str(self.root), "--run-dir", str(tmp / "run"),
                       "--host", "alpha"]

    def device(self, name: str, size: int = 1 << 24) -> str:
        path = self.tmp / name
        with open(path, "wb") as f:
            f.truncate(size)
        return str(path)

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main([*self.common, *argv])
        out = capsys.readouterr()
        return code, out.out, out.err


@pytest.fixture
def env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Env:
    e = Env(tmp_path)
    assert e.run(capsys, "create-cluster", "--ip", "10.0.0.1")[0] == 0
    assert e.run(capsys, "create-resource", "r0", e.device("d0"))[0] == 0
    meta = MetaStore(e.root)
    meta.set(ResourceKeys("r0").todo("alpha", "attach"), "0")  # as after 'down'
    # r1: beta is primary, alpha a synced secondary; r2: beta's alone
    for name, members in (("r1", ("beta", "alpha")), ("r2", ("beta",))):
        k = ResourceKeys(name)
        for host in members:
            meta.set(k.data(host), f"/dev/{host}-{name}")
            meta.set(k.syncstatus(host), "done")
            meta.set(k.todo(host, "attach"), "1")
            meta.set(k.device_size(host), str(1 << 24))
        meta.set(k.primary, "beta")
        meta.set(k.size, str(1 << 24))
    return e


REFUSED = [
    ("up", "r0"),
    ("attach", "r0"),
    ("up", "r0", "--device"),
    ("primary", "r1"),
    ("primary", "--force", "r1"),
    ("secondary", "r0"),
    ("log-rotate", "r0"),
    ("wait-resource", "r0", "up-to-date"),
    ("attach-device", "r0"),
    ("attach-device", "r1"),
    ("create-resource", "r9", "@d9", "--wait"),
    ("create-resource", "r0", "@d9"),
    ("create-resource", "r9", "/nonexistent/device"),
    ("create-resource", "r9", "@d0"),
    ("join-resource", "r2", "@d9", "--wait"),
    ("join-resource", "r1", "@d9"),
    ("invalidate", "r1", "--wait"),
    ("invalidate", "r0"),
    ("invalidate", "r2"),
    ("leave-resource", "r0"),
    ("resize", "r1"),
    ("resize", "r0", "4096"),
    ("delete-resource", "r1"),
    ("create-cluster",),
    ("join-cluster", "10.0.0.2", "--ip", "10.0.0.1", "--from-root", "/nonexistent"),
    ("leave-cluster",),
    ("view", "r7"),
    ("log-delete", "r7"),
]


@pytest.mark.parametrize("argv", REFUSED, ids=[" ".join(a) for a in REFUSED])
def test_a_refused_verb_changes_nothing(env: Env, capsys: pytest.CaptureFixture[str],
                                        argv: tuple[str, ...]) -> None:
    args = [env.device(a[1:]) if a.startswith("@") else a for a in argv]
    before = tree_state(env.root)
    code, out, err = env.run(capsys, *args)
    assert code == 1, (code, out, err)
    assert err.startswith(f"marsadm {argv[0]}: ") and "Traceback" not in err
    assert tree_state(env.root) == before, f"{' '.join(argv)} changed the tree"


def test_primary_on_the_primary_says_nothing_changes(env: Env,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    before = tree_state(env.root)
    for extra in ((), ("--dry-run",)):
        code, out, _ = env.run(capsys, "primary", "r0", *extra)
        assert code == 0 and "alpha is already the primary of r0: nothing changes" in out
    assert tree_state(env.root) == before


USAGE = [
    (("--timeout", "-1", "view"), "--timeout"),
    (("--timeout", "0", "view"), "--timeout"),
    (("view", "--timeout", "nan"), "--timeout"),
    (("view", "--timeout", "abc"), "--timeout"),
    (("create-resource", "r5", "@d5", "--size", "1000"), "--size"),
    (("create-resource", "r5", "@d5", "--size", "abc"), "--size"),
    (("create-resource", "r5", "@d5", "--size", "0"), "--size"),
    (("resize", "r0", "1001"), "size"),
    (("cron", "--rotate-age", "-5"), "--rotate-age"),
    (("cron", "--rotate-size", "0"), "--rotate-size"),
    (("join-cluster", "peer", "--ip", "bad ip!"), "--ip"),
    (("join-cluster", "peer", "--ip", "10.0.0.3", "--ssh-port", "70000"), "--ssh-port"),
    (("create-cluster", "--uuid", "not-a-uuid"), "--uuid"),
    (("view", "bad/name"), "resource"),
    (("--host", "bad host", "view"), "--host"),
]


@pytest.mark.parametrize("argv, option", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_a_bad_option_is_a_usage_error_naming_it(env: Env,
                                                  capsys: pytest.CaptureFixture[str],
                                                  argv: tuple[str, ...], option: str) -> None:
    args = [env.device(a[1:]) if a.startswith("@") else a for a in argv]
    before = tree_state(env.root)
    code, out, err = env.run(capsys, *args)
    assert code == 2, (code, out, err)
    assert f"argument {option}" in err and "Traceback" not in err, err
    assert tree_state(env.root) == before
    code, out, _ = env.run(capsys, *args, "--json")
    assert code == 2 and '"code": 2' in out and option in out
