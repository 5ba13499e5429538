"""The shard writers: each takes whole shards (a span of positions), ranks
the copies of the buckets that span falls in, reads exactly their images
from the spill (coalesced ranged reads) and streams the tars to their final
names, a bounded number of image bytes in memory at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import io as sio
from schemas.shard_format import sample_json, sample_key, shard_name, write_tar

from ..session import inject_failure, task_attempt_id, task_attempt_number
from .placement import bucket_of, concat_ranges, hash_order, writer_span
from .spill import PAGE, no_space, peak_rss, read_ranges, release_ranges, reset_peak_rss, without_gc

__all__ = ["RouteTask", "route_partition", "ROUTED_SCHEMA", "WriteTask", "write_partition", "WRITTEN_SCHEMA",
           "TEMPORARY", "READ_BYTES"]

#: Where a local attempt streams a shard before renaming it to its final name.
TEMPORARY = "_temporary"
#: Image bytes a writer reads from the spill at a time (its memory for images).
READ_BYTES = 64 << 20

#: A row per shard, with its writer's figures (``reads``: ranged reads of the
#: spill, ``bytes_read``, ``task_rss``: peak resident memory, bytes); ``error``:
#: why the writer stopped (a write found no room; the row's other fields null), else null.
WRITTEN_SCHEMA = ("shard int, writer int, samples long, bytes long, sha256 string, labels string, "
                  "reads long, bytes_read long, task_rss long, released long, reused boolean, error string")


#: A good copy's row on its way to a writer (``wkey``: the key ``repartition`` sends to the writer's partition).
ROUTED_SCHEMA = ("key string, copy int, h long, labels array<int>, weight double, ext string, path string, "
                 "offset long, length long, copies int, writer int, wkey int")


@dataclass(frozen=True)
class RouteTask:
    """What every routing task is given: the fetch tasks' rows files are read
    and each row sent to the writers that need its bucket (``first[b] ..
    last[b]`` for bucket ``b``; none where ``first > last``); ``keys[w]``
    sends a row to writer ``w``'s partition (``placement.partition_keys``);
    only the rows of ``target`` are routed (a fetch pass may serve several)."""

    bits: int
    first: np.ndarray
    last: np.ndarray
    keys: np.ndarray
    storage: dict
    target: int = 0


def route_partition(task: RouteTask):
    """mapInArrow over rows-file paths (a ``rows_path`` column) ->
    ``ROUTED_SCHEMA`` rows: each good copy once per writer that needs it."""

    @without_gc
    def route(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        sio.apply_storage_config(task.storage)
        for batch in batches:
            for path in batch.column("rows_path").to_pylist():
                fs, p = sio.filesystem(path)
                with fs.open(p, "rb") as fh:  # a record batch at a time, whatever the file's size
                    reader = pa.ipc.open_file(fh)
                    for i in range(reader.num_record_batches):
                        rows = reader.get_batch(i)
                        mine = pc.equal(rows.column("target"), task.target)
                        rows = (rows if pc.all(mine).as_py() else rows.filter(mine)).drop_columns(["target"])
                        if not rows.num_rows:
                            continue
                        b = bucket_of(rows.column("h").to_numpy(), task.bits)
                        n = task.last[b] - task.first[b] + 1
                        writers = concat_ranges(task.first[b], n)
                        take = np.repeat(np.arange(rows.num_rows), n)
                        out = rows.take(pa.array(take)) if take.size != rows.num_rows else rows
                        yield pa.RecordBatch.from_arrays(
                            [*out.columns, pa.array(writers, pa.int32()), pa.array(task.keys[writers], pa.int32())],
                            names=[*out.schema.names, "writer", "wkey"])

    return route


@dataclass(frozen=True)
class WriteTask:
    """What every writer task is given (the unit a test builds by hand).

    ``output``: the directory the shards go to (under their final names);
    writer ``w`` writes positions ``[w * per_writer, (w + 1) * per_writer)``
    of ``total``; ``starts``: each bucket's first position, then ``total``
    (``bits`` bits of the placement hash name a bucket); ``read_bytes``:
    image bytes read at a time (default ``READ_BYTES``); ``read_gap``: ranges
    of one spill file at most this many bytes apart are read together.
    """

    output: str
    prefix: str
    samples_per_shard: int
    total: int
    per_writer: int
    starts: np.ndarray
    bits: int
    storage: dict
    read_bytes: int = READ_BYTES
    read_gap: int = 0
    release: bool = False


def _chunks(lengths: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Consecutive ``[a, b)`` of items whose lengths add up to at most
    ``limit`` (an item larger than that alone)."""
    ends = np.cumsum(lengths)
    out, a = [], 0
    while a < lengths.size:
        base = ends[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(ends, base + limit, side="right")))
        out.append((a, b))
        a = b
    return out


