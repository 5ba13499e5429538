"""The fetch tasks: read each selected image once, in source order, check
it, append the good ones to the task's spill files and emit a row per copy
(where its image is), never the image bytes themselves.

A fetch pass serves one or more targets (``run_many``): each copy row names
its ``target`` (0 .. K-1), and an image selected by several targets is read,
checked and spilled once. A fetch task's input: copy rows (``key, copy, h,
weight, target, labels, file, row, uri``) sorted by (file, row, key, target,
copy), a contiguous range of the index's files. It writes its good copies'
rows (``ROWS_ARROW``: ``key, copy, h, labels, weight, ext``, where the image
is: ``length`` bytes at ``offset`` of spill file ``path``, the image's
``copies`` over every target, and the ``target``) to a rows file beside its
spill, and returns ``FETCHED_SCHEMA`` rows: one *task row* (that file, its
bad examples with their target and reason, its peak resident memory, per
target the image bytes spilled and what was re-encoded, the images and
index bytes it read) and *tally rows*: per target, its good copies per
bucket as dense blocks of ``TALLY_BLOCK`` buckets (blocks of zeros left
out). :func:`combine_fetched` sums the tally rows in Spark, so the driver
receives one block per target and block, whatever the number of tasks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import io as sio
from schemas.shard_format import decode_problem, image_extension, image_problem

from ..reencode import reencode_image
from ..session import inject_failure, task_attempt_id
from .placement import bucket_of, concat_ranges, runs_of
from .spill import PAGE, SpillWriter, no_space, peak_rss, reset_peak_rss, spread_name, with_retries, without_gc

__all__ = ["FetchTask", "fetch_partition", "FETCHED_SCHEMA", "ROWS_ARROW", "DUPLICATE", "NOT_IN_INDEX",
           "IMAGE_BATCH_ROWS", "CHUNK_ROWS", "binary_views", "verdicts", "example_chunks"]

#: Arrow batch size while images travel through Python (bytes, not rows, matter).
IMAGE_BATCH_ROWS = 256
#: Image bytes a fetch task gathers, then spills in the order of their placement hash.
SORT_BYTES = 64 << 20
#: Copy rows a fetch task holds at a time (~100 bytes each, besides its images).
CHUNK_ROWS = 1 << 18
#: The ``reason`` of a key the selection holds in more than one row (not a bad image).
DUPLICATE = "in more than one selection row"
#: The ``reason`` of a selected key the index does not hold.
NOT_IN_INDEX = "not in the source index"

#: A fetch task's row; ``error``: why it stopped (a write found no room), else null.
FETCHED_SCHEMA = ("rows_path string, copies long, buckets array<int>, counts array<long>, "
                  "bad_keys array<string>, bad_reasons array<string>, bad_copies array<long>, "
                  "task_rss long, task_spilled long, reencoded array<long>, error string")

#: A good copy's row: the sample's fields and where its image is in the spill.
ROWS_ARROW = pa.schema([("key", pa.string()), ("copy", pa.int32()), ("h", pa.int64()),
                        ("labels", pa.list_(pa.int32())), ("weight", pa.float64()), ("ext", pa.string()),
                        ("path", pa.string()), ("offset", pa.int64()), ("length", pa.int64()),
                        ("copies", pa.int32())])


@dataclass(frozen=True)
class FetchTask:
    """What every fetch task is given (the unit a test builds by hand).

    ``bits``: bits of the placement hash that name its bucket; ``column``:
    ``"image"`` (bytes in the index) or ``"uri"``; ``storage``:
    fsspec options (``schemas.io.storage_config``); ``spill_dir``: where the
    spill files go; ``spill_file_bytes``: a new spill file past this;
    ``uri_prefixes``: where uris may be read (schemas.uri_policy);
    ``reencode``: ``(max_side, quality)`` or None; ``decode``: fully decode
    every image (``--decode-check``), not only check its structure;
    ``sort_bytes``: images gathered before they are spilled in placement
    order (memory; default ``SORT_BYTES``); ``chunk_rows``: copy rows a task
    holds at a time (:func:`example_chunks`; default ``CHUNK_ROWS``).
    """

    column: str
    bits: int
    storage: dict
    spill_dir: str
    spill_file_bytes: int
    uri_prefixes: tuple = ()
    reencode: tuple | None = None
    decode: bool = False
    sort_bytes: int = SORT_BYTES
    chunk_rows: int = CHUNK_ROWS


def binary_views(array: pa.Array) -> list:
    """Zero-copy ``memoryview`` of each value of a binary Arrow array (a null
    value gives whatever its offsets span, normally nothing)."""
    if not len(array):
        return []
    data = memoryview(array.buffers()[2]) if array.buffers()[2] is not None else memoryview(b"")
    width = np.int64 if array.type == pa.large_binary() else np.int32
    bounds = np.frombuffer(array.buffers()[1], width)[array.offset:array.offset + len(array) + 1].tolist()
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def verdicts(items: Sequence, views: Sequence, decode: bool = False) -> tuple[list, list]:
    """``(extension or None, reason or None)`` of fetched items: ``items[i]``
    is why image i could not be read (a string), ``None`` (no bytes), or
    anything else when ``views[i]`` holds its bytes, which are then checked
    (:func:`schemas.shard_format.image_problem`, or with ``decode`` a full decode)."""
    exts, reasons = [], []
    check = decode_problem if decode else image_problem
    for item, view in zip(items, views):
        if isinstance(item, str) or item is None:
            exts.append(None)
            reasons.append(item if isinstance(item, str) else "no image bytes")
            continue
        problem = check(view)
        exts.append(None if problem else image_extension(view))
        reasons.append(problem)
    return exts, reasons


def examples_of(table: pa.Table) -> np.ndarray:
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


def duplicated(table: pa.Table, bounds: np.ndarray) -> list[str]:
    """Keys of the examples whose copy rows are not exactly 0, 1, ..., c-1:
    the selection holds their key in more than one row."""
    counts = np.diff(bounds)
    expected = np.arange(table.num_rows) - np.repeat(bounds[:-1], counts)
    wrong = np.repeat(np.arange(counts.size), counts)[table.column("copy").to_numpy() != expected]
    return sorted(set(table.column("key").take(pa.array(bounds[:-1][np.unique(wrong)])).to_pylist()))


def example_chunks(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Copy rows sorted by (file, row, key, copy), regrouped into tables cut
    where an example ends once ``rows`` rows are held (an example's copies are
    never split; a table holds at most ``rows`` plus one input batch and one
    example), each one chunk per column. A fetch task holds one such table at
    a time, whatever its input's size."""
    pending: list = []
    held = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        held += batch.num_rows
        if held < rows:
            continue
        table = pa.Table.from_batches(pending).combine_chunks()
        cut = int(examples_of(table)[-2])  # the last example may go on in the next batch
        if cut == 0:
            continue  # one example so far: keep gathering
        yield table.slice(0, cut)
        rest = table.slice(cut)
        pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending).combine_chunks()


