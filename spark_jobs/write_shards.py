"""Write WebDataset tar shards from a resampler selection (DESIGN.md §3).

::

    python -m spark_jobs.write_shards --selection DIR --index PATH --output DIR \\
      [--samples-per-shard 10000] [--prefix shard] [--seed 0] [--overwrite] \\
      [--max-bad-fraction 0.001] [--spill-dir DIR] [--run-bytes 64M] [--max-side N [--quality 90]] \\
      [--master local[*]]

Where a copy goes: copies are ordered by ``h = xxhash64(key, copy, seed)``
read as unsigned (ties, practically never, by key then copy), and a good
copy's position in the output is its rank in that order among the good copies
(exactly as if the bad examples had never been selected); position //
samples-per-shard is its shard. No stage sorts the selection for this:

1. **fetch**: each copy meets its example's source location (file, row) in
   the index, never its image bytes; each image is read once, in source order
   (per file, by row, only the row groups needed; per ``uri``, sorted),
   checked from its bytes (with ``--max-side N``: an image whose longer side
   exceeds N is replaced by its re-encoding, :func:`shards.reencode_image`,
   once per example; one that cannot be decoded is a bad example), and the
   good copies go into Arrow IPC *run* files
   beside the output, sorted by ``h`` and cut into record batches at *bucket*
   boundaries (a bucket: the copies sharing the top bits of ``h``, about two
   per shard). This is the one exchange of image bytes, done in Python so
   they never enter the JVM. Each task also tallies its good copies per
   bucket. Keys the index lacks and missing or unrecognisable images are
   counted, listed and skipped;
2. **write**: the exact bucket tallies give every bucket its first position;
   each writer task takes whole shards, reads the batches of their buckets
   from every run, ranks those copies by ``h`` and writes the tars, with fixed
   tar metadata, under attempt-specific temporary names (in local mode: once a
   shard is written, the run batches no other writer or later shard needs
   are punched out, so the page cache holds each image about once); the
   driver keeps what successful attempts reported, renames, writes
   ``manifest.json`` and then ``_SUCCESS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import Manifest, ResampleConfig, SchemaError, ShardInfo, check_index_schema, parse_size
from schemas import io as sio
from schemas.stage_output import StageOutput, require_complete, require_finished_input

from .session import (StageTimer, add_spark_arguments, inject_failure, observed_metrics, read_parquet_columns,
                      read_parquet_through_fsspec, require_reachable_outputs, run_cli, set_confs, task_attempt_id,
                      task_attempt_number)
from .shards import (REENCODE_QUALITY, encoder_version, image_extension, reencode_image, sample_json, sample_key,
                     shard_name, write_tar)

__all__ = ["ShardJob", "run", "main", "resolve_selection"]

TEMPORARY = "_temporary"
#: Arrow batch size while images travel through Python (bytes, not rows, matter).
IMAGE_BATCH_ROWS = 256
#: Bytes of copies a fetch task gathers in memory before writing one sorted run
#: (its peak memory is about twice this: the images read, then the sorted run).
RUN_BYTES = 64 << 20
#: Buckets (of the placement hash's top bits) per shard: a writer reads at most
#: two buckets it only partly needs, so more buckets mean less over-reading.
BUCKETS_PER_SHARD = 2
#: At most 2**MAX_BUCKET_BITS buckets.
MAX_BUCKET_BITS = 20
#: A run is cut into record batches of about 1/RUN_BATCHES of its image bytes
#: (at bucket boundaries): the unit a shard writer reads (4 MiB for 64 MiB runs).
RUN_BATCHES = 16
#: Fetch tasks per core; each reads a contiguous range of the index's files.
FETCH_TASKS_PER_CORE = 2
#: Shard writers per core (fewer shards each, so a slow one delays the stage less).
WRITERS_PER_CORE = 2
#: Bytes of images one shard-writing task reads (it takes whole shards).
WRITER_BYTES = 1 << 30


@dataclass
class ShardJob:
    """One shard-writing run (the command line, typed).

    ``allow_uri_prefixes``: where a ``uri`` index's images may be read from
    (``--allow-uri-prefix``, schemas.uri_policy); None: the index's own storage.
    ``uri_prefixes`` (set here, not an argument) is the effective list, in
    normal form: what the fetch enforces and the manifest records.
    ``max_side``: re-encode the images whose longer side exceeds it
    (``--max-side``; None: every image as the index holds it) as JPEGs of
    ``quality`` (``--quality``, default 90). ``shared_output``: a local
    ``output``/``spill_dir`` is mounted by every executor (``--shared-output``;
    ``session.require_reachable_outputs``).
    """

    selection: str
    index: str
    output: str
    samples_per_shard: int = 10000
    prefix: str = "shard"
    seed: int = 0
    overwrite: bool = False
    max_bad_fraction: float = 0.001
    spill_dir: str | None = None
    run_bytes: int = RUN_BYTES
    writer_bytes: int = WRITER_BYTES
    allow_uri_prefixes: Sequence[str] | None = None
    max_side: int | None = None
    quality: int | None = None
    shared_output: bool = False

    def __post_init__(self) -> None:
        from schemas.uri_policy import canonical_prefix, default_prefixes

        if isinstance(self.allow_uri_prefixes, str):
            self.allow_uri_prefixes = (self.allow_uri_prefixes,)
        if self.allow_uri_prefixes is None:
            self.uri_prefixes = default_prefixes(self.index)
        else:
            self.uri_prefixes = tuple(dict.fromkeys(canonical_prefix(p) for p in self.allow_uri_prefixes))
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if not self.prefix or "/" in self.prefix:
            raise ValueError(f"--prefix must be a plain file name prefix, got {self.prefix!r}")
        if self.run_bytes < 1:
            raise ValueError(f"--run-bytes must be >= 1, got {self.run_bytes}")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"--max-side must be >= 1, got {self.max_side}")
        if self.quality is not None and self.max_side is None:
            raise ValueError("--quality is the quality of images re-encoded for --max-side: give --max-side too")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")

    @property
    def reencode(self) -> tuple[int, int] | None:
        """``(max_side, quality)`` when images are re-encoded, else None."""
        if self.max_side is None:
            return None
        return self.max_side, REENCODE_QUALITY if self.quality is None else self.quality


def resolve_selection(path: str) -> tuple[str, str | None]:
    """``(selection parquet dir, resampler output dir or None)`` for a path that
    is either the resampler's output directory or its ``selection/``."""
    inner = sio.join(path, "selection")
    if sio.exists(inner):
        return inner, path.rstrip("/")
    parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
    if path.rstrip("/").endswith("/selection") and sio.exists(sio.join(parent, "stats.json")):
        return path, parent
    return path, None


# -- stage 1, fetch: read, check and spill the images, in source order --------------


