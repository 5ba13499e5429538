"""Pickled numpy arrays, loaded without running anything else (Animal-MNIST's data).

Some data sets ship as pickles of numpy arrays. A pickle can name any
callable and call it, so :func:`load_numpy_pickle` admits exactly the three
globals a plain ``numpy.ndarray`` pickle names (the array reconstructors of
protocols 0-4 and 5, ``numpy.ndarray`` and ``numpy.dtype``, under numpy 1's and 2's module names;
and, for protocol 2, ``_codecs.encode`` limited to str -> latin-1 bytes)
and refuses every other one *before* it is looked up, so nothing it names is
imported or called. The result must be one plain ndarray of a numeric or
boolean dtype (never ``object``: that would hold arbitrary Python objects).
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib

import numpy as np

__all__ = ["ALLOWED_GLOBALS", "UnsafePickleError", "load_numpy_pickle", "loads_numpy_pickle"]

# numpy's own array reconstructors, whatever their module paths: protocols 0-4 and protocol 5
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]



class _Latin1Bytes:
    """Protocol 2 pickles write bytes as ``_codecs.encode(text, 'latin1')``:
    admitted for exactly that (str to latin-1 bytes), nothing else. No
    ``__dict__`` and no attributes to set, so a pickle's BUILD cannot alter it."""

    __slots__ = ()

    def __call__(self, text, encoding):
        if type(text) is not str or encoding != "latin1":
            raise pickle.UnpicklingError(f"_codecs.encode is admitted only as (str, 'latin1'), got "
                                         f"({type(text).__name__}, {encoding!r})")
        return text.encode("latin1")


#: (module, name) -> the object a plain ndarray pickle needs; nothing else is admitted.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _Latin1Bytes(),
}


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that names something other than a plain numpy array."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, fh, source: str):
        super().__init__(fh)
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refused: the pickle names {module}.{name}; only plain numpy arrays are "
                f"admitted ({', '.join(f'{m}.{n}' for m, n in ALLOWED_GLOBALS)})") from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refused: the pickle uses a persistent id ({pid!r})")


def loads_numpy_pickle(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """The one plain ndarray pickled in ``data`` (raw pickle bytes); ``source``
    names it in errors. Raises :class:`UnsafePickleError` (a ``ValueError``)
    for anything else."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as exc:
        raise ValueError(f"{source}: not a readable numpy pickle ({type(exc).__name__}: {exc})") from None
    if type(obj) is not np.ndarray:
        raise UnsafePickleError(f"{source}: refused: the pickle holds a {type(obj).__name__}, not a numpy array")
    if obj.dtype.hasobject or obj.dtype.kind not in "biuf":
        raise UnsafePickleError(f"{source}: refused: an array of dtype {obj.dtype}; only numeric arrays are admitted")
    return obj


def load_numpy_pickle(path: str, max_bytes: int = 1 << 30) -> np.ndarray:
    """:func:`loads_numpy_pickle` of the file ``path``, gzipped or not (read
    up to ``max_bytes`` uncompressed, default 1 GiB; more is refused)."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
            data = fh.read(max_bytes + 1)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{path}: more than {max_bytes} bytes uncompressed; refused")
    return loads_numpy_pickle(data, path)
