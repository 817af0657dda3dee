"""crc32c (Castagnoli) with the fastest implementation available.

The `crc32c` package (hardware instructions) is preferred, then `google_crc32c`;
`crcmod`'s pure/C table implementation is the portable fallback. All give the same values.
"""

from __future__ import annotations

from collections.abc import Callable

Buffer = bytes | bytearray | memoryview
Crc32cFunc = Callable[[Buffer, int], int]


def _crcmod_impl() -> Crc32cFunc:
    import crcmod.predefined

    fun = crcmod.predefined.mkPredefinedCrcFun("crc-32c")

    def crc32c_crcmod(data: Buffer, value: int = 0) -> int:
        return int(fun(bytes(data), value))

    return crc32c_crcmod


def _crc32c_pkg_impl() -> Crc32cFunc:
    import crc32c as crc32c_pkg

    # the package's own function: it returns an int and releases the GIL on big buffers;
    # a wrapper would cost a Python call per record on the write path
    fun: Crc32cFunc = crc32c_pkg.crc32c
    return fun


def _google_impl() -> Crc32cFunc:
    import google_crc32c

    def crc32c_google(data: Buffer, value: int = 0) -> int:
        return int(google_crc32c.extend(value, bytes(data)))

    return crc32c_google


def available_implementations() -> dict[str, Crc32cFunc]:
    """Every crc32c implementation importable here, by name."""
    impls: dict[str, Crc32cFunc] = {}
    for name, factory in (
        ("crc32c", _crc32c_pkg_impl),
        ("google_crc32c", _google_impl),
        ("crcmod", _crcmod_impl),
    ):
        try:
            impls[name] = factory()
        except ImportError:
            continue
    return impls


_IMPLS = available_implementations()
if not _IMPLS:  # pragma: no cover - crcmod is a hard dependency
    raise ImportError("no crc32c implementation: install crc32c or crcmod")
IMPLEMENTATION: str = next(iter(_IMPLS))
crc32c: Crc32cFunc = _IMPLS[IMPLEMENTATION]
