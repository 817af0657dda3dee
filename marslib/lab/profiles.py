"""Parsing link profiles: ``--rate 10mbit --delay 25ms --loss 1% --storm 100x:2s/10s``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from marslib.lab.errors import LabError

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "k": 1e3, "m": 1e6, "g": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "": 1e-3}

DEFAULT_STORM_BASE = 1e9  # bit/s paced down in a storm when the link has no --rate


def parse_rate(text: str) -> float:
    """Bits per second from tc's notation: ``100mbit``, ``1gbit``, ``500kbit``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _RATE_UNITS:
        raise LabError(f"invalid rate {text!r}: use e.g. 10mbit, 100mbit, 1gbit")
    bps = float(m.group(1)) * _RATE_UNITS[unit]
    if bps < 8000:
        raise LabError(f"rate {text!r} is below 8kbit")
    return bps


def parse_time(text: str) -> float:
    """Seconds from ``25ms``, ``2s``, ``500us`` (a bare number is milliseconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s|)\s*", text)
    if not m:
        raise LabError(f"invalid time {text!r}: use e.g. 25ms or 2s")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parse_loss(text: str) -> float:
    """A probability from ``1%`` or ``1`` (percent, as with netem)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text)
    if not m or float(m.group(1)) > 100:
        raise LabError(f"invalid loss {text!r}: use a percentage such as 1% or 0.5%")
    return float(m.group(1)) / 100


@dataclass(frozen=True)
class StormSpec:
    factor: float
    duration: float
    period: float


def parse_storm(text: str) -> StormSpec:
    """``100x:2s/10s``: throughput / 100 for 2 s in every 10 s."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)x:([^/]+)/(.+)", text)
    if not m:
        raise LabError(f"invalid storm {text!r}: use FACTORx:DURATION/PERIOD, e.g. 100x:2s/10s")
    spec = StormSpec(float(m.group(1)), parse_time(m.group(2)), parse_time(m.group(3)))
    if spec.factor < 1 or not 0 < spec.duration < spec.period:
        raise LabError(f"invalid storm {text!r}: need factor >= 1 and 0 < duration < period")
    return spec


def tc_burst(bps: float) -> int:
    """tbf bucket size: 2 ms at the rate, at least 64 KiB (GSO segments are up to 64 KiB)."""
    return max(64 << 10, int(bps / 8 * 0.002))
