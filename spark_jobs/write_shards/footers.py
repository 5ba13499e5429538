"""Facts read from Parquet footers before any work (a few ranged reads per
file, never the data): the selection's rows and copies, the index's rows,
and from them and the files' sizes the spill's size at most.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import io as sio

from .spill import PAGE

__all__ = ["SelectionFacts", "selection_facts", "index_rows", "spill_estimate", "footer", "in_parallel",
           "URI_IMAGE_BYTES"]

#: Bytes per image assumed for a ``uri`` index (its images' sizes are not known before they are read).
URI_IMAGE_BYTES = 128 << 10


@dataclass
class SelectionFacts:
    """What the selection's Parquet footers say, read before any work:
    ``rows`` (examples), ``copies`` (the resampler's total when its stats are
    there, else ``rows``: at most a few fewer than the copies) and
    ``min_copies`` (None where a row group has no statistics)."""

    rows: int
    copies: int
    min_copies: int | None


def footer(path: str) -> pq.FileMetaData:
    """A Parquet file's footer (a few ranged reads, never the data)."""
    fs, p = sio.filesystem(path)
    with fs.open(p, "rb") as fh:
        return pq.read_metadata(fh)


def in_parallel(function, items: list) -> list:
    """``[function(item) for item in items]``, 16 at a time (requests to a store)."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(function, items))


def _copies_minima(meta: pq.FileMetaData) -> list[int | None]:
    """The smallest ``copies`` of each row group (None where its statistics
    are missing or the column is not an integer)."""
    paths_in = [meta.schema.column(i).path for i in range(meta.num_columns)]
    at = paths_in.index("copies") if "copies" in paths_in else None
    integer = at is not None and meta.schema.column(at).physical_type in ("INT32", "INT64")
    lows = []
    for g in range(meta.num_row_groups):
        stat = meta.row_group(g).column(at).statistics if integer else None
        lows.append(stat.min if stat is not None and stat.has_min_max else None)
    return lows


def selection_facts(selection_path: str, stats: dict | None) -> SelectionFacts | None:
    """:class:`SelectionFacts` from the footers (read in parallel; ``stats``:
    the resampler's stats.json, or None); None when the files cannot be
    listed (Spark's reader then says what is wrong)."""
    try:
        paths = sio.expand_paths(selection_path)
    except FileNotFoundError:
        return None
    rows, lows = 0, []
    for meta in in_parallel(footer, paths):
        rows += meta.num_rows
        lows += _copies_minima(meta)
    total = stats["total_copies"] if stats and isinstance(stats.get("total_copies"), int) else rows
    return SelectionFacts(rows=rows, copies=total,
                          min_copies=None if None in lows or not lows else int(min(lows)))


def index_rows(files: list[str], max_files: int | None = None) -> int | None:
    """The index's rows, from its files' footers (read in parallel); None for
    more than ``max_files`` files or when a footer cannot be read."""
    if max_files is not None and len(files) > max_files:
        return None
    try:
        return sum(meta.num_rows for meta in in_parallel(footer, files))
    except (OSError, ValueError, pa.ArrowException):
        return None


def spill_estimate(files: list[str], column: str, selected: int, rows: int | None) -> int | None:
    """The spill's bytes at most: an inline index's file sizes (every image
    once) plus a page of padding per row (``rows``: the index's; a local
    spill aligns each image); ``selected`` examples of ``URI_IMAGE_BYTES``
    for a ``uri`` index. None when the sizes or the rows cannot be read."""
    if column == "uri":
        return selected * URI_IMAGE_BYTES
    if rows is None:
        return None
    try:
        fs, _ = sio.filesystem(files[0])
        return int(sum(in_parallel(lambda f: fs.size(sio.filesystem(f)[1]), files))) + rows * PAGE
    except (OSError, IndexError, ValueError):
        return None
