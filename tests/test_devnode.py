"""The block device node /dev/mars/R (marslib/devnode) with a real marsd primary.

The nbdfuse + loop path runs here for real (root, nbdfuse, losetup); the kernel nbd path
cannot (no nbd module on these machines): its choice and command lines are tested.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, BlockDev, MarsHost, have_libnbd, nbd_client, wait_until

from marslib import control
from marslib.devnode import FUSE, KERNEL, choose_backend, kernel, node, system
from marslib.devnode.common import NodePaths, State
from marslib.errors import Refused
from marslib.meta import MetaStore
from marslib.schema import ResourceKeys

TOOLS = ("nbdfuse", "losetup", "fusermount3", "mkfs.ext4")
needs_node_tools = pytest.mark.skipif(
    not IS_ROOT or not all(shutil.which(t) for t in TOOLS) or not have_libnbd(),
    reason="needs root, " + ", ".join(TOOLS) + " and python3-libnbd")

R = "r0"
MiB = 1 << 20


# ------------------------------------------------------------------ helpers
class Node:
    """One test's node: where it is, what the test mounted, cleanup that always runs."""

    def __init__(self, host: MarsHost, base: Path) -> None:
        self.host = host
        self.dev_dir = base / "dev"
        self.mnt = base / "mnt"
        self.mnt.mkdir()
        host.env["MARS_DEV_DIR"] = str(self.dev_dir)
        self.paths = NodePaths(R, host.run_dir)

    @property
    def link(self) -> Path:
        return self.dev_dir / R

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        return control.request(self.host.run_dir / "marsd.sock", cmd, **args)

    def device_status(self) -> dict[str, Any] | None:
        st: dict[str, Any] | None = self.host.status(R).get("device_node")
        return st

    def mount(self) -> None:
        subprocess.run(["mount", "-t", "ext4", str(self.link), str(self.mnt)], check=True)

    def umount(self) -> None:
        if system.mounts_at(self.mnt):
            if subprocess.run(["umount", str(self.mnt)]).returncode != 0:
                subprocess.run(["umount", "-l", str(self.mnt)])

    def cleanup(self) -> None:
        self.umount()
        self.host.stop()
        with contextlib.suppress(Exception):
            node.detach(R, self.host.run_dir, timeout=10)
        for loop in system.loops_backed_by(self.paths.nbd_file):  # whatever is left
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        if system.mounts_at(self.paths.fuse_dir):
            subprocess.run(["fusermount3", "-u", "-z", str(self.paths.fuse_dir)],
                           capture_output=True)


@pytest.fixture
def dn(host: MarsHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    n = Node(host, tmp_path)
    monkeypatch.setenv("MARS_DEV_DIR", str(n.dev_dir))
    try:
        yield n
    finally:
        n.cleanup()


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(length))


def write_node(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_node(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # not the page cache: the export
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def read_export(host: MarsHost, offset: int, length: int) -> bytes:
    """Read through a new connection to the NBD export (libnbd), not through the node."""
    out = nbd_client(host.nbd_uri(R), "pread", str(offset), str(length))
    return bytes.fromhex(out.stdout.strip())


def healthy_node(n: Node) -> dict[str, Any] | None:
    st = n.device_status()
    return st if st and st.get("healthy") else None


# ------------------------------------------------------------------ with marsd
@needs_node_tools
def test_attach_write_mount_refuse_detach(dn: Node, blockdev: BlockDev) -> None:
    host = dn.host
    host.serve(blockdev.path)
    reply = dn.request("attach-device", resource=R)
    assert reply["changed"] is True and reply["node"] == str(dn.link)
    assert reply["backend"] == FUSE and reply["healthy"] is True
    loop = os.readlink(dn.link)
    assert loop.startswith("/dev/loop") and loop == reply["device"]
    assert dn.request("attach-device", resource=R)["changed"] is False  # idempotent
    meta = MetaStore(host.root)
    assert meta.get(ResourceKeys(R).todo(host.name, "device")) == "1"
    assert meta.get(ResourceKeys(R).actual(host.name, "device")) == str(dn.link)
    st = dn.device_status()
    assert st is not None and st["node"] == str(dn.link) and st["device"] == loop

    # bytes written through the node are what the export serves
    data = pattern(3, MiB)
    write_node(dn.link, 5 * MiB, data)
    assert read_export(host, 5 * MiB, MiB) == data

    # a filesystem on it; detach refused while it is mounted, naming the mount point
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1",
                    str(dn.link)], check=True)
    dn.mount()
    (dn.mnt / "hello").write_text("through /dev/mars")
    subprocess.run(["sync", "-f", str(dn.mnt / "hello")], check=True)
    with pytest.raises(Refused, match=f"mounted at {dn.mnt}"):
        dn.request("detach-device", resource=R)
    assert os.readlink(dn.link) == loop  # left as it was
    dn.umount()

    reply = dn.request("detach-device", resource=R)
    assert reply["changed"] is True and reply["attached"] is False
    assert not dn.link.exists() and not os.path.lexists(dn.link)
    assert system.loops_backed_by(dn.paths.nbd_file) == []
    assert system.mounts_at(dn.paths.fuse_dir) == []
    assert not system.process_alive(reply_pid := st["client_pid"], "nbdfuse"), reply_pid
    assert meta.get(ResourceKeys(R).actual(host.name, "device")) is None
    assert meta.get(ResourceKeys(R).todo(host.name, "device")) == "0"
    assert dn.request("detach-device", resource=R)["changed"] is False

    # attached again: the filesystem written before is there
    dn.request("attach-device", resource=R)
    dn.mount()
    assert (dn.mnt / "hello").read_text() == "through /dev/mars"


