"""The spill: image bytes a fetch task appends, in source order, to files
that the shard writers read back by ranged reads.

A spill file is plain concatenated image bytes (no framing): a copy's row
says where its image is (``path``, ``offset``, ``length``). Nothing in it is
sorted, so a fetch task holds one batch of images at a time, and a writer
reads exactly the bytes of the images it writes (each read coalescing the
ranges of one file that touch), never another writer's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import io
import mmap
import os
import random
import time
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from schemas import io as sio

from .placement import coalesce_ranges

__all__ = ["SpillWriter", "read_ranges", "release_ranges", "spread_name", "PAGE", "with_retries", "is_transient",
           "no_space", "NO_SPACE_ERRNOS", "READ_ATTEMPTS", "reset_peak_rss", "peak_rss", "gc_paused", "without_gc",
           "TASK_GC_THRESHOLD"]

T = TypeVar("T")

#: Local spill files align each image to this (bytes), so that its pages can be released alone.
PAGE = 4096
#: Attempts of a read that fails with a transient error (the first included).
READ_ATTEMPTS = 4
#: Seconds before the first retry; doubled each time, with jitter.
READ_BACKOFF = 0.2


def is_transient(error: BaseException) -> bool:
    """Whether a read error may go away when the read is retried: I/O and
    network errors, not a missing file or a refusal."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError))


