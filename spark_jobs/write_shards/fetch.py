"""The fetch tasks: read each selected image once, in source order, check
it, append the good ones to the task's spill files and emit a row per copy
(where its image is), never the image bytes themselves.

A fetch pass serves one or more targets (``many.py``): each copy row names
its ``target`` (0 .. K-1), and an image selected by several targets is read,
checked and spilled once. A fetch task's input: copy rows (``key, copy, h,
weight, target, labels, file, row, uri``) sorted by (file, row, key, target,
copy), a contiguous range of the index's files. It writes its good copies'
rows (``ROWS_ARROW``: ``key, copy, h, labels, weight, ext``, where the image
is: ``length`` bytes at ``offset`` of spill file ``path``, the
example's ``copies`` in that target, and the ``target``) to a rows file beside its
spill, and returns ``FETCHED_SCHEMA`` rows: one *task row* (that file, its
bad examples with their target and reason, its peak resident memory, per
target the image bytes spilled and what was re-encoded, the images and
index bytes it read) and *tally rows*: per target, its good copies per
bucket as dense blocks of ``TALLY_BLOCK`` buckets (blocks of zeros left
out). ``tallies.combine_in_spark`` sums the tally rows in Spark, so the driver
receives one block per target and block, whatever the number of tasks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import io as sio
from schemas.shard_format import decode_problem, image_extension, image_problem

from ..reencode import reencode_image
from ..session import inject_failure, task_attempt_id
from .placement import concat_ranges
from .source import IMAGE_BATCH_ROWS, NOT_IN_INDEX, ReadCounts, binary_views, fetched
from .spill import PAGE, SpillWriter, no_space, peak_rss, reset_peak_rss, spread_name, without_gc
from .tallies import TASK_ROW, TallyLayout, tally_batch

__all__ = ["FetchTask", "fetch_partition", "FETCHED_SCHEMA", "ROWS_ARROW", "DUPLICATE", "NOT_IN_INDEX",
           "IMAGE_BATCH_ROWS", "CHUNK_ROWS", "fetched_arrow_schema", "groups_of", "targets_of", "binary_views", "verdicts", "example_chunks"]

#: Image bytes a fetch task gathers, then spills in the order of their placement hash.
SORT_BYTES = 64 << 20
#: Copy rows a fetch task holds at a time (~100 bytes each, besides its images).
CHUNK_ROWS = 1 << 18
#: The ``reason`` of a key the selection holds in more than one row (not a bad image).
DUPLICATE = "in more than one selection row"

#: A fetch task's rows: one task row (``target`` = ``TASK_ROW``: its rows file, bad examples
#: with their target, figures; per target ``target_bytes`` the image bytes it selected and
#: ``reencoded`` (images, bytes before, after; K x 3, flat); the index images and bytes read;
#: ``error``: why it stopped, a write that found no room, else null) and tally rows
#: (``target, block, counts``: ``tallies.tally_batch``).
FETCHED_SCHEMA = ("target int, block int, counts array<long>, rows_path string, copies long, "
                  "bad_keys array<string>, bad_reasons array<string>, bad_copies array<long>, "
                  "bad_targets array<int>, task_rss long, task_spilled long, target_bytes array<long>, "
                  "reencoded array<long>, read_images long, read_bytes long, error string")

#: A good copy's row: the sample's fields, where its image is in the spill, the
#: copies of its example in its target and the target.
ROWS_ARROW = pa.schema([("key", pa.string()), ("copy", pa.int32()), ("h", pa.int64()),
                        ("labels", pa.list_(pa.int32())), ("weight", pa.float64()), ("ext", pa.string()),
                        ("path", pa.string()), ("offset", pa.int64()), ("length", pa.int64()),
                        ("copies", pa.int32()), ("target", pa.int32())])


@dataclass(frozen=True)
class FetchTask:
    """What every fetch task is given (the unit a test builds by hand).

    ``bits``: bits of the placement hash that name a bucket, per target (an
    int: one target); ``column``: ``"image"`` (bytes in the index) or
    ``"uri"``; ``storage``: fsspec options (``schemas.io.storage_config``);
    ``spill_dir``: where the spill files go; ``spill_file_bytes``: a new
    spill file past this; ``uri_prefixes``: where uris may be read
    (schemas.uri_policy); ``reencode``: ``(max_side, quality)`` or None;
    ``decode``: fully decode every image (``--decode-check``), not only
    check its structure; ``sort_bytes``: images gathered before they are
    spilled in placement order (memory; default ``SORT_BYTES``);
    ``chunk_rows``: copy rows a task holds at a time
    (:func:`example_chunks`; default ``CHUNK_ROWS``).
    """

    column: str
    bits: int | tuple
    storage: dict
    spill_dir: str
    spill_file_bytes: int
    uri_prefixes: tuple = ()
    reencode: tuple | None = None
    decode: bool = False
    sort_bytes: int = SORT_BYTES
    chunk_rows: int = CHUNK_ROWS

    @property
    def layout(self) -> TallyLayout:
        """The targets' buckets (:class:`tallies.TallyLayout`)."""
        return TallyLayout(tuple(self.bits) if isinstance(self.bits, (tuple, list)) else (int(self.bits),))


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


