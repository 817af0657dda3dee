"""A set of fixed-size device blocks, as a bitmap: which blocks a resync has to compare.

Bit ``i`` (byte ``i // 8``, bit ``i % 8``, least significant first) stands for the block
``[i * block_size, (i + 1) * block_size)``; the last block may be shorter. A set of a
1 GiB device in 64 KiB blocks is 2 KiB, and much less on the wire: :meth:`BlockSet.encode`
compresses it (zstd) behind a small versioned header::

    magic u32 "MBST" | version u16 | flags u16 | block_size u32 | size u64 | count u64
    | zstd frame of the bitmap

A reader refuses another magic, a newer version, a bitmap of the wrong length or a count
that does not match (ValueError): a damaged set must never restrict a sync.
"""

from __future__ import annotations

import struct
from pathlib import Path

import zstandard

from marslib.durable import write_file_durably

BLOCK_SIZE = 64 << 10
MAGIC = 0x5453424D  # b"MBST" read little-endian
VERSION = 1
_HEADER = struct.Struct("<IHHIQQ")
HEADER_LEN = _HEADER.size  # 28
MAX_BLOCKS = 1 << 36  # 4 PiB in 64 KiB blocks: a header claiming more is damaged
_ZSTD_LEVEL = 3
_decompressor = zstandard.ZstdDecompressor()