def _examples(table: pa.Table) -> np.ndarray:
    """Start of each example in copy rows sorted by (file, row, key, copy):
    the rows where (file, row, key) changes, plus the end. Copies of a key the
    index lacks (no file) are an example per key."""
    n = table.num_rows

    def codes(name):
        return pc.fill_null(pc.dictionary_encode(table.column(name)).combine_chunks().indices, -1).to_numpy()

    files, keys = codes("file"), codes("key")
    rows = pc.fill_null(table.column("row"), -1).to_numpy()
    change = np.flatnonzero((files[1:] != files[:-1]) | (rows[1:] != rows[:-1]) | (keys[1:] != keys[:-1])) + 1
    return np.concatenate([[0], change, [n]]).astype(np.int64)


def _duplicated(table: pa.Table, bounds: np.ndarray) -> list[str]:
    """Keys of the examples whose copy rows are not exactly 0, 1, ..., c-1:
    the selection holds their key in more than one row."""
    counts = np.diff(bounds)
    expected = np.arange(table.num_rows) - np.repeat(bounds[:-1], counts)
    wrong = np.repeat(np.arange(counts.size), counts)[table.column("copy").to_numpy() != expected]
    return sorted(set(table.column("key").take(pa.array(bounds[:-1][np.unique(wrong)])).to_pylist()))