@needs_node_tools
def test_attach_refused_where_not_primary(dn: Node, blockdev: BlockDev) -> None:
    host = dn.host
    host.serve(blockdev.path)
    host.marsadm("down", R)
    with pytest.raises(Refused, match="not running as primary"):
        dn.request("attach-device", resource=R)
    assert not os.path.lexists(dn.link)


@needs_node_tools
def test_marsd_restart_rebuilds_the_node(dn: Node, blockdev: BlockDev) -> None:
    host = dn.host
    host.serve(blockdev.path)
    first = dn.request("attach-device", resource=R)
    data = pattern(9, MiB)
    write_node(dn.link, 2 * MiB, data)

    host.kill9()  # marsd and its workers; nbdfuse runs in a session of its own
    assert system.process_alive(first["client_pid"], "nbdfuse")
    info = wait_until(lambda: (i := node.node_state(R, host.run_dir)) and not i.healthy and i,
                      "the node is seen stale once its export is gone (the workers end)")
    assert info.problem and "NBD export" in info.problem

    host.start()
    st = wait_until(lambda: (s := healthy_node(dn)) and s["client_pid"] !=
                    first["client_pid"] and s, "marsd rebuilds the node after its restart")
    assert os.readlink(dn.link) == st["device"]
    assert read_node(dn.link, 2 * MiB, MiB) == data
    more = pattern(11, MiB)
    write_node(dn.link, 7 * MiB, more)
    assert read_export(host, 7 * MiB, MiB) == more
    assert not system.process_alive(first["client_pid"], "nbdfuse")  # the old one is gone
    assert len(system.loops_backed_by(dn.paths.nbd_file)) == 1


@needs_node_tools
def test_restart_under_a_mount_waits_for_the_umount(dn: Node, blockdev: BlockDev) -> None:
    """The honest limit of the FUSE path: a mounted node loses its connection when marsd
    restarts; marsd reports it and rebuilds the node once it is unmounted."""
    host = dn.host
    host.serve(blockdev.path)
    dn.request("attach-device", resource=R)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(dn.link)], check=True)
    dn.mount()
    (dn.mnt / "kept").write_text("synced before the restart")
    subprocess.run(["sync", "-f", str(dn.mnt / "kept")], check=True)

    host.kill9()
    host.start()
    st = wait_until(lambda: (s := dn.device_status()) and s.get("note") and s,
                    "marsd reports the stale node it cannot rebuild")
    assert not st["healthy"] and f"mounted at {dn.mnt}" in st["note"]
    assert os.path.lexists(dn.link)

    dn.umount()
    wait_until(lambda: healthy_node(dn), "marsd rebuilds the node after the umount")
    dn.mount()
    assert (dn.mnt / "kept").read_text() == "synced before the restart"


@needs_node_tools
def test_primary_stays_while_its_node_is_mounted(dn: Node, blockdev: BlockDev) -> None:
    host = dn.host
    host.serve(blockdev.path)
    dn.request("attach-device", resource=R)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(dn.link)], check=True)
    dn.mount()
    meta = MetaStore(host.root)
    meta.set(ResourceKeys(R).todo(host.name, "attach"), "0")  # what 'down' asks for
    dn.request("reconcile")
    st = host.status(R)
    assert st.get("role") == "primary", "the primary stopped under a mounted node"
    assert f"mounted at {dn.mnt}" in (st["device_node"]["note"] or "")

    dn.umount()
    dn.request("reconcile")
    wait_until(lambda: not host.status(R), "the primary stops once the node is unmounted")
    assert not os.path.lexists(dn.link)
    assert system.loops_backed_by(dn.paths.nbd_file) == []


# ------------------------------------------------------------------ kernel path
def fake_sys_block(base: Path, connected: dict[int, int]) -> Path:
    """/sys/block with nbd0..nbd11; ``connected``: device number -> client pid."""
    for i in range(12):
        (base / f"nbd{i}").mkdir(parents=True)
        if i in connected:
            (base / f"nbd{i}" / "pid").write_text(f"{connected[i]}\n")
    return base


