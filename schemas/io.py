"""Filesystem layer shared by every stage: local paths, gs://, s3://, hdfs://.

All paths go through fsspec, so the same code reads a test's temporary
directory and a bucket. Writes of small result files are atomic: a reader
sees the old file or the complete new one, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from typing import Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "filesystem",
    "is_local",
    "punch_holes",
    "write_all",
    "exchange",
    "json_text",
    "require_readable",
    "expand_paths",
    "read_parquet",
    "write_parquet_atomic",
    "write_bytes_atomic",
    "read_bytes",
    "exists",
    "join",
    "file_sha256",
    "fingerprint_paths",
    "listing_fingerprint",
    "storage_config",
    "apply_storage_config",
    "remove_tree",
    "move",
]

_GLOB_CHARS = set("*?[")


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path_within_fs)`` for a local path or URL."""
    fs, _, paths = fsspec.get_fs_token_paths(path)
    return fs, paths[0] if paths else path


def _unstrip(fs: fsspec.AbstractFileSystem, original: str, p: str) -> str:
    """Give a listed path back the protocol of ``original`` (gs://...)."""
    if "://" in original and "://" not in p:
        return fs.unstrip_protocol(p)
    return p


def expand_paths(path: str, suffix: str = ".parquet") -> list[str]:
    """Expand a file, a directory (recursively) or a glob into sorted files.

    Files whose name starts with ``_`` or ``.`` (``_SUCCESS``, ``.crc``,
    temporary files) are skipped; in a directory, so are those not ending in
    ``suffix``.
    Raises ``FileNotFoundError`` naming ``path`` when nothing matches.
    """
    if any(c in path for c in _GLOB_CHARS):
        fs, _, found = fsspec.get_fs_token_paths(path)
        files = [p for p in found if fs.isfile(p)
                 and not p.rsplit("/", 1)[-1].startswith(("_", "."))]
    else:
        fs, p = filesystem(path)
        if fs.isdir(p):
            files = [f for f in fs.find(p)
                     if f.endswith(suffix)
                     and not any(part.startswith(("_", ".")) for part in f[len(p):].split("/") if part)]
        elif fs.exists(p):
            files = [p]
        else:
            files = []
    if not files:
        raise FileNotFoundError(f"no {suffix or ''} files found at {path}")
    return sorted(_unstrip(fs, path, f) for f in files)


