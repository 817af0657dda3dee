"""A position in a resource's log history: which logfile, which byte, which record."""

from __future__ import annotations

from dataclasses import dataclass

from marslib.layout import logfile_name, parse_logfile_name


@dataclass(frozen=True, order=True)
class LogPosition:
    """``number``/``host`` name the logfile; ``offset`` is the byte after the last record
    counted; ``seq`` is that record's sequence number (0: none yet)."""

    number: int
    offset: int
    seq: int
    host: str = ""

    @property
    def logfile(self) -> str:
        return logfile_name(self.number, self.host)

    def encode(self) -> str:
        """The metadata value: ``logfile,offset,seq`` (readers ignore further fields)."""
        return f"{self.logfile},{self.offset},{self.seq}"

    @classmethod
    def decode(cls, value: str) -> LogPosition:
        parts = value.split(",")
        if len(parts) < 3:
            raise ValueError(f"invalid log position {value!r}")
        parsed = parse_logfile_name(parts[0])
        if parsed is None:
            raise ValueError(f"invalid logfile name in log position {value!r}")
        return cls(parsed[0], int(parts[1]), int(parts[2]), parsed[1])
