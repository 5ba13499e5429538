"""The index's label-set table: one row per distinct label list, counted once
and reused by every resampling run over the same index.

A resampling run needs, before it can plan, the number of records of each
*class* (distinct label list, ``lsid = xxhash64(labels)``). That table is a
property of the index alone: every target, size, matcher and scheme over one
index needs the same one. Counting it is a full scan of the index, so the
job can keep it in a file (``--label-sets PATH``) and read it back next time.

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
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import LABEL_SETS_SCHEMA, read_metadata, with_metadata
from schemas import io as sio

__all__ = ["labels_column", "distinct_label_sets", "check_label_sets_path", "read_label_sets",
           "write_label_sets"]

#: Recorded in the table's metadata: what wrote it (a file without it is not replaced).
WRITTEN_BY = "spark_jobs.label_sets"


def labels_column():
    """The index's label list as array<int>; a null list reads as empty (both
    are bad input, reported together)."""
    from pyspark.sql import functions as F

    return F.coalesce(F.col("labels").cast("array<int>"), F.array().cast("array<int>"))


def distinct_label_sets(index_df) -> pa.Table:
    """lsid, labels, n (records): one row per distinct label list, sorted by lsid.

    Groups by the list itself (a hash aggregate on the array, no sort), then
    hashes the few distinct lists exactly as the job does per record; two
    lists with one ``lsid`` (a 64-bit collision) are an error.
    """
    from pyspark.sql import functions as F

    labels = labels_column()
    rows = (index_df.groupBy(labels.alias("labels")).agg(F.count(F.lit(1)).alias("n"))
            .select(F.xxhash64("labels").alias("lsid"), "labels", "n").collect())
    rows.sort(key=lambda r: r["lsid"])
    for a, b in zip(rows, rows[1:]):
        if a["lsid"] == b["lsid"]:
            raise ValueError(f"64-bit hash collision between label lists {a['labels']} and {b['labels']}; "
                             "please report it")
    return pa.table({"lsid": pa.array([r["lsid"] for r in rows], pa.int64()),
                     "labels": pa.array([r["labels"] for r in rows], pa.list_(pa.int32())),
                     "n": pa.array([r["n"] for r in rows], pa.int64())}, schema=LABEL_SETS_SCHEMA)


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
    ``fingerprint``; ``None`` (with a line on stderr saying why) if there is
    none or it is for other inputs. Call :func:`check_label_sets_path` first."""
    if not sio.exists(path):
        return None
    table = sio.read_parquet(path)
    meta = read_metadata(table.schema)
    table = table.select(LABEL_SETS_SCHEMA.names).cast(LABEL_SETS_SCHEMA)
    if meta.get("fingerprint") != fingerprint:
        print(f"resample: label-set table {path} was counted over other inputs; counting again",
              file=sys.stderr)
        return None
    return table


def write_label_sets(table: pa.Table, path: str, fingerprint: dict[str, Any]) -> None:
    """Store ``table`` at ``path`` (atomically) with the inputs' fingerprint."""
    meta = {"written_by": WRITTEN_BY, "fingerprint": fingerprint,
            "records": int(pc.sum(table.column("n")).as_py() or 0)}
    sio.write_parquet_atomic(with_metadata(table.cast(LABEL_SETS_SCHEMA), meta), path)
