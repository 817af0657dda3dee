"""Log record format v1: round trips, versioning, and every corruption detected."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marslib.checksum import available_implementations
from marslib.errors import FormatTooNew
from marslib.formats import logrecord
from marslib.formats.logrecord import (
    FLAG_COMPRESSED,
    FLAG_END,
    HEADER_V1_2_LEN,
    HEADER_V1_LEN,
    LogRecord,
    Problem,
    RecordError,
    decode,
    encode,
)

records = st.builds(
    LogRecord,
    seq=st.integers(1, 2**63),
    offset=st.integers(0, 2**50),
    data=st.binary(max_size=9000),
    stamp_ns=st.integers(0, 2**63),
)


def test_crc32c_implementations_agree() -> None:
    impls = available_implementations()
    assert "crcmod" in impls and len(impls) >= 2
    for data in (b"", b"123456789", bytes(range(256)) * 300):
        values = {name: f(data, 0) for name, f in impls.items()}
        assert len(set(values.values())) == 1, values
    assert impls["crcmod"](b"123456789", 0) == 0xE3069283  # the crc32c check value


@given(st.binary(max_size=5000), st.integers(0, 5000))
def test_crc32c_continuation_agrees(data: bytes, cut: int) -> None:
    for f in available_implementations().values():
        assert f(data[cut:], f(data[:cut], 0)) == f(data, 0)


@given(records, st.sampled_from([None, 1, 3]))
def test_round_trip(record: LogRecord, level: int | None) -> None:
    raw = encode(record, level)
    got, end = decode(raw)
    assert end == len(raw)
    assert (got.seq, got.offset, bytes(got.data), got.stamp_ns) == (
        record.seq, record.offset, bytes(record.data), record.stamp_ns)
    assert not got.flags & FLAG_COMPRESSED


def test_compression_only_where_it_shrinks() -> None:
    text = LogRecord(seq=1, offset=0, data=b"abc" * 4000)
    noise = LogRecord(seq=2, offset=0, data=bytes((i * 7919) % 251 for i in range(12000)))
    packed = encode(text, 1)
    assert len(packed) < 1000
    assert struct.unpack_from("<I", packed, 8)[0] & FLAG_COMPRESSED
    import os
    rnd = LogRecord(seq=3, offset=0, data=os.urandom(12000))
    assert len(encode(rnd, 1)) == HEADER_V1_2_LEN + 12000
    assert decode(encode(noise, 1))[0].data == noise.data


def test_end_marker() -> None:
    rec, _ = decode(encode(LogRecord(seq=9, offset=0, data=b"", flags=FLAG_END)))
    assert rec.is_end and rec.data_len == 0


def test_newer_minor_with_extra_header_field_is_read() -> None:
    rec = LogRecord(seq=5, offset=512, data=b"payload", extension=b"\x01\x02\x03\x04new!",
                    format_version=(1 << 8) | 7)
    got, end = decode(encode(rec) + b"trailing")
    assert bytes(got.data) == b"payload" and got.extension == b"\x01\x02\x03\x04new!"
    assert end == HEADER_V1_2_LEN + 8 + 7


def test_extension_bytes_are_covered_by_the_header_crc() -> None:
    raw = bytearray(encode(LogRecord(seq=5, offset=0, data=b"x", extension=b"abcd")))
    raw[HEADER_V1_LEN] ^= 1
    with pytest.raises(RecordError) as exc:
        decode(raw)
    assert exc.value.problem is Problem.BAD_HEADER_CRC


def test_newer_major_is_refused_clearly() -> None:
    raw = encode(LogRecord(seq=1, offset=0, data=b"x", format_version=2 << 8))
    with pytest.raises(FormatTooNew, match="upgrade marslib"):
        decode(raw)


@settings(max_examples=300)
@given(records, st.data())
def test_any_bit_flip_is_detected(record: LogRecord, data: st.DataObject) -> None:
    raw = bytearray(encode(record))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((RecordError, FormatTooNew)):
        got, end = decode(raw)
        # a flip that still decodes would be a silent corruption
        raise AssertionError(f"flip of bit {bit} not detected: {got}")


@given(records, st.data())
def test_truncation_is_short_never_a_record(record: LogRecord, data: st.DataObject) -> None:
    raw = encode(record)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(RecordError) as exc:
        decode(raw[:cut])
    assert exc.value.problem in (Problem.SHORT, Problem.ZERO)


@given(st.lists(records, min_size=1, max_size=5), st.binary(min_size=1, max_size=200),
       st.data())
def test_garbage_between_records_stops_the_reader(
    recs: list[LogRecord], garbage: bytes, data: st.DataObject
) -> None:
    parts = [encode(r) for r in recs]
    at = data.draw(st.integers(0, len(parts)))
    blob = b"".join(parts[:at]) + garbage + b"".join(parts[at:])
    pos, seen = 0, []
    while pos < len(blob):
        try:
            rec, pos = decode(blob, pos)
        except (RecordError, FormatTooNew):
            break
        seen.append(rec)
    # everything before the garbage decodes; nothing that decodes is something never written
    assert len(seen) >= at
    written = {(r.seq, r.offset, bytes(r.data)) for r in recs}
    for rec in seen:
        assert (rec.seq, rec.offset, bytes(rec.data)) in written


@given(st.binary(max_size=300))
def test_random_bytes_never_decode_silently(blob: bytes) -> None:
    try:
        decode(blob)
    except (RecordError, FormatTooNew):
        return
    raise AssertionError("random bytes decoded as a record")


def test_limits() -> None:
    with pytest.raises(ValueError):
        encode(LogRecord(seq=1, offset=0, data=b"x", extension=b"e" * logrecord.MAX_HEADER_LEN))
