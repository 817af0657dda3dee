"""The demo application's on-disk record format and its chunk files.

A record is one self-checking, self-delimiting unit (little endian)::

    offset  size  field
         0     4  magic         b"MAPR"
         4     2  version       1
         6     2  header_len    36 + host_len
         8     8  seq           u64, 1, 2, 3, ... across the whole data set
        16     8  time_ns       wall clock of the writer (ns since the epoch)
        24     4  payload_len   u32
        28     1  host_len      1..255
        29     3  reserved      zero
        32  host  host          the writer's host name (ASCII)
      32+h     4  crc32c        over every header byte before it + the payload
      36+h  plen  payload       a pattern derived from seq

Records are appended to ``data/chunk-NNNNNN`` (six-digit index from 0); the writer starts
a new chunk once the current one holds :data:`CHUNK_SIZE` bytes, so a record never spans
two chunks. Sequence numbers run on across chunks without a gap.
"""

from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from marslib.checksum import crc32c

MAGIC = b"MAPR"
VERSION = 1
FIXED = struct.Struct("<4sHHQQIB3x")  # 32 bytes
CRC = struct.Struct("<I")
MAX_HOST = 255
MAX_PAYLOAD = 16 << 20
CHUNK_SIZE = 1 << 20
CHUNK_RE = re.compile(r"chunk-(\d{6})")


def header_len(host: str) -> int:
    return FIXED.size + len(host.encode("ascii")) + CRC.size


class RecordError(ValueError):
    """A record that fails its checks at ``offset``.

    ``incomplete`` is set when the buffer simply ends before the record does (what a torn
    append or a concurrent reader sees); ``declared_end`` is where the header says the record
    ends, when the header could be parsed.
    """

    def __init__(self, offset: int, reason: str, incomplete: bool = False,
                 declared_end: int | None = None) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason
        self.incomplete = incomplete
        self.declared_end = declared_end


