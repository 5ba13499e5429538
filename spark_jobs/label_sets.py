"""The index's label-set table: one row per distinct label list, counted once
and reused by every resampling run over the same index.

A resampling run needs, before it can plan, the number of records of each
*class* (distinct label list, ``lsid = xxhash64(labels)``). That table is a
property of the index alone: every target, size, matcher and scheme over one
index needs the same one. Counting it is a full scan of the index, so the
job can keep it in a file (``--label-sets PATH``) and read it back next time.

The count also checks that the index holds every key once
(:func:`count_label_sets`, one read of the key column): a key two records
share, whatever their labels and whether or not the draw would select them,
is refused there, naming the key and its files. So that check too runs once
per index: a stored table records that it was made with it.

A stored table is used only when its recorded fingerprint matches: the
index's files by name, size and modification time (or object version), and
the ``--exclude`` file's content. Parquet files are immutable once written,
so a rewrite shows in the listing. The drawing tasks also check every class
they see against the table (no more records than counted; exactly as many in
a class drawn whole; none that the table names but no record has): a
disagreement makes the job count again, rewrite the file and draw again. A
file rewritten in place with the same name, size and modification time
whose classes only shrank would pass unnoticed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import LABEL_SETS_SCHEMA, read_metadata, with_metadata
from schemas import io as sio

__all__ = ["labels_column", "LabelSetCount", "count_label_sets", "count_label_sets_excluding", "subtract_label_sets",
           "distinct_label_sets", "duplicate_key",
           "check_label_sets_path", "read_label_sets", "write_label_sets"]

#: Recorded in the table's metadata: what wrote it (a file without it is not replaced).
WRITTEN_BY = "spark_jobs.label_sets"
#: Recorded in the table's metadata: the index's keys were found unique when it was counted.
KEYS_CHECKED = "keys_unique"


def labels_column():
    """The index's label list as array<int>; a null list reads as empty (both
    are bad input, reported together)."""
    from pyspark.sql import functions as F

    return F.coalesce(F.col("labels").cast("array<int>"), F.array().cast("array<int>"))


@dataclass(frozen=True)
class LabelSetCount:
    """What the count of an index found: the label-set table (``lsid``,
    ``labels``, ``n``; sorted by lsid) and, from the key check, how many key
    hashes more than one record has (``shared_hashes``) and the smallest of
    them (``smallest_shared``; ``None`` where none). A shared hash is a key
    held twice, or (rarely) a 64-bit collision of two keys:
    :func:`duplicate_key` tells which."""

    table: pa.Table
    shared_hashes: int = 0
    smallest_shared: int | None = None


def count_label_sets(index_df) -> LabelSetCount:
    """The label-set table of ``index_df`` (key, labels) and the key check:
    the labels read once (:func:`distinct_label_sets`: a map-side aggregate,
    a few rows per task leave it), the keys read once and their 64-bit
    hashes (8 bytes a record) grouped by value across tasks, where
    :func:`_shared_hashes` finds the repeated ones with numpy."""
    table = distinct_label_sets(index_df)
    return LabelSetCount(table, *_key_check(index_df))


def _key_check(index_df) -> tuple[int, int | None]:
    """How many key hashes more than one record of ``index_df`` has, and the smallest of them."""
    from pyspark.sql import functions as F

    hashes = index_df.select(F.xxhash64(F.col("key").cast("string")).alias("h"))
    found = hashes.repartition("h").mapInArrow(_shared_hashes, "groups long, smallest long").collect()
    smallest = [r["smallest"] for r in found if r["smallest"] is not None]
    return sum(r["groups"] for r in found), (min(smallest) if smallest else None)


def count_label_sets_excluding(marked_df) -> tuple[LabelSetCount, dict[int, pa.Table]]:
    """The label-set tables of many targets' views of one index, from one
    count: ``marked_df`` is the index (key, labels) with ``excluded``, the
    targets (ints) whose exclusions hold the record's key (null: none).

    Returns the index's own count (its table and key check, as
    :func:`count_label_sets`) and, per target that excludes any record, the
    table of the records it keeps (:func:`subtract_label_sets`): the labels
    and exclusions are grouped once (one row per label list and set of
    excluding targets), whatever the number of targets; the driver holds
    per-label-set rows per target, never per-record data."""
    from pyspark.sql import functions as F

    rows = (marked_df.groupBy(labels_column().alias("labels"), F.col("excluded"))
            .agg(F.count(F.lit(1)).alias("n"))
            .select(F.xxhash64("labels").alias("lsid"), "labels", "excluded", "n").collect())
    base, per_target = subtract_label_sets([(r["lsid"], r["labels"], r["excluded"], r["n"]) for r in rows])
    return LabelSetCount(base, *_key_check(marked_df)), per_target


def subtract_label_sets(rows) -> tuple[pa.Table, dict[int, pa.Table]]:
    """From rows ``(lsid, labels, excluded, n)`` (``n`` records with that
    label list whose key the targets in ``excluded`` exclude; ``None`` or
    empty: none does): the whole table, and per target named in
    ``excluded``, the table less the records it excludes (label sets left
    with no record dropped), each sorted by lsid like
    :func:`distinct_label_sets`."""
    base: dict[tuple, list] = {}
    minus: dict[int, dict[tuple, int]] = {}
    for lsid, labels, excluded, n in rows:
        key = tuple(labels or ())
        entry = base.setdefault(key, [lsid, list(key), 0])
        entry[2] += int(n)
        for t in excluded or ():
            minus.setdefault(int(t), {}).setdefault(key, 0)
            minus[int(t)][key] += int(n)

    def table(drop: dict[tuple, int]) -> pa.Table:
        kept = [{"lsid": lsid, "labels": labels, "n": n - drop.get(k, 0)}
                for k, (lsid, labels, n) in base.items() if n - drop.get(k, 0) > 0]
        return _label_set_table(sorted(kept, key=lambda r: r["lsid"]))
    return table({}), {t: table(drop) for t, drop in sorted(minus.items())}


def _shared_hashes(batches):
    """mapInArrow over key hashes grouped by value: one row, the number of
    distinct hashes seen more than once and the smallest of them."""
    parts = [b.column(0).to_numpy(zero_copy_only=False) for b in batches]
    h = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    repeated = np.unique(h[1:][h[1:] == h[:-1]])
    yield pa.RecordBatch.from_pydict({"groups": [int(repeated.size)],
                                      "smallest": [int(repeated[0]) if repeated.size else None]},
                                     schema=pa.schema([("groups", pa.int64()), ("smallest", pa.int64())]))


def distinct_label_sets(index_df) -> pa.Table:
    """lsid, labels, n (records): one row per distinct label list, sorted by lsid.

    Groups by the list itself (a hash aggregate on the array, no sort), then
    hashes the few distinct lists exactly as the job does per record; two
    lists with one ``lsid`` (a 64-bit collision) are an error. Reads the
    labels only (:func:`count_label_sets` also checks the keys).
    """
    from pyspark.sql import functions as F

    labels = labels_column()
    rows = (index_df.groupBy(labels.alias("labels")).agg(F.count(F.lit(1)).alias("n"))
            .select(F.xxhash64("labels").alias("lsid"), "labels", "n").collect())
    return _label_set_table(sorted(rows, key=lambda r: r["lsid"]))


def _label_set_table(rows) -> pa.Table:
    """The table of rows (lsid, labels, n) sorted by lsid; a repeated lsid is an error."""
    for a, b in zip(rows, rows[1:]):
        if a["lsid"] == b["lsid"]:
            raise ValueError(f"64-bit hash collision between label lists {a['labels']} and {b['labels']}; "
                             "please report it")
    return pa.table({"lsid": pa.array([r["lsid"] for r in rows], pa.int64()),
                     "labels": pa.array([r["labels"] for r in rows], pa.list_(pa.int32())),
                     "n": pa.array([r["n"] for r in rows], pa.int64())}, schema=LABEL_SETS_SCHEMA)


def duplicate_key(index_df, count: LabelSetCount) -> str | None:
    """A key that more than one record of ``index_df`` holds, where
    :func:`count_label_sets` found shared key hashes (``None``: every key is
    unique). Reads only the records of the smallest shared hash; where that
    was a hash collision of distinct keys and other hashes are shared, groups
    every key (exact). Deterministic: the smallest such key of what it reads."""
    from pyspark.sql import functions as F

    if not count.shared_hashes:
        return None
    keys = index_df.select(F.col("key").cast("string").alias("key"))

    def smallest_shared_key(records) -> str | None:
        row = records.groupBy("key").count().where(F.col("count") > 1).orderBy("key").first()
        return row["key"] if row is not None else None

    found = smallest_shared_key(keys.where(F.xxhash64("key") == F.lit(count.smallest_shared)))
    if found is None and count.shared_hashes > 1:
        found = smallest_shared_key(keys)  # that hash was two distinct keys: check every key
    return found


def check_label_sets_path(path: str) -> None:
    """Refuse ``path`` (``ValueError`` naming it) unless it is absent or a
    label-set table this project wrote: the job may replace only those."""
    if not sio.exists(path):
        return
    fs, p = sio.filesystem(path)
    if fs.isdir(p):
        raise ValueError(f"--label-sets {path} is a directory; give a file path (e.g. label-sets.parquet)")
    try:
        with fs.open(p, "rb") as fh:
            schema = pq.read_schema(fh)
        meta = read_metadata(schema)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"--label-sets {path} exists and is not a readable label-set table ({e}); it is "
                         "left as it is: give another path or remove it") from None
    if meta.get("written_by") != WRITTEN_BY or not set(LABEL_SETS_SCHEMA.names) <= set(schema.names):
        raise ValueError(f"--label-sets {path} exists and is not a label-set table written by this project; "
                         "it is left as it is: give another path")


def read_label_sets(path: str, fingerprint: dict[str, Any]) -> pa.Table | None:
    """The table stored at ``path`` if it was counted over inputs with this
    ``fingerprint`` (and their keys checked); ``None`` (with a line on stderr
    saying why) if there is none, it is for other inputs, or it was counted
    without the key check (an earlier version). Call
    :func:`check_label_sets_path` first."""
    if not sio.exists(path):
        return None
    table = sio.read_parquet(path)
    meta = read_metadata(table.schema)
    table = table.select(LABEL_SETS_SCHEMA.names).cast(LABEL_SETS_SCHEMA)
    if meta.get("fingerprint") != fingerprint:
        print(f"resample: label-set table {path} was counted over other inputs; counting again",
              file=sys.stderr)
        return None
    if meta.get(KEYS_CHECKED) is not True:
        print(f"resample: label-set table {path} was counted without checking the index's keys; counting again",
              file=sys.stderr)
        return None
    return table


def write_label_sets(table: pa.Table, path: str, fingerprint: dict[str, Any]) -> None:
    """Store ``table`` at ``path`` (atomically) with the inputs' fingerprint,
    as counted with the key check (:func:`count_label_sets`): write only a
    table whose index was found to hold every key once."""
    meta = {"written_by": WRITTEN_BY, "fingerprint": fingerprint, KEYS_CHECKED: True,
            "records": int(pc.sum(table.column("n")).as_py() or 0)}
    sio.write_parquet_atomic(with_metadata(table.cast(LABEL_SETS_SCHEMA), meta), path)