def _read_inline(path: str, rows: np.ndarray) -> Iterator[tuple[np.ndarray, pa.Array]]:
    """``(positions into rows, image cells as an Arrow array)`` of one Parquet
    file, row group by row group in file order (sequential reads, only the
    groups needed; a transient error reopens the file and retries)."""
    fs, p = sio.filesystem(path)
    state: dict = {}

    def opened() -> pq.ParquetFile:
        try:
            if "file" not in state:
                state["handle"] = fs.open(p, "rb")
                state["file"] = pq.ParquetFile(state["handle"])
            return state["file"]
        except Exception:
            _close(state)
            raise

    def group(g: int) -> pa.ChunkedArray:
        def attempt():
            try:
                return opened().read_row_group(g, columns=["image"]).column("image")
            except Exception:
                _close(state)
                raise
        return with_retries(attempt)

    try:
        pf = with_retries(opened)
        bounds = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        group_of = np.searchsorted(bounds, rows, side="right") - 1
        order = np.argsort(rows, kind="stable")
        for g in np.unique(group_of):
            members = order[group_of[order] == g]
            col = group(int(g))
            wanted = rows[members] - bounds[g]
            if wanted.size == len(col) and np.array_equal(wanted, np.arange(wanted.size)):
                images = col.combine_chunks()  # the whole group, in order: no copy
            else:
                images = col.take(pa.array(wanted)).combine_chunks()
            for s in range(0, len(members), IMAGE_BATCH_ROWS):
                yield members[s:s + IMAGE_BATCH_ROWS], images.slice(s, IMAGE_BATCH_ROWS)
    finally:
        _close(state)


def _close(state: dict) -> None:
    handle = state.pop("handle", None)
    state.pop("file", None)
    if handle is not None:
        try:
            handle.close()
        except Exception:  # noqa: BLE001 - closing a broken handle
            pass


