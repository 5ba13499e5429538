"""Reading the selected images out of the index: an inline index's row
groups (only those holding selected rows, in file order) or a ``uri``
index's files (only under the allowed prefixes), each image once, with what
was read counted (:class:`ReadCounts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import io as sio

from .placement import runs_of
from .spill import with_retries

__all__ = ["ReadCounts", "fetched", "binary_views", "IMAGE_BATCH_ROWS", "NOT_IN_INDEX"]

#: Arrow batch size while images travel through Python (bytes, not rows, matter).
IMAGE_BATCH_ROWS = 256
#: The ``reason`` of a selected key the index does not hold.
NOT_IN_INDEX = "not in the source index"


@dataclass
class ReadCounts:
    """What a fetch task read from the index: ``images`` (each selected
    image once, however many copies and targets selected it) and ``bytes``
    (an inline index: the compressed ``image`` column chunks of the row
    groups read; a ``uri`` index: the images' bytes)."""

    images: int = 0
    bytes: int = 0


def binary_views(array: pa.Array) -> list:
    """Zero-copy ``memoryview`` of each value of a binary Arrow array (a null
    value gives whatever its offsets span, normally nothing)."""
    if not len(array):
        return []
    data = memoryview(array.buffers()[2]) if array.buffers()[2] is not None else memoryview(b"")
    width = np.int64 if array.type == pa.large_binary() else np.int32
    bounds = np.frombuffer(array.buffers()[1], width)[array.offset:array.offset + len(array) + 1].tolist()
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _read_inline(path: str, rows: np.ndarray, counts: ReadCounts) -> Iterator[tuple[np.ndarray, pa.Array]]:
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
        meta = pf.metadata
        bounds = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(pf.num_row_groups)])
        leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]
        image_at = leaves.index("image") if "image" in leaves else -1
        group_of = np.searchsorted(bounds, rows, side="right") - 1
        order = np.argsort(rows, kind="stable")
        for g in np.unique(group_of):
            members = order[group_of[order] == g]
            col = group(int(g))
            counts.images += len(members)
            if image_at >= 0:
                counts.bytes += meta.row_group(int(g)).column(image_at).total_compressed_size
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


def fetched(table: pa.Table, bounds: np.ndarray, column: str, uri_prefixes: Sequence[str] = (),
            counts: ReadCounts | None = None) -> Iterator[tuple[np.ndarray, list, pa.Array]]:
    """Read the images of copy rows sorted by (file, row, key, ...)
    (images start at ``bounds``), once per image and in source order (per
    file, by row, only the row groups needed; per ``uri``, sorted), as
    ``(images, items, data)`` batches (first the images the index lacks,
    with ``NOT_IN_INDEX``): ``images`` index the images, ``items`` say why
    an image could not be read (a string) or anything else when ``data``
    (an Arrow binary array) holds its bytes. A ``uri`` is read only when it
    lies under one of ``uri_prefixes`` (schemas.uri_policy), and then in the
    normal form checked; one outside is a bad example, the policy's verdict
    its reason. Transient read errors are retried
    (:func:`spill.with_retries`) before an image is counted unreadable.
    What is read is added to ``counts``."""
    counts = counts if counts is not None else ReadCounts()
    first = bounds[:-1]
    file_col = table.column("file").take(pa.array(first))
    missing = pc.is_null(file_col).to_numpy(zero_copy_only=False)
    for s in range(0, int(missing.sum()), IMAGE_BATCH_ROWS):
        examples = np.flatnonzero(missing)[s:s + IMAGE_BATCH_ROWS]
        yield examples, [NOT_IN_INDEX] * len(examples), pa.nulls(len(examples), pa.binary())
    present = np.flatnonzero(~missing)
    if column == "image":
        yield from _inline_batches(table, first, present, file_col.take(pa.array(present)), counts)
    else:
        yield from _uri_batches(table.column("uri").take(pa.array(first)), present, uri_prefixes, counts)


def _inline_batches(table: pa.Table, first: np.ndarray, present: np.ndarray, files: pa.ChunkedArray,
                    counts: ReadCounts) -> Iterator[tuple[np.ndarray, list, pa.Array]]:
    """:func:`fetched`'s batches of an inline index: the ``present``
    images (their first rows at ``first[present]``, in ``files``, sorted by
    file), file by file, by row."""
    codes = pc.dictionary_encode(files).combine_chunks().indices.to_numpy(zero_copy_only=False)
    rows = pc.fill_null(table.column("row"), -1).to_numpy()[first][present]
    for start, end in zip(*runs_of(codes)):  # the images of one file (sorted by file)
        for examples, images in _read_inline(files[int(start)].as_py(), rows[start:end], counts):
            items = pc.is_null(images).to_pylist()
            yield present[examples + start], [None if null else True for null in items], images


def _uri_batches(column: pa.ChunkedArray, present: np.ndarray, uri_prefixes: Sequence[str],
                 counts: ReadCounts) -> Iterator[tuple[np.ndarray, list, pa.Array]]:
    """:func:`fetched`'s batches of a ``uri`` index: the ``present`` images
    (``column``: each image's uri) by uri, each read only where the policy
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
                counts.images += 1
                counts.bytes += len(images[-1])
            except Exception as e:  # noqa: BLE001 - a missing image is counted, not fatal
                images.append(f"unreadable uri {uris[i]!r}: {type(e).__name__}: {e}"[:300])
        data = pa.array([x if isinstance(x, bytes) else None for x in images], pa.binary())
        yield np.asarray(chunk, np.int64), [x if isinstance(x, str) else True for x in images], data
