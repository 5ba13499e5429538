"""The IDX format of MNIST and Fashion-MNIST (optionally gzipped), read strictly.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number
of dimensions), one big-endian uint32 per dimension, then the values in C
order, big-endian. :func:`read_idx` checks every part of that against the
file and reads no more than the header promises, so a bad or truncated file,
or a gzip bomb, is refused with a message naming it, before any large
allocation.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

__all__ = ["IDX_TYPES", "read_idx", "encode_idx"]

#: IDX type code -> big-endian numpy dtype.
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_MAX_DIMS = 8


def _open(path: str):
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_exact(fh, size: int, path: str, what: str) -> bytes:
    try:
        data = fh.read(size)
    except (EOFError, OSError, zlib.error) as exc:  # truncated or corrupt gzip stream
        raise ValueError(f"{path}: unreadable while reading the {what} ({exc})") from None
    if len(data) != size:
        raise ValueError(f"{path}: truncated: the {what} needs {size} bytes, the file has {len(data)}")
    return data


def read_idx(path: str, *, expect_dims: int | None = None, max_bytes: int = 1 << 31) -> np.ndarray:
    """The array stored in the IDX file ``path`` (``.gz`` or raw), in native
    byte order. Raises ``ValueError`` naming ``path`` when the magic number,
    type code, dimensions (``expect_dims`` when given) or size do not agree
    with the file, or the data would exceed ``max_bytes`` (default 2 GiB)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such IDX file")
    with _open(path) as fh:
        magic = _read_exact(fh, 4, path, "magic number")
        if magic[0] or magic[1]:
            raise ValueError(f"{path}: not an IDX file (magic number {magic.hex()} does not start with 0000)")
        code, ndim = magic[2], magic[3]
        if code not in IDX_TYPES:
            raise ValueError(f"{path}: unknown IDX type code 0x{code:02x} "
                             f"(known: {', '.join(f'0x{c:02x}' for c in IDX_TYPES)})")
        if not 1 <= ndim <= _MAX_DIMS or (expect_dims is not None and ndim != expect_dims):
            wanted = expect_dims if expect_dims is not None else f"1..{_MAX_DIMS}"
            raise ValueError(f"{path}: {ndim} dimensions in the header, expected {wanted}")
        shape = tuple(int(d) for d in np.frombuffer(_read_exact(fh, 4 * ndim, path, "dimensions"), ">u4"))
        dtype = IDX_TYPES[code]
        size = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if size > max_bytes:
            raise ValueError(f"{path}: the header's shape {shape} means {size} bytes, over the limit {max_bytes}")
        data = _read_exact(fh, size, path, f"data of shape {shape}")
        if _read_exact_tail(fh, path):
            raise ValueError(f"{path}: bytes after the data of shape {shape} (the header does not match the file)")
    return np.frombuffer(data, dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _read_exact_tail(fh, path: str) -> bool:
    try:
        return bool(fh.read(1))
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{path}: unreadable after the data ({exc})") from None


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of ``array`` (the inverse of :func:`read_idx`; for tests and tools)."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_TYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(IDX_TYPES[codes[native]]).tobytes()