def fetched(table: pa.Table, bounds: np.ndarray, column: str,
            uri_prefixes: Sequence[str] = ()) -> Iterator[tuple[np.ndarray, list, pa.Array]]:
    """Read the images of copy rows sorted by (file, row, key, copy)
    (examples start at ``bounds``), once per example and in source order (per
    file, by row, only the row groups needed; per ``uri``, sorted), as
    ``(examples, items, images)`` batches (first the examples the index
    lacks, with ``NOT_IN_INDEX``): ``examples`` index the examples, ``items``
    say why an image could not be read (a string) or anything else when
    ``images`` (an Arrow binary array) holds its bytes. A ``uri`` is read only
    when it lies under one of ``uri_prefixes`` (schemas.uri_policy), and then
    in the normal form checked; one outside is a bad example, the policy's
    verdict its reason. Transient read errors are retried
    (:func:`spill.with_retries`) before an image is counted unreadable."""
    first = bounds[:-1]
    file_col = table.column("file").take(pa.array(first))
    missing = pc.is_null(file_col).to_numpy(zero_copy_only=False)
    for s in range(0, int(missing.sum()), IMAGE_BATCH_ROWS):
        examples = np.flatnonzero(missing)[s:s + IMAGE_BATCH_ROWS]
        yield examples, [NOT_IN_INDEX] * len(examples), pa.nulls(len(examples), pa.binary())
    present = np.flatnonzero(~missing)
    if column == "image":
        yield from _inline_batches(table, first, present, file_col.take(pa.array(present)))
    else:
        yield from _uri_batches(table.column("uri").take(pa.array(first)), present, uri_prefixes)


def _inline_batches(table: pa.Table, first: np.ndarray, present: np.ndarray,
                    files: pa.ChunkedArray) -> Iterator[tuple[np.ndarray, list, pa.Array]]:
    """:func:`fetched`'s batches of an inline index: the ``present``
    examples (their first rows at ``first[present]``, in ``files``, sorted by
    file), file by file, by row."""
    codes = pc.dictionary_encode(files).combine_chunks().indices.to_numpy(zero_copy_only=False)
    rows = pc.fill_null(table.column("row"), -1).to_numpy()[first][present]
    for start, end in zip(*runs_of(codes)):  # the examples of one file (sorted by file)
        for examples, images in _read_inline(files[int(start)].as_py(), rows[start:end]):
            items = pc.is_null(images).to_pylist()
            yield present[examples + start], [None if null else True for null in items], images


def _uri_batches(column: pa.ChunkedArray, present: np.ndarray,
                 uri_prefixes: Sequence[str]) -> Iterator[tuple[np.ndarray, list, pa.Array]]:
    """:func:`fetched`'s batches of a ``uri`` index: the ``present`` examples
    (``column``: each example's uri) by uri, each read only where the policy
    allows it."""
    from schemas.uri_policy import check_uris, read_target

    by_uri = pc.sort_indices(pa.table({"uri": pc.fill_null(column.take(pa.array(present)), ""),
                                       "at": pa.array(present)}),
                             sort_keys=[("uri", "ascending"), ("at", "ascending")])
    order = present[by_uri.to_numpy()].tolist()  # by uri (none first), then position
    uris = column.to_pylist()
    for s in range(0, len(order), IMAGE_BATCH_ROWS):
        chunk = order[s:s + IMAGE_BATCH_ROWS]
        images = []
        for i, verdict in zip(chunk, check_uris(uri_prefixes, [uris[i] for i in chunk])):
            try:
                if not uris[i]:
                    raise ValueError("no uri")
                if verdict.reason is not None:  # not fetched: a bad example, like an unreadable one
                    images.append(verdict.reason)
                    continue
                images.append(with_retries(lambda target=verdict.target: read_target(target, uri_prefixes)))
            except Exception as e:  # noqa: BLE001 - a missing image is counted, not fatal
                images.append(f"unreadable uri {uris[i]!r}: {type(e).__name__}: {e}"[:300])
        data = pa.array([x if isinstance(x, bytes) else None for x in images], pa.binary())
        yield np.asarray(chunk, np.int64), [x if isinstance(x, str) else True for x in images], data