class BlockSet:
    """Blocks of a device of ``size`` bytes in blocks of ``block_size``."""

    __slots__ = ("size", "block_size", "nblocks", "_bits")

    def __init__(self, size: int, block_size: int = BLOCK_SIZE,
                 bits: bytes | bytearray | None = None) -> None:
        if size < 0 or block_size <= 0:
            raise ValueError(f"bad block set geometry: size {size}, block size {block_size}")
        self.size = size
        self.block_size = block_size
        self.nblocks = -(-size // block_size)
        if self.nblocks > MAX_BLOCKS:
            raise ValueError(f"a block set of {self.nblocks} blocks is too large")
        nbytes = -(-self.nblocks // 8)
        if bits is None:
            self._bits = bytearray(nbytes)
        else:
            if len(bits) != nbytes:
                raise ValueError(f"bitmap of {len(bits)} bytes for {self.nblocks} blocks")
            self._bits = bytearray(bits)
            tail = self.nblocks % 8
            if tail and self._bits[-1] >> tail:
                raise ValueError("bitmap has bits past its last block")

    # ------------------------------------------------------------------ building
    def add(self, index: int) -> None:
        if not 0 <= index < self.nblocks:
            raise IndexError(f"block {index} outside 0..{self.nblocks - 1}")
        self._bits[index >> 3] |= 1 << (index & 7)

    def add_range(self, offset: int, length: int) -> None:
        """Add every block that ``[offset, offset + length)`` touches (clipped to the
        device: a write past the end marks nothing there)."""
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return
        first = max(offset, 0) // self.block_size
        last = (end - 1) // self.block_size
        bits = self._bits
        if last - first < 16:
            for i in range(first, last + 1):
                bits[i >> 3] |= 1 << (i & 7)
            return
        # whole bytes in the middle at once
        head_end = min(last + 1, (first + 7) & ~7)
        for i in range(first, head_end):
            bits[i >> 3] |= 1 << (i & 7)
        tail_start = max(head_end, (last + 1) & ~7)
        if tail_start > head_end:
            bits[head_end >> 3 : tail_start >> 3] = b"\xff" * ((tail_start - head_end) >> 3)
        for i in range(tail_start, last + 1):
            bits[i >> 3] |= 1 << (i & 7)

    def update(self, other: BlockSet) -> None:
        """Add every block of ``other`` (the same geometry)."""
        self._check_same(other)
        n = len(self._bits)
        mine = int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")
        self._bits = bytearray(mine.to_bytes(n, "little"))

    def union(self, other: BlockSet) -> BlockSet:
        out = self.copy()
        out.update(other)
        return out

    __or__ = union

    def copy(self) -> BlockSet:
        return BlockSet(self.size, self.block_size, self._bits)

    def _check_same(self, other: BlockSet) -> None:
        if (other.size, other.block_size) != (self.size, self.block_size):
            raise ValueError(f"block sets of different geometry: {self.size}/"
                             f"{self.block_size} and {other.size}/{other.block_size}")

    # ------------------------------------------------------------------ reading
    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.nblocks:
            return False
        return bool(self._bits[index >> 3] >> (index & 7) & 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockSet) and (self.size, self.block_size, self._bits) == \
            (other.size, other.block_size, other._bits)

    def __repr__(self) -> str:
        return f"BlockSet({self.count} of {self.nblocks} blocks of {self.block_size})"

    @property
    def count(self) -> int:
        """How many blocks are in the set."""
        return int.from_bytes(self._bits, "little").bit_count()

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        """Bytes of device the set covers (the last block may be short)."""
        n = self.count * self.block_size
        last = self.nblocks - 1
        if last >= 0 and last in self:
            n -= self.nblocks * self.block_size - self.size
        return n

    def _block_span(self, offset: int, length: int) -> tuple[int, int]:
        """First block and the block after the last that ``[offset, offset+length)``
        touches, clipped to the set."""
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return 0, 0
        return max(offset, 0) // self.block_size, (end - 1) // self.block_size + 1

    def indices_in(self, offset: int, length: int) -> list[int]:
        """The blocks of the set that ``[offset, offset + length)`` touches, ascending."""
        first, stop = self._block_span(offset, length)
        bits = self._bits
        out: list[int] = []
        i = first
        while i < stop:
            byte = bits[i >> 3]
            if not byte:
                i = (i | 7) + 1
                continue
            if byte >> (i & 7) & 1:
                out.append(i)
            i += 1
        return out

    def any_in(self, offset: int, length: int) -> bool:
        """Whether a block of the set lies (partly) in ``[offset, offset + length)``."""
        first, stop = self._block_span(offset, length)
        if first >= stop:
            return False
        bits = self._bits
        lo, hi = first >> 3, (stop - 1) >> 3
        if lo == hi:
            mask = ((1 << (stop - first)) - 1) << (first & 7)
            return bool(bits[lo] & mask)
        if bits[lo] >> (first & 7):
            return True
        if any(bits[lo + 1 : hi]):
            return True
        tail = (stop - 1) & 7
        return bool(bits[hi] & ((2 << tail) - 1))

    def runs_in(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The set's blocks in ``[offset, offset + length)`` as runs of adjacent blocks:
        ``(first block, number of blocks)``, ascending."""
        runs: list[tuple[int, int]] = []
        for i in self.indices_in(offset, length):
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        return runs

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.indices_in(0, self.size))

    # ------------------------------------------------------------ serialising
    def encode(self) -> bytes:
        """The set as bytes (see the module's doc): header, then the zstd bitmap."""
        head = _HEADER.pack(MAGIC, VERSION, 0, self.block_size, self.size, self.count)
        return head + zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(bytes(self._bits))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> BlockSet:
        """A set from :meth:`encode`'s bytes; ValueError if they are not a valid set."""
        if len(data) < HEADER_LEN:
            raise ValueError(f"block set of {len(data)} bytes: no header")
        magic, version, _flags, block_size, size, count = _HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise ValueError(f"not a block set (magic {magic:#010x})")
        if version > VERSION:
            raise ValueError(f"block set format version {version}: this release reads "
                             f"{VERSION}")
        if block_size <= 0 or -(-size // block_size) > MAX_BLOCKS:
            raise ValueError(f"bad block set geometry: size {size}, block size {block_size}")
        nblocks = -(-size // block_size)
        nbytes = (nblocks + 7) // 8
        packed = bytes(memoryview(data)[HEADER_LEN:])
        try:
            # the frame's own size claim is checked first: a damaged one must not make
            # this allocate more than the bitmap can be
            claimed = zstandard.frame_content_size(packed)
            if claimed > nbytes:
                raise ValueError(f"block set bitmap claims {claimed} bytes, at most {nbytes} "
                                 "fit its geometry")
            bits = _decompressor.decompress(packed, max_output_size=nbytes)
        except zstandard.ZstdError as exc:
            raise ValueError(f"block set bitmap cannot be decompressed: {exc}") from None
        out = cls(size, block_size, bits)
        if out.count != count:
            raise ValueError(f"block set says {count} blocks, its bitmap holds {out.count}")
        return out

    def save(self, path: Path) -> None:
        """Write the set to ``path`` atomically and durably."""
        write_file_durably(path, self.encode())

    @classmethod
    def load(cls, path: Path) -> BlockSet | None:
        """The set saved at ``path``; None if there is none. ValueError if it is damaged."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return cls.decode(data)
