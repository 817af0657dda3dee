"""Wire frames, shared by the metadata (7777), fetch (7778) and sync (7779) ports.

Little-endian::

    magic u32 | proto_version u16 | type u16 | header_len u32 | payload_len u32
    | header (UTF-8 JSON object, header_len bytes) | payload (payload_len bytes)

Unknown JSON keys are ignored and missing ones take defaults, so an older and a newer
release can talk during a rolling upgrade; unknown frame types are answered with ERROR
by the receiver's handler, not by closing. Frames added later carry ``"v"``, the version
of their header's meaning: a receiver answers a newer one, like an unknown type, with an
ERROR saying "unexpected frame", and the asker falls back to what the older peer
speaks. Oversized or malformed frames raise FrameError: the connection that sent them is
closed, nothing else.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

MAGIC = 0x5346524D  # b"MRFS" little-endian
PROTO_VERSION = 1  # the version this release speaks best
PROTO_MIN = 1  # the oldest version it still speaks
_PREFIX = struct.Struct("<IHHII")
PREFIX_LEN = _PREFIX.size  # 16
MAX_HEADER_LEN = 1 << 20
MAX_PAYLOAD_LEN = 64 << 20


class FrameType(IntEnum):
    HELLO = 1
    AUTH = 2
    ERROR = 3
    PING = 4
    PONG = 5
    META_PUSH = 10  # header {"items": [[key, value|null, stamp], ...]}
    FETCH_REQ = 20  # header {"rid", "resource", "logfile", "offset", "max_len"}
    FETCH_DATA = 21  # header {"rid", "logfile", "offset", "end", "finished", "next"}
    SYNC_SUMS_REQ = 30  # header {"rid", "resource", "offset", "block_size", "count"}
    SYNC_SUMS = 31  # header {"rid", "offset", "block_size", "position"}, payload: crc32c
    #                 per block (u32 LE each); "position": the log position the data
    #                 reflects (a window of at most 16 MiB; absent from older primaries)
    SYNC_READ_REQ = 32  # header {"rid", "resource", "offset", "length"}
    SYNC_DATA = 33  # header {"rid", "offset"}, payload: the bytes
    SYNC_DIFF_REQ = 34  # header {"rid", "resource", "offset", "block_size", "count"},
    #                     payload: the asker's crc32c per block (u32 LE each)
    SYNC_DIFF = 35  # header {"rid", "offset", "block_size", "blocks": [index, ...]},
    #                 payload: the data of those blocks, back to back
    SYNC_DIFF_SET_REQ = 36  # header {"rid", "v", "resource", "offset", "block_size",
    #                         "count", "blocks": [index, ...]} (indexes in the window of
    #                         "count" blocks), payload: the asker's crc32c of each
    #                         listed block (u32 LE each); answered with SYNC_DIFF
    SYNC_WRITTEN_REQ = 38  # header {"rid", "v", "resource", "since", "until", "block_size",
    #                        "size"}: which blocks the answerer's logs wrote in (since, until]
    SYNC_WRITTEN = 39  # header {"rid", "count", "missing", "gap", "records"}, payload: the
    #                    block set (marslib.blockset encoding)
    STATUS_REQ = 40  # header {"rid", "resource", "rotate"}: "rotate" (optional) asks the
    #                  primary to start a new logfile first, so its end is byte 0 of it
    STATUS = 41  # header {"rid", "log_end", "size"}


class FrameError(Exception):
    """The peer sent something that is not a valid frame; close its connection."""


@dataclass(frozen=True)
class Frame:
    type: int
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes | bytearray | memoryview = b""
    version: int = PROTO_VERSION

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def encode_frame(frame: Frame) -> bytes:
    header = json.dumps(frame.header, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_LEN or len(frame.payload) > MAX_PAYLOAD_LEN:
        raise ValueError("frame too large")
    prefix = _PREFIX.pack(MAGIC, frame.version, int(frame.type), len(header), len(frame.payload))
    return b"".join((prefix, header, frame.payload))


class FrameParser:
    """Sans-I/O: feed bytes, take complete frames. Raises FrameError on garbage."""

    def __init__(self, max_payload: int = MAX_PAYLOAD_LEN) -> None:
        self._buf = bytearray()
        self.max_payload = max_payload

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buf = self._buf
        if len(buf) < PREFIX_LEN:
            return None
        magic, version, ftype, hlen, plen = _PREFIX.unpack_from(buf, 0)
        if magic != MAGIC:
            raise FrameError(f"bad frame magic {magic:#010x}")
        if hlen > MAX_HEADER_LEN or plen > self.max_payload:
            raise FrameError(f"oversized frame (header {hlen}, payload {plen} bytes)")
        total = PREFIX_LEN + hlen + plen
        if len(buf) < total:
            return None
        try:
            header = json.loads(bytes(buf[PREFIX_LEN : PREFIX_LEN + hlen]) or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FrameError(f"frame header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise FrameError("frame header is not a JSON object")
        payload = bytes(buf[PREFIX_LEN + hlen : total])
        del buf[:total]
        return Frame(ftype, header, payload, version)