def reencoded(items: list, views: list, max_side: int, quality: int, totals: np.ndarray) -> tuple[list, list]:
    """``(items, views)`` of a fetched batch with every image whose longer
    side exceeds ``max_side`` replaced by :func:`spark_jobs.reencode.reencode_image`, the
    others left as they are, bytes and all. An image whose size cannot be
    read or that cannot be decoded gets the reason as its item (a bad
    example). Adds (images re-encoded, bytes before, after) to ``totals``."""
    items, views = list(items), list(views)
    for i, item in enumerate(items):
        if item is None or isinstance(item, str):
            continue  # already bad
        try:
            data = reencode_image(views[i], max_side, quality)
        except Exception as e:  # noqa: BLE001 - an undecodable image is a bad example, not fatal
            items[i] = f"cannot be re-encoded for --max-side {max_side}: {type(e).__name__}: {e}"[:300]
            continue
        if data is not None:
            totals += (1, len(views[i]), len(data))
            views[i] = memoryview(data)
    return items, views


class _Gathered:
    """Good images a fetch task has read and not yet spilled, with their
    copies' rows: :meth:`flush` appends the images in the order of their
    first copy's placement hash (so a writer's images lie together in the
    spill where the job is small: fewer reads, whole ranges to release) and
    writes the rows with where each image went."""

    def __init__(self):
        self.views: list = []
        self.parts: list = []
        self.bytes = 0

    def add(self, views: list, carried: pa.Table, ext: pa.Array, owner: np.ndarray, copies: np.ndarray) -> None:
        self.parts.append((carried, ext, owner + len(self.views), copies))
        self.views += views
        self.bytes += sum(len(v) for v in views)

    def flush(self, spill: SpillWriter, out) -> None:
        if not self.views:
            return
        owner = np.concatenate([p[2] for p in self.parts])
        h = np.concatenate([p[0].column("h").to_numpy() for p in self.parts]).view(np.uint64)
        first = np.full(len(self.views), np.iinfo(np.uint64).max, np.uint64)
        np.minimum.at(first, owner, h)
        order = np.argsort(first, kind="stable")
        path, placed = spill.append([self.views[i] for i in order.tolist()])
        offsets = np.empty(len(self.views), np.int64)
        offsets[order] = placed
        lengths = np.fromiter((len(v) for v in self.views), np.int64, len(self.views))
        for carried, ext, own, copies in self.parts:
            out.write_batch(pa.RecordBatch.from_arrays(
                [*(c.combine_chunks() for c in carried.columns), ext, pa.array([path] * len(own), pa.string()),
                 pa.array(offsets[own], pa.int64()), pa.array(lengths[own], pa.int64()),
                 pa.array(copies, pa.int32())], schema=ROWS_ARROW))
        self.views, self.parts, self.bytes = [], [], 0


@dataclass
class _Tally:
    """What a fetch task counts as it goes: good copies per bucket, the
    images re-encoded (images, bytes before, after), the bad examples
    ``(key, reason, copies)``, and whether a key was in two selection rows
    (the driver then refuses the selection, so nothing more is read)."""

    buckets: np.ndarray
    reencoded: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    bad: list = field(default_factory=list)
    refused: bool = False