def _write_shard(task: WriteTask, rows: pa.Table, paths: list, files: np.ndarray, shard: int,
                 attempt: str, stats: dict) -> tuple:
    """Stream one shard (``rows`` in order) to its final name; returns
    ``(samples, bytes, sha256, labels json)``."""
    name = shard_name(task.prefix, shard)
    cols = [rows.column(c).to_pylist() for c in ("key", "copy", "ext", "labels", "weight")]
    offsets = rows.column("offset").to_numpy()
    lengths = rows.column("length").to_numpy()

    def samples() -> Iterator[tuple]:
        for a, b in _chunks(lengths, task.read_bytes):
            views, reads, nbytes = read_ranges(paths, files[a:b], offsets[a:b], lengths[a:b], task.read_gap)
            stats["reads"] += reads
            stats["bytes_read"] += nbytes
            for i, view in enumerate(views):
                k, c, e, lab, w = (col[a + i] for col in cols)
                yield sample_key(k, c), e, view, sample_json(k, c, lab, w)
                if a + i == 1:
                    inject_failure("write")  # mid-write: a partial file exists

    final = sio.join(task.output, name)
    local = sio.is_local(final)
    # Local: an attempt writes aside and renames (atomic; in the task, so the
    # commit renames nothing). Object stores: an upload appears whole when it
    # completes, so it goes to the final name (equal inputs, equal bytes).
    target = sio.join(task.output, TEMPORARY, f"{name}.{attempt}") if local else final
    fs, p = sio.filesystem(target)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    # A local file unbuffered: write_tar hands it the parts with writev (no joined copy).
    with (open(p, "wb", buffering=0) if local else fs.open(p, "wb")) as fh:
        n, size, digest = write_tar(fh, samples())
    if local:
        os.replace(p, sio.filesystem(final)[1])
    return n, size, digest, _label_counts(rows)


def _label_counts(rows: pa.Table) -> str:
    """The shard's labels and their counts (JSON)."""
    flat = pc.list_flatten(rows.column("labels")).to_numpy(zero_copy_only=False)
    values, counts = np.unique(flat, return_counts=True)
    return json.dumps({int(v): int(c) for v, c in zip(values, counts)}, sort_keys=True)


def _finished(task: WriteTask, rows: pa.Table, shard: int) -> tuple | None:
    """``(samples, bytes, sha256, labels)`` of a shard an earlier attempt
    wrote whole (its final name exists: it was renamed there whole), else None."""
    final = sio.filesystem(sio.join(task.output, shard_name(task.prefix, shard)))[1]
    if not os.path.exists(final):
        return None
    return rows.num_rows, os.path.getsize(final), sio.file_sha256(final), _label_counts(rows)


