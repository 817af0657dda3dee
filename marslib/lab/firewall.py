"""iptables chains owned by the lab inside a host's namespace, rebuilt whole on each change.

Each mechanism (loss, partitions, the WAN proxy redirect) has its own chain, hooked once
into the built-in chain; changing it means flushing the chain and adding the rules the
lab state asks for, so the rules always match state.json exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from marslib.lab.run import ns_prefix, run

LOSS = ("filter", "MARSLAB-LOSS", "INPUT")
PART_IN = ("filter", "MARSLAB-PART", "INPUT")
PART_OUT = ("raw", "MARSLAB-PART", "OUTPUT")  # raw: before the nat REDIRECT to the proxy
WAN = ("nat", "MARSLAB-WAN", "OUTPUT")

Chain = tuple[str, str, str]


def _ipt(netns: str, table: str, *args: str, check: bool = True) -> int:
    return run([*ns_prefix(netns), "iptables", "-w", "-t", table, *args],
               check=check).returncode


def set_rules(netns: str, chain: Chain, rules: Sequence[Sequence[str]]) -> None:
    """Make ``chain`` in ``netns`` hold exactly ``rules`` (each the args after ``-A CHAIN``)."""
    table, name, hook = chain
    if _ipt(netns, table, "-n", "-L", name, check=False) != 0:
        _ipt(netns, table, "-N", name)
    if _ipt(netns, table, "-C", hook, "-j", name, check=False) != 0:
        _ipt(netns, table, "-I", hook, "-j", name)
    _ipt(netns, table, "-F", name)
    for rule in rules:
        _ipt(netns, table, "-A", name, *rule)


def dump(netns: str) -> str:
    return run([*ns_prefix(netns), "iptables-save"], check=False).stdout