class _Output:
    """A fetch attempt's files: its spill (:class:`SpillWriter`) and its
    rows file (``ROWS_ARROW``), both unique to the attempt."""

    def __init__(self, task: FetchTask, attempt: str):
        self.spill = SpillWriter(task.spill_dir, attempt, task.spill_file_bytes,
                                 align=PAGE if sio.is_local(task.spill_dir) else 1)
        self.rows_path = sio.join(task.spill_dir, spread_name(f"rows-{attempt}.arrow"))
        fs, p = sio.filesystem(self.rows_path)
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        self._file = fs.open(p, "wb")
        self.rows = pa.ipc.new_file(self._file, ROWS_ARROW)

    def close(self) -> None:
        self.spill.close()
        self.rows.close()
        self._file.close()

    def abandon(self) -> None:
        """Close what is open after a failed write (the driver removes the files)."""
        for close in (self.spill.close, self.rows.close, self._file.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing after a failure
                pass


def _take(task: FetchTask, table: pa.Table, bounds: np.ndarray, batch: tuple, tally: _Tally,
          gathered: _Gathered) -> None:
    """One fetched batch ``(examples, items, images)`` of ``table`` (examples
    start at ``bounds``): re-encoded where asked, checked; the bad examples
    tallied with their reason, the good ones' images and copy rows gathered
    and their copies counted per bucket."""
    examples, items, images = batch
    views = binary_views(images)
    if task.reencode is not None:
        items, views = reencoded(items, views, *task.reencode, tally.reencoded)
    exts, reasons = verdicts(items, views, task.decode)
    counts = bounds[examples + 1] - bounds[examples]
    ok = np.array([e is not None for e in exts], bool)
    keys = table.column("key")
    for i in np.flatnonzero(~ok).tolist():
        tally.bad.append((keys[int(bounds[examples[i]])].as_py(), reasons[i], int(counts[i])))
    good = np.flatnonzero(ok)
    if not good.size:
        return
    rows = concat_ranges(bounds[examples[good]], counts[good])
    owner = np.repeat(np.arange(good.size), counts[good])
    carried = table.select(["key", "copy", "h", "labels", "weight"]).take(pa.array(rows))
    ext = pa.array([exts[i] for i in good.tolist()], pa.string()).take(pa.array(owner))
    gathered.add([views[i] for i in good.tolist()], carried, ext, owner, counts[good][owner])
    tally.buckets += np.bincount(bucket_of(carried.column("h").to_numpy(), task.bits), minlength=tally.buckets.size)


def _fetch_chunks(task: FetchTask, tables: Iterator[pa.Table], out: _Output) -> _Tally:
    """Read, check and spill the images of a task's copy rows (tables of
    whole examples, :func:`example_chunks`), ``task.sort_bytes`` of images
    at a time, in the order of their placement hash; returns the tally."""
    tally = _Tally(buckets=np.zeros(1 << task.bits, np.int64))
    gathered = _Gathered()
    for table in tables:
        bounds = examples_of(table)
        dup = duplicated(table, bounds)
        tally.bad.extend((key, DUPLICATE, 0) for key in dup)
        tally.refused = tally.refused or bool(dup)
        if tally.refused:
            continue
        for batch in fetched(table, bounds, task.column, task.uri_prefixes):
            _take(task, table, bounds, batch, tally, gathered)
            if gathered.bytes >= task.sort_bytes:
                gathered.flush(out.spill, out.rows)
    if not tally.refused:  # refused: no more (earlier chunks' spill goes with the job's)
        gathered.flush(out.spill, out.rows)
    return tally


#: A fetch task's row (``FETCHED_SCHEMA``) in Arrow.
_FETCHED_ARROW = pa.schema([("rows_path", pa.string()), ("copies", pa.int64()), ("buckets", pa.list_(pa.int32())),
                            ("counts", pa.list_(pa.int64())), ("bad_keys", pa.list_(pa.string())),
                            ("bad_reasons", pa.list_(pa.string())), ("bad_copies", pa.list_(pa.int64())),
                            ("task_rss", pa.int64()), ("task_spilled", pa.int64()),
                            ("reencoded", pa.list_(pa.int64())), ("error", pa.string())])


def _fetched_row(out: _Output, tally: _Tally) -> pa.RecordBatch:
    used = np.flatnonzero(tally.buckets)
    bad = tally.bad
    return pa.RecordBatch.from_pylist(
        [{"rows_path": out.rows_path, "copies": int(tally.buckets.sum()), "buckets": used.tolist(),
          "counts": tally.buckets[used].tolist(), "bad_keys": [b[0] for b in bad],
          "bad_reasons": [b[1] for b in bad], "bad_copies": [b[2] for b in bad], "task_rss": peak_rss(),
          "task_spilled": out.spill.written, "reencoded": tally.reencoded.tolist(), "error": None}],
        schema=_FETCHED_ARROW)


def fetch_partition(task: FetchTask):
    """mapInArrow, the fetch pass (module doc): copy rows of a contiguous
    range of index files -> one ``FETCHED_SCHEMA`` row. The spill and rows
    files are unique to the attempt; only those of a successful attempt are
    reported. A write that finds no room (``spill.no_space``) is reported in
    the row's ``error`` (the driver stops the job with it), not raised."""

    @without_gc
    def fetch(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        reset_peak_rss()
        sio.apply_storage_config(task.storage)
        chunks = example_chunks(batches, task.chunk_rows)
        first = next(chunks, None)
        if first is None:
            return
        out = None
        try:
            out = _Output(task, task_attempt_id())
            tally = _fetch_chunks(task, itertools.chain([first], chunks), out)
            out.close()
        except OSError as e:
            report = no_space(e, task.spill_dir)
            if report is None:
                raise
            if out is not None:
                out.abandon()
            yield pa.RecordBatch.from_pylist([{"error": report}], schema=_FETCHED_ARROW)
            return
        inject_failure("spill")  # after the spill is written: it must be ignored
        yield _fetched_row(out, tally)

    return fetch
