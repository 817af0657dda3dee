"""The sans-I/O NBD server state machine, driven with byte strings."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marslib.nbd import protocol as p
from marslib.nbd.protocol import (
    NEED_DATA,
    ConnectionClosed,
    DisconnectRequest,
    FlushRequest,
    NbdServerConnection,
    OptionHandled,
    Phase,
    ReadRequest,
    RequestError,
    TransmissionStarted,
    TrimRequest,
    WriteRequest,
)

EXPORT = "res1"
SIZE = 1 << 20
EVENT_TYPES = (
    OptionHandled,
    TransmissionStarted,
    ReadRequest,
    WriteRequest,
    FlushRequest,
    TrimRequest,
    DisconnectRequest,
    RequestError,
    ConnectionClosed,
)
DEFAULT_FLAGS = (
    p.FLAG_HAS_FLAGS
    | p.FLAG_SEND_FLUSH
    | p.FLAG_SEND_FUA
    | p.FLAG_SEND_TRIM
    | p.FLAG_CAN_MULTI_CONN
)


# --- client-side byte builders -----------------------------------------------------------
def client_flags(flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data


def info_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + struct.pack(f">{len(infos)}H", *infos)
    )


def request(
    command: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, command, handle, offset, length) + payload


def write(handle: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return request(p.CMD_WRITE, handle, offset, len(data), flags, data)


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server bytes into (option, reply type, payload) tuples; all of them must parse."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == p.OPTION_REPLY_MAGIC
        pos += 20
        out.append((opt, rep, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def handshaken(
    size: int = SIZE, read_only: bool = False, description: str = ""
) -> NbdServerConnection:
    """A connection past the greeting and client flags, in option haggling."""
    conn = NbdServerConnection(EXPORT, size, read_only=read_only, description=description)
    assert len(conn.data_to_send()) == 18
    conn.receive_data(client_flags())
    assert conn.events() == []
    assert conn.phase is Phase.OPTIONS
    return conn


def transmitting(size: int = SIZE, read_only: bool = False) -> NbdServerConnection:
    """A connection that negotiated the export with NBD_OPT_GO."""
    conn = handshaken(size, read_only)
    conn.receive_data(option(p.OPT_GO, info_data(EXPORT)))
    [event] = conn.events()
    assert isinstance(event, TransmissionStarted)
    conn.data_to_send()
    return conn


# --- handshake -------------------------------------------------------------------------
def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = NbdServerConnection(EXPORT, SIZE)
    greeting = conn.data_to_send()
    assert greeting[:8] == b"NBDMAGIC"
    assert greeting[8:16] == b"IHAVEOPT"
    assert struct.unpack(">H", greeting[16:]) == (p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES,)
    assert conn.data_to_send() == b""
    assert conn.next_event() is NEED_DATA


def test_full_handshake_with_go() -> None:
    conn = handshaken(description="the test export")
    infos = (p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE)
    msg = option(p.OPT_GO, info_data(EXPORT, infos))
    conn.receive_data(msg)
    [event] = conn.events()
    assert event == TransmissionStarted(EXPORT, SIZE, DEFAULT_FLAGS, p.OPT_GO)
    assert conn.phase is Phase.TRANSMISSION
    replies = option_replies(conn.data_to_send())
    assert all(opt == p.OPT_GO for opt, _, _ in replies)
    assert [rep for _, rep, _ in replies] == [p.REP_INFO] * 4 + [p.REP_ACK]
    infos_sent = {struct.unpack(">H", data[:2])[0]: data[2:] for _, rep, data in replies[:-1]}
    assert struct.unpack(">QH", infos_sent[p.INFO_EXPORT]) == (SIZE, DEFAULT_FLAGS)
    assert struct.unpack(">III", infos_sent[p.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert infos_sent[p.INFO_NAME] == EXPORT.encode()
    assert infos_sent[p.INFO_DESCRIPTION] == b"the test export"


def test_go_on_read_only_export_advertises_read_only() -> None:
    conn = handshaken(read_only=True)
    conn.receive_data(option(p.OPT_GO, info_data(EXPORT)))
    [event] = conn.events()
    assert isinstance(event, TransmissionStarted)
    assert event.transmission_flags == DEFAULT_FLAGS | p.FLAG_READ_ONLY


def test_go_split_into_single_bytes() -> None:
    conn = NbdServerConnection(EXPORT, SIZE)
    events = []
    for byte in client_flags() + option(p.OPT_GO, info_data(EXPORT, (p.INFO_BLOCK_SIZE,))):
        conn.receive_data(bytes([byte]))
        events += conn.events()
    assert events == [TransmissionStarted(EXPORT, SIZE, DEFAULT_FLAGS, p.OPT_GO)]


def test_info_answers_and_stays_in_negotiation() -> None:
    conn = handshaken()
    conn.receive_data(option(p.OPT_INFO, info_data(EXPORT)))
    [event] = conn.events()
    assert isinstance(event, OptionHandled) and event.reply == p.REP_ACK
    assert conn.phase is Phase.OPTIONS
    replies = option_replies(conn.data_to_send())
    assert [(opt, rep) for opt, rep, _ in replies] == [
        (p.OPT_INFO, p.REP_INFO),
        (p.OPT_INFO, p.REP_INFO),
        (p.OPT_INFO, p.REP_ACK),
    ]
    assert replies[0][2] == struct.pack(">HQH", p.INFO_EXPORT, SIZE, DEFAULT_FLAGS)
    conn.receive_data(option(p.OPT_GO, info_data(EXPORT)))
    assert isinstance(conn.next_event(), TransmissionStarted)


def test_list_names_the_export() -> None:
    conn = handshaken()
    conn.receive_data(option(p.OPT_LIST))
    [event] = conn.events()
    assert isinstance(event, OptionHandled)
    replies = option_replies(conn.data_to_send())
    assert replies == [
        (p.OPT_LIST, p.REP_SERVER, struct.pack(">I", 4) + b"res1"),
        (p.OPT_LIST, p.REP_ACK, b""),
    ]


def test_list_with_data_is_invalid() -> None:
    conn = handshaken()
    conn.receive_data(option(p.OPT_LIST, b"x"))
    conn.events()
    [(opt, rep, _)] = option_replies(conn.data_to_send())
    assert (opt, rep) == (p.OPT_LIST, p.REP_ERR_INVALID)
    assert conn.phase is Phase.OPTIONS


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_enters_transmission(no_zeroes: bool) -> None:
    conn = NbdServerConnection(EXPORT, SIZE)
    conn.data_to_send()
    flags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)
    conn.receive_data(client_flags(flags) + option(p.OPT_EXPORT_NAME, EXPORT.encode()))
    [event] = conn.events()
    assert event == TransmissionStarted(EXPORT, SIZE, DEFAULT_FLAGS, p.OPT_EXPORT_NAME)
    reply = conn.data_to_send()
    assert reply[:10] == struct.pack(">QH", SIZE, DEFAULT_FLAGS)
    assert reply[10:] == (b"" if no_zeroes else bytes(124))


def test_export_name_unknown_closes_without_reply() -> None:
    conn = handshaken()
    conn.receive_data(option(p.OPT_EXPORT_NAME, b"other"))
    [event] = conn.events()
    assert isinstance(event, ConnectionClosed) and not event.clean
    assert "other" in event.reason and "res1" in event.reason
    assert conn.data_to_send() == b""
    assert conn.phase is Phase.CLOSED


def test_go_with_wrong_resource_name_gets_unknown_naming_the_export() -> None:
    conn = handshaken()
    conn.receive_data(option(p.OPT_GO, info_data("wrong resource name")))
    [event] = conn.events()
    assert isinstance(event, OptionHandled) and event.reply == p.REP_ERR_UNKNOWN
    [(opt, rep, message)] = option_replies(conn.data_to_send())
    assert (opt, rep) == (p.OPT_GO, p.REP_ERR_UNKNOWN)
    assert b"wrong resource name" in message and b"'res1'" in message
    # the client may try again
    conn.receive_data(option(p.OPT_GO, info_data(EXPORT)))
    assert isinstance(conn.next_event(), TransmissionStarted)


def test_empty_name_is_the_default_export() -> None:
    conn = handshaken()
    conn.receive_data(option(p.OPT_GO, info_data("", (p.INFO_NAME,))))
    [event] = conn.events()
    assert isinstance(event, TransmissionStarted) and event.export_name == EXPORT
    names = [d[2:] for _, rep, d in option_replies(conn.data_to_send()) if d[:2] == b"\0\1"]
    assert names == [b"res1"]


@pytest.mark.parametrize(
    "opt",
    [p.OPT_STRUCTURED_REPLY, p.OPT_SET_META_CONTEXT, p.OPT_LIST_META_CONTEXT, p.OPT_STARTTLS, 99],
)
def test_unsupported_options_get_err_unsup(opt: int) -> None:
    conn = handshaken()
    conn.receive_data(option(opt, b"some data"))
    [event] = conn.events()
    assert isinstance(event, OptionHandled) and event.reply == p.REP_ERR_UNSUP
    [(o, rep, message)] = option_replies(conn.data_to_send())
    assert (o, rep) == (opt, p.REP_ERR_UNSUP) and b"not supported" in message
    assert conn.phase is Phase.OPTIONS


def test_abort_acks_and_closes_cleanly() -> None:
    conn = handshaken()
    conn.receive_data(option(p.OPT_ABORT) + option(p.OPT_LIST))
    [event] = conn.events()
    assert isinstance(event, ConnectionClosed) and event.clean
    assert option_replies(conn.data_to_send()) == [(p.OPT_ABORT, p.REP_ACK, b"")]
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("flags", [0, p.FLAG_C_NO_ZEROES, p.FLAG_C_FIXED_NEWSTYLE | 4, 0xFFFFFFFF])
def test_client_without_fixed_newstyle_or_with_unknown_flags_is_refused(flags: int) -> None:
    conn = NbdServerConnection(EXPORT, SIZE)
    conn.receive_data(client_flags(flags))
    [event] = conn.events()
    assert isinstance(event, ConnectionClosed) and not event.clean
    assert conn.phase is Phase.CLOSED


def test_oversized_option_closes_before_its_data_arrives() -> None:
    conn = handshaken()
    conn.receive_data(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, (64 << 10) + 1))
    [event] = conn.events()
    assert isinstance(event, ConnectionClosed) and "limit" in event.reason


def test_bad_option_magic_closes() -> None:
    conn = handshaken()
    conn.receive_data(struct.pack(">QII", 0x1234, p.OPT_GO, 0))
    [event] = conn.events()
    assert isinstance(event, ConnectionClosed) and "magic" in event.reason


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0\4res",  # name longer than the data
        struct.pack(">I", 4) + b"res1" + struct.pack(">H", 2) + b"\0\1",  # missing a request
        struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0",  # not UTF-8
    ],
)
def test_malformed_go_is_invalid_and_keeps_negotiating(data: bytes) -> None:
    conn = handshaken()
    conn.receive_data(option(p.OPT_GO, data))
    [event] = conn.events()
    assert isinstance(event, OptionHandled) and event.reply == p.REP_ERR_INVALID
    assert conn.phase is Phase.OPTIONS


# --- transmission ------------------------------------------------------------------------
def test_requests_parse_into_events() -> None:
    conn = transmitting()
    conn.receive_data(
        request(p.CMD_READ, 1, 512, 4096)
        + write(2, 4096, b"abc", p.CMD_FLAG_FUA)
        + request(p.CMD_FLUSH, 3, 0, 0)
        + request(p.CMD_TRIM, 4, 8192, 4096)
        + request(p.CMD_DISC, 5, 0, 0)
        + request(p.CMD_READ, 6, 0, 1)  # after DISC: ignored
    )
    assert conn.events() == [
        ReadRequest(1, 512, 4096),
        WriteRequest(2, 4096, b"abc", True),
        FlushRequest(3),
        TrimRequest(4, 8192, 4096, False),
        DisconnectRequest(5),
    ]
    assert conn.phase is Phase.DISCONNECTING
    conn.receive_data(request(p.CMD_READ, 7, 0, 1))
    assert conn.next_event() is NEED_DATA


def test_write_event_waits_for_the_whole_payload() -> None:
    conn = transmitting()
    msg = write(9, 0, bytes(range(256)) * 16)
    conn.receive_data(msg[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(msg[-1:])
    assert conn.next_event() == WriteRequest(9, 0, bytes(range(256)) * 16, False)


def test_replies_are_simple_replies() -> None:
    conn = transmitting()
    assert conn.send_reply(0x0102030405060708) == struct.pack(
        ">IIQ", 0x67446698, 0, 0x0102030405060708
    )
    assert conn.send_reply(7, p.EIO) == struct.pack(">IIQ", 0x67446698, 5, 7)
    assert conn.send_read_reply(7, memoryview(b"xyz")) == struct.pack(">IIQ", 0x67446698, 0, 7) + (
        b"xyz"
    )


def test_bad_request_magic_closes() -> None:
    conn = transmitting()
    conn.receive_data(request(p.CMD_READ, 1, 0, 1) + b"\xde\xad\xbe\xef" + bytes(24))
    first, second = conn.events()
    assert first == ReadRequest(1, 0, 1)
    assert isinstance(second, ConnectionClosed) and not second.clean
    assert "0xdeadbeef" in second.reason
    conn.receive_data(request(p.CMD_READ, 2, 0, 1))
    assert conn.next_event() is NEED_DATA


def test_too_large_write_closes_at_once() -> None:
    conn = transmitting()
    conn.receive_data(request(p.CMD_WRITE, 1, 0, (32 << 20) + 1))
    [event] = conn.events()
    assert isinstance(event, ConnectionClosed) and "maximum" in event.reason


def test_largest_write_is_accepted() -> None:
    conn = transmitting(size=64 << 20)
    payload = b"\xa5" * (32 << 20)
    conn.receive_data(write(1, 0, payload))
    [event] = conn.events()
    assert isinstance(event, WriteRequest) and event.data == payload


def test_too_large_read_is_an_error_reply() -> None:
    conn = transmitting(size=64 << 20)
    conn.receive_data(request(p.CMD_READ, 1, 0, (32 << 20) + 1) + request(p.CMD_READ, 2, 0, 1))
    first, second = conn.events()
    assert isinstance(first, RequestError) and first.error == p.EINVAL and first.handle == 1
    assert second == ReadRequest(2, 0, 1)


def test_past_end_requests_get_errors_and_keep_the_connection() -> None:
    conn = transmitting()
    conn.receive_data(
        request(p.CMD_READ, 1, SIZE - 1, 2)
        + write(2, SIZE - 1, b"xy")
        + request(p.CMD_TRIM, 3, SIZE, 1)
        + request(p.CMD_READ, 4, SIZE - 1, 1)  # the last byte is fine
        + request(p.CMD_READ, 5, SIZE, 0)  # zero length at the end is fine
        + write(6, 2**64 - 1, b"z")  # offset + length overflows 64 bits
    )
    events = conn.events()
    assert [(type(e), getattr(e, "handle", None)) for e in events] == [
        (RequestError, 1),
        (RequestError, 2),
        (RequestError, 3),
        (ReadRequest, 4),
        (ReadRequest, 5),
        (RequestError, 6),
    ]
    errors = [e.error for e in events if isinstance(e, RequestError)]
    assert errors == [p.EINVAL, p.ENOSPC, p.EINVAL, p.ENOSPC]
    assert conn.phase is Phase.TRANSMISSION


def test_read_only_refuses_write_and_trim() -> None:
    conn = transmitting(read_only=True)
    conn.receive_data(
        write(1, 0, b"data") + request(p.CMD_TRIM, 2, 0, 512) + request(p.CMD_READ, 3, 0, 4)
    )
    e1, e2, e3 = conn.events()
    assert isinstance(e1, RequestError) and e1.error == p.EPERM
    assert isinstance(e2, RequestError) and e2.error == p.EPERM
    assert e3 == ReadRequest(3, 0, 4)


def test_unknown_command_and_flags_are_einval() -> None:
    conn = transmitting()
    conn.receive_data(
        request(7, 1, 0, 0)
        + request(p.CMD_READ, 2, 0, 1, flags=4)
        + write(3, 0, b"ab", flags=2)
        + request(p.CMD_READ, 4, 0, 2)
    )
    e1, e2, e3, e4 = conn.events()
    assert isinstance(e1, RequestError) and e1.error == p.EINVAL
    assert isinstance(e2, RequestError) and e2.error == p.EINVAL
    assert isinstance(e3, RequestError) and e3.error == p.EINVAL  # payload skipped
    assert e4 == ReadRequest(4, 0, 2)


def test_export_size_is_read_for_every_request() -> None:
    size = [SIZE]
    conn = NbdServerConnection(EXPORT, lambda: size[0])
    conn.receive_data(client_flags() + option(p.OPT_GO, info_data(EXPORT)))
    conn.events()
    conn.receive_data(write(1, SIZE, b"grow"))
    assert isinstance(conn.next_event(), RequestError)
    size[0] = 2 * SIZE
    conn.receive_data(write(2, SIZE, b"grow"))
    assert conn.next_event() == WriteRequest(2, SIZE, b"grow", False)
    conn.size = 10
    conn.receive_data(request(p.CMD_READ, 3, 0, 11))
    assert isinstance(conn.next_event(), RequestError)
    assert conn.size == 10


def test_eof_between_messages_is_clean_and_inside_one_is_not() -> None:
    conn = transmitting()
    conn.receive_eof()
    [event] = conn.events()
    assert isinstance(event, ConnectionClosed) and event.clean
    conn = transmitting()
    conn.receive_data(request(p.CMD_READ, 1, 0, 1)[:10])
    conn.receive_eof()
    [event] = conn.events()
    assert isinstance(event, ConnectionClosed) and not event.clean


def test_errno_mapping() -> None:
    assert p.nbd_error_from_errno(errno.ENOSPC) == p.ENOSPC
    assert p.nbd_error_from_errno(errno.EDQUOT) == p.ENOSPC
    assert p.nbd_error_from_errno(errno.EROFS) == p.EPERM
    assert p.nbd_error_from_errno(errno.EINVAL) == p.EINVAL
    assert p.nbd_error_from_errno(errno.ENOMEM) == p.ENOMEM
    assert p.nbd_error_from_errno(errno.EOVERFLOW) == p.EOVERFLOW
    assert p.nbd_error_from_errno(errno.ENOENT) == p.EIO
    assert p.nbd_error_from_errno(None) == p.EIO


# --- hypothesis ----------------------------------------------------------------------------
_offsets = st.integers(min_value=0, max_value=SIZE - 1)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, object]:
    """One valid request as bytes and the event it must produce."""
    kind = draw(st.sampled_from(["read", "write", "flush", "trim"]))
    handle = draw(st.integers(min_value=0, max_value=2**64 - 1))
    offset = draw(_offsets)
    length = draw(st.integers(min_value=0, max_value=min(SIZE - offset, 300)))
    fua = draw(st.booleans())
    flags = p.CMD_FLAG_FUA if fua else 0
    if kind == "read":
        return request(p.CMD_READ, handle, offset, length), ReadRequest(handle, offset, length)
    if kind == "write":
        data = draw(st.binary(min_size=length, max_size=length))
        return write(handle, offset, data, flags), WriteRequest(handle, offset, data, fua)
    if kind == "flush":
        return request(p.CMD_FLUSH, handle, 0, 0), FlushRequest(handle)
    return (
        request(p.CMD_TRIM, handle, offset, length, flags),
        TrimRequest(handle, offset, length, fua),
    )


@settings(max_examples=200, deadline=None)
@given(
    reqs=st.lists(requests(), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=20),
)
def test_pipelined_requests_survive_any_split(
    reqs: list[tuple[bytes, object]], cuts: list[int]
) -> None:
    conn = transmitting()
    stream = b"".join(raw for raw, _ in reqs)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    events = []
    for start, end in zip(points, points[1:], strict=False):
        conn.receive_data(stream[start:end])
        events += conn.events()
    assert events == [expected for _, expected in reqs]
    assert conn.buffered == 0


def test_pipelined_requests_split_at_every_byte() -> None:
    reqs = (
        request(p.CMD_READ, 1, 0, 512)
        + write(2, 100, b"hello world", p.CMD_FLAG_FUA)
        + request(p.CMD_FLUSH, 3, 0, 0)
        + request(p.CMD_TRIM, 4, 4096, 4096)
        + write(5, 0, b"")
    )
    expected = [
        ReadRequest(1, 0, 512),
        WriteRequest(2, 100, b"hello world", True),
        FlushRequest(3),
        TrimRequest(4, 4096, 4096, False),
        WriteRequest(5, 0, b"", False),
    ]
    for cut in range(len(reqs) + 1):
        conn = transmitting()
        conn.receive_data(reqs[:cut])
        events = conn.events()
        conn.receive_data(reqs[cut:])
        assert events + conn.events() == expected, cut


def feed_via_buffer(conn: NbdServerConnection, stream: bytes, chunk: int) -> list[object]:
    """Feed ``stream`` like asyncio.BufferedProtocol does: recv_into get_buffer()'s buffer."""
    events: list[object] = []
    pos = 0
    while pos < len(stream):
        buf = conn.get_buffer(-1)
        n = min(len(buf), chunk, len(stream) - pos)
        assert n > 0
        buf[:n] = stream[pos : pos + n]
        del buf
        conn.buffer_updated(n)
        pos += n
        events += conn.events()
    return events


