"""Bad input the job finds while it runs, refused with a ``SchemaError`` (or
``ValueError``) naming the file and key: label lists outside the weights,
an index with no examples or no weight, and keys held by more than one
record (found by the label-set count, by a drawing task's report, or in the
selection)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from schemas import SchemaError

from .. import label_sets as LS
from ..session import read_parquet_through_fsspec

if TYPE_CHECKING:
    from .job import ResampleJob

__all__ = ["check_label_sets", "bad_label_error", "not_unique", "check_unique_keys"]


def check_label_sets(spark, job: "ResampleJob", weighted_sets: pa.Table) -> tuple[int, int]:
    """Records, and records with a non-zero weight; raise for an index with
    no records, bad label lists, or no weight at all."""
    n_col = weighted_sets.column("n").to_numpy()
    records = int(n_col.sum())
    if records == 0:
        raise SchemaError("source index has no examples" + (" left after --exclude" if job.exclude else ""),
                          file=job.index)
    if pc.any(weighted_sets.column("bad")).as_py():
        raise bad_label_error(spark, job, weighted_sets)
    positive = int(n_col[weighted_sets.column("q").to_numpy() > 0].sum())
    if positive == 0:
        raise ValueError(f"no example of {job.index} has a non-zero weight under scheme {job.scheme!r}")
    return records, positive


def bad_label_error(spark, job: "ResampleJob", weighted_sets: pa.Table) -> SchemaError:
    """Name the file and key of the first example (smallest key) whose label list is bad."""
    from pyspark.sql import functions as F

    from .draw import keyed

    bad = weighted_sets.filter(weighted_sets.column("bad"))
    n_bad = int(pc.sum(bad.column("n")).as_py())
    bad_ids = bad.column("lsid").to_pylist()
    row = (keyed(spark.read.parquet(job.index), 0).where(F.col("lsid").isin(bad_ids))
           .select("key", "labels", "_metadata.file_path").orderBy("key").first())
    file = row["file_path"] if row else job.index
    table = job.labels if job.scheme == "subset" else job.weights
    what = (f"labels {row['labels']} include a label that is not in {table}"
            if row and row["labels"] else "labels is empty or null")
    return SchemaError(f"{what} ({n_bad} example(s) affected)", file=file,
                       key=row["key"] if row else None)


def not_unique(spark, job: "ResampleJob", key: str) -> SchemaError:
    """The error for a key the index holds more than once, naming its files and labels."""
    from pyspark.sql import functions as F

    rows = (spark.read.parquet(job.index).where(F.col("key") == key)
            .select("_metadata.file_path", LS.labels_column().alias("labels")).collect())
    where = "; ".join(f"{r['file_path']} (labels {list(r['labels'])})"
                      for r in sorted(rows, key=lambda r: (r["file_path"], list(r["labels"]))))
    return SchemaError(f"key is not unique: {len(rows)} records of the source index have it: {where}",
                       file=job.index, key=key)


def check_unique_keys(spark, job: "ResampleJob", selection: str) -> None:
    """Refuse an index holding a selected key in more than one record: with
    different label lists its records fall in different classes, and both could
    be selected. One aggregation over the selection's keys (at most N rows, not
    the index: one task per selection file reads them); then a filter of the
    index for the first such key, to name its files. (The label-set count
    checks every key of the index; this covers a stored label-set table.)"""
    from pyspark.sql import functions as F

    # Read through fsspec (Spark need not have the selection's filesystem: object stores).
    dup = (read_parquet_through_fsspec(spark, selection, ["key"])
           .groupBy("key").count().where(F.col("count") > 1).orderBy("key").first())
    if dup is not None:
        raise not_unique(spark, job, dup["key"])
