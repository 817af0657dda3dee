"""The block device node through marsadm: up --device, view, down and detach-device
refusing while it is mounted (and changing nothing then), handover refused while the old
primary has a node."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BlockDev, MarsHost, loopback_ips, wait_until
from test_cli_refusals import tree_state
from test_devnode import Node, needs_node_tools

pytestmark = needs_node_tools
SIZE = 64 << 20


@pytest.fixture
def primary(host: MarsHost, blockdev: BlockDev, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    n = Node(host, tmp_path)
    monkeypatch.setenv("MARS_DEV_DIR", str(n.dev_dir))
    host.marsadm("create-cluster", "--ip", host.ip)
    host.marsadm("create-resource", "r0", blockdev.path)
    host.start()
    try:
        yield n
    finally:
        n.cleanup()


def switches(host: MarsHost) -> dict[str, tuple[str, int]]:
    """What an operator's verb writes (marsd keeps moving replay-HOST itself)."""
    return {k: v for k, v in tree_state(host.root).items()
            if "/todo-" in k or k.endswith("/primary") or k.endswith("/size")}


def member_view(host: MarsHost) -> dict:  # type: ignore[type-arg]
    return host.marsadm("view")["resources"]["r0"]["members"][host.name]


def test_up_device_view_and_down_refused_while_mounted(primary: Node) -> None:
    host = primary.host
    out = host.marsadm("up", "r0", "--device")
    assert out["changed"] and out["node"] == str(primary.link)
    assert member_view(host)["device_node"] == str(primary.link)
    text = subprocess.run([str(Path(__file__).parents[1] / "bin" / "marsadm"), "view"],
                          capture_output=True, text=True, env=host.env).stdout
    row = next(x for x in text.splitlines() if x.startswith("r0 "))
    assert row.split()[-1] == str(primary.link), text
    assert host.marsadm("attach-device", "r0")["changed"] is False  # idempotent
    subprocess.run(["mkfs.ext4", "-q", "-F", str(primary.link)], check=True)
    primary.mount()
    before = switches(host)
    for verb in (("down", "r0"), ("down", "r0", "--force"), ("detach-device", "r0"),
                 ("secondary", "r0")):
        r = host.marsadm(*verb, check=False)
        assert r["rc"] == 1 and "in use" in r["error"] and str(primary.mnt) in r["error"], r
        assert host.status("r0").get("role") == "primary", f"{verb} stopped the primary"
    assert switches(host) == before, "a refused verb changed the tree"
    primary.umount()
    # unmounted: down takes the node away itself, then stops the resource
    assert host.marsadm("down", "r0")["changed"]
    assert not primary.link.exists()
    assert member_view(host)["device_node"] is None


def test_handover_refused_while_the_old_primary_has_a_node(
        primary: Node, tmp_path: Path) -> None:
    alpha = primary.host
    alpha.marsadm("up", "r0", "--device")
    ip_b, = loopback_ips(1)
    beta = MarsHost(tmp_path / "b", "beta", ip_b)
    dev_b = BlockDev(tmp_path / "b.img", SIZE)
    try:
        beta.join(alpha, dev_b.path)
        wait_until(lambda: beta.marsadm("view")["resources"]["r0"]["members"]["alpha"]
                   ["device_node"] == str(primary.link), "beta sees alpha's node")
        r = beta.marsadm("primary", "r0", check=False)
        assert r["rc"] == 1 and "block device" in r["error"] and "detach-device" in r["error"]
        alpha.marsadm("detach-device", "r0")
        wait_until(lambda: beta.marsadm("view")["resources"]["r0"]["members"]["alpha"]
                   ["device_node"] is None, "beta sees the node gone")
        assert beta.marsadm("primary", "r0")["changed"]
    finally:
        beta.stop()
        dev_b.close()