@settings(max_examples=100, deadline=None)
@given(
    reqs=st.lists(requests(), min_size=1, max_size=12),
    chunk=st.integers(min_value=1, max_value=400),
)
def test_pipelined_requests_through_get_buffer(
    reqs: list[tuple[bytes, object]], chunk: int
) -> None:
    conn = transmitting()
    events = feed_via_buffer(conn, b"".join(raw for raw, _ in reqs), chunk)
    assert events == [expected for _, expected in reqs]
    assert conn.buffered == 0


@pytest.mark.parametrize("use_buffer", [False, True])
@pytest.mark.parametrize("chunk", [1000, 65536, 300000, 10**7])
def test_large_writes_arrive_in_any_chunks(use_buffer: bool, chunk: int) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    stream = (
        write(1, 0, big)
        + request(p.CMD_READ, 2, 0, 4096)
        + write(3, 4096, big[:70000], p.CMD_FLAG_FUA)
        + write(4, SIZE - 10, big[:11])  # past the end: payload skipped, error
        + request(p.CMD_FLUSH, 5, 0, 0)
    )
    conn = transmitting()
    if use_buffer:
        events = feed_via_buffer(conn, stream, chunk)
    else:
        events = []
        for start in range(0, len(stream), chunk):
            conn.receive_data(memoryview(stream)[start : start + chunk])
            events += conn.events()
    assert events[:3] == [
        WriteRequest(1, 0, big, False),
        ReadRequest(2, 0, 4096),
        WriteRequest(3, 4096, big[:70000], True),
    ]
    assert isinstance(events[3], RequestError) and events[3].error == p.ENOSPC
    assert events[4:] == [FlushRequest(5)]
    first = events[0]
    # a payload that arrived in pieces is handed over in the buffer it was received into
    # (its own, not reused), a small one as bytes
    assert isinstance(first, WriteRequest) and type(first.data) in (bytes, bytearray)


