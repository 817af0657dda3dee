"""Version links: a hash chain over finished logfiles, for split-brain detection.

``version-NNNNNNNNN-WRITER`` = ``digest,end_offset,last_seq,prev_digest[,logfile_host]``:
WRITER's view of where logfile NNNNNNNNN (written by logfile_host) ended. The digest is
sha256 over ``number,logfile_host,end_offset,last_seq,previous digest``. Two hosts whose
links for the same logfile number differ have diverging histories: a split brain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from marslib.schema import ResourceKeys

GENESIS = "0" * 16


@dataclass(frozen=True)
class VersionLink:
    number: int
    host: str
    end_offset: int
    last_seq: int
    prev_digest: str

    @property
    def digest(self) -> str:
        text = f"{self.number},{self.host},{self.end_offset},{self.last_seq},{self.prev_digest}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def key(self, resource: str, writer: str | None = None) -> str:
        return ResourceKeys(resource).version_link(self.number, writer or self.host)

    def encode(self) -> str:
        return f"{self.digest},{self.end_offset},{self.last_seq},{self.prev_digest},{self.host}"

    @classmethod
    def decode(cls, number: int, writer: str, value: str) -> VersionLink:
        parts = value.split(",")
        if len(parts) < 4:
            raise ValueError(f"invalid version link {value!r}")
        host = parts[4] if len(parts) > 4 else writer
        link = cls(number, host, int(parts[1]), int(parts[2]), parts[3])
        if link.digest != parts[0]:
            raise ValueError(f"version link {number}-{writer} does not match its digest")
        return link
