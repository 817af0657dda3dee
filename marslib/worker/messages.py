"""The control channel between marsd and a resource worker: frame format and messages.

Sans-I/O: :func:`encode` turns a message into bytes, :func:`parse_prefix` and
:func:`decode` turn bytes back into a message; the asyncio code is in
:mod:`marslib.worker.channel`. Little-endian::

    magic u32 | version u16 | flags u16 | header_len u32 | payload_len u32
    | header (UTF-8 JSON object) | payload (bytes)

The header is ``{"type": NAME, "id": N, "re": N, "clock": STAMP, "body": {...}}``: ``id``
numbers a request that wants a reply (0: an event), ``re`` names the request a reply
answers (0: not a reply), ``clock`` is the sender's Lamport clock (so that metadata keys
written by marsd and by its workers keep their order), ``body`` holds the message's
fields. Only bulk data (the bytes of a read, checksums, differing blocks) travels in the
payload.

Tolerance, for a worker started from a newer install than the marsd that runs it: unknown
body keys are ignored, missing ones take their defaults, an unknown message type is
answered with :class:`Failure` (a request) or ignored (anything else). A frame that
cannot be parsed (bad magic, another major version, oversized, not a JSON object, a field
of the wrong type, a required field missing) raises :class:`ProtocolError`: whoever reads
it drops the channel.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union

from marslib.errors import MarsError

MAGIC = 0x4B52574D  # b"MWRK" little-endian
VERSION = 1  # major: a reader refuses frames of another major version
PREFIX = struct.Struct("<IHHII")
PREFIX_LEN = PREFIX.size  # 16
MAX_HEADER_LEN = 1 << 20
MAX_PAYLOAD_LEN = 64 << 20
READ_CHUNK = 16 << 20  # marsd asks for bigger reads in pieces of this size


class ProtocolError(MarsError):
    """The other side sent something that is not a valid message: drop the channel."""


@dataclass(frozen=True)
class Message:
    """Base of every message; ``TYPE`` is its name on the wire."""

    TYPE: ClassVar[str] = ""


M = TypeVar("M", bound=type[Message])
MESSAGES: dict[str, type[Message]] = {}


def message(name: str) -> typing.Callable[[M], M]:
    """Register a message class under its wire name."""

    def register(cls: M) -> M:
        if name in MESSAGES:
            raise ValueError(f"message type {name!r} registered twice")
        cls.TYPE = name
        MESSAGES[name] = cls
        return cls

    return register


# ----------------------------------------------------------------- worker -> marsd
@message("hello")
@dataclass(frozen=True)
class Hello(Message):
    """The worker's first frame, sent as soon as it runs."""

    version: str  # marslib version of the worker's code
    pid: int
    protocol: int = VERSION


@dataclass(frozen=True)
class State(Message):
    """What marsd keeps of a running resource between requests. Every reply of a worker
    carries it, sampled when the reply is sent; a worker also pushes it when it changes.

    Primary: ``log_end`` (the durable end of the log, as ``LogPosition.encode()``),
    ``emergency``, ``size``. Secondary: ``phase``, ``error``, ``size``."""

    log_end: str | None = None
    emergency: bool = False
    size: int = 0
    phase: str = ""
    error: str | None = None


@message("state")
@dataclass(frozen=True)
class StatePush(State):
    """The resource's state changed (the log grew, a phase ended). A request: the worker
    sends the next one only after marsd's :class:`Ack`, so pushes never pile up."""


@message("started")
@dataclass(frozen=True)
class Started(State):
    """The resource runs; ``status`` is its :meth:`marslib.status.ResourceStatus.to_json`."""

    status: dict[str, Any] = field(default_factory=dict)


@message("stopped")
@dataclass(frozen=True)
class Stopped(State):
    """The resource stopped; the worker exits after sending this."""


@message("status-reply")
@dataclass(frozen=True)
class StatusReply(State):
    """``status``: the resource's :meth:`marslib.status.ResourceStatus.to_json`, which marsd
    reads back with ``ResourceStatus.from_json`` (unknown keys from a newer worker are
    ignored)."""

    status: dict[str, Any] = field(default_factory=dict)


@message("refreshed")
@dataclass(frozen=True)
class Refreshed(State):
    """Reply to :class:`Refresh`; ``grow_error`` says why a grown size cannot be served."""

    grow_error: str | None = None


@message("rotated")
@dataclass(frozen=True)
class Rotated(State):
    logfile: str = ""


@message("data")
@dataclass(frozen=True)
class ReadData(State):
    """The newest data of the range asked for (log overlay included), in the payload."""

    payload: bytes | bytearray = b""


@message("sums")
@dataclass(frozen=True)
class SumsData(State):
    """Reply to :class:`Sums`: the crc32c of each block (u32 LE each) in the payload, and
    ``position``, the log position the data they were taken of reflects."""

    position: str | None = None
    payload: bytes | bytearray = b""


@message("diff-data")
@dataclass(frozen=True)
class DiffData(State):
    """Reply to :class:`Diff`: the window-relative ``blocks`` that differ, and their data
    back to back in the payload."""

    blocks: list[int] = field(default_factory=list)
    payload: bytes | bytearray = b""


@message("done")
@dataclass(frozen=True)
class Done(State):
    """A request that has no other answer succeeded."""


