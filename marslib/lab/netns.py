"""The lab network: a bridge in the root namespace and one namespace per host on a veth.

No default route is set in a namespace: a lab host reaches only the other lab hosts and
the bridge address, never anything beyond this machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from marslib.lab.addresses import Net
from marslib.lab.errors import LabCommandError
from marslib.lab.run import run

log = logging.getLogger("marslib.lab")

NETNS_DIR = Path("/run/netns")


def _forward_rule(net: Net) -> list[str]:
    return ["FORWARD", "-i", net.bridge, "-o", net.bridge, "-m", "comment",
            "--comment", f"mars-lab {net.bridge}", "-j", "ACCEPT"]


def create_bridge(net: Net) -> None:
    run(["ip", "link", "add", net.bridge, "type", "bridge"])
    run(["ip", "addr", "add", f"{net.gateway}/24", "dev", net.bridge])
    run(["ip", "link", "set", net.bridge, "up"])
    # bridged frames pass the root namespace's iptables (bridge-nf-call-iptables); make sure
    # a FORWARD policy of DROP does not stop traffic between lab hosts
    if shutil.which("iptables"):
        run(["iptables", "-I", *_forward_rule(net)])
    log.info("lab: bridge %s %s", net.bridge, net.subnet)


def create_host(net: Net, i: int) -> str:
    """Namespace, veth pair (``eth0`` inside) and address for host ``i``; returns the netns."""
    ns = net.netns(i)
    assert ns is not None
    veth = net.veth(i)
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "link", "set", veth, "master", net.bridge, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{net.ip(i)}/24", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    log.info("lab: host lab%d netns %s ip %s", i, ns, net.ip(i))
    return ns


def namespaces(net: Net) -> list[str]:
    """The namespaces of this lab net that exist now (whatever state.json says)."""
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(NETNS_DIR) if net.owns_netns(n))
    return []


def netns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def nets_in_use() -> set[int]:
    """Lab nets with a bridge or namespace on this machine."""
    used = set()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir("/sys/class/net"):
            if name.startswith("marslab") and name[7:].isdigit():
                used.add(int(name[7:]))
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(NETNS_DIR):
            head = name.split("-", 1)[0]
            if head == "marslab":
                used.add(0)
            elif head.startswith("marslab") and head[7:].isdigit():
                used.add(int(head[7:]))
    return used


def destroy(net: Net) -> None:
    """Delete the namespaces, veths, bridge and FORWARD rule of ``net`` (processes first!)."""
    for ns in namespaces(net):
        try:
            run(["ip", "netns", "del", ns])
        except LabCommandError as exc:
            log.warning("lab: cannot delete netns %s: %s", ns, exc)
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir("/sys/class/net"):
            if name.startswith(net.veth_prefix) and name[len(net.veth_prefix):].isdigit():
                run(["ip", "link", "del", name], check=False)
    if link_exists(net.bridge):
        run(["ip", "link", "del", net.bridge], check=False)
    if shutil.which("iptables"):
        for _ in range(100):
            if run(["iptables", "-D", *_forward_rule(net)], check=False).returncode != 0:
                break
