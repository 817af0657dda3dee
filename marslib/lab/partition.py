"""Network partitions between two lab hosts: iptables DROP in both namespaces.

Incoming packets from the peer are dropped in ``filter INPUT``; outgoing ones in ``raw
OUTPUT``, which runs before the nat REDIRECT to the WAN proxy, so a partitioned path stays
silent (connects time out) whether or not it is shaped.
"""

from __future__ import annotations

import logging

from marslib.lab import firewall
from marslib.lab.state import LabState

log = logging.getLogger("marslib.lab")


def apply(state: LabState) -> None:
    """Make the partition chains of every host hold exactly ``state.partitions``."""
    ips = {h.name: h.ip for h in state.hosts}
    for h in state.hosts:
        assert h.netns is not None
        peers = sorted({b if a == h.name else a for a, b in state.partitions
                        if h.name in (a, b)})
        firewall.set_rules(h.netns, firewall.PART_IN,
                           [["-s", ips[p], "-j", "DROP"] for p in peers])
        firewall.set_rules(h.netns, firewall.PART_OUT,
                           [["-d", ips[p], "-j", "DROP"] for p in peers])
    log.info("lab: partitions %s", state.partitions or "none")


def add(state: LabState, a: str, b: str) -> bool:
    pair = sorted((a, b))
    if pair in state.partitions:
        return False
    state.partitions.append(pair)
    return True


def remove(state: LabState, a: str, b: str) -> bool:
    pair = sorted((a, b))
    if pair not in state.partitions:
        return False
    state.partitions.remove(pair)
    return True