def targets_of(table: pa.Table) -> np.ndarray:
    """Each copy row's target (int64; 0 for rows without a ``target`` column)."""
    if "target" not in table.column_names:
        return np.zeros(table.num_rows, np.int64)
    return pc.fill_null(table.column("target"), 0).to_numpy().astype(np.int64)


def groups_of(table: pa.Table, bounds: np.ndarray) -> np.ndarray:
    """Start of each (example, target) group of copy rows sorted by (file,
    row, key, target, copy), plus the end: the example starts and where the
    target changes within an example."""
    targets = targets_of(table)
    change = np.flatnonzero(targets[1:] != targets[:-1]) + 1
    return np.union1d(bounds, change).astype(np.int64)


def duplicated(table: pa.Table, groups: np.ndarray) -> list[tuple[str, int]]:
    """``(key, target)`` of the groups (:func:`groups_of`) whose copy rows are
    not exactly 0, 1, ..., c-1: that target's selection holds the key in
    more than one row."""
    counts = np.diff(groups)
    expected = np.arange(table.num_rows) - np.repeat(groups[:-1], counts)
    wrong = np.unique(np.repeat(np.arange(counts.size), counts)[table.column("copy").to_numpy() != expected])
    at = groups[:-1][wrong]
    keys = table.column("key").take(pa.array(at)).to_pylist()
    return sorted(set(zip(keys, targets_of(table)[at].tolist())))


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


def reencoded(items: list, views: list, max_side: int, quality: int) -> tuple[list, list, list]:
    """``(items, views, changed)`` of a fetched batch with every image whose
    longer side exceeds ``max_side`` replaced by :func:`spark_jobs.reencode.reencode_image`, the
    others left as they are, bytes and all; ``changed``: ``(i, bytes before,
    after)`` of each image re-encoded. An image whose size cannot be read or
    that cannot be decoded gets the reason as its item (a bad example)."""
    items, views, changed = list(items), list(views), []
    for i, item in enumerate(items):
        if item is None or isinstance(item, str):
            continue  # already bad
        try:
            data = reencode_image(views[i], max_side, quality)
        except Exception as e:  # noqa: BLE001 - an undecodable image is a bad example, not fatal
            items[i] = f"cannot be re-encoded for --max-side {max_side}: {type(e).__name__}: {e}"[:300]
            continue
        if data is not None:
            changed.append((i, len(views[i]), len(data)))
            views[i] = memoryview(data)
    return items, views, changed


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

    def add(self, views: list, carried: pa.Table, ext: pa.Array, owner: np.ndarray, copies: np.ndarray,
            targets: np.ndarray) -> None:
        self.parts.append((carried, ext, owner + len(self.views), copies, targets))
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
        for carried, ext, own, copies, targets in self.parts:
            out.write_batch(pa.RecordBatch.from_arrays(
                [*(c.combine_chunks() for c in carried.columns), ext, pa.array([path] * len(own), pa.string()),
                 pa.array(offsets[own], pa.int64()), pa.array(lengths[own], pa.int64()),
                 pa.array(copies, pa.int32()), pa.array(targets, pa.int32())], schema=ROWS_ARROW))
        self.views, self.parts, self.bytes = [], [], 0