def pattern(seq: int, length: int) -> bytes:
    """The payload of record ``seq``: its sequence number over and over."""
    unit = struct.pack("<Q", seq)
    return (unit * (length // 8 + 1))[:length]


@dataclass(frozen=True)
class Record:
    seq: int
    time_ns: int
    host: str
    payload: bytes

    def __post_init__(self) -> None:
        if not 1 <= self.seq < 1 << 64:
            raise ValueError(f"seq {self.seq} out of range")
        if not 0 <= self.time_ns < 1 << 64:
            raise ValueError(f"time_ns {self.time_ns} out of range")
        raw = self.host.encode("ascii")  # UnicodeEncodeError is a ValueError
        if not 1 <= len(raw) <= MAX_HOST:
            raise ValueError(f"host name must have 1..{MAX_HOST} characters")
        if len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"payload larger than {MAX_PAYLOAD}")

    @classmethod
    def make(cls, seq: int, host: str, size: int, time_ns: int | None = None) -> Record:
        """A record of ``size`` bytes in all (header included) with the seq pattern."""
        plen = size - header_len(host)
        if plen < 0:
            raise ValueError(f"record size {size} is smaller than its header "
                             f"({header_len(host)} bytes for host {host!r})")
        return cls(seq, time_ns if time_ns is not None else time.time_ns(), host,
                   pattern(seq, plen))

    @property
    def size(self) -> int:
        return header_len(self.host) + len(self.payload)

    def encode(self) -> bytes:
        host = self.host.encode("ascii")
        head = FIXED.pack(MAGIC, VERSION, FIXED.size + len(host) + CRC.size, self.seq,
                          self.time_ns, len(self.payload), len(host)) + host
        crc = crc32c(self.payload, crc32c(head, 0))
        return b"".join((head, CRC.pack(crc), self.payload))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Record:
        """Exactly one record: trailing bytes are an error too."""
        rec, end = decode_from(data, 0)
        if end != len(data):
            raise RecordError(0, f"{len(data) - end} bytes after the record")
        return rec


def decode_from(buf: bytes | bytearray | memoryview, offset: int) -> tuple[Record, int]:
    """The record at ``offset`` of ``buf`` and the offset just after it."""
    view = memoryview(buf)
    avail = len(view) - offset
    if avail < FIXED.size:
        raise RecordError(offset, f"only {avail} bytes left, a header needs {FIXED.size}",
                          incomplete=True)
    magic, version, hlen, seq, time_ns, plen, host_len = FIXED.unpack_from(view, offset)
    if magic != MAGIC:
        raise RecordError(offset, f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise RecordError(offset, f"unknown record version {version}")
    if host_len == 0 or hlen != FIXED.size + host_len + CRC.size:
        raise RecordError(offset, f"inconsistent header length {hlen} (host length "
                          f"{host_len})")
    if plen > MAX_PAYLOAD:
        raise RecordError(offset, f"payload length {plen} too large")
    end = offset + hlen + plen
    if end > len(view):
        raise RecordError(offset, f"record of {hlen + plen} bytes but only {avail} left",
                          incomplete=True, declared_end=end)
    crc_at = offset + hlen - CRC.size
    (stored,) = CRC.unpack_from(view, crc_at)
    payload = view[crc_at + CRC.size:end]
    actual = crc32c(payload, crc32c(view[offset:crc_at], 0))
    if actual != stored:
        raise RecordError(offset, f"crc mismatch (stored {stored:08x}, computed {actual:08x})",
                          declared_end=end)
    if view[offset + 29:offset + 32] != b"\0\0\0":
        raise RecordError(offset, "reserved bytes are not zero", declared_end=end)
    try:
        host = bytes(view[offset + FIXED.size:crc_at]).decode("ascii")
        rec = Record(seq, time_ns, host, bytes(payload))
    except ValueError as exc:
        raise RecordError(offset, f"invalid field: {exc}", declared_end=end) from None
    return rec, end


# ------------------------------------------------------------------ chunk files
def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}"


def list_chunks(data_dir: Path) -> list[tuple[int, Path]]:
    """The chunk files in ``data_dir`` by index (other names are ignored)."""
    out = []
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        return []
    for name in names:
        m = CHUNK_RE.fullmatch(name)
        if m:
            out.append((int(m.group(1)), data_dir / name))
    return sorted(out)


@dataclass
class ChunkScan:
    """What one pass over a chunk found: its good records and where (if) it went bad."""

    path: Path
    size: int
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    good_end: int = 0  # offset just after the last good record
    error: RecordError | None = None
    nothing_after: bool = False  # the bad record is the last non-zero thing in the chunk

    def torn_tail(self) -> bool:
        """The failure looks like an append that did not complete: the chunk ends inside
        the record, or nothing but zeros (allocated, never written) follows the bad record.
        Only the newest chunk may end like this, and only in a record never acknowledged."""
        if self.error is None:
            return False
        return self.error.incomplete or self.nothing_after


def scan_chunk(path: Path, data: bytes | None = None,
               hosts: dict[str, int] | None = None,
               expect_seq: int | None = None) -> tuple[ChunkScan, str | None]:
    """Walk the records of one chunk.

    Stops at the first bad record (``scan.error``). When ``expect_seq`` is given, a record
    whose seq is not the expected next one stops the walk as well, with a message (second
    element of the result). ``hosts`` counts records per writer host.
    """
    if data is None:
        data = path.read_bytes()
    scan = ChunkScan(path, len(data))
    view = memoryview(data)
    off = 0
    gap: str | None = None
    while off < len(view):
        try:
            rec, end = decode_from(view, off)
        except RecordError as exc:
            if not exc.incomplete and not any(view[off:]):
                exc = RecordError(off, f"{len(view) - off} zero bytes at the end")
            scan.error = exc
            after = exc.declared_end if exc.declared_end is not None else off
            scan.nothing_after = not any(view[after:])
            break
        if expect_seq is not None and rec.seq != expect_seq:
            gap = (f"seq {rec.seq} where {expect_seq} was expected "
                   f"({'gap' if rec.seq > expect_seq else 'repeat'})")
            scan.good_end = off
            break
        if scan.records == 0:
            scan.first_seq = rec.seq
        scan.records += 1
        scan.last_seq = rec.seq
        if hosts is not None:
            hosts[rec.host] = hosts.get(rec.host, 0) + 1
        if expect_seq is not None:
            expect_seq += 1
        off = end
        scan.good_end = off
    return scan, gap
