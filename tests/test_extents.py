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


@given(writes)
def test_extent_map_matches_a_byte_model(ops: list[tuple[int, int, int]]) -> None:
    model = bytearray(SPACE)
    written = bytearray(SPACE)  # 1 where something was written
    em = ExtentMap()
    for start, length, value in ops:
        length = min(length, SPACE - start)
        em.insert(start, bytes([value]) * length)
        model[start : start + length] = bytes([value]) * length
        written[start : start + length] = b"\x01" * length
    exts = list(em)
    for a, b in zip(exts, exts[1:], strict=False):
        assert a.end <= b.start, "extents overlap or are unsorted"
    assert em.bytes == sum(written) == sum(len(e.data) for e in exts)
    buf = bytearray(SPACE)
    em.overlay(buf, 0)
    assert buf == model
    # overlay of a window
    win = bytearray(100)
    em.overlay(win, 1000)
    assert win == model[1000:1100]


def test_superseded_data_is_dropped() -> None:
    em = ExtentMap()
    for i in range(100):
        em.insert(0, bytes([i]) * 4096)
    assert len(em) == 1 and em.bytes == 4096 and bytes(next(iter(em)).data) == bytes([99]) * 4096
