"""Human sizes: ``64K``, ``1G``, ``512`` (bytes); binary units."""

from __future__ import annotations

import re

from marslib.errors import UsageError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*", text)
    if not m:
        raise UsageError(f"invalid size {text!r}: use a number with an optional K, M, G or T")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit.lower()] and n % _UNITS[unit.lower()] == 0:
            return f"{n // _UNITS[unit.lower()]}{unit}"
    return str(n)


def human_size(n: int | float) -> str:
    """Rounded for people: ``78.8G``, ``512K``, ``0``."""
    value = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "" or value >= 100 else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)