def require_readable(path: str, flag: str, suffix: str = ".parquet") -> None:
    """Raise ``ValueError`` naming ``flag`` and the first local file of
    ``path`` (a file, directory or glob, as :func:`expand_paths` lists it)
    that this process may not read (permissions), before an engine meets it
    in a task and fails with its own traceback. Object stores are left to
    their reads (their permissions are not files')."""
    if not is_local(path):
        return
    for file in expand_paths(path, suffix):
        local = filesystem(file)[1]
        try:
            os.close(os.open(local, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except PermissionError:
            raise ValueError(f"{flag} {path}: {local} cannot be read (permission denied)") from None


def read_parquet(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read one Parquet file, a directory of them, or a glob, into one table."""
    tables = []
    for f in expand_paths(path):
        fs, p = filesystem(f)
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh, columns=list(columns) if columns else None))
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def join(base: str, *parts: str) -> str:
    """Join path components with ``/`` (works for local paths and URLs)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as fh:
        return fh.read()


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_text(obj, **dumps_options) -> str:
    """``json.dumps(obj, **dumps_options)`` that is always valid JSON: a
    float that is not finite (NaN, infinity: JSON has neither) is written as
    ``null``. Every JSON file the project writes goes through it."""
    return json.dumps(_finite(obj), allow_nan=False, **dumps_options)


def write_bytes_atomic(path: str, data: bytes | str, durable: bool = True) -> None:
    """Write ``data`` so that ``path`` is either absent/old or complete.

    Local files: write a unique temporary file beside it, fsync (unless not
    ``durable``: for files that need not outlive a crash of the machine),
    rename. Object stores: a single PUT is already atomic.
    """
    if isinstance(data, str):
        data = data.encode()
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{p}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    else:
        with fs.open(p, "wb") as fh:
            fh.write(data)


def write_parquet_atomic(table: pa.Table, path: str) -> None:
    """Write ``table`` as one Parquet file, atomically (see :func:`write_bytes_atomic`)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's content, streamed in 4 MiB chunks."""
    h = hashlib.sha256()
    fs, p = filesystem(path)
    with fs.open(p, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def fingerprint_paths(path: str, suffix: str = "") -> str:
    """Content fingerprint of a file, directory or glob (names relative to it).

    Changes when any file's content, name or the set of files changes.
    """
    files = expand_paths(path, suffix=suffix)
    base = path.rstrip("/")
    h = hashlib.sha256()
    for f in files:
        rel = f[len(base):] if f.startswith(base) else os.path.basename(f)
        h.update(rel.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


#: fsspec ``info()`` fields that change when an object is rewritten (local
#: files, S3, GCS, Azure), for :func:`listing_fingerprint` ``versions``.
_VERSION_FIELDS = ("mtime", "ETag", "LastModified", "generation", "etag", "last_modified")


def listing_fingerprint(path: str, suffix: str = ".parquet", versions: bool = False) -> str:
    """Cheap fingerprint of a large dataset: file names and sizes, not contents.

    For a 300M-record index (terabytes with inline images) hashing content
    is too slow; rewritten files change size in practice, and Parquet files
    are immutable once written. ``versions``: also each file's modification
    time or object version (ETag, generation), so that a rewrite of the same
    size shows too.
    """
    files = expand_paths(path, suffix=suffix)
    base = path.rstrip("/")
    h = hashlib.sha256()
    for f in files:
        fs, p = filesystem(f)
        rel = f[len(base):] if f.startswith(base) else os.path.basename(f)
        if versions:
            info = fs.info(p)
            stamp = "\0".join(f"{k}={info[k]}" for k in _VERSION_FIELDS if info.get(k) is not None)
            h.update(f"{rel}\0{info.get('size')}\0{stamp}\n".encode())
        else:
            h.update(f"{rel}\0{fs.size(p)}\n".encode())
    return h.hexdigest()


def storage_config() -> dict:
    """fsspec's per-protocol options (``fsspec.config.conf``: endpoints,
    credentials) as set on the driver, to ship to Spark tasks."""
    import copy

    return copy.deepcopy(dict(fsspec.config.conf))


def apply_storage_config(conf: dict) -> None:
    """Install options captured by :func:`storage_config` (in a worker)."""
    for protocol, options in conf.items():
        fsspec.config.conf.setdefault(protocol, {}).update(options)


def remove_tree(path: str) -> None:
    """Remove ``path`` (a file or a directory tree) if it exists."""
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def is_local(path: str) -> bool:
    """Whether ``path`` is on the local (POSIX) filesystem."""
    return isinstance(filesystem(path)[0], LocalFileSystem)


_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (linux/falloc.h)


def write_all(fd: int, buffers: Sequence) -> int:
    """Write ``buffers`` (bytes-like) one after another to file descriptor
    ``fd`` with ``os.writev``, without joining them (no copy); returns the
    bytes written. Handles short writes and the system's limit on buffers
    per call."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total, i = 0, 0
    while i < len(views):
        done = os.writev(fd, views[i:i + _IOV_MAX])
        total += done
        while i < len(views) and done >= len(views[i]):
            done -= len(views[i])
            i += 1
        if done:
            views[i] = views[i][done:]
    return total


_IOV_MAX = 1024


def punch_holes(path: str, ranges: Sequence[tuple[int, int]]) -> int:
    """Release the ``[start, end)`` byte ranges of a local file (Linux
    ``fallocate`` punch hole): they read as zeros from then on, and their page
    cache and disk blocks are freed; the size is unchanged. Returns the bytes
    released: 0 where the platform or filesystem cannot do it (nothing else
    changes then)."""
    import ctypes

    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return 0
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    released = 0
    fd = os.open(filesystem(path)[1], os.O_WRONLY)
    try:
        for start, end in ranges:
            if end <= start:
                continue
            if fallocate(fd, _PUNCH_HOLE, start, end - start) != 0:
                return released  # EOPNOTSUPP and the like: keep the bytes
            released += end - start
    finally:
        os.close(fd)
    return released


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Swap two local paths atomically (``renameat2(RENAME_EXCHANGE)``):
    ``True`` when done, ``False`` where the system or filesystem has no such
    call (the caller then renames twice)."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def move(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` on one filesystem (a copy and delete on object stores)."""
    fs, p = filesystem(src)
    fs.mv(p, filesystem(dst)[1])