@dataclass
class _Tally:
    """What a fetch task counts as it goes: good copies per bucket of every
    target (``layout``'s flat vector), per target the image bytes it
    selected and the images re-encoded (images, bytes before, after), the
    bad examples ``(key, reason, copies, target)``, what was read from the
    index, and whether a key was in two selection rows of a lone target (the
    driver then refuses the selection, so nothing more is read)."""

    layout: TallyLayout
    flat: np.ndarray = None
    target_bytes: np.ndarray = None
    reencoded: np.ndarray = None
    bad: list = field(default_factory=list)
    reads: ReadCounts = field(default_factory=ReadCounts)
    refused: bool = False

    def __post_init__(self) -> None:
        k = len(self.layout.bits)
        self.flat = np.zeros(self.layout.size, np.int64)
        self.target_bytes = np.zeros(k, np.int64)
        self.reencoded = np.zeros((k, 3), np.int64)


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


@dataclass(frozen=True)
class _Chunk:
    """A table of whole examples' copy rows with its ``bounds`` (example
    starts), ``groups`` (:func:`groups_of`) and each example's first group."""

    table: pa.Table
    bounds: np.ndarray
    groups: np.ndarray
    targets: np.ndarray  # each row's target
    first_group: np.ndarray  # each example's first group, then the number of groups

    @classmethod
    def of(cls, table: pa.Table) -> "_Chunk":
        bounds = examples_of(table)
        groups = groups_of(table, bounds)
        return cls(table=table, bounds=bounds, groups=groups, targets=targets_of(table),
                   first_group=np.searchsorted(groups, bounds).astype(np.int64))


def _take(task: FetchTask, chunk: _Chunk, batch: tuple, tally: _Tally, gathered: _Gathered) -> None:
    """One fetched batch ``(examples, items, images)`` of a chunk:
    re-encoded where asked, checked; the bad examples tallied per target with
    their reason, the good ones' images and copy rows gathered and their
    copies counted per bucket of their target."""
    examples, items, images = batch
    table, bounds, groups = chunk.table, chunk.bounds, chunk.groups
    views = binary_views(images)
    changed = []
    if task.reencode is not None:
        items, views, changed = reencoded(items, views, *task.reencode)
    exts, reasons = verdicts(items, views, task.decode)
    targets, first_group = chunk.targets, chunk.first_group
    ok = np.array([e is not None for e in exts], bool)
    keys = table.column("key")
    for i in np.flatnonzero(~ok).tolist():
        e = examples[i]
        for g in range(first_group[e], first_group[e + 1]):
            tally.bad.append((keys[int(bounds[e])].as_py(), reasons[i], int(groups[g + 1] - groups[g]),
                              int(targets[groups[g]])))
    for i, before, after in changed:  # per target that selected the image
        gs = np.arange(first_group[examples[i]], first_group[examples[i] + 1])
        np.add.at(tally.reencoded, targets[groups[gs]], np.array([1, before, after], np.int64))
    good = np.flatnonzero(ok)
    if not good.size:
        return
    counts = bounds[examples[good] + 1] - bounds[examples[good]]
    rows = concat_ranges(bounds[examples[good]], counts)
    owner = np.repeat(np.arange(good.size), counts)
    group = np.searchsorted(groups, rows, side="right") - 1
    carried = table.select(["key", "copy", "h", "labels", "weight"]).take(pa.array(rows))
    ext = pa.array([exts[i] for i in good.tolist()], pa.string()).take(pa.array(owner))
    gathered.add([views[i] for i in good.tolist()], carried, ext, owner, np.diff(groups)[group], targets[rows])
    lengths = np.fromiter((len(views[i]) for i in good.tolist()), np.int64, good.size)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])  # each good (example, target) once
    np.add.at(tally.target_bytes, targets[rows[starts]], lengths[owner[starts]])
    flat = task.layout.flat(targets[rows], carried.column("h").to_numpy())
    tally.flat += np.bincount(flat, minlength=tally.flat.size)