def test_get_buffer_after_a_complete_payload_feeds_the_next_request() -> None:
    conn = transmitting()
    stream = write(1, 0, bytes(100000)) + request(p.CMD_FLUSH, 2, 0, 0)
    conn.receive_data(stream[:1000])
    assert conn.next_event() is NEED_DATA
    rest = stream[1000:]
    while rest:  # no next_event() in between, as when the server is throttled
        buf = conn.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), len(rest))
        buf[:n] = rest[:n]
        del buf
        conn.buffer_updated(n)
        rest = rest[n:]
    assert conn.events() == [WriteRequest(1, 0, bytes(100000), False), FlushRequest(2)]


def test_eof_inside_a_large_payload_is_unclean() -> None:
    conn = transmitting()
    conn.receive_data(write(1, 0, bytes(100000))[:50000])
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 50000 - 28
    conn.receive_eof()
    [event] = conn.events()
    assert isinstance(event, ConnectionClosed) and not event.clean
    assert "49972 bytes" in event.reason


def _check_events(events: list[object]) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, EVENT_TYPES)
        if isinstance(event, ConnectionClosed):
            assert i == len(events) - 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_garbage_from_the_start_never_raises(chunks: list[bytes]) -> None:
    conn = NbdServerConnection(EXPORT, SIZE)
    events: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events += conn.events()
    _check_events(events)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["options", "transmission"]),
    st.lists(st.binary(max_size=80), max_size=10),
    st.booleans(),
)
def test_garbage_in_any_phase_never_raises(phase: str, chunks: list[bytes], eof: bool) -> None:
    conn = handshaken() if phase == "options" else transmitting()
    events: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events += conn.events()
        conn.data_to_send()
    if eof:
        conn.receive_eof()
        events += conn.events()
        assert conn.phase in (Phase.CLOSED, Phase.DISCONNECTING)
    _check_events(events)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=2**16 - 1),
    st.integers(min_value=0, max_value=2**16 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_request_header_yields_an_event_or_waits(
    magic_bits: int, flags: int, command: int, offset: int, length: int
) -> None:
    magic = p.REQUEST_MAGIC if magic_bits % 2 else magic_bits
    conn = transmitting()
    conn.receive_data(struct.pack(">IHHQQI", magic, flags, command, 1, offset, length))
    event = conn.next_event()
    if event is NEED_DATA:  # a write still waiting for its payload
        assert command == p.CMD_WRITE and magic == p.REQUEST_MAGIC and length > 0
    else:
        _check_events([event])
