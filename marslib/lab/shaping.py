"""Link shaping without netem: tbf for rate, iptables for loss, the WAN proxy for delay/storms.

Each host has one link (its veth) with a profile. A packet from P to X crosses P's link and
then X's link, so: the rate is tbf on both ends of each link (namespace side = upload,
bridge side = download); loss on the path P->X is 1-(1-loss_P)(1-loss_X), dropped at X's
INPUT; a TCP connection from X to P on the MARS ports goes through X's proxy with a one-way
delay of delay_X + delay_P in each direction, and the storms of both links.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marslib.lab import firewall, proxyctl
from marslib.lab.profiles import (
    DEFAULT_STORM_BASE,
    StormSpec,
    parse_loss,
    parse_rate,
    parse_storm,
    parse_time,
    tc_burst,
)
from marslib.lab.run import run
from marslib.lab.state import HostState, LabState, LinkProfile, host_dir

log = logging.getLogger("marslib.lab")

FAR_PROFILE = {"rate": "100mbit", "delay": "25ms"}  # --secondaries-far: lab2.. get this


@dataclass(frozen=True)
class Link:
    rate: float | None = None
    delay: float = 0.0
    loss: float = 0.0
    storm: StormSpec | None = None
    since: float = 0.0

    @classmethod
    def parse(cls, p: LinkProfile | None) -> Link:
        if p is None:
            return cls()
        return cls(parse_rate(p.rate) if p.rate else None,
                   parse_time(p.delay) if p.delay else 0.0,
                   parse_loss(p.loss) if p.loss else 0.0,
                   parse_storm(p.storm) if p.storm else None, p.since)

    def storm_json(self) -> dict[str, float] | None:
        if self.storm is None:
            return None
        return {"factor": self.storm.factor, "duration": self.storm.duration,
                "period": self.storm.period, "base_bps": self.rate or DEFAULT_STORM_BASE,
                "start": self.since}


def apply(state: LabState) -> None:
    """Make every link, loss rule and proxy of the lab match ``state.shapes``."""
    links = {h.name: Link.parse(state.shapes.get(h.name)) for h in state.hosts}
    lab_dir = Path(state.lab_dir)
    for h in state.hosts:
        _apply_rate(state, h, links[h.name])
    for h in state.hosts:
        assert h.netns is not None
        mine = links[h.name]
        loss_rules = []
        paths: dict[str, Any] = {}
        for peer in state.hosts:
            if peer.name == h.name:
                continue
            theirs = links[peer.name]
            loss = 1 - (1 - mine.loss) * (1 - theirs.loss)
            if loss > 0:
                loss_rules.append(["-s", peer.ip, "-m", "statistic", "--mode", "random",
                                   "--probability", f"{loss:.6f}", "-j", "DROP"])
            storms = [s for s in (mine.storm_json(), theirs.storm_json()) if s]
            delay = mine.delay + theirs.delay
            rates = [r for r in (mine.rate, theirs.rate) if r]
            if delay > 0 or storms:
                paths[peer.ip] = {"delay": delay, "storms": storms,
                                  "rate_bps": min(rates) if rates else None}
        firewall.set_rules(h.netns, firewall.LOSS, loss_rules)
        if paths or proxyctl.current_paths(host_dir(lab_dir, h.name)):
            proxyctl.configure(host_dir(lab_dir, h.name), h.netns, lab_dir, paths)
    shaped = {n: p for n, p in state.shapes.items() if not p.empty()}
    log.info("lab: shaping %s", ", ".join(
        f"{n}: " + " ".join(f"{k} {v}" for k, v in vars(p).items() if v and k != "since")
        for n, p in shaped.items()) or "off")


def _apply_rate(state: LabState, h: HostState, link: Link) -> None:
    veth = state.netobj.veth(h.index)
    for prefix, dev in ((["-n", h.netns or ""], "eth0"), ([], veth)):
        if link.rate is None:
            run(["tc", *prefix, "qdisc", "del", "dev", dev, "root"], check=False)
        else:
            run(["tc", *prefix, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                 f"{int(link.rate)}bit", "burst", str(tc_burst(link.rate)), "latency", "50ms"])


def validate(profile: LinkProfile) -> None:
    """Raise LabError now for a malformed value, not halfway through applying it."""
    Link.parse(profile)