def _fetch_chunks(task: FetchTask, tables: Iterator[pa.Table], out: _Output) -> _Tally:
    """Read, check and spill the images of a task's copy rows (tables of
    whole examples, :func:`example_chunks`), ``task.sort_bytes`` of images
    at a time, in the order of their placement hash; returns the tally."""
    tally = _Tally(layout=task.layout)
    gathered = _Gathered()
    lone = len(task.layout.bits) == 1
    for table in tables:
        chunk = _Chunk.of(table)
        bounds = chunk.bounds
        dup = duplicated(table, chunk.groups)
        tally.bad.extend((key, DUPLICATE, 0, t) for key, t in dup)
        tally.refused = tally.refused or (lone and bool(dup))
        if tally.refused:
            continue
        for batch in fetched(table, bounds, task.column, task.uri_prefixes, tally.reads):
            _take(task, chunk, batch, tally, gathered)
            if gathered.bytes >= task.sort_bytes:
                gathered.flush(out.spill, out.rows)
    if not tally.refused:  # refused: no more (earlier chunks' spill goes with the job's)
        gathered.flush(out.spill, out.rows)
    return tally


#: ``FETCHED_SCHEMA`` in Arrow.
_FETCHED_ARROW = pa.schema([
    ("target", pa.int32()), ("block", pa.int32()), ("counts", pa.list_(pa.int64())), ("rows_path", pa.string()),
    ("copies", pa.int64()), ("bad_keys", pa.list_(pa.string())), ("bad_reasons", pa.list_(pa.string())),
    ("bad_copies", pa.list_(pa.int64())), ("bad_targets", pa.list_(pa.int32())), ("task_rss", pa.int64()),
    ("task_spilled", pa.int64()), ("target_bytes", pa.list_(pa.int64())), ("reencoded", pa.list_(pa.int64())),
    ("read_images", pa.int64()), ("read_bytes", pa.int64()), ("error", pa.string())])


def fetched_arrow_schema() -> pa.Schema:
    """``FETCHED_SCHEMA`` in Arrow."""
    return _FETCHED_ARROW


def _task_row(schema: pa.Schema, **values) -> pa.RecordBatch:
    """A fetch task's own row (``target`` = ``TASK_ROW``), the fields not given null."""
    values = {"target": TASK_ROW, "block": 0, **values}
    return pa.RecordBatch.from_pylist([values], schema=schema)


def _fetched_rows(out: _Output, tally: _Tally, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    bad = tally.bad
    yield _task_row(schema, rows_path=out.rows_path, copies=int(tally.flat.sum()),
                    bad_keys=[b[0] for b in bad], bad_reasons=[b[1] for b in bad], bad_copies=[b[2] for b in bad],
                    bad_targets=[b[3] for b in bad], task_rss=peak_rss(), task_spilled=out.spill.written,
                    target_bytes=tally.target_bytes.tolist(), reencoded=tally.reencoded.ravel().tolist(),
                    read_images=tally.reads.images, read_bytes=tally.reads.bytes)
    yield tally_batch(tally.layout, tally.flat, schema)


def fetch_partition(task: FetchTask):
    """mapInArrow, the fetch pass (module doc): copy rows of a contiguous
    range of index files -> ``FETCHED_SCHEMA`` rows (a task row, tally
    rows). The spill and rows files are unique to the attempt; only those
    of a successful attempt are reported. A write that finds no room
    (``spill.no_space``) is reported in the task row's ``error`` (the
    driver stops the job with it), not raised."""
    schema = fetched_arrow_schema()

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
            yield _task_row(schema, error=report)
            return
        inject_failure("spill")  # after the spill is written: it must be ignored
        yield from _fetched_rows(out, tally, schema)

    return fetch
