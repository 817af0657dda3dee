"""Common lab set-ups: a cluster with one resource replicated to some hosts."""

from __future__ import annotations

from marslib.lab.lab import Lab


def replicate(lab: Lab, resource: str = "r0", primary: str = "lab1",
              secondaries: tuple[str, ...] = ("lab2",), timeout: float = 300) -> None:
    """On ``primary``: create the cluster and ``resource`` on its first device and start
    marsd; on each secondary: join the cluster over ssh with the lab key, start marsd and
    join the resource (waiting for the full sync)."""
    first = lab.host(primary)
    lab.marsadm(primary, "create-cluster", "--ip", first.ip)
    lab.marsadm(primary, "create-resource", resource, first.devices[0])
    lab.marsd_start(primary)
    lab.marsadm(primary, "up", resource)
    for name in secondaries:
        host = lab.host(name)
        lab.marsadm(name, "join-cluster", first.ip, "--ip", host.ip, "--ssh-key",
                    str(lab.key), "--remote-root", str(first.root), "--accept-new-host-key")
        lab.marsd_start(name)
        lab.marsadm(name, "join-resource", resource, host.devices[0], "--wait",
                    timeout=timeout)
