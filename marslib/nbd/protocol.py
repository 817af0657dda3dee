"""Server side of the fixed newstyle NBD protocol as a sans-I/O state machine.

Bytes from the client go in with :meth:`NbdServerConnection.receive_data` (the end of the
stream with :meth:`NbdServerConnection.receive_eof`); parsed events come out of
:meth:`NbdServerConnection.next_event`. Bytes the state machine produces on its own (the
greeting, option replies, the export information) are collected by
:meth:`NbdServerConnection.data_to_send`; replies to transmission requests are built by
:meth:`NbdServerConnection.send_reply` and :meth:`NbdServerConnection.send_read_reply`, so the
caller may answer requests in any order. No sockets, no event loop.

Only simple replies are spoken (structured replies and metadata contexts are refused with
``NBD_REP_ERR_UNSUP``), and a server has exactly one export. A client that breaks the protocol
in a way that cannot be answered with an error reply gets a :class:`ConnectionClosed` event
with the reason; :meth:`receive_data` and :meth:`next_event` never raise for any input.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

# --- magic numbers ------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", also the magic of every option request
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# --- handshake flags (server) and client flags --------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --- transmission flags ---------------------------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# --- options --------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 10
OPT_SET_META_CONTEXT = 11

# --- option reply types ---------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8

# --- information types (NBD_OPT_INFO / NBD_OPT_GO) ---------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- commands and command flags -------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_FLAG_FUA = 1 << 0
KNOWN_CMD_FLAGS = CMD_FLAG_FUA

# --- error values of simple replies ---------------------------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ESHUTDOWN = 108

# --- limits -----------------------------------------------------------------------------
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_REQUEST_SIZE = 32 << 20  # largest READ/WRITE payload; also NBD_INFO_BLOCK_SIZE maximum
MAX_OPTION_LENGTH = 64 << 10  # a longer option closes the connection
MAX_STRING = 4096  # longest export name / message the spec allows
RECEIVE_BUFFER_SIZE = 256 << 10  # what get_buffer() offers outside of WRITE payloads

OPTION_NAMES = {
    OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    OPT_ABORT: "NBD_OPT_ABORT",
    OPT_LIST: "NBD_OPT_LIST",
    OPT_STARTTLS: "NBD_OPT_STARTTLS",
    OPT_INFO: "NBD_OPT_INFO",
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}
COMMAND_NAMES = {
    CMD_READ: "NBD_CMD_READ",
    CMD_WRITE: "NBD_CMD_WRITE",
    CMD_DISC: "NBD_CMD_DISC",
    CMD_FLUSH: "NBD_CMD_FLUSH",
    CMD_TRIM: "NBD_CMD_TRIM",
}

_ERRNO_TO_NBD = {
    _errno.EPERM: EPERM,
    _errno.EACCES: EPERM,
    _errno.EROFS: EPERM,
    _errno.EIO: EIO,
    _errno.ENOMEM: ENOMEM,
    _errno.EINVAL: EINVAL,
    _errno.ENOSPC: ENOSPC,
    _errno.EDQUOT: ENOSPC,
    _errno.EFBIG: ENOSPC,
    _errno.EOVERFLOW: EOVERFLOW,
    _errno.ESHUTDOWN: ESHUTDOWN,
}

# --- wire structs -----------------------------------------------------------------------
_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_SIMPLE_REPLY = SIMPLE_REPLY
REQUEST_SIZE = _REQUEST.size  # 28
REPLY_HEADER_SIZE = _SIMPLE_REPLY.size  # 16


def nbd_error_from_errno(err: int | None) -> int:
    """The NBD error value for an OS errno; anything without a mapping is EIO."""
    if err is None:
        return EIO
    return _ERRNO_TO_NBD.get(err, EIO)


class Phase(Enum):
    """Where a connection is in the protocol."""

    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    DISCONNECTING = "disconnecting"  # NBD_CMD_DISC received; answer what is in flight
    CLOSED = "closed"


class _NeedData:
    """Type of :data:`NEED_DATA`."""

    _instance: _NeedData | None = None

    def __new__(cls) -> _NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by :meth:`NbdServerConnection.next_event` when more bytes are needed."""


# --- events -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OptionHandled:
    """An option was answered by the state machine (its reply is in ``data_to_send``)."""

    option: int
    reply: int
    message: str


