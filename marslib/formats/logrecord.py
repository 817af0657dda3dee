"""The transaction log record, format version 1.2 (see docs/log-format.md).

Little-endian, one record per write request, packed back to back::

    magic u32 | format_version u16 | header_len u16 | flags u32 | seq u64 | stamp_ns u64
    | offset u64 | data_len u32 | stored_len u32 | data_crc u32 | header_crc u32
    | commit_start u64 | commit_records u32                         (since 1.1)
    | durable_end u64                                               (since 1.2)
    | [fields appended by later minor versions] | payload (stored_len bytes)

The last record of every group commit carries ``FLAG_COMMIT`` and says where its commit
began (``commit_start``, an offset in the same logfile) and how many records it holds:
a commit whose marker is intact is complete, so a torn tail (an incomplete last commit)
can be told from damage inside the log (see ``marslib.logfile.judge_stop``). Since 1.2
the marker also says up to which offset the log was durable when the commit was written
(``durable_end``): commits may be written while earlier ones are still being flushed,
and only a commit written after a record was durable proves that record was
acknowledged. Such a marker may carry padding bytes (0xa5) after its fields, so that the
commit ends on a 4096-byte boundary (readers skip them like any header bytes they do not
know).

``format_version`` is ``major << 8 | minor``. A reader accepts any minor of a major it
knows and skips header bytes it does not understand (``header_len`` says how many);
a higher major is refused. ``header_crc`` is the crc32c of every header byte except
the crc field itself, so appended fields are covered too. ``data_crc`` is the crc32c
of the logical (uncompressed) data.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import zstandard

from marslib.checksum import Buffer, crc32c
from marslib.errors import FormatTooNew

MAGIC = 0x474F4C4D  # b"MLOG" read little-endian
FORMAT_MAJOR = 1
FORMAT_MINOR = 2
FORMAT_VERSION = FORMAT_MAJOR << 8 | FORMAT_MINOR

_HEADER = struct.Struct("<IHHIQQQIIII")
HEADER_V1_LEN = _HEADER.size  # 52
_CRC_POS = HEADER_V1_LEN - 4  # header_crc is the last v1 field
_COMMIT = struct.Struct("<QI")  # commit_start, commit_records: the fields of 1.1
HEADER_V1_1_LEN = HEADER_V1_LEN + _COMMIT.size  # 64
_DURABLE = struct.Struct("<Q")  # durable_end: the field of 1.2
HEADER_V1_2_LEN = HEADER_V1_1_LEN + _DURABLE.size  # 72
COMMIT_ALIGN = 4096  # a padded commit ends on a multiple of this
_FLAGS_POS = 8
MAX_HEADER_LEN = 4096
MAX_DATA_LEN = 64 << 20

FLAG_COMPRESSED = 1 << 0  # payload is a zstd frame of the logical data
FLAG_END = 1 << 1  # end-of-log marker: the writer closed this log (handover)
FLAG_GAP = 1 << 2  # history gap: writes happened that no log holds (emergency mode)
FLAG_COMMIT = 1 << 3  # the last record of a group commit (format 1.1)
KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_END | FLAG_GAP | FLAG_COMMIT

_compressors: dict[int, zstandard.ZstdCompressor] = {}
_decompressor = zstandard.ZstdDecompressor()


@dataclass(frozen=True)
class LogRecord:
    """One logged write (or an end-of-log marker)."""

    seq: int
    offset: int
    data: bytes | memoryview
    stamp_ns: int = 0
    flags: int = 0
    extension: bytes = field(default=b"", repr=False)  # header bytes past known fields
    format_version: int = FORMAT_VERSION
    commit_start: int = 0  # with FLAG_COMMIT: offset of the commit's first record
    commit_records: int = 0  # with FLAG_COMMIT: records in the commit, this one included
    durable_end: int = 0  # with FLAG_COMMIT (1.2): the log was durable to here when written

    @property
    def is_end(self) -> bool:
        return bool(self.flags & FLAG_END)

    @property
    def is_gap(self) -> bool:
        return bool(self.flags & FLAG_GAP)

    @property
    def is_commit(self) -> bool:
        return bool(self.flags & FLAG_COMMIT)

    @property
    def has_commit_marks(self) -> bool:
        """Written by a format that marks group commits (1.1 and later)."""
        return has_commit_marks(self.format_version)

    @property
    def data_len(self) -> int:
        return len(self.data)


def has_commit_marks(format_version: int) -> bool:
    return format_version & 0xFF >= 1 or format_version >> 8 > 1


def has_durable_end(format_version: int) -> bool:
    """Written by a format whose commit markers carry ``durable_end`` (1.2 and later)."""
    return format_version & 0xFF >= 2 or format_version >> 8 > 1


@dataclass(frozen=True)
class RecordHeader:
    """A decoded and checked header; ``record_len`` is header plus stored payload."""

    format_version: int
    header_len: int
    flags: int
    seq: int
    stamp_ns: int
    offset: int
    data_len: int
    stored_len: int
    data_crc: int
    extension: bytes
    commit_start: int = 0
    commit_records: int = 0
    durable_end: int = 0

    @property
    def record_len(self) -> int:
        return self.header_len + self.stored_len


class Problem(Enum):
    """Why a record could not be decoded."""

    SHORT = "short"  # fewer bytes than the record needs: a torn tail or EOF
    ZERO = "zero"  # an all-zero header: unused, preallocated space
    BAD_MAGIC = "bad magic"
    BAD_HEADER = "bad header"  # impossible lengths
    BAD_HEADER_CRC = "header checksum mismatch"
    BAD_DATA_CRC = "data checksum mismatch"
    BAD_PAYLOAD = "payload cannot be decompressed"


class RecordError(Exception):
    """A record at ``pos`` failed to decode; ``problem`` says how."""

    def __init__(self, pos: int, problem: Problem, detail: str = "") -> None:
        super().__init__(f"offset {pos}: {problem.value}{': ' + detail if detail else ''}")
        self.pos = pos
        self.problem = problem
        self.detail = detail


def encode(record: LogRecord, compress_level: int | None = None) -> bytes:
    """Encode a record; with ``compress_level`` the payload is zstd-compressed if that
    makes it smaller."""
    data = record.data
    data_len = len(data)
    if data_len > MAX_DATA_LEN:
        raise ValueError(f"record data of {data_len} bytes exceeds {MAX_DATA_LEN}")
    flags = record.flags & ~FLAG_COMPRESSED
    payload: bytes | memoryview = data
    if compress_level is not None and data_len >= 512:
        comp = _compressors.get(compress_level)
        if comp is None:
            comp = _compressors.setdefault(
                compress_level, zstandard.ZstdCompressor(level=compress_level)
            )
        packed = comp.compress(data)
        if len(packed) < data_len:
            payload = packed
            flags |= FLAG_COMPRESSED
    fields = b""
    if has_commit_marks(record.format_version):
        fields = _COMMIT.pack(record.commit_start, record.commit_records)
    else:
        flags &= ~FLAG_COMMIT
    if has_durable_end(record.format_version):
        fields += _DURABLE.pack(record.durable_end)
    extension = fields + record.extension
    header_len = HEADER_V1_LEN + len(extension)
    if header_len > MAX_HEADER_LEN:
        raise ValueError(f"record header of {header_len} bytes exceeds {MAX_HEADER_LEN}")
    head = _HEADER.pack(
        MAGIC,
        record.format_version,
        header_len,
        flags,
        record.seq,
        record.stamp_ns,
        record.offset,
        data_len,
        len(payload),
        crc32c(data, 0),
        0,
    )
    hcrc = crc32c(extension, crc32c(memoryview(head)[:_CRC_POS], 0))
    return b"".join((head[:_CRC_POS], hcrc.to_bytes(4, "little"), extension, payload))


_HEADER_1_2 = struct.Struct("<IHHIQQQIIIIQIQ")  # a whole 1.2 header, all fields
_CRC_END = _CRC_POS + 4
_crc_bytes = struct.Struct("<I").pack
_MAX_PAD = MAX_HEADER_LEN - HEADER_V1_2_LEN
# padding is not zeros: an all-zero sector inside a commit can then only be one that was
# never written (see marslib.logfile.judge_stop)
PAD_BYTE = b"\xa5"


def encode_commit(writes: Sequence[tuple[int, Buffer]], first_seq: int, commit_start: int,
                  stamp_ns: int, durable_end: int | None = None, align: bool = False
                  ) -> tuple[list[Buffer], int]:
    """One group commit of uncompressed records, as buffers for ``pwritev``: header and
    payload of each write in turn, the payloads uncopied, and the commit's length. The
    last record carries ``FLAG_COMMIT``; ``commit_start`` is the logfile offset the commit
    will be written at, ``durable_end`` how far the log is durable now (default: to
    ``commit_start``). With ``align`` the marker's header is padded (``PAD_BYTE``) so that the
    commit ends on a multiple of ``COMMIT_ALIGN`` (unless that needs more padding than a
    header holds; compare the end).

    Byte for byte what :func:`encode` and :func:`seal_commit` produce for the same
    records, without building a :class:`LogRecord` per write (the primary's hot path)."""
    pack = _HEADER_1_2.pack
    crc = crc32c
    out: list[Buffer] = []
    append = out.append
    last = len(writes) - 1
    seq = first_seq
    total = 0
    extra = b""  # fields of a later minor version would go here
    for i, (offset, data) in enumerate(writes):
        n = len(data)
        if n > MAX_DATA_LEN:
            raise ValueError(f"record data of {n} bytes exceeds {MAX_DATA_LEN}")
        if i == last:
            tail = extra
            if align:
                pad = -(commit_start + total + HEADER_V1_2_LEN + len(extra) + n) % COMMIT_ALIGN
                if pad <= _MAX_PAD - len(extra):
                    tail = extra + PAD_BYTE * pad
            head = pack(MAGIC, FORMAT_VERSION, HEADER_V1_2_LEN + len(tail), FLAG_COMMIT, seq,
                        stamp_ns, offset, n, n, crc(data, 0), 0, commit_start, last + 1,
                        commit_start if durable_end is None else durable_end)
        else:
            tail = extra
            head = pack(MAGIC, FORMAT_VERSION, HEADER_V1_2_LEN + len(tail), 0, seq, stamp_ns,
                        offset, n, n, crc(data, 0), 0, 0, 0, 0)
        rest = head[_CRC_END:] + tail if tail else head[_CRC_END:]
        hcrc = crc(rest, crc(head[:_CRC_POS], 0))
        header = head[:_CRC_POS] + _crc_bytes(hcrc) + rest
        append(header)
        append(data)
        total += len(header) + n
        seq += 1
    return out, total


def sealed_header(encoded: bytes, commit_start: int, commit_records: int,
                  durable_end: int | None = None) -> bytes:
    """The header of the encoded record ``encoded`` (1.1 or later) rewritten to make it
    the last record of a group commit that began at ``commit_start`` and holds
    ``commit_records`` records, written when the log was durable to ``durable_end``
    (default: ``commit_start``); its payload (``encoded[header_len:]``) stays as it is."""
    version, header_len = struct.unpack_from("<HH", encoded, 4)
    if not has_commit_marks(version) or header_len < HEADER_V1_1_LEN:
        raise ValueError(f"format {version >> 8}.{version & 0xFF} records have no commit marks")
    head = bytearray(encoded[:header_len])
    flags = struct.unpack_from("<I", head, _FLAGS_POS)[0] | FLAG_COMMIT
    struct.pack_into("<I", head, _FLAGS_POS, flags)
    _COMMIT.pack_into(head, HEADER_V1_LEN, commit_start, commit_records)
    if has_durable_end(version) and header_len >= HEADER_V1_2_LEN:
        _DURABLE.pack_into(head, HEADER_V1_1_LEN,
                           commit_start if durable_end is None else durable_end)
    view = memoryview(head)
    hcrc = crc32c(view[HEADER_V1_LEN:header_len], crc32c(view[:_CRC_POS], 0))
    struct.pack_into("<I", head, _CRC_POS, hcrc)
    return bytes(head)


def sealed_commit(records: list[bytes], commit_start: int, durable_end: int | None = None
                  ) -> list[Buffer]:
    """Encoded ``records`` as the buffers of one group commit for ``pwritev``: the last
    one sealed as its marker (see :func:`sealed_header`), every payload uncopied."""
    last = records[-1]
    head = sealed_header(last, commit_start, len(records), durable_end)
    return [*records[:-1], head, memoryview(last)[len(head):]]


def seal_commit(encoded: bytes, commit_start: int, commit_records: int,
                durable_end: int | None = None) -> bytes:
    """``encoded`` as the last record of a group commit (see :func:`sealed_header`)."""
    head = sealed_header(encoded, commit_start, commit_records, durable_end)
    return head + encoded[len(head):]


def decode_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> RecordHeader:
    """Decode and check the header at ``pos``; raise RecordError if it is not valid."""
    avail = len(buf) - pos
    if avail < HEADER_V1_LEN:
        if avail > 0 and not any(memoryview(buf)[pos:]):
            raise RecordError(pos, Problem.ZERO)
        raise RecordError(pos, Problem.SHORT, f"{avail} header bytes")
    (
        magic,
        version,
        header_len,
        flags,
        seq,
        stamp_ns,
        offset,
        data_len,
        stored_len,
        data_crc,
        header_crc,
    ) = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        if magic == 0 and not any(memoryview(buf)[pos : pos + HEADER_V1_LEN]):
            raise RecordError(pos, Problem.ZERO)
        raise RecordError(pos, Problem.BAD_MAGIC, f"{magic:#010x}")
    if header_len < HEADER_V1_LEN or header_len > MAX_HEADER_LEN:
        raise RecordError(pos, Problem.BAD_HEADER, f"header_len {header_len}")
    if avail < header_len:
        raise RecordError(pos, Problem.SHORT, f"{avail} of {header_len} header bytes")
    view = memoryview(buf)
    extension = bytes(view[pos + HEADER_V1_LEN : pos + header_len])
    crc = crc32c(extension, crc32c(view[pos : pos + _CRC_POS], 0))
    if crc != header_crc:
        raise RecordError(pos, Problem.BAD_HEADER_CRC, f"{crc:#010x} != {header_crc:#010x}")
    if version >> 8 > FORMAT_MAJOR:
        raise FormatTooNew(
            f"log record at offset {pos} has format version {version >> 8}.{version & 0xFF}; "
            f"this marslib reads major version {FORMAT_MAJOR} only: upgrade marslib"
        )
    if data_len > MAX_DATA_LEN or stored_len > MAX_DATA_LEN + 4096:
        raise RecordError(pos, Problem.BAD_HEADER, f"data_len {data_len}, stored {stored_len}")
    if not flags & FLAG_COMPRESSED and stored_len != data_len:
        raise RecordError(pos, Problem.BAD_HEADER, f"stored {stored_len} != data {data_len}")
    commit_start = commit_records = durable_end = 0
    if has_durable_end(version):
        if header_len < HEADER_V1_2_LEN:
            raise RecordError(pos, Problem.BAD_HEADER,
                              f"header_len {header_len} of a format {version >> 8}."
                              f"{version & 0xFF} record")
        (durable_end,) = _DURABLE.unpack_from(extension, _COMMIT.size)
    if has_commit_marks(version):
        if header_len < HEADER_V1_1_LEN:
            raise RecordError(pos, Problem.BAD_HEADER,
                              f"header_len {header_len} of a format {version >> 8}."
                              f"{version & 0xFF} record")
        commit_start, commit_records = _COMMIT.unpack_from(extension)
        extension = extension[_COMMIT.size + (_DURABLE.size if has_durable_end(version)
                                              else 0):]
        if flags & FLAG_COMMIT and commit_records < 1:
            raise RecordError(pos, Problem.BAD_HEADER, "a commit of no records")
    return RecordHeader(
        version, header_len, flags, seq, stamp_ns, offset, data_len, stored_len, data_crc,
        extension, commit_start, commit_records, durable_end,
    )


def decode(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[LogRecord, int]:
    """Decode the record at ``pos``; return it and the position after it.

    Uncompressed data is returned as a memoryview into ``buf`` (no copy).
    """
    h = decode_header(buf, pos)
    end = pos + h.record_len
    if len(buf) < end:
        raise RecordError(pos, Problem.SHORT, f"{len(buf) - pos} of {h.record_len} bytes")
    payload = memoryview(buf)[pos + h.header_len : end]
    data: bytes | memoryview
    if h.flags & FLAG_COMPRESSED:
        try:
            data = _decompressor.decompress(payload, max_output_size=h.data_len)
        except zstandard.ZstdError as exc:
            raise RecordError(pos, Problem.BAD_PAYLOAD, str(exc)) from None
        if len(data) != h.data_len:
            raise RecordError(pos, Problem.BAD_PAYLOAD, f"{len(data)} != {h.data_len} bytes")
    else:
        data = payload
    crc = crc32c(data, 0)
    if crc != h.data_crc:
        raise RecordError(pos, Problem.BAD_DATA_CRC, f"{crc:#010x} != {h.data_crc:#010x}")
    record = LogRecord(
        seq=h.seq,
        offset=h.offset,
        data=data,
        stamp_ns=h.stamp_ns,
        flags=h.flags & ~FLAG_COMPRESSED,
        extension=h.extension,
        format_version=h.format_version,
        commit_start=h.commit_start,
        commit_records=h.commit_records,
        durable_end=h.durable_end,
    )
    return record, end