def _releasable(rows: pa.Table, files: np.ndarray, samples_per_shard: int) -> tuple[np.ndarray, ...]:
    """The images whose every copy is among ``rows`` (a writer's, in order):
    ``(file, start, end, last)``, ``[start, end)`` their page-aligned
    extent in spill file ``file``, ``last`` the index of the writer's last
    shard that holds a copy (the image may go once that one is written)."""
    offsets = rows.column("offset").to_numpy()
    ends = offsets + rows.column("length").to_numpy()
    copies = rows.column("copies").to_numpy()
    key = files * (1 << 40) + offsets
    uniq, first, inverse, count = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    last = np.zeros(uniq.size, np.int64)
    np.maximum.at(last, inverse, np.arange(rows.num_rows) // samples_per_shard)
    sole = count == copies[first]
    pick = first[sole]
    return (files[pick], offsets[pick], -(-ends[pick] // PAGE) * PAGE, last[sole])


def _writer_rows(task: WriteTask, w: int, mine: pa.Table) -> tuple[pa.Table, int]:
    """``(rows, lo)``: writer ``w``'s copies in placement order, exactly its
    positions ``[lo, hi)``, from ``mine``, the copies of the buckets its span
    falls in (checked against the tallies)."""
    h = mine.column("h").to_numpy()
    buckets = bucket_of(h, task.bits)
    first, last = int(buckets.min()), int(buckets.max())
    expected = int(task.starts[last + 1] - task.starts[first])
    if mine.num_rows != expected:
        raise ValueError(f"internal error: writer {w} got {mine.num_rows} copies of buckets "
                         f"{first}..{last}, tallied {expected}")
    lo, hi = writer_span(w, task.per_writer, task.total)
    order = hash_order(h, mine.column("key"), mine.column("copy").to_numpy())
    skip = lo - int(task.starts[first])
    if skip < 0:
        raise ValueError(f"internal error: writer {w} starts at {lo}, its first bucket at "
                         f"{int(task.starts[first])}")
    return mine.take(pa.array(order[skip:skip + hi - lo])), lo


def _release(release: tuple, shard_at: int, paths: list) -> int:
    """Release the spill pages of the images whose last copy is in the
    writer's shard number ``shard_at`` (:func:`_releasable`); returns the bytes."""
    released = 0
    now = release[3] == shard_at
    for f in np.unique(release[0][now]).tolist():
        mask = now & (release[0] == f)
        released += release_ranges(paths[f], release[1][mask], release[2][mask])
    inject_failure("released")  # a shard is written, its images may be released
    return released


def _write_writer(task: WriteTask, w: int, mine: pa.Table, attempt: str) -> list[tuple]:
    """Writer ``w``'s shards from ``mine`` (the copies of its buckets); a
    ``WRITTEN_SCHEMA`` tuple per shard. A retried attempt (pages released)
    keeps the shards an earlier attempt finished, up to the first missing."""
    rows, lo = _writer_rows(task, w, mine)
    encoded = pc.dictionary_encode(rows.column("path")).combine_chunks()
    paths = encoded.dictionary.to_pylist()
    files = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    stats = {"reads": 0, "bytes_read": 0}
    release = _releasable(rows, files, task.samples_per_shard) if task.release else None
    retry = task.release and (task_attempt_number() or 0) > 0
    shards = []
    for i, a in enumerate(range(0, rows.num_rows, task.samples_per_shard)):
        b = min(rows.num_rows, a + task.samples_per_shard)
        shard = (lo + a) // task.samples_per_shard
        done = _finished(task, rows.slice(a, b - a), shard) if retry else None
        retry = done is not None  # after the first shard missing, every later one is written again
        if done is None:
            done = _write_shard(task, rows.slice(a, b - a), paths, files[a:b], shard, attempt, stats)
        n, size, digest, labels = done
        want = min(task.samples_per_shard, task.total - shard * task.samples_per_shard)
        if n != want:
            raise ValueError(f"internal error: shard {shard} has {n} samples, expected {want}")
        released = _release(release, i, paths) if release is not None else 0
        shards.append((shard, w, n, size, digest, labels, released, retry))
    rss = peak_rss()
    return [s[:6] + (stats["reads"], stats["bytes_read"], rss) + s[6:] + (None,) for s in shards]


#: ``WRITTEN_SCHEMA`` in Arrow.
_WRITTEN_ARROW = pa.schema([("shard", pa.int32()), ("writer", pa.int32()), ("samples", pa.int64()),
                            ("bytes", pa.int64()), ("sha256", pa.string()), ("labels", pa.string()),
                            ("reads", pa.int64()), ("bytes_read", pa.int64()), ("task_rss", pa.int64()),
                            ("released", pa.int64()), ("reused", pa.bool_()), ("error", pa.string())])


def write_partition(task: WriteTask):
    """mapInArrow over the copy rows of the buckets each writer needs (a
    ``writer`` column says whose), one writer per partition: ranks them in
    :func:`placement.hash_order`, keeps the writer's positions and writes
    its shards. A ``WRITTEN_SCHEMA`` row per shard; a write that finds no
    room (``spill.no_space``) is one row with its ``error``, not raised."""

    @without_gc
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        reset_peak_rss()
        sio.apply_storage_config(task.storage)
        parts = [b for b in batches if b.num_rows]
        if not parts:
            return
        table = pa.Table.from_batches(parts)
        del parts
        attempt = task_attempt_id()
        writer_col = table.column("writer").to_numpy()
        results = []
        try:
            for w in np.unique(writer_col).tolist():
                mine = table.filter(pa.array(writer_col == w)) if len(np.unique(writer_col)) > 1 else table
                results += _write_writer(task, w, mine, attempt)
        except OSError as e:
            report = no_space(e, task.output)
            if report is None:
                raise
            results = [(None,) * 11 + (report,)]
        if results:
            cols = list(zip(*results))
            yield pa.RecordBatch.from_arrays([pa.array(c, f.type) for c, f in zip(cols, _WRITTEN_ARROW)],
                                             schema=_WRITTEN_ARROW)

    return write
