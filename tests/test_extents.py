"""The extent map keeps exactly the newest bytes of every range, sorted, never overlapping."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from marslib.extents import ExtentMap

SPACE = 4096

writes = st.lists(
    st.tuples(st.integers(0, SPACE - 1), st.integers(1, 700), st.integers(1, 255)),
    max_size=40,
)


def apply_to_a_model(ops: list[tuple[int, int, int]], space: int
                     ) -> tuple[ExtentMap, bytes]:
    """Insert the (start, length, value) writes into an extent map and into a byte model;
    the model holds 0 where nothing was written."""
    model = bytearray(space)
    em = ExtentMap()
    for start, length, value in ops:
        length = min(length, space - start)
        data = bytearray([value]) * length  # a mutable buffer, as NBD payloads are
        em.insert(start, data)
        model[start : start + length] = data
    return em, bytes(model)


def check_against_the_model(em: ExtentMap, model: bytes,
                            windows: list[tuple[int, int]]) -> None:
    exts = list(em)
    for a, b in zip(exts, exts[1:], strict=False):
        assert a.end <= b.start, "extents overlap or are unsorted"
    assert em.bytes == sum(len(e.data) for e in exts)
    image = bytearray(len(model))
    for ext in exts:
        image[ext.start : ext.end] = ext.data
    assert image == model
    for lo, hi in windows:
        buf = bytearray(hi - lo)
        em.overlay(buf, lo)
        assert buf == model[lo:hi]


@given(writes)
def test_extent_map_matches_a_byte_model(ops: list[tuple[int, int, int]]) -> None:
    em, model = apply_to_a_model(ops, SPACE)  # values are never 0: written bytes count
    assert em.bytes == sum(1 for b in model if b)
    check_against_the_model(em, model, [(0, SPACE), (1000, 1100)])


BLOCKS_SPACE = 8 * 4096

mixed_writes = st.lists(
    st.one_of(
        # whole 4 KiB blocks: the block dict
        st.tuples(st.integers(0, 7).map(lambda b: b * 4096), st.integers(1, 3).map(
            lambda n: n * 4096), st.integers(1, 255)),
        # anything else: the byte extents, or a patched block
        st.tuples(st.integers(0, BLOCKS_SPACE - 1), st.integers(1, 9000), st.integers(1, 255)),
    ),
    max_size=40,
)


@given(mixed_writes)
def test_block_and_byte_writes_mixed_match_a_byte_model(
        ops: list[tuple[int, int, int]]) -> None:
    em, model = apply_to_a_model(ops, BLOCKS_SPACE)
    assert em.bytes == sum(1 for b in model if b)
    check_against_the_model(em, model, [(0, BLOCKS_SPACE), (4000, 4200), (4096, 8192),
                                        (100, 20000)])


def test_a_large_write_is_one_extent_and_a_partial_overwrite_splits_it() -> None:
    em = ExtentMap()
    em.insert(0, bytes([1]) * (1 << 20))
    assert [(e.start, len(e.data)) for e in em] == [(0, 1 << 20)]
    em.insert(8192, bytes([2]) * 4096)
    assert [(e.start, len(e.data)) for e in em] == [(0, 8192), (8192, 4096),
                                                    (12288, (1 << 20) - 12288)]
    assert em.bytes == 1 << 20


def test_superseded_data_is_dropped() -> None:
    em = ExtentMap()
    for i in range(100):
        em.insert(0, bytes([i]) * 4096)
    assert len(em) == 1 and em.bytes == 4096 and bytes(next(iter(em)).data) == bytes([99]) * 4096