@dataclass(frozen=True, slots=True)
class TransmissionStarted:
    """Option haggling ended successfully: the client now sends requests."""

    export_name: str
    size: int
    transmission_flags: int
    option: int  # NBD_OPT_GO or NBD_OPT_EXPORT_NAME


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """``NBD_CMD_READ``: reply with ``send_read_reply`` and exactly ``length`` bytes."""

    handle: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """``NBD_CMD_WRITE`` with its complete payload; with ``fua`` reply only once durable."""

    handle: int
    offset: int
    data: bytes | bytearray  # a large payload arrives in a buffer of its own
    fua: bool


@dataclass(frozen=True, slots=True)
class FlushRequest:
    """``NBD_CMD_FLUSH``: reply once every write already answered is durable."""

    handle: int


@dataclass(frozen=True, slots=True)
class TrimRequest:
    """``NBD_CMD_TRIM``: the range is no longer needed (a hint)."""

    handle: int
    offset: int
    length: int
    fua: bool


@dataclass(frozen=True, slots=True)
class DisconnectRequest:
    """``NBD_CMD_DISC``: answer what is in flight, then close; later bytes are ignored."""

    handle: int


@dataclass(frozen=True, slots=True)
class RequestError:
    """A request failed validation; reply ``send_reply(handle, error)``, keep the connection."""

    handle: int
    command: int
    offset: int
    length: int
    error: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection must be closed after sending ``data_to_send``; ``clean`` if by the client's
    wish (``NBD_OPT_ABORT``, end of file between messages), else a protocol violation."""

    reason: str
    clean: bool


Event = (
    OptionHandled
    | TransmissionStarted
    | ReadRequest
    | WriteRequest
    | FlushRequest
    | TrimRequest
    | DisconnectRequest
    | RequestError
    | ConnectionClosed
)


def _option_name(option: int) -> str:
    return OPTION_NAMES.get(option, f"option {option}")


def _command_name(command: int) -> str:
    return COMMAND_NAMES.get(command, f"command {command}")


class NbdServerConnection:
    """One client connection of a server with a single export.

    ``size`` is the export size in bytes or a callable returning it; it is read again for
    every request, so the export may grow or shrink while clients are connected.
    ``read_only`` is advertised at the end of option haggling and enforced on each request.
    """

    def __init__(
        self,
        export_name: str,
        size: int | Callable[[], int],
        *,
        read_only: bool = False,
        description: str = "",
        max_request_size: int = MAX_REQUEST_SIZE,
        max_option_length: int = MAX_OPTION_LENGTH,
    ) -> None:
        self.export_name = export_name
        self.description = description
        self.read_only = read_only
        self.max_request_size = max_request_size
        self.max_option_length = max_option_length
        self._size: Callable[[], int] = size if callable(size) else _constant(size)
        self._buf = bytearray()  # received, not yet parsed from _pos on
        self._pos = 0
        # a WRITE whose payload is still arriving: (handle, offset, flags) and the payload
        self._write_req: tuple[int, int, int] = (0, 0, 0)
        self._payload: bytearray | None = None
        self._payload_filled = 0
        self._scratch: bytearray | None = None  # get_buffer's buffer outside of payloads
        self._recv_into_payload = False
        self._out = bytearray(_GREETING.pack(NBDMAGIC, IHAVEOPT, HANDSHAKE_FLAGS))
        self._phase = Phase.CLIENT_FLAGS
        self._no_zeroes = False
        self._eof = False
        self._close_reason: str | None = None
        self.transmission_flags = 0

    # --- state -------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        """Current protocol phase."""
        return self._phase

    @property
    def close_reason(self) -> str | None:
        """Why the connection was closed, once it is."""
        return self._close_reason

    @property
    def size(self) -> int:
        """Current export size in bytes."""
        return self._size()

    @size.setter
    def size(self, value: int | Callable[[], int]) -> None:
        self._size = value if callable(value) else _constant(value)

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return len(self._buf) - self._pos + self._payload_filled

    # --- input --------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the client."""
        if self._phase is Phase.CLOSED or self._phase is Phase.DISCONNECTING:
            return
        payload = self._payload
        if payload is not None:
            filled = self._payload_filled
            need = len(payload) - filled
            if len(data) <= need:
                payload[filled : filled + len(data)] = data
                self._payload_filled = filled + len(data)
                return
            with memoryview(data) as view:
                payload[filled:] = view[:need]
                self._payload_filled = len(payload)
                self._buf += view[need:]
            return
        self._buf += data

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A buffer to receive into directly (asyncio.BufferedProtocol); then buffer_updated().

        While a large WRITE payload is arriving this is the rest of that payload, so its
        bytes are copied once, by the kernel.
        """
        payload = self._payload
        if payload is not None and self._payload_filled < len(payload):
            self._recv_into_payload = True
            return memoryview(payload)[self._payload_filled :]
        self._recv_into_payload = False  # bytes after a complete payload go to _buf
        if self._scratch is None:
            self._scratch = bytearray(RECEIVE_BUFFER_SIZE)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were received into the buffer of the last get_buffer()."""
        if self._phase is Phase.CLOSED or self._phase is Phase.DISCONNECTING:
            return
        if self._recv_into_payload:
            self._payload_filled += nbytes
        elif self._scratch is not None:
            with memoryview(self._scratch) as view:
                self._buf += view[:nbytes]

    def receive_eof(self) -> None:
        """The client closed its side; events for complete messages still come first."""
        self._eof = True

    def next_event(self) -> Event | _NeedData:
        """The next event, or :data:`NEED_DATA` if the buffered bytes do not complete one."""
        phase = self._phase
        if phase is Phase.TRANSMISSION:
            if self._payload is None:
                event = self._next_request()
            else:
                event = self._payload_event()
        elif phase is Phase.OPTIONS:
            event = self._next_option()
        elif phase is Phase.CLIENT_FLAGS:
            event = self._next_client_flags()
        else:
            return NEED_DATA
        if event is NEED_DATA:
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            if self._eof:
                return self._on_eof()
        return event

    def events(self) -> list[Event]:
        """Every event the buffered bytes complete."""
        out: list[Event] = []
        while True:
            event = self.next_event()
            if isinstance(event, _NeedData):
                return out
            out.append(event)

    # --- output -------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        """Bytes the state machine produced itself since the last call (greeting, options)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send_reply(self, handle: int, error: int = 0) -> bytes:
        """Simple reply without payload (WRITE, FLUSH, TRIM, or any error)."""
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)

    def send_read_reply(self, handle: int, data: bytes | bytearray | memoryview) -> bytes:
        """Successful simple reply to READ followed by its data."""
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle) + data

    def close(self, reason: str) -> ConnectionClosed:
        """Mark the connection closed by the server side; later input is ignored."""
        return self._close(reason, clean=True)

    # --- internals ----------------------------------------------------------------------
    def _close(self, reason: str, clean: bool) -> ConnectionClosed:
        self._phase = Phase.CLOSED
        self._close_reason = reason
        self._discard_input()
        return ConnectionClosed(reason, clean)

    def _discard_input(self) -> None:
        self._buf.clear()
        self._pos = 0
        self._payload = None
        self._payload_filled = 0
        self._recv_into_payload = False

    def _on_eof(self) -> ConnectionClosed:
        if self.buffered:
            return self._close(
                f"client closed the connection in the middle of a message "
                f"({self.buffered} bytes of it received)",
                clean=False,
            )
        return self._close("client closed the connection", clean=True)

    def _next_client_flags(self) -> Event | _NeedData:
        if len(self._buf) - self._pos < 4:
            return NEED_DATA
        (flags,) = _U32.unpack_from(self._buf, self._pos)
        self._pos += 4
        if not flags & FLAG_C_FIXED_NEWSTYLE:
            return self._close(
                f"client flags 0x{flags:x} lack NBD_FLAG_C_FIXED_NEWSTYLE; "
                "only fixed newstyle negotiation is served",
                clean=False,
            )
        if flags & ~KNOWN_CLIENT_FLAGS:
            return self._close(f"client sent unknown client flags 0x{flags:x}", clean=False)
        self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self._phase = Phase.OPTIONS
        return self._next_option()

    def _next_option(self) -> Event | _NeedData:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < _OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = _OPTION_HEADER.unpack_from(buf, pos)
        if magic != IHAVEOPT:
            return self._close(f"bad option magic 0x{magic:x}", clean=False)
        if length > self.max_option_length:
            return self._close(
                f"{_option_name(option)} has {length} bytes of data, "
                f"more than the limit of {self.max_option_length}",
                clean=False,
            )
        start = pos + _OPTION_HEADER.size
        end = start + length
        if len(buf) < end:
            return NEED_DATA
        data = bytes(buf[start:end])
        self._pos = end
        if option == OPT_EXPORT_NAME:
            return self._opt_export_name(data)
        if option == OPT_GO or option == OPT_INFO:
            return self._opt_info_go(option, data)
        if option == OPT_LIST:
            return self._opt_list(data)
        if option == OPT_ABORT:
            self._reply(option, REP_ACK)
            return self._close("client aborted option negotiation (NBD_OPT_ABORT)", clean=True)
        return self._reply_error(
            option, REP_ERR_UNSUP, f"{_option_name(option)} is not supported by this server"
        )

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload))
        self._out += payload

    def _reply_error(self, option: int, reply: int, message: str) -> OptionHandled:
        self._reply(option, reply, message.encode()[:MAX_STRING])
        return OptionHandled(option, reply, message)

    def _compute_flags(self) -> int:
        flags = (
            FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_CAN_MULTI_CONN
        )
        if self.read_only:
            flags |= FLAG_READ_ONLY
        return flags

    def _known_export(self, name: str) -> bool:
        return name == self.export_name or name == ""

    def _unknown_export_message(self, name: str) -> str:
        return f"unknown export {name!r}: this server exports only {self.export_name!r}"

    def _start_transmission(self, option: int, size: int, flags: int) -> TransmissionStarted:
        self.transmission_flags = flags
        self._phase = Phase.TRANSMISSION
        return TransmissionStarted(self.export_name, size, flags, option)

    def _opt_export_name(self, data: bytes) -> Event:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            return self._close("NBD_OPT_EXPORT_NAME with a name that is not UTF-8", clean=False)
        if not self._known_export(name):
            # This option cannot be answered with an error: the spec says hang up.
            return self._close(self._unknown_export_message(name), clean=False)
        size = self._size()
        flags = self._compute_flags()
        self._out += _EXPORT_NAME_REPLY.pack(size, flags)
        if not self._no_zeroes:
            self._out += bytes(124)
        return self._start_transmission(OPT_EXPORT_NAME, size, flags)

    def _opt_list(self, data: bytes) -> OptionHandled:
        if data:
            return self._reply_error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        name = self.export_name.encode()
        self._reply(OPT_LIST, REP_SERVER, _U32.pack(len(name)) + name)
        self._reply(OPT_LIST, REP_ACK)
        return OptionHandled(OPT_LIST, REP_ACK, f"listed export {self.export_name!r}")

    def _opt_info_go(self, option: int, data: bytes) -> Event:
        what = _option_name(option)
        if len(data) < 6:
            return self._reply_error(option, REP_ERR_INVALID, f"{what} data too short")
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > len(data) - 6:
            return self._reply_error(option, REP_ERR_INVALID, f"{what} name length too large")
        (n_info,) = _U16.unpack_from(data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * n_info:
            return self._reply_error(
                option, REP_ERR_INVALID, f"{what} length does not match its information requests"
            )
        try:
            name = data[4 : 4 + name_len].decode()
        except UnicodeDecodeError:
            return self._reply_error(option, REP_ERR_INVALID, f"{what} export name is not UTF-8")
        if not self._known_export(name):
            return self._reply_error(option, REP_ERR_UNKNOWN, self._unknown_export_message(name))
        requested = set(struct.unpack_from(f">{n_info}H", data, 6 + name_len))
        size = self._size()
        flags = self._compute_flags()
        self._reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, size, flags))
        self._reply(
            option,
            REP_INFO,
            _INFO_BLOCK_SIZE.pack(
                INFO_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, self.max_request_size
            ),
        )
        if INFO_NAME in requested:
            self._reply(option, REP_INFO, _U16.pack(INFO_NAME) + self.export_name.encode())
        if INFO_DESCRIPTION in requested and self.description:
            desc = self.description.encode()[:MAX_STRING]
            self._reply(option, REP_INFO, _U16.pack(INFO_DESCRIPTION) + desc)
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            return self._start_transmission(OPT_GO, size, flags)
        return OptionHandled(option, REP_ACK, f"export {self.export_name!r}: {size} bytes")

    def _next_request(self) -> Event | _NeedData:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 28:
            return NEED_DATA
        magic, flags, command, handle, offset, length = _REQUEST.unpack_from(buf, pos)
        if magic != REQUEST_MAGIC:
            return self._close(f"bad request magic 0x{magic:08x}", clean=False)
        if command == CMD_WRITE:
            if length > self.max_request_size:
                return self._close(
                    f"NBD_CMD_WRITE of {length} bytes at offset {offset} exceeds the maximum "
                    f"request size of {self.max_request_size} bytes",
                    clean=False,
                )
            start = pos + 28
            end = start + length
            if len(buf) >= end:
                self._pos = end
                if length <= 65536:
                    data = bytes(buf[start:end])
                else:
                    with memoryview(buf) as view, view[start:end] as part:  # one copy, not two
                        data = bytes(part)
                return self._write_event(handle, offset, flags, data)
            # The payload is incomplete: collect it in a buffer of its own instead of growing
            # the receive buffer (large bytearray growth is slow).
            payload = bytearray(length)
            with memoryview(buf) as view:
                payload[: len(buf) - start] = view[start:]
            self._payload_filled = len(buf) - start
            self._payload = payload
            self._write_req = (handle, offset, flags)
            self._pos = len(buf)
            return NEED_DATA
        self._pos = pos + 28
        if flags & ~KNOWN_CMD_FLAGS:
            return self._bad_flags(flags, command, handle, offset, length)
        if command == CMD_READ:
            if length > self.max_request_size:
                return RequestError(
                    handle,
                    command,
                    offset,
                    length,
                    EINVAL,
                    f"read of {length} bytes exceeds the maximum request size of "
                    f"{self.max_request_size} bytes",
                )
            if offset + length > self._size():
                return self._past_end(command, handle, offset, length, EINVAL)
            return ReadRequest(handle, offset, length)
        if command == CMD_FLUSH:
            return FlushRequest(handle)
        if command == CMD_TRIM:
            if self.read_only:
                return RequestError(
                    handle, command, offset, length, EPERM, "trim on a read-only export"
                )
            if offset + length > self._size():
                return self._past_end(command, handle, offset, length, EINVAL)
            return TrimRequest(handle, offset, length, bool(flags & CMD_FLAG_FUA))
        if command == CMD_DISC:
            self._phase = Phase.DISCONNECTING
            self._discard_input()
            return DisconnectRequest(handle)
        return RequestError(
            handle, command, offset, length, EINVAL, f"unsupported {_command_name(command)}"
        )

    def _payload_event(self) -> Event | _NeedData:
        payload = self._payload
        assert payload is not None
        if self._payload_filled < len(payload):
            return NEED_DATA
        self._payload = None
        self._payload_filled = 0
        handle, offset, flags = self._write_req
        # the payload buffer is this request's own: handed over as it is, not copied
        return self._write_event(handle, offset, flags, payload)

    def _write_event(self, handle: int, offset: int, flags: int, data: bytes | bytearray
                     ) -> Event:
        if flags & ~KNOWN_CMD_FLAGS:
            return self._bad_flags(flags, CMD_WRITE, handle, offset, len(data))
        if self.read_only:
            return RequestError(
                handle, CMD_WRITE, offset, len(data), EPERM, "write to a read-only export"
            )
        if offset + len(data) > self._size():
            return self._past_end(CMD_WRITE, handle, offset, len(data), ENOSPC)
        return WriteRequest(handle, offset, data, bool(flags & CMD_FLAG_FUA))

    def _past_end(
        self, command: int, handle: int, offset: int, length: int, error: int
    ) -> RequestError:
        return RequestError(
            handle,
            command,
            offset,
            length,
            error,
            f"{_command_name(command)} of {length} bytes at offset {offset} "
            f"ends past the export size of {self._size()} bytes",
        )

    def _bad_flags(
        self, flags: int, command: int, handle: int, offset: int, length: int
    ) -> RequestError:
        return RequestError(
            handle,
            command,
            offset,
            length,
            EINVAL,
            f"{_command_name(command)} with unsupported command flags 0x{flags:x}",
        )


def _constant(value: int) -> Callable[[], int]:
    def size() -> int:
        return value

    return size