def _fetched(table: pa.Table, bounds: np.ndarray, column: str, emit,
             uri_prefixes: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
    """Read the images of copy rows sorted by (file, row, key, copy)
    (examples start at ``bounds``), once per example and in source order (per
    file, by row, only the row groups needed; per ``uri``, sorted), and
    ``emit(table, bounds, examples, heads, images)`` for each batch of them
    (first the examples the index lacks, with ``NOT_IN_INDEX``): ``bounds``
    delimit the examples' copy rows, ``examples`` index them, ``heads`` are the first 16 bytes of each
    image (or why it could not be read), ``images`` the bytes as an Arrow
    array. A ``uri`` is read only when it lies under one of ``uri_prefixes``
    (schemas.uri_policy; none: nothing is read), and then in the normal form
    checked; one outside is a bad example, the policy's verdict its reason."""
    first = bounds[:-1]
    file_col = table.column("file").take(pa.array(first))
    missing = pc.is_null(file_col).to_numpy(zero_copy_only=False)
    for s in range(0, int(missing.sum()), IMAGE_BATCH_ROWS):
        examples = np.flatnonzero(missing)[s:s + IMAGE_BATCH_ROWS]
        yield emit(table, bounds, examples, [NOT_IN_INDEX] * len(examples), pa.nulls(len(examples), pa.binary()))
    present = np.flatnonzero(~missing)
    if column == "image":
        files = file_col.take(pa.array(present))
        codes = pc.dictionary_encode(files).combine_chunks().indices.to_numpy(zero_copy_only=False)
        rows = pc.fill_null(table.column("row"), -1).to_numpy()[first][present]
        for start, end in zip(*_runs_of(codes)):  # the examples of one file (sorted by file)
            for examples, images in _read_inline(files[int(start)].as_py(), rows[start:end]):
                heads = pc.binary_slice(images, 0, 16).to_pylist()
                yield emit(table, bounds, present[examples + start], heads, images)
    else:
        uris = table.column("uri").take(pa.array(first)).to_pylist()
        order = sorted(present.tolist(), key=lambda i: (uris[i] or "", i))
        from schemas.uri_policy import check_uris, read_target

        for s in range(0, len(order), IMAGE_BATCH_ROWS):
            chunk = order[s:s + IMAGE_BATCH_ROWS]
            images = []
            verdicts = check_uris(uri_prefixes, [uris[i] for i in chunk])
            for i, verdict in zip(chunk, verdicts):
                try:
                    if not uris[i]:
                        raise ValueError("no uri")
                    if verdict.reason is not None:  # not fetched: a bad example, like an unreadable one
                        images.append(verdict.reason)
                        continue
                    images.append(read_target(verdict.target))
                except Exception as e:  # noqa: BLE001 - a missing image is counted, not fatal
                    images.append(f"unreadable uri {uris[i]!r}: {type(e).__name__}: {e}"[:300])
            data = pa.array([x if isinstance(x, bytes) else None for x in images], pa.binary())
            yield emit(table, bounds, np.asarray(chunk, np.int64), images, data)


SPILLED_SCHEMA = ("path string, rows long, bytes long, "  # a run file written (buckets: each batch's
                  "key string, reason string, "  # first; offsets: where each batch starts, then where the
                  "buckets array<int>, counts array<long>, "  # last ends), or a bad example (rows: its
                  "offsets array<long>, "  # copies), or the task's good copies per bucket (buckets, counts)
                  "reencoded array<long>")  # and the images it re-encoded: (images, bytes before, after)
#: The ``reason`` of a key the selection holds in more than one row (not a bad image).
DUPLICATE = "in more than one selection row"
#: The ``reason`` of a selected key the index does not hold.
NOT_IN_INDEX = "not in the source index"


def _spill_partition(column: str, storage: dict, spill_dir: str, bucket_bits: int, run_bytes: int,
                     uri_prefixes: Sequence[str], reencode: tuple[int, int] | None = None):
    """mapInArrow, the fetch pass: copy rows (sorted by file, row, key, copy)
    -> the good copies, with images, in sorted *run* files, the bad examples
    and the task's tally of good copies per bucket (``SPILLED_SCHEMA``: a row
    per run, a row per bad example, one tally row).

    Each image is read once, in source order, and checked from its bytes. A
    run is an Arrow IPC file of the copies a task gathered (up to
    ``run_bytes`` of images), sorted by ``h`` (:func:`hash_order`) and cut
    into record batches at bucket boundaries (:func:`_write_run`). Image
    bytes go from the Parquet read to the run file without entering the JVM;
    the file name is unique to the attempt, and only the runs of successful
    attempts are reported. Only uris under ``uri_prefixes`` are read
    (:func:`_fetched`). With ``reencode`` (``(max_side, quality)``) the
    images larger than ``max_side`` are re-encoded before they are checked
    (:func:`_reencoded`).
    """

    def spill(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        sio.apply_storage_config(storage)
        attempt = task_attempt_id()
        gathered: list[pa.RecordBatch] = []
        pool: list[pa.Array] = []  # the images read, referenced by the gathered rows
        bad: list[tuple[str, str, int]] = []
        tally = np.zeros(1 << bucket_bits, np.int64)
        reencoded = np.zeros(3, np.int64)  # images, their bytes before, after
        pooled = size = 0
        batch_bytes = max(1, run_bytes // RUN_BATCHES)

        def place(table, bounds, examples, heads, images):
            nonlocal pooled
            if reencode is not None:
                heads, images = _reencoded(heads, images, *reencode, reencoded)
            batch = _good_copies(table, bounds, examples, heads, images, pooled, bad)
            pool.append(images)
            pooled += len(images)
            return batch

        pending = list(batches)
        if not pending:
            return
        table = pa.Table.from_batches(pending)
        bounds = _examples(table)
        runs = []
        duplicated = _duplicated(table, bounds)
        if duplicated:  # reported, nothing read: the driver refuses the selection
            bad.extend((key, DUPLICATE, 0) for key in duplicated)
            table, bounds = table.slice(0, 0), bounds[:1]
        for batch in _fetched(table, bounds, column, place, uri_prefixes):
            gathered.append(batch)
            size += pool[-1].nbytes
            if size >= run_bytes:
                runs.append(_write_run(gathered, pool, spill_dir, attempt, len(runs), bucket_bits, batch_bytes,
                                       tally))
                gathered, pool, pooled, size = [], [], 0, 0
        if gathered:
            runs.append(_write_run(gathered, pool, spill_dir, attempt, len(runs), bucket_bits, batch_bytes,
                                   tally))
        inject_failure("spill")  # after the runs are written: they must be ignored
        used = np.flatnonzero(tally)
        no_runs, no_bad = [None] * len(runs), [None] * len(bad)
        yield pa.RecordBatch.from_arrays(
            [pa.array([r.path for r in runs] + no_bad + [None], pa.string()),
             pa.array([r.rows for r in runs] + [b[2] for b in bad] + [None], pa.int64()),
             pa.array([r.bytes for r in runs] + no_bad + [None], pa.int64()),
             pa.array(no_runs + [b[0] for b in bad] + [None], pa.string()),
             pa.array(no_runs + [b[1] for b in bad] + [None], pa.string()),
             pa.array([r.first_buckets for r in runs] + no_bad + [used.astype(np.int32)], pa.list_(pa.int32())),
             pa.array(no_runs + no_bad + [tally[used]], pa.list_(pa.int64())),
             pa.array([r.offsets for r in runs] + no_bad + [None], pa.list_(pa.int64())),
             pa.array(no_runs + no_bad + [reencoded], pa.list_(pa.int64()))],
            names=["path", "rows", "bytes", "key", "reason", "buckets", "counts", "offsets", "reencoded"])

    return spill


def hash_order(h: np.ndarray, keys: pa.Array | pa.ChunkedArray, copies: np.ndarray) -> np.ndarray:
    """The permutation that sorts copies by ``h`` read as unsigned, then key
    (as Spark and Python compare strings: by code point), then copy."""
    u = np.asarray(h, np.int64).view(np.uint64)
    perm = np.argsort(u, kind="stable")
    su = u[perm]
    edge = np.diff(np.concatenate([[0], (su[1:] == su[:-1]).astype(np.int8), [0]]))
    for a, b in zip(np.flatnonzero(edge == 1).tolist(), (np.flatnonzero(edge == -1) + 1).tolist()):
        # Equal 64-bit hashes (practically never): by key, then copy.
        members = perm[a:b].tolist()
        perm[a:b] = sorted(members, key=lambda i: (keys[i].as_py(), int(copies[i])))
    return perm


def bucket_of(h: np.ndarray, bucket_bits: int) -> np.ndarray:
    """The bucket of each placement hash: its top ``bucket_bits`` bits (unsigned)."""
    if bucket_bits == 0:
        return np.zeros(len(h), np.int64)
    return (np.asarray(h, np.int64).view(np.uint64) >> np.uint64(64 - bucket_bits)).astype(np.int64)


@dataclass(frozen=True)
class Run:
    """A run file: its path, copies (rows) and image bytes, and its record
    batches' layout: each batch's first bucket and byte offsets (where each
    starts, then where the last ends)."""

    path: str
    rows: int
    bytes: int
    first_buckets: tuple[int, ...]
    offsets: tuple[int, ...]


def _write_run(batches: list[pa.RecordBatch], pool: list[pa.Array], spill_dir: str, attempt: str, index: int,
               bucket_bits: int, batch_bytes: int, tally: np.ndarray) -> Run:
    """Write one run file (see :func:`_spill_partition`): the gathered rows in
    :func:`hash_order` with their images taken from ``pool`` (the one copy of
    the bytes), in record batches of about ``batch_bytes`` of images cut
    at bucket boundaries; the schema's ``first_buckets`` metadata holds each
    batch's first bucket. Adds the rows per bucket to ``tally``."""
    meta = pa.Table.from_batches(batches).combine_chunks()
    perm = hash_order(meta.column("h").to_numpy(), meta.column("key"), meta.column("copy").to_numpy())
    images = gather_binary(pool, meta.column("image_ref").to_numpy()[perm])
    table = (meta.drop_columns(["image_ref"]).take(pa.array(perm)).combine_chunks()
             .append_column("image", images))
    buckets = bucket_of(table.column("h").to_numpy(), bucket_bits)
    tally += np.bincount(buckets, minlength=tally.size)
    # Cut at the first bucket start past each multiple of batch_bytes of images.
    starts = np.flatnonzero(np.diff(buckets, prepend=-1))
    offsets = _offsets(images)
    marks = np.arange(1, offsets[-1] // batch_bytes + 1) * batch_bytes
    after = np.searchsorted(offsets[starts], marks, side="left")
    cuts = np.unique(np.concatenate([[0], starts[after[after < starts.size]], [table.num_rows]])).tolist()
    first_buckets = buckets[cuts[:-1]].tolist()
    schema = table.schema.with_metadata({"first_buckets": json.dumps(first_buckets)})
    cols = [c.chunk(0) if c.num_chunks else pa.array([], c.type) for c in table.columns]
    path = sio.join(spill_dir, f"run-{attempt}-{index:04d}.arrow")
    fs, p = sio.filesystem(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    # The first batch follows the magic (8 bytes with padding) and the schema message.
    offsets = [8 + schema.serialize().size]
    with fs.open(p, "wb") as fh:
        with pa.ipc.new_file(fh, schema) as out:
            for a, b in zip(cuts[:-1], cuts[1:]):
                out.write_batch(pa.record_batch([c.slice(a, b - a) for c in cols], schema=schema))
                offsets.append(fh.tell())
    return Run(path, table.num_rows, int(table.nbytes), tuple(first_buckets), tuple(offsets))


def _read_runs(paths: Sequence[str], first: int, last: int, bucket_bits: int) -> tuple[pa.Table, list]:
    """The copies of buckets ``first..last`` from every run file: a table of
    all but their images, and their images as memoryviews (reading only the
    batches that hold them: memory-mapped for local files, ranged reads
    otherwise; the image bytes are not copied)."""
    parts = []
    for path in paths:
        fs, p = sio.filesystem(path)
        local = "file" in fs.protocol or "local" in fs.protocol
        with contextlib.nullcontext(pa.memory_map(p)) if local else fs.open(p, "rb") as source:
            reader = pa.ipc.open_file(source)
            starts = json.loads(reader.schema.metadata[b"first_buckets"])
            # Cuts fall where a bucket starts: batch i holds buckets starts[i] .. starts[i + 1] - 1.
            ends = starts[1:] + [1 << bucket_bits]
            for i, (a, b) in enumerate(zip(starts, ends)):
                if a <= last and b > first:
                    try:
                        parts.append(reader.get_batch(i))
                    except (pa.ArrowInvalid, OSError) as e:  # zeros where a released batch was
                        raise RuntimeError(f"run {path}: batch {i} cannot be read ({e}); was it released by "
                                           "another attempt, or its receipt removed? Rerun the job") from e
    parts = [b for b in parts if b.num_rows]
    if not parts:
        return pa.table({}), []
    table = pa.Table.from_batches(parts)
    buckets = bucket_of(table.column("h").to_numpy(), bucket_bits)
    keep = np.flatnonzero((buckets >= first) & (buckets <= last))
    views = [v for chunk in table.column("image").chunks for v in binary_views(chunk)]
    return table.drop_columns(["image"]).take(pa.array(keep)), [views[i] for i in keep.tolist()]


def _verdicts(heads: list) -> tuple[list, list]:
    """(extension or None, reason or None) for fetched items: the first bytes
    of an image, ``None`` (no bytes) or a string (why it could not be read)."""
    exts, reasons = [], []
    for item in heads:
        if isinstance(item, str) or item is None:
            exts.append(None)
            reasons.append(item if isinstance(item, str) else "no image bytes")
            continue
        ext = image_extension(item)
        exts.append(ext)
        reasons.append(None if ext else "unrecognised image format")
    return exts, reasons


def _reencoded(heads: list, images: pa.Array, max_side: int, quality: int,
               totals: np.ndarray) -> tuple[list, pa.Array]:
    """``(heads, images)`` of a fetched batch (see :func:`_fetched`) with
    every image whose longer side exceeds ``max_side`` replaced by
    :func:`shards.reencode_image` and the others left as they are, bytes and
    all. An image whose size cannot be read or that cannot be decoded gets
    the reason in place of its head (a bad example). Adds (images
    re-encoded, their bytes before, after) to ``totals``."""
    views = binary_views(images)
    heads = list(heads)
    replaced: dict[int, bytes] = {}
    for i, head in enumerate(heads):
        if head is None or isinstance(head, str):
            continue  # already bad
        try:
            data = reencode_image(views[i], max_side, quality)
        except Exception as e:  # noqa: BLE001 - an undecodable image is a bad example, not fatal
            heads[i] = f"cannot be re-encoded for --max-side {max_side}: {type(e).__name__}: {e}"[:300]
            continue
        if data is not None:
            replaced[i] = data
            heads[i] = data[:16]
            totals += (1, len(views[i]), len(data))
    if not replaced:
        return heads, images
    mask = np.zeros(len(images), bool)
    mask[list(replaced)] = True
    new = pa.array([replaced[i] for i in sorted(replaced)], images.type)
    return heads, pc.replace_with_mask(images, pa.array(mask), new)


def _good_copies(table: pa.Table, bounds: np.ndarray, examples: np.ndarray, heads: list, images: pa.Array,
                 first_image: int, bad: list) -> pa.RecordBatch:
    """The copy rows of a batch's good examples with the index of their image
    (``first_image`` + position in ``images``), not the bytes. Bad examples
    go to ``bad`` as (key, reason, copies)."""
    exts, reasons = _verdicts(heads)
    counts = bounds[examples + 1] - bounds[examples]
    owner = np.repeat(np.arange(len(examples)), counts)
    rows = _concat_ranges(bounds[examples], counts)
    ok = np.array([e is not None for e in exts], bool)
    if not ok.all():
        keys = table.column("key")
        for i in np.flatnonzero(~ok).tolist():
            bad.append((keys[int(bounds[examples[i]])].as_py(), reasons[i], int(counts[i])))
        keep = ok[owner]
        rows, owner = rows[keep], owner[keep]
    carried = table.select(["key", "copy", "h", "labels", "weight"]).take(pa.array(rows))
    return pa.RecordBatch.from_arrays(
        [*(c.combine_chunks() for c in carried.columns),
         pa.array(owner + first_image, pa.int64()), pa.array(exts, pa.string()).take(pa.array(owner))],
        names=["key", "copy", "h", "labels", "weight", "image_ref", "ext"])


def _read_inline(path: str, rows: np.ndarray) -> Iterator[tuple[np.ndarray, pa.Array]]:
    """``(positions into rows, image cells as an Arrow array)`` of one Parquet
    file, row group by row group in file order (sequential reads, only the
    groups needed)."""
    fs, p = sio.filesystem(path)
    with fs.open(p, "rb") as fh:
        pf = pq.ParquetFile(fh)
        bounds = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        group_of = np.searchsorted(bounds, rows, side="right") - 1
        order = np.argsort(rows, kind="stable")
        for g in np.unique(group_of):
            members = order[group_of[order] == g]
            col = pf.read_row_group(int(g), columns=["image"]).column("image")
            wanted = rows[members] - bounds[g]
            if wanted.size == len(col) and np.array_equal(wanted, np.arange(wanted.size)):
                images = col.combine_chunks()  # the whole group, in order: no copy
            else:
                images = col.take(pa.array(wanted)).combine_chunks()
            for s in range(0, len(members), IMAGE_BATCH_ROWS):
                yield members[s:s + IMAGE_BATCH_ROWS], images.slice(s, IMAGE_BATCH_ROWS)


# -- stage 2: write shards --------------------------------------------------------------

#: A row per shard; ``released``: run bytes released after it was written; ``reused``: an earlier
#: attempt wrote it.
WRITTEN_SCHEMA = ("shard int, temp string, samples long, bytes long, sha256 string, labels string, "
                  "released long, reused boolean")
#: The four bytes that start every message of an Arrow IPC file (a record batch, or the end of the batches).
_IPC_CONTINUATION = b"\xff\xff\xff\xff"


def gather_binary(pool: Sequence[pa.Array], refs: np.ndarray) -> pa.Array:
    """``concat(pool)[refs]`` as one binary array, with one copy of the bytes
    (a join of zero-copy views: several times faster than Arrow's ``take``
    on binary data)."""
    views = [v for chunk in pool for v in binary_views(chunk)]
    picked = [views[i] for i in refs.tolist()]
    lengths = np.concatenate([np.diff(_offsets(chunk)) for chunk in pool] or [np.zeros(0, np.int64)])
    offsets = np.zeros(len(picked) + 1, np.int64)
    np.cumsum(lengths[refs], out=offsets[1:])
    if offsets[-1] >= 2 ** 31:
        raise ValueError("internal error: a run holds 2 GiB of images or more (lower run_bytes)")
    # Into a buffer of Arrow's memory pool, which keeps and reuses its pages (a
    # bytes join maps fresh pages for every run: several times slower).
    data = pa.allocate_buffer(int(offsets[-1]))
    out = memoryview(data)
    for view, a, b in zip(picked, offsets[:-1].tolist(), offsets[1:].tolist()):
        out[a:b] = view
    return pa.Array.from_buffers(pa.binary(), len(picked), [None, pa.py_buffer(offsets.astype(np.int32)), data])


def _offsets(array: pa.Array) -> np.ndarray:
    """The value offsets of a binary or large_binary Arrow array (int64)."""
    width = np.int64 if array.type == pa.large_binary() else np.int32
    return np.frombuffer(array.buffers()[1], width)[array.offset:array.offset + len(array) + 1].astype(np.int64)


def binary_views(array: pa.Array) -> list:
    """Zero-copy ``memoryview`` of each value of a binary Arrow array (a null
    value gives whatever its offsets span, normally nothing)."""
    data = memoryview(array.buffers()[2]) if len(array) else memoryview(b"")
    bounds = _offsets(array).tolist()
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _write_sorted(table: pa.Table, images: list, first: int, output: str, prefix: str, samples_per_shard: int,
                  total: int, attempt: str) -> Iterator[tuple]:
    """Write the copies of ``table`` with their ``images`` (memoryviews, never
    copied before the tar block that holds them), in order, as the shards
    from position ``first`` (a shard's first) on, each streamed to
    ``output/_temporary/<name>.<attempt>``; yields each shard's row (the
    first six ``WRITTEN_SCHEMA`` fields) once its file is closed. Nothing
    is final until the driver renames what successful attempts reported."""
    cols = [table.column(c).to_pylist() for c in ("key", "copy", "ext", "labels", "weight")]
    labels_flat = pc.list_flatten(table.column("labels")).to_numpy(zero_copy_only=False)
    label_offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(table.column("labels"))
                                                   .to_numpy(zero_copy_only=False))])
    for a in range(0, table.num_rows, samples_per_shard):
        b = min(table.num_rows, a + samples_per_shard)
        shard = (first + a) // samples_per_shard
        items = [(sample_key(k, c), e, view, sample_json(k, c, lab, w))
                 for view, k, c, e, lab, w in zip(images[a:b], *(col[a:b] for col in cols))]
        values, counts = np.unique(labels_flat[label_offsets[a]:label_offsets[b]], return_counts=True)

        def samples(items=items):
            for i, item in enumerate(items):
                yield item
                if i == 1:
                    inject_failure("write")  # mid-write: a partial temporary file exists

        temp = sio.join(output, TEMPORARY, f"{shard_name(prefix, shard)}.{attempt}")
        fs, p = sio.filesystem(temp)
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(p, "wb") as fh:
            n, size, digest = write_tar(fh, samples())
        want = min(samples_per_shard, total - shard * samples_per_shard)
        if n != want:
            raise ValueError(f"internal error: shard {shard} has {n} samples, expected {want}")
        yield (shard, temp, n, size, digest, json.dumps({int(v): int(c) for v, c in zip(values, counts)},
                                                        sort_keys=True))


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n in zip(starts, lengths))``, vectorised."""
    lengths = np.asarray(lengths, np.int64)
    return np.repeat(np.asarray(starts, np.int64) - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


def _runs_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of equal values in a sorted array."""
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
    return starts, np.append(starts[1:], values.size)


def _write_from_runs(runs: Sequence[Run], bucket_starts: np.ndarray, bucket_bits: int, shards_per_writer: int,
                     output: str, prefix: str, samples_per_shard: int, total: int, storage: dict,
                     release: bool):
    """mapInArrow over writer ids: writer w writes shards ``w*shards_per_writer
    ...``. Their positions fall in a few buckets (``bucket_starts[b]``: the
    position of bucket b's first copy); it reads those buckets' copies from
    every run, ranks them in :func:`hash_order` and writes the tars. One
    ``WRITTEN_SCHEMA`` row per shard.

    With ``release`` (local mode, runs on the local filesystem, no speculation),
    each closed shard gets a receipt (``<temp>.json``, written atomically),
    and then the run batches that only this writer reads and that hold no
    copy of a shard still to write are punched out of the run files
    (:func:`schemas.io.punch_holes`): the page cache (or disk) holds each
    image about once, not twice. A retry of the writer reuses the shards its
    earlier attempts left receipts for, and reads the runs only from the
    first shard without one.
    """

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        sio.apply_storage_config(storage)
        attempt = task_attempt_id()
        retry = (task_attempt_number() or 0) > 0
        results = []
        for batch in batches:
            for w in batch.column(0).to_pylist():
                lo = int(w) * shards_per_writer * samples_per_shard
                hi = min(total, (int(w) + 1) * shards_per_writer * samples_per_shard)  # positions
                reused = _receipts(output, prefix, lo, hi, samples_per_shard) if release and retry else []
                results += reused
                todo = lo + len(reused) * samples_per_shard
                if todo >= hi:
                    continue
                first = int(np.searchsorted(bucket_starts, todo, side="right")) - 1
                last = int(np.searchsorted(bucket_starts, hi - 1, side="right")) - 1
                table, images = _read_runs([r.path for r in runs], first, last, bucket_bits)
                expected = int(bucket_starts[last + 1] - bucket_starts[first])
                if len(images) != expected:
                    raise ValueError(f"internal error: runs hold {len(images)} copies of buckets "
                                     f"{first}..{last}, tallied {expected}")
                order = hash_order(table.column("h").to_numpy(), table.column("key"),
                                   table.column("copy").to_numpy())
                skip = todo - int(bucket_starts[first])
                mine = order[skip:skip + hi - todo]
                pending = _releasable(runs, bucket_starts, bucket_bits, lo, hi) if release else []
                for row in _write_sorted(table.take(pa.array(mine)), [images[i] for i in mine.tolist()], todo,
                                         output, prefix, samples_per_shard, total, attempt):
                    released = 0
                    if release:
                        sio.write_bytes_atomic(row[1] + ".json", json.dumps(dict(zip(_RECEIPT, row))),
                                              durable=False)  # for retries in this job only
                        done = min(total, (row[0] + 1) * samples_per_shard)  # positions written
                        ready = [p for p in pending if p[0] <= done]
                        pending = pending[len(ready):]
                        released = _release(ready)
                    results.append(row + (released, False))
                    inject_failure("released")  # a shard is written, its runs may be released
        if results:
            cols = list(zip(*results))
            yield pa.RecordBatch.from_arrays(
                [pa.array(cols[0], pa.int32()), pa.array(cols[1], pa.string()), pa.array(cols[2], pa.int64()),
                 pa.array(cols[3], pa.int64()), pa.array(cols[4], pa.string()), pa.array(cols[5], pa.string()),
                 pa.array(cols[6], pa.int64()), pa.array(cols[7], pa.bool_())],
                names=["shard", "temp", "samples", "bytes", "sha256", "labels", "released", "reused"])

    return write


#: The fields of a shard's receipt (the first six of ``WRITTEN_SCHEMA``).
_RECEIPT = ("shard", "temp", "samples", "bytes", "sha256", "labels")


def _receipts(output: str, prefix: str, lo: int, hi: int, samples_per_shard: int) -> list[tuple]:
    """The rows of the leading shards of positions ``[lo, hi)`` that an
    earlier attempt finished: a receipt whose temporary file is there, whole.
    Stops at the first shard without one."""
    temporary = sio.join(output, TEMPORARY)
    fs, p = sio.filesystem(temporary)
    names = sorted(n.rsplit("/", 1)[-1] for n in fs.ls(p, detail=False)) if fs.exists(p) else []
    rows = []
    for shard in range(lo // samples_per_shard, math.ceil(hi / samples_per_shard)):
        stem = shard_name(prefix, shard) + "."
        for name in (n for n in names if n.startswith(stem) and n.endswith(".json")):
            receipt = json.loads(sio.read_bytes(sio.join(temporary, name)))
            tfs, tp = sio.filesystem(receipt["temp"])
            if receipt["shard"] == shard and tfs.exists(tp) and tfs.size(tp) == receipt["bytes"]:
                rows.append(tuple(receipt[k] for k in _RECEIPT) + (0, True))
                break
        else:
            break
    return rows


def _releasable(runs: Sequence[Run], bucket_starts: np.ndarray, bucket_bits: int, lo: int,
                hi: int) -> list[tuple[int, str, int, int]]:
    """The run batches whose copies all have positions in ``[lo, hi)`` (one
    writer's, so no other writer reads them): ``(end position, path, start
    byte, end byte)``, by end position (a batch may go once every position
    before its end position is written)."""
    found = []
    for run in runs:
        firsts = np.asarray(run.first_buckets, np.int64)
        if firsts.size == 0:
            continue
        begin = bucket_starts[firsts]
        end = bucket_starts[np.append(firsts[1:], 1 << bucket_bits)]
        for i in np.flatnonzero((begin >= lo) & (end <= hi) & (end > begin)).tolist():
            found.append((int(end[i]), run.path, int(run.offsets[i]), int(run.offsets[i + 1])))
    return sorted(found)


def _release(batches: Sequence[tuple[int, str, int, int]]) -> int:
    """Punch the given run batches out of their files; returns the bytes
    released. A range that does not start and end where Arrow IPC messages
    start (the layout is not what was recorded, or it is already released) is
    left alone."""
    by_path: dict[str, list[tuple[int, int]]] = {}
    for _, path, start, end in batches:
        by_path.setdefault(path, []).append((start, end))
    released = 0
    for path, ranges in by_path.items():
        fd = os.open(sio.filesystem(path)[1], os.O_RDONLY)
        try:
            whole = [(a, b) for a, b in ranges
                     if os.pread(fd, 4, a) == _IPC_CONTINUATION and os.pread(fd, 4, b) == _IPC_CONTINUATION]
        finally:
            os.close(fd)
        released += sio.punch_holes(path, whole)
    return released


# -- the job --------------------------------------------------------------------------

def bucket_bits(copies: int, samples_per_shard: int) -> int:
    """Bits of the placement hash that name its bucket: about
    ``BUCKETS_PER_SHARD`` buckets per shard for ``copies`` (an estimate is
    enough: it only sets how finely runs are cut), at most ``MAX_BUCKET_BITS``."""
    wanted = max(1, math.ceil(BUCKETS_PER_SHARD * max(1, copies) / samples_per_shard))
    return min(MAX_BUCKET_BITS, (wanted - 1).bit_length())


def spark_hash_int(value: int, seed: int = 42) -> int:
    """Spark's ``hash()`` of an int (Murmur3 x86_32, seed 42): what places a
    row in ``repartition(n, column)``, partition ``pmod(hash, n)``."""
    mask = 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    k1 = rotl((value & mask) * 0xCC9E2D51 & mask, 15) * 0x1B873593 & mask
    h1 = (rotl(seed ^ k1, 13) * 5 + 0xE6546B64) & mask
    h1 ^= 4
    h1 = ((h1 ^ (h1 >> 16)) * 0x85EBCA6B) & mask
    h1 = ((h1 ^ (h1 >> 13)) * 0xC2B2AE35) & mask
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def partition_keys(n: int) -> list[int]:
    """For each partition p < n, the smallest int k >= 0 that ``repartition(n,
    column)`` sends to partition p: rows keyed k go there, and only there."""
    keys: dict[int, int] = {}
    k = 0
    while len(keys) < n:
        keys.setdefault(spark_hash_int(k) % n, k)
        k += 1
    return [keys[p] for p in range(n)]


def contiguous_groups(items: int, groups: int) -> np.ndarray:
    """Group of each of ``items`` ordered items: ``groups`` contiguous runs
    of sizes differing by at most one."""
    return (np.arange(items) * groups) // max(1, items)


def _spark_file_path(uri: str) -> str:
    """A path as ``inputFiles()`` gives it, written as ``_metadata.file_path``
    is (Hadoop's ``Path.toUri``: ``file:///x`` is ``file:/x``)."""
    scheme, sep, rest = uri.partition(":///")
    return f"{scheme}:/{rest}" if sep and "/" not in scheme else uri


def _resample_stats(resample_dir: str | None) -> dict | None:
    """The resampler's stats.json beside the selection, if there is one."""
    if resample_dir and sio.exists(sio.join(resample_dir, "stats.json")):
        return json.loads(sio.read_bytes(sio.join(resample_dir, "stats.json")))
    return None


def _copies_estimate(selection_path: str, stats: dict | None) -> int:
    """Copies in the selection: the resampler's total when its stats are there,
    else the selection's rows from the Parquet footers (at most a few fewer)."""
    if stats and isinstance(stats.get("total_copies"), int):
        return stats["total_copies"]
    rows = 0
    try:
        paths = sio.expand_paths(selection_path)
    except FileNotFoundError:  # Spark reads what it reads, and says what is wrong
        return 0
    for path in paths:
        fs, p = sio.filesystem(path)
        with fs.open(p, "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    return rows


def _config_from(stats: dict | None, total: int) -> tuple[ResampleConfig, dict]:
    """The resampler's configuration and input fingerprints, for the manifest."""
    if stats:
        return ResampleConfig.from_dict(stats["config"]), stats.get("inputs", {})
    return ResampleConfig(target="unknown", size=max(total, 1)), {}


def run(spark, job: ShardJob) -> Manifest:
    """Write the shards; return the manifest (also at ``output/manifest.json``).

    Every input is checked before the output is touched; the shards are built
    aside and committed whole (``schemas.stage_output``)."""
    from pyspark.sql import functions as F

    from pyspark.sql.pandas.types import to_arrow_schema

    t0 = time.time()
    stages = StageTimer()
    require_reachable_outputs(spark, {"--output": job.output, "--spill-dir": job.spill_dir}, job.shared_output)
    output = StageOutput(job.output, "write_shards")

    selection_path, resample_dir = resolve_selection(job.selection)
    if resample_dir:
        require_complete(resample_dir, "the resampler")
    require_finished_input(job.index, "--index")
    # The resampler writes its selection through fsspec: on an object store, read it that way too
    # (Spark's reader would need the cluster's connector for the scheme).
    selection = (read_parquet_columns if sio.is_local(selection_path) else read_parquet_through_fsspec)(
        spark, selection_path, ["key", "copies", "weight"])
    for col in ("key", "copies"):
        if col not in selection.columns:
            raise SchemaError(f"selection has no '{col}' column", file=selection_path)
    if "weight" not in selection.columns:
        selection = selection.withColumn("weight", F.lit(0.0))
    selection = selection.select(F.col("key").cast("string"), F.col("copies").cast("int"),
                                 F.col("weight").cast("double"))
    index = read_parquet_columns(spark, job.index, ["key", "labels", "image", "uri"])
    column = check_index_schema(to_arrow_schema(index.schema), file=job.index)  # "image" or "uri"
    located = index.select(
        F.col("key").cast("string").alias("key"), F.col("labels").cast("array<int>").alias("labels"),
        F.col("_metadata.file_path").alias("file"), F.col("_metadata.row_index").alias("row"),
        (F.col("uri") if column == "uri" else F.lit(None).cast("string")).alias("uri"))
    if output.check(job.overwrite):  # every input is checked: the output may be touched now
        print(output.skip_line(), file=sys.stderr)
        manifest_path = sio.join(job.output, "manifest.json")
        return Manifest.from_json(sio.read_bytes(manifest_path).decode(), manifest_path)
    work = output.begin()
    try:
        manifest = _write_into(spark, job, work, selection, selection_path, resample_dir, index, column, located,
                               stages, t0)
    except BaseException:
        output.abort(work)
        raise
    output.commit(work)
    return manifest


def _write_into(spark, job: ShardJob, work: str, selection, selection_path: str, resample_dir: str | None, index,
                column: str, located, stages: StageTimer, t0: float) -> Manifest:
    """Fetch, spill and write the shards and the manifest into ``work``."""
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    files = sorted(index.inputFiles())
    tasks = max(1, min(len(files), FETCH_TASKS_PER_CORE * spark.sparkContext.defaultParallelism))
    # Each fetch task takes a contiguous range of about as many files as the
    # others (rows of a file the table misses, if any, are spread by hash).
    task_keys = np.asarray(partition_keys(tasks))[contiguous_groups(len(files), tasks)].tolist()
    # From Arrow: a local relation, which needs no Spark job (a list of rows would).
    task_of_file = spark.createDataFrame(pa.table({"file": pa.array([_spark_file_path(f) for f in files], pa.string()),
                                                   "task": pa.array(task_keys, pa.int32())}))
    storage = sio.storage_config()
    spill_dir = sio.join(job.spill_dir or sio.join(work, TEMPORARY), f"spill-{uuid.uuid4().hex[:12]}")
    resample_stats = _resample_stats(resample_dir)
    bits = bucket_bits(_copies_estimate(selection_path, resample_stats), job.samples_per_shard)
    # Arrow batches of images; the index is scanned for keys and labels only,
    # so split it by count (one split per fetch task), not by file bytes that
    # are mostly the images this scan skips.
    restore_confs = set_confs(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(IMAGE_BATCH_ROWS),
                                      "spark.sql.files.maxPartitionBytes": str(1 << 50),
                                      "spark.sql.files.minPartitionNum": str(tasks)})
    try:
        # Stage 1: each copy, with its placement hash h (its order in the
        # output), meets its example's source location in the index (a key the
        # index lacks is reported); every image is read once, in source order,
        # and checked; the good copies go to run files sorted by h, the bad
        # examples are reported. The selection is checked on the way.
        observed = Observation("selection")
        asked = F.coalesce(F.col("copies"), F.lit(0))
        measures = [F.count(F.lit(1)).alias("rows"),
                    F.sum(F.greatest(asked, F.lit(0)).cast("long")).alias("copies"), F.min(asked).alias("min_copies")]
        copies = (selection.observe(observed, *measures)
                  .where(asked > 0)
                  .select("key", "weight", F.explode(F.sequence(F.lit(0), F.col("copies") - 1)).alias("copy"))
                  .withColumn("h", F.xxhash64(F.col("key"), F.col("copy"), F.lit(job.seed).cast("long"))))
        spilled = (copies.join(located, on="key", how="left").join(F.broadcast(task_of_file), on="file", how="left")
                   .repartition(tasks, F.coalesce(F.col("task"), F.hash("file")))
                   .drop("task").sortWithinPartitions("file", "row", "key", "copy")
                   .mapInArrow(_spill_partition(column, storage, spill_dir, bits, job.run_bytes, job.uri_prefixes,
                                                job.reencode), SPILLED_SCHEMA)
                   .collect())  # a row per run, per bad example and per task: small
        # No metrics come back when nothing was selected: then count directly.
        facts = observed_metrics(observed) or selection.agg(*measures).first()
        unique, requested_total = int(facts["rows"]), int(facts["copies"] or 0)
        if unique == 0:
            raise SchemaError("selection is empty", file=selection_path)
        if int(facts["min_copies"]) < 1:
            raise SchemaError(f"copies must be > 0 (found {int(facts['min_copies'])})", file=selection_path)
        duplicated = [r["key"] for r in spilled if r["reason"] == DUPLICATE]
        if duplicated:
            raise SchemaError(f"{len(duplicated)} keys appear in more than one row (first: "
                              f"{sorted(duplicated)[:3]})", file=selection_path)
        runs = [r for r in spilled if r["path"] is not None]
        bad_found = sorted((r for r in spilled if r["key"] is not None), key=lambda r: r["key"])
        dropped = sum(int(r["rows"]) for r in bad_found)
        total = sum(int(r["rows"]) for r in runs)
        if total + dropped > requested_total:  # a copy met two index rows
            dup = (located.join(selection.select("key"), on="key").groupBy("key").count()
                   .where("count > 1").select("key").orderBy("key").first())
            raise SchemaError(f"key {dup['key'] if dup else '?'!r} appears more than once in the source index",
                              file=job.index)
        if total + dropped != requested_total:
            raise ValueError(f"internal error: runs hold {total} copies and {dropped} were dropped, "
                             f"expected {requested_total}")
        per_bucket = np.zeros(1 << bits, np.int64)
        reencoded = np.zeros(3, np.int64)
        for r in spilled:
            if r["counts"] is not None:  # a task's tally
                np.add.at(per_bucket, np.asarray(r["buckets"], np.int64), np.asarray(r["counts"], np.int64))
                reencoded += np.asarray(r["reencoded"], np.int64)
        bucket_starts = np.concatenate([[0], np.cumsum(per_bucket)])
        if bucket_starts[-1] != total:
            raise ValueError(f"internal error: buckets tally {bucket_starts[-1]} copies, runs hold {total}")
        run_files = sorted((Run(r["path"], int(r["rows"]), int(r["bytes"]), tuple(r["buckets"]), tuple(r["offsets"]))
                            for r in runs), key=lambda run: run.path)
        n_bad = len(bad_found)
        if n_bad / unique > job.max_bad_fraction:
            raise ValueError(f"{n_bad} of {unique} selected examples have a missing or unrecognisable "
                             f"image ({n_bad / unique:.3%} > --max-bad-fraction {job.max_bad_fraction:.3%}); "
                             f"first: {[r['key'] for r in bad_found[:3]]}")
        bad_records = [{"key": r["key"], "reason": r["reason"]} for r in bad_found[:1000]]
        if total == 0:
            raise ValueError("no selected example has a usable image")
        num_shards = math.ceil(total / job.samples_per_shard)
        stages.lap("fetch")

        # Stage 2: each writer takes whole shards, reads their buckets' batches
        # of every run, ranks the copies by h and writes the tars.
        sample_bytes = max(1.0, sum(run.bytes for run in run_files) / total)
        parallelism = spark.sparkContext.defaultParallelism
        shards_per_writer = max(1, min(int(job.writer_bytes // (sample_bytes * job.samples_per_shard)),
                                       math.ceil(num_shards / (WRITERS_PER_CORE * parallelism))))
        writers = math.ceil(num_shards / shards_per_writer)
        # Release consumed run batches while writing where the runs are local
        # files and no other attempt of a writer can still be reading them:
        # local mode (a failed attempt has stopped; on a cluster an attempt on
        # a lost executor may still run) without speculative attempts.
        release = (spark.sparkContext.master.startswith("local") and sio.is_local(spill_dir)
                   and spark.sparkContext.getConf().get("spark.speculation", "false").lower() != "true")
        rows = (spark.range(0, writers, 1, writers)
                .mapInArrow(_write_from_runs(run_files, bucket_starts, bits, shards_per_writer, work,
                                             job.prefix, job.samples_per_shard, total, storage, release),
                            WRITTEN_SCHEMA)
                .collect())
        stages.lap("write")
    finally:
        restore_confs()
        sio.remove_tree(spill_dir)

    by_shard = {}
    for r in rows:
        by_shard.setdefault(r["shard"], r)  # one successful attempt per shard
    if sorted(by_shard) != list(range(num_shards)):
        raise ValueError(f"internal error: shards written {sorted(by_shard)[:10]}..., expected 0..{num_shards - 1}")
    shards, label_counts = [], {}
    for s in range(num_shards):
        r = by_shard[s]
        name = shard_name(job.prefix, s)
        sio.move(r["temp"], sio.join(work, name))
        shards.append(ShardInfo(name=name, samples=int(r["samples"]), bytes=int(r["bytes"]), sha256=r["sha256"]))
        for label, n in json.loads(r["labels"]).items():
            label_counts[int(label)] = label_counts.get(int(label), 0) + n
    sio.remove_tree(sio.join(work, TEMPORARY))

    config, resample_inputs = _config_from(resample_stats, requested_total)
    manifest = Manifest(
        config=config,
        inputs={"selection": sio.listing_fingerprint(selection_path), "index": sio.listing_fingerprint(job.index),
                **{f"resample.{k}": v for k, v in resample_inputs.items()}},
        shards=shards, total_samples=total, unique_examples=unique - n_bad,
        label_distribution=label_counts, bad_records=bad_records,
        extra={"samples_per_shard": job.samples_per_shard, "prefix": job.prefix, "seed": job.seed,
               "requested_samples": requested_total, "bad_examples": n_bad, "image_source": column,
               "allowed_uri_prefixes": list(job.uri_prefixes) if column == "uri" else None,
               "max_side": job.max_side, "reencoded": _reencode_record(job, reencoded),
               "spill": {"run_bytes": sum(run.offsets[-1] for run in run_files),
                         "released_while_writing": sum(int(r["released"]) for r in by_shard.values()),
                         "shards_reused_by_retries": sum(bool(r["reused"]) for r in by_shard.values())},
               "seconds": round(time.time() - t0, 2), "timings": stages.timings})
    sio.write_bytes_atomic(sio.join(work, "manifest.json"), manifest.to_json())
    return manifest


def _reencode_record(job: ShardJob, totals: np.ndarray) -> dict | None:
    """The manifest's record of ``--max-side`` re-encoding (None without it).
    ``images``, ``bytes_before`` and ``bytes_after`` count examples (each
    re-encoded once, whatever its copies)."""
    if job.reencode is None:
        return None
    max_side, quality = job.reencode
    return {"max_side": max_side, "quality": quality, "format": "JPEG baseline, 4:2:0, optimised Huffman",
            "resample": "DCT scaling to >= 2x the target, then Lanczos", "encoder": encoder_version(),
            "images": int(totals[0]), "bytes_before": int(totals[1]), "bytes_after": int(totals[2])}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spark_jobs.write_shards",
                                description="Write WebDataset shards from a resampler selection.")
    p.add_argument("--selection", required=True, help="resampler output dir or its selection/ dir")
    p.add_argument("--index", required=True, help="the source index the resampler read")
    p.add_argument("--output", required=True)
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--seed", type=int, default=0, help="placement of copies across shards")
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    p.add_argument("--max-bad-fraction", type=float, default=0.001,
                   help="fail when more selected examples than this have no usable image")
    p.add_argument("--spill-dir", help="where fetch tasks leave sorted runs of image bytes for the shard "
                   "writers; every executor must reach it (default: OUTPUT/_temporary)")
    p.add_argument("--run-bytes", type=parse_size, default=RUN_BYTES,
                   help="image bytes a fetch task sorts in memory per run file (default 64 MiB: "
                        "memory per task is about twice this; larger runs mean fewer, larger reads "
                        "for the writers, e.g. on object storage)")
    p.add_argument("--allow-uri-prefix", action="append", metavar="PREFIX",
                   help="repeatable: read a uri index's images only under these directories or URL "
                        "prefixes (a local path, file://, s3://bucket/..., gs://, hdfs://host/..., "
                        "http(s)://host/...; matched on path components after normalising; '..' is "
                        "refused). Given, it replaces the default: the index's own storage (its "
                        "scheme and bucket, or for a local index the directory containing the index "
                        "path). Any other uri is a bad example (see --max-bad-fraction)")
    p.add_argument("--max-side", type=int, metavar="N",
                   help="re-encode every image whose longer side exceeds N pixels (scaled to N, aspect "
                        "kept) as a JPEG (--quality; no metadata kept), as img2dataset does at download "
                        "time: smaller shards, faster decoding; images of at most N are kept byte for byte. "
                        "Every image's header is read: one whose size cannot be read, or that cannot be "
                        "decoded when it must be re-encoded, is a bad example (see --max-bad-fraction). "
                        "Default: images as the index holds them")
    p.add_argument("--quality", type=int, metavar="Q",
                   help=f"JPEG quality of images re-encoded for --max-side (1-100, default {REENCODE_QUALITY})")
    add_spark_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("write_shards", args,
                   lambda: ShardJob(selection=args.selection, index=args.index, output=args.output,
                                    samples_per_shard=args.samples_per_shard, prefix=args.prefix,
                                    seed=args.seed, overwrite=args.overwrite,
                                    max_bad_fraction=args.max_bad_fraction, spill_dir=args.spill_dir,
                                    run_bytes=args.run_bytes, allow_uri_prefixes=args.allow_uri_prefix,
                                    max_side=args.max_side, quality=args.quality,
                                    shared_output=args.shared_output),
                   run, lambda job, m: f"{m.total_samples} samples ({m.unique_examples} unique) in "
                                       f"{len(m.shards)} shards -> {job.output}")

if __name__ == "__main__":
    raise SystemExit(main())