def test_kernel_backend_is_chosen_where_the_module_is(tmp_path: Path) -> None:
    assert choose_backend(tmp_path / "module" / "nbd") == FUSE
    (tmp_path / "module" / "nbd").mkdir(parents=True)
    assert choose_backend(tmp_path / "module" / "nbd") == KERNEL
    # this machine: no nbd module, so the FUSE path
    assert choose_backend() == (KERNEL if Path("/sys/module/nbd").is_dir() else FUSE)


def test_kernel_command_lines(tmp_path: Path) -> None:
    sock = Path("/run/mars/r0.nbd")
    assert kernel.connect_command("r0", sock, "/dev/nbd3") == [
        "nbd-client", "-unix", "/run/mars/r0.nbd", "/dev/nbd3", "-name", "r0",
        "-block-size", "4096", "-persist", "-nonetlink"]
    assert kernel.check_command("/dev/nbd3") == ["nbd-client", "-c", "/dev/nbd3"]
    assert kernel.disconnect_command("/dev/nbd3") == ["nbd-client", "-d", "/dev/nbd3"]
    sys_block = fake_sys_block(tmp_path / "block", {0: 100, 1: 101, 2: 102})
    assert kernel.free_device(sys_block) == "/dev/nbd3"
    full = fake_sys_block(tmp_path / "full", {i: 100 + i for i in range(12)})
    with pytest.raises(Refused, match="no free /dev/nbdN"):
        kernel.free_device(full)


def test_kernel_build_runs_nbd_client_on_a_free_device(tmp_path: Path) -> None:
    """What attach runs on a kernel with nbd, with nbd-client and the kernel played by a
    function (neither exists here)."""
    import socket as socketlib
    sock_path = tmp_path / "r0.nbd"
    listener = socketlib.socket(socketlib.AF_UNIX)
    listener.bind(str(sock_path))
    sys_block = fake_sys_block(tmp_path / "block", {0: 100})
    ran: list[list[str]] = []

    def runner(cmd: list[str], log_path: Path) -> int:
        ran.append(cmd)
        (sys_block / Path(cmd[3]).name / "pid").write_text("4242\n")  # "connected"
        return 0

    try:
        paths = NodePaths("r0", tmp_path)
        state = kernel.build(paths, sock_path, 5, runner=runner, sys_block=sys_block)
    finally:
        listener.close()
    assert ran == [kernel.connect_command("r0", sock_path, "/dev/nbd1")]
    st = sock_path.stat()
    assert state == State(KERNEL, "/dev/nbd1", str(sock_path), f"{st.st_ino}:{st.st_ctime_ns}",
                          4242, 1)

    def failing(cmd: list[str], log_path: Path) -> int:
        return 1
    listener = socketlib.socket(socketlib.AF_UNIX)
    sock_path.unlink()
    listener.bind(str(sock_path))
    try:
        with pytest.raises(system.CommandFailed, match="nbd-client -unix"):
            kernel.build(NodePaths("r0", tmp_path), sock_path, 5, runner=failing,
                         sys_block=sys_block)
    finally:
        listener.close()


def test_no_node_no_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARS_DEV_DIR", str(tmp_path / "dev"))
    assert node.node_state("r9", tmp_path) is None
    assert node.in_use("r9", tmp_path) is None
    assert node.detach("r9", tmp_path) == []
    with pytest.raises(Refused, match="no NBD export"):
        node.attach("r9", tmp_path / "r9.nbd", tmp_path, backend=FUSE)
    assert not os.path.lexists(tmp_path / "dev" / "r9")


# ------------------------------------------------------------------ Ansible
def test_ansible_device_node_plan() -> None:
    """mars_resource's device_node: attach where primary, nothing on a secondary, detach
    only where a node exists (marsadm view's member field ``device_node``)."""
    from test_ansible_modules import M, member, params, view
    mod = M["mars_resource"]
    alpha = member("primary", "Primary", "/dev/vg0/r0")
    beta = member("secondary", "UpToDate", "/dev/vg1/r0")
    on_alpha = view(host="alpha", alpha=alpha, beta=beta)
    p = params("mars_resource", name="r0", device="/dev/vg0/r0", device_node=True)
    assert mod.plan_node(on_alpha, p) == ["attach-device", "r0"]
    assert mod.plan_node(view(host="beta", alpha=alpha, beta=beta), p) is None
    off = params("mars_resource", name="r0", device="/dev/vg0/r0")
    assert off["device_node"] is False
    assert mod.plan_node(on_alpha, off) is None  # no node: nothing to do
    with_node = view(host="alpha", alpha={**alpha, "device_node": "/dev/mars/r0"}, beta=beta)
    assert mod.plan_node(with_node, off) == ["detach-device", "r0"]
    gone = params("mars_resource", name="r0", state="absent")
    assert mod.plan_node(with_node, gone) is None
    # check mode, resource not there yet: a create would make this host its primary
    assert mod.plan_node(view(host="gamma"), {**p, "name": "r1"}, check_mode=True) == \
        ["attach-device", "r1"]
    create = mod.plan(view(host="gamma"), {**p, "name": "r1"})
    assert create["action"] == "create-resource" and "--wait" in create["args"]
