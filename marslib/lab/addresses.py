"""Names and addresses of one lab network: bridge, namespaces, veths, IPs.

Net 0 is the default lab (``/var/tmp/mars-lab``): bridge ``marslab0`` with 10.77.0.1/24,
host i at 10.77.0.(10+i) in namespace ``marslab-labI``. A lab in another directory gets a
free net k >= 1 (``marslabK``, 10.77.K.0/24, ``marslabK-labI``) so that a test lab never
disturbs a developer's lab. Without root, hosts are addresses 127.0.K.(10+i) on loopback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HOSTS = 240
MAX_NET = 250


@dataclass(frozen=True)
class Net:
    index: int
    local: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index <= MAX_NET:
            raise ValueError(f"lab net {self.index} out of range 0..{MAX_NET}")

    @property
    def bridge(self) -> str:
        return f"marslab{self.index}"

    @property
    def netns_prefix(self) -> str:
        return "marslab-" if self.index == 0 else f"marslab{self.index}-"

    @property
    def veth_prefix(self) -> str:
        return f"ml{self.index}h"

    @property
    def prefix(self) -> str:
        return f"127.0.{self.index}" if self.local else f"10.77.{self.index}"

    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace (ssh and Ansible come from here)."""
        return f"{self.prefix}.1"

    @property
    def subnet(self) -> str:
        return f"{self.prefix}.0/24"

    def netns(self, i: int) -> str | None:
        return None if self.local else f"{self.netns_prefix}{host_name(i)}"

    def veth(self, i: int) -> str:
        """The bridge-side end of host i's veth pair (the namespace side is ``eth0``)."""
        return f"{self.veth_prefix}{i}"

    def ip(self, i: int) -> str:
        if not 1 <= i <= MAX_HOSTS:
            raise ValueError(f"lab host number {i} out of range 1..{MAX_HOSTS}")
        return f"{self.prefix}.{10 + i}"

    def owns_netns(self, name: str) -> bool:
        return re.fullmatch(re.escape(self.netns_prefix) + r"lab\d+", name) is not None


def host_name(i: int) -> str:
    return f"lab{i}"