def with_retries(read: Callable[[], T], attempts: int = READ_ATTEMPTS, backoff: float = READ_BACKOFF,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``read()``, retried up to ``attempts`` times in all while it raises a
    transient error (:func:`is_transient`), waiting ``backoff * 2**k`` seconds
    (times 1 to 1.5, jitter) before retry ``k + 1``; the last error is raised."""
    for k in range(attempts):
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - re-raised unless transient and attempts are left
            if k + 1 >= attempts or not is_transient(e):
                raise
            sleep(backoff * (2 ** k) * (1 + random.random() / 2))
    raise AssertionError("unreachable")


#: ``errno`` of a write that found no room: a full filesystem, a quota, a file size limit.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space(error: BaseException, where: str) -> str | None:
    """``"PATH: reason"`` when ``error`` is a write that found no room
    (:data:`NO_SPACE_ERRNOS`; PATH: its file, else ``where``), else None. A
    task reports it to the driver (one line) instead of failing: retrying
    cannot help, and the driver removes what the run wrote."""
    if not isinstance(error, OSError) or error.errno not in NO_SPACE_ERRNOS:
        return None
    return f"{error.filename or where}: {error.strerror or errno.errorcode.get(error.errno, error.errno)}"


def spread_name(name: str) -> str:
    """``<hh>/name``: a spill file's path under its directory, ``hh`` two hex
    digits of a hash of the name. Object stores scale their request rate per
    key prefix (S3: about 5,500 GETs/s each): writers reading ~10^8 ranges
    from 256 prefixes are not held to one prefix's rate."""
    return f"{hashlib.blake2b(name.encode(), digest_size=1).hexdigest()}/{name}"


class SpillWriter:
    """Appends image bytes to spill files ``<dir>/<hh>/spill-<attempt>-<n>.bin``
    (:func:`spread_name`),
    starting a new file past ``file_bytes``; :meth:`append` returns where the
    bytes went. With ``align`` (bytes) each image starts at a multiple of it
    (zeros between), so a writer can release an image's pages alone
    (``release_ranges``). Unique to a task attempt; :meth:`close` before the
    rows that point into the files leave the task."""

    def __init__(self, spill_dir: str, attempt: str, file_bytes: int, align: int = 1):
        self.spill_dir, self.attempt, self.file_bytes = spill_dir, attempt, max(1, file_bytes)
        self.align = max(1, align)
        self.paths: list[str] = []
        self.written = 0  # bytes, all files, padding included
        self._fh = None
        self._size = 0

    def _open(self) -> None:
        self.close()
        path = sio.join(self.spill_dir, spread_name(f"spill-{self.attempt}-{len(self.paths):04d}.bin"))
        fs, p = sio.filesystem(path)
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        # A local file takes the images with one writev (no joined copy).
        self._fh = open(p, "wb", buffering=0) if sio.is_local(path) else fs.open(p, "wb")
        self.paths.append(path)
        self._size = 0

    def _write(self, images: Sequence) -> None:
        if isinstance(self._fh, io.FileIO):
            sio.write_all(self._fh.fileno(), images)
        else:
            self._fh.write(b"".join(images))

    def append(self, images: Sequence) -> tuple[str, np.ndarray]:
        """Write ``images`` (bytes-like) one after another (each at a
        multiple of ``align``); returns the file and each image's offset."""
        if self._fh is None or self._size >= self.file_bytes:
            self._open()
        lengths = np.fromiter((len(x) for x in images), np.int64, len(images))
        padded = -(-lengths // self.align) * self.align
        offsets = self._size + np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
        if self.align > 1:
            pads = (padded - lengths).tolist()
            zeros = bytes(self.align)
            images = [part for image, pad in zip(images, pads) for part in (image, zeros[:pad]) if len(part)]
        self._write(images)
        self._size += int(padded.sum())
        self.written += int(padded.sum())
        return self.paths[-1], offsets

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_ranges(paths: Sequence[str], files: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                gap: int = 0) -> tuple[list, int, int]:
    """The bytes of ranges ``[starts, starts + lengths)`` of ``paths[files]``,
    in the given order, as ``(views, reads, bytes_read)``: ranges of one file
    at most ``gap`` bytes apart are read together (a read of local files is a
    view of a memory map; otherwise one ranged request each, all issued
    together, retried when transient: :func:`with_retries`)."""
    files = np.asarray(files, np.int64)
    starts = np.asarray(starts, np.int64)
    ends = starts + np.asarray(lengths, np.int64)
    read_file, read_start, read_end, read_of = coalesce_ranges(files, starts, ends, gap)
    if not len(read_file):
        return [], 0, 0
    blocks: list = [None] * len(read_file)
    is_local = {f: sio.is_local(paths[f]) for f in np.unique(read_file).tolist()}
    local = [i for i, f in enumerate(read_file.tolist()) if is_local[f]]
    remote = [i for i, f in enumerate(read_file.tolist()) if not is_local[f]]
    maps: dict[int, memoryview] = {}
    for i in local:
        f = int(read_file[i])
        if f not in maps:
            with open(sio.filesystem(paths[f])[1], "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                maps[f] = memoryview(mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)) if size else \
                    memoryview(b"")
        view = maps[f][int(read_start[i]):int(read_end[i])]
        if len(view) != read_end[i] - read_start[i]:
            raise ValueError(f"spill file {paths[f]} holds {len(maps[f])} bytes, a read needs "
                             f"{int(read_start[i])}..{int(read_end[i])}")
        blocks[i] = view
    if remote:
        fs, _ = sio.filesystem(paths[int(read_file[remote[0]])])
        where = [sio.filesystem(paths[int(read_file[i])])[1] for i in remote]
        got = with_retries(lambda: fs.cat_ranges(where, [int(read_start[i]) for i in remote],
                                                 [int(read_end[i]) for i in remote], on_error="raise"))
        for i, data in zip(remote, got):
            if len(data) != read_end[i] - read_start[i]:
                raise ValueError(f"spill file {paths[int(read_file[i])]}: read {len(data)} bytes at "
                                 f"{int(read_start[i])}, expected {int(read_end[i] - read_start[i])}")
            blocks[i] = memoryview(data)
    rel = (starts - read_start[read_of]).tolist()
    rel_end = (ends - read_start[read_of]).tolist()
    views = [blocks[r][a:b] for r, a, b in zip(read_of.tolist(), rel, rel_end)]
    return views, len(read_file), int((read_end - read_start).sum())


#: Objects allocated, net, between young collections while a task runs (Python's default: 700).
TASK_GC_THRESHOLD = 100_000
_frozen = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """A task's body with Python's cyclic garbage collector mostly out of the
    way: what the worker held before its first such task (modules, pyarrow,
    pyspark) is frozen once (``gc.freeze``), so that the full collection
    Spark's daemon runs after every task of a reused worker
    (``pyspark/daemon.py``) walks only what tasks left; and young
    collections run every ``TASK_GC_THRESHOLD`` allocations, not 700 (a
    task's Arrow batches, views and rows make few cycles). Both were 7% of
    the job's CPU (``perf``, ``shards_bench``). The thresholds are restored
    on exit; nothing a task makes is frozen."""
    global _frozen
    if not _frozen:
        gc.freeze()
        _frozen = True
    before = gc.get_threshold()
    gc.set_threshold(TASK_GC_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def without_gc(task: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """A task generator (a ``mapInArrow`` function) run under :func:`gc_paused`."""

    @functools.wraps(task)
    def run(*args, **kwargs) -> Iterator[T]:
        with gc_paused():
            yield from task(*args, **kwargs)

    return run


def reset_peak_rss() -> None:
    """Start this process's peak resident memory afresh (Linux
    ``/proc/self/clear_refs``; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """This process's peak resident memory since :func:`reset_peak_rss`
    (bytes; 0 where ``/proc`` does not say)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_ranges(path: str, starts: np.ndarray, ends: np.ndarray) -> int:
    """Release (``fallocate`` punch hole, :func:`schemas.io.punch_holes`)
    the byte ranges ``[starts, ends)`` of a local spill file, merged where
    they touch; returns the bytes released (0 where the filesystem cannot)."""
    if not len(starts):
        return 0
    _, read_start, read_end, _ = coalesce_ranges(np.zeros(len(starts), np.int64), starts, ends)
    return sio.punch_holes(path, list(zip(read_start.tolist(), read_end.tolist())))