# ----------------------------------------------------------------- marsd -> worker
@message("start")
@dataclass(frozen=True)
class Start(Message):
    """Run ``resource`` in ``role`` ("primary" or "secondary")."""

    role: str
    resource: str
    host: str
    root: str  # the state root (/mars)
    run_dir: str  # sockets (/run/mars)
    logger: dict[str, Any] = field(default_factory=dict)  # LoggerConfig fields (primary)
    net: dict[str, Any] = field(default_factory=dict)  # NetConfig fields without the secret


@message("stop")
@dataclass(frozen=True)
class Stop(Message):
    end_marker: bool = False  # a primary giving up its role ends its log (handover)


@message("status")
@dataclass(frozen=True)
class StatusRequest(Message):
    pass


@message("refresh")
@dataclass(frozen=True)
class Refresh(Message):
    """marsd's pass over the tree: publish the device size; a primary serves a grown
    ``size``; a secondary follows its todo switches."""

    size: int = 0


@message("space")
@dataclass(frozen=True)
class SpaceLevel(Message):
    """The free-space level of /mars (marslib.space): a secondary stops fetching or drops
    applied logfiles."""

    level: int = 0


@message("rotate")
@dataclass(frozen=True)
class Rotate(Message):
    pass


@message("emergency")
@dataclass(frozen=True)
class Emergency(Message):
    enter: bool = True  # False: leave emergency mode
    reason: str = ""


@message("read")
@dataclass(frozen=True)
class Read(Message):
    offset: int = 0
    length: int = 0


@message("block-sums")
@dataclass(frozen=True)
class Sums(Message):
    """The crc32c of each ``block_size`` block of the newest data of
    ``[offset, offset + length)`` (at most ``READ_CHUNK``), without the data."""

    offset: int = 0
    length: int = 0
    block_size: int = 65536


@message("diff")
@dataclass(frozen=True)
class Diff(Message):
    """Compare the asker's crc32c (the payload, u32 LE each) with the newest data of the
    window ``[offset, offset + length)``: of each block, or of the window-relative
    ``blocks`` listed (one checksum each). Answered with :class:`DiffData`, so that only
    the blocks that differ cross the channel."""

    offset: int = 0
    length: int = 0
    block_size: int = 65536
    blocks: list[int] | None = None
    payload: bytes | bytearray = b""


# ------------------------------------------------------------------ both directions
@message("ack")
@dataclass(frozen=True)
class Ack(Message):
    pass


@message("failure")
@dataclass(frozen=True)
class Failure(Message):
    """A request failed: ``error`` is the message for the operator, ``kind`` the class of
    the exception (``RuntimeError``, ``DeviceError``, ...)."""

    error: str
    kind: str = "MarsError"


# ----------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class Envelope:
    """The header fields around a message's body."""

    type: str
    id: int = 0
    re: int = 0
    clock: int = 0


def encode(msg: Message, *, id: int = 0, re: int = 0, clock: int = 0) -> list[bytes]:
    """The frame of ``msg`` as pieces to write back to back (the payload is not copied)."""
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "payload"}
    header = json.dumps({"type": msg.TYPE, "id": id, "re": re, "clock": clock, "body": body},
                        separators=(",", ":")).encode()
    payload = getattr(msg, "payload", b"")
    if len(header) > MAX_HEADER_LEN or len(payload) > MAX_PAYLOAD_LEN:
        raise ValueError(f"{msg.TYPE} message too large ({len(header)} + {len(payload)} bytes)")
    return [PREFIX.pack(MAGIC, VERSION, 0, len(header), len(payload)), header, payload]


def parse_prefix(prefix: bytes) -> tuple[int, int]:
    """``(header_len, payload_len)`` of the frame that starts with ``prefix``."""
    magic, version, _flags, hlen, plen = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic:#010x}")
    if version != VERSION:
        raise ProtocolError(f"frame version {version}, this side speaks {VERSION}")
    if hlen > MAX_HEADER_LEN or plen > MAX_PAYLOAD_LEN:
        raise ProtocolError(f"oversized frame (header {hlen}, payload {plen} bytes)")
    return hlen, plen


def decode(header: bytes, payload: bytes = b"") -> tuple[Envelope, Message | None]:
    """The envelope and message of one frame; the message is None for an unknown type."""
    try:
        obj = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame header is not a JSON object")
    env = Envelope(_get(obj, "type", str, ""), _get(obj, "id", int, 0), _get(obj, "re", int, 0),
                   _get(obj, "clock", int, 0))
    body = obj.get("body", {})
    if not isinstance(body, dict):
        raise ProtocolError(f"{env.type} frame: body is not a JSON object")
    cls = MESSAGES.get(env.type)
    if cls is None:
        return env, None
    return env, _build(cls, body, payload)


def _get(obj: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = obj.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"frame header field {key!r} is not {kind.__name__}: {value!r}")
    return value


def _build(cls: type[Message], body: dict[str, Any], payload: bytes) -> Message:
    hints = _hints(cls)
    args: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "payload":
            args["payload"] = payload
        elif f.name in body:
            value = body[f.name]
            if not _fits(value, hints[f.name]):
                raise ProtocolError(f"{cls.TYPE} message: field {f.name!r} has a value of the "
                                    f"wrong type: {str(value)[:80]!r}")
            args[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{cls.TYPE} message: required field {f.name!r} missing")
    return cls(**args)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value matches a field's annotation (the few shapes messages use)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return False
