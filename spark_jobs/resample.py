"""Resample the source index by importance weights (DESIGN.md §4).

::

    python -m spark_jobs.resample --index PATH --weights weights.parquet \\
      --size 80M --matcher same|elastic [--draw multinomial|systematic] \\
      [--aggregate mean|max|sum] [--scheme adaptive|entire|subset|topk-uniform|reversed|balanced] \\
      [--labels vocab.parquet] [--subset-labels NAME,...] [--top-k K] \\
      [--exclude KEYS.parquet] [--label-sets PATH] [--seed 0] --output DIR [--master local[*]]

Writes ``DIR/selection/`` (Parquet: key, copies, weight), ``DIR/stats.json``,
``DIR/label_stats.parquet``, ``DIR/label_stats.png`` and, last, ``DIR/_SUCCESS``.

How it stays exact and deterministic (DESIGN.md §4): records are grouped into
classes, one per distinct label list (``lsid = xxhash64(labels)``), so every
record of a class has the same fixed-point weight. One aggregation counts the
records per class; the driver computes the exact weights and splits N across
classes with Python integers (``spark_jobs.sampling.make_class_plan``).
Inside a class, records are ranked by ``order = xxhash64(key, seed)`` (ties by
key) and the copies go by rank (``sampling.rank_copies``). Only the records
whose order hash is under a per-class bound, about as many as the class can
select, leave their scan task: one shuffle of roughly N rows groups them by
class for the draw, whose tasks write the selection's Parquet files
themselves (under attempt-specific names; the driver keeps the files of the
successful attempts) and return only tallies. Nothing depends on Spark's
partitions, and task retries recompute the same classes from the same inputs.

The label-set table can be kept between runs (``--label-sets``): it depends
on the index alone, so every run over one index (targets, sizes, schemes)
can skip that full scan (``spark_jobs.label_sets``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import (SELECTION_SCHEMA, Hierarchy, ResampleConfig, SchemaError, parse_size, read_metadata,
                     validate_weights)
from schemas import io as sio
from schemas.manifest import SCHEMES
from schemas.stage_output import StageOutput, require_finished_input

from . import label_sets as LS
from . import sampling as S
from .label_sets import distinct_label_sets
from .session import (StageTimer, add_spark_arguments, inject_failure, read_parquet_through_fsspec,
                      require_reachable_outputs, run_cli, task_attempt_id)

__all__ = ["ResampleJob", "LabelSets", "keyed", "distinct_label_sets", "weigh_label_sets",
           "candidate_bounds", "draw", "write_drawn", "run", "main"]

#: Candidate records per partition of the drawing stage (the whole partition
#: is held in one Python worker's memory: ~170 bytes a record, measured).
DEFAULT_ROWS_PER_PARTITION = 1_000_000


@dataclass
class ResampleJob:
    """One resampling run's inputs and options (the command line, typed)."""

    index: str
    output: str
    size: int
    weights: str | None = None
    matcher: str = "same"
    draw: str = "multinomial"
    aggregate: str = "mean"
    scheme: str = "adaptive"
    labels: str | None = None
    subset_labels: tuple[str, ...] = ()
    top_k: int | None = None
    exclude: str | None = None
    seed: int = 0
    target: str | None = None
    temperature: float | None = None
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION
    label_sets: str | None = None
    candidate_sigmas: float = S.CANDIDATE_SIGMAS
    overwrite: bool = False
    shared_output: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.size = parse_size(self.size)
        if self.matcher == "elastic":
            self.draw = "systematic"
        if self.scheme == "subset":
            # Uniform over every example carrying a subset label, whatever else it carries.
            self.aggregate = "max"
        if self.scheme in ("adaptive", "topk-uniform", "reversed", "balanced") and not self.weights:
            raise ValueError(f"scheme {self.scheme!r} needs --weights")
        if self.scheme == "subset" and not self.labels:
            raise ValueError("scheme 'subset' needs --labels (the label vocabulary)")
        if self.scheme == "subset" and not self.subset_labels:
            raise ValueError("scheme 'subset' needs --subset-labels NAME,...")

    def config(self) -> ResampleConfig:
        return ResampleConfig(target=self.target or "unknown", size=self.size, matcher=self.matcher,
                              draw=self.draw, seed=self.seed,
                              temperature=self.temperature if self.temperature else 2.0,
                              aggregation=self.aggregate, scheme=self.scheme,
                              subset_labels=tuple(self.subset_labels), top_k=self.top_k)


# -- driver side: label weights for the chosen scheme -------------------------------

def label_weights_for(job: ResampleJob) -> tuple[S.LabelWeights | None, dict[str, Any]]:
    """Dense label weights for the job's scheme (``None`` for ``entire``) and facts
    about them for stats.json (target, temperature, label names)."""
    info: dict[str, Any] = {}
    table = None
    if job.weights:
        table = sio.read_parquet(job.weights)
        validate_weights(table, job.weights)
        meta = read_metadata(table.schema)
        info["weights_metadata"] = meta
        job.target = job.target or meta.get("target")
        job.temperature = job.temperature or meta.get("temperature")
    if job.scheme == "entire":
        return None, info
    if job.scheme == "subset":
        vocab = sio.read_parquet(job.labels)
        hierarchy = Hierarchy(vocab, job.labels)
        subset = hierarchy.descendants_of_names(job.subset_labels)
        ids = hierarchy.label_ids
        w = S.scheme_label_weights("subset", ids, None, subset_ids=subset)
        info["subset_label_ids"] = len(subset)
        return S.quantize_label_weights(ids, w), info
    ids = table.column("label_id").to_numpy()
    weights = table.column("weight").to_numpy(zero_copy_only=False)
    counts = table.column("count").to_numpy() if "count" in table.schema.names else None
    w = S.scheme_label_weights(job.scheme, ids, weights, counts=counts, top_k=job.top_k)
    return S.quantize_label_weights(ids, w), info


# -- Spark stages (thin: the arithmetic is in spark_jobs.sampling) -----------------

def keyed(index_df, seed: int):
    """index (key, labels, ...) -> key, labels, order, lsid.

    Native expressions, pure functions of the row: ``order = xxhash64(key,
    seed)`` ranks records inside their class; ``lsid = xxhash64(labels)`` is
    the class (the label-set id: an example's weight depends only on its
    label list).
    """
    from pyspark.sql import functions as F

    labels = LS.labels_column()
    return index_df.select(
        F.col("key").cast("string").alias("key"),
        labels.alias("labels"),
        F.xxhash64(F.col("key"), F.lit(seed).cast("long")).alias("order"),
        F.xxhash64(labels).alias("lsid"),
    )


def weigh_label_sets(sets: pa.Table, lw: S.LabelWeights | None, aggregate: str) -> pa.Table:
    """Add q, w, bad to the label-set table with :func:`sampling.example_weights`:
    on the driver, once per distinct label list rather than once per example."""
    labels = sets.column("labels").combine_chunks()
    raw = labels.offsets.to_numpy().astype(np.int64)
    values = pc.fill_null(labels.values.slice(raw[0], raw[-1] - raw[0]), -1).to_numpy(zero_copy_only=False)
    offsets = raw - raw[0]
    if lw is None:  # scheme 'entire': every example with labels weighs 1
        bad = np.diff(offsets) == 0
        q = np.where(bad, 0, 1 << S.WEIGHT_BITS).astype(np.int64)
        w = np.where(bad, 0.0, 1.0)
    else:
        w, q, bad = S.example_weights(offsets, values, lw, aggregate)
    return (sets.append_column("q", pa.array(q, pa.int64()))
            .append_column("w", pa.array(w, pa.float64()))
            .append_column("bad", pa.array(bad, pa.bool_())))


@dataclass
class LabelSets:
    """The distinct label lists of the index: ``lsid -> (labels, records, q)``.

    q is a function of the label list, so this one small table gives the
    histogram of distinct weights (elastic water-filling) and the desired
    label distribution, exactly.
    """

    sets: dict[int, tuple[tuple[int, ...], int, int]]

    @classmethod
    def from_table(cls, weighted_sets: pa.Table) -> "LabelSets":
        d = weighted_sets.to_pydict()
        return cls({lsid: (tuple(labels or ()), n, q)
                    for lsid, labels, n, q in zip(d["lsid"], d["labels"], d["n"], d["q"])})

    def desired_label_mass(self) -> dict[int, int]:
        """label id -> exact Σq over the examples carrying it."""
        mass: dict[int, int] = {}
        for labels, n, q in self.sets.values():
            if q > 0:
                for label in labels:
                    mass[label] = mass.get(label, 0) + n * q
        return mass

    def per_label(self, per_set: dict[int, int]) -> dict[int, int]:
        """Spread a per-label-set count over the labels of each set."""
        out: dict[int, int] = {}
        for lsid, n in per_set.items():
            for label in self.sets[lsid][0]:
                out[label] = out.get(label, 0) + n
        return out


def candidate_bounds(plan: S.ClassPlan, sigmas: float = S.CANDIDATE_SIGMAS) -> tuple[np.ndarray, int]:
    """Per plan class: the inclusive bound on ``order`` under which its records
    are drawn from (``sampling.candidate_bound``), and the expected number of
    such records in all."""
    needed = S.ranks_needed(plan.draw, plan.counts, plan.records, sigmas)
    bounds = np.array([S.candidate_bound(k, m, sigmas) for k, m in zip(needed.tolist(), plan.records.tolist())],
                      dtype=np.int64)
    share = (bounds.astype(np.float64) + 2.0 ** 63 + 1) / 2.0 ** 64
    expected = int(np.minimum(plan.records, np.ceil(plan.records * share)).sum())
    return bounds, expected


#: What a drawing task returns (it writes its selected rows itself): a row
#: per file written (``file``: its temporary path, ``tally``: its rows); per
#: class, ``lsid`` with its copies drawn in ``tally``; per copies value,
#: ``copies`` with the number of examples in ``tally``; per class whose
#: records disagree with the count, ``lsid``, ``copies`` = -1 and the records
#: seen in ``tally``.
DRAWN_SCHEMA = "file string, copies int, lsid long, tally long"
#: Where drawing tasks write, under the selection, before the driver commits.
ATTEMPTS_DIR = "_attempts"


def _draw_partition(plan: S.ClassPlan, full: np.ndarray, class_w: np.ndarray, selection: str, name: str,
                    storage: dict):
    """mapInArrow over whole classes: candidate (key, order, lsid) -> the
    selected (key, copies, weight), written as one Parquet file under
    ``selection/_attempts`` (``part-<name>-<partition>``, attempt-specific),
    and tally rows (``DRAWN_SCHEMA``). A class with fewer candidates than it
    selects (its bound fell short: below 1e-11 rare) draws nothing; the
    driver sees its total missing and draws it again from all its records.
    ``full[k]``: plan class k sends every record."""

    def draw_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        collected = list(batches)
        if not collected:
            return
        table = pa.Table.from_batches(collected)
        lsid = table.column("lsid").to_numpy()
        order = table.column("order").to_numpy()
        perm = np.lexsort((order, lsid))
        sl, so = lsid[perm], order[perm]
        keys_col = table.column("key")
        # Equal (class, order): resolve by key, and find duplicate keys.
        tie = np.concatenate([[0], ((sl[1:] == sl[:-1]) & (so[1:] == so[:-1])).astype(np.int8), [0]])
        if tie.any():
            for a, b in zip(np.flatnonzero(np.diff(tie) == 1), np.flatnonzero(np.diff(tie) == -1) + 1):
                members = perm[a:b]
                keys = [keys_col[int(i)].as_py() for i in members]
                perm[a:b] = members[S.sort_class(np.zeros(len(members), np.int64), keys)]
        n = perm.size
        if n == 0:
            return
        starts = np.concatenate([[0], np.flatnonzero(np.diff(sl)) + 1])
        have = np.diff(np.append(starts, n))
        cls = plan.index_of(sl[starts])
        m = plan.records[cls]
        # More records than counted (or a whole class that differs): the count was of other data.
        # Such a class draws nothing; a flag row tells the driver.
        disagree = (have > m) | (full[cls] & (have != m))
        copies = np.zeros(n, np.int64)
        short = disagree.copy()
        # Copies by rank of every other class (sampling.rank_copies, all at once); a
        # class that gives copies to more ranks than it has candidates is short.
        live = np.flatnonzero(~short)
        lengths, by_rank = S.rank_copies_many(plan.draw, plan.counts[cls[live]], m[live], plan.seed,
                                              plan.class_ids[cls[live]])
        fits = lengths <= have[live]
        short[live[~fits]] = True
        rank = np.arange(by_rank.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = np.repeat(fits, lengths)
        copies[(np.repeat(starts[live], lengths) + rank)[keep]] = by_rank[keep]
        picked = copies > 0
        selected = pa.Table.from_arrays(
            [table.column("key").take(pa.array(perm[picked])).combine_chunks(),
             pa.array(copies[picked].astype(np.int32), pa.int32()),
             pa.array(class_w[np.repeat(cls, have)[picked]], pa.float64())], schema=SELECTION_SCHEMA)
        path = ""
        if selected.num_rows:
            from pyspark import TaskContext

            ctx = TaskContext.get()
            part = f"part-{name}-{ctx.partitionId() if ctx else 0:05d}.parquet"
            path = sio.join(selection, ATTEMPTS_DIR, f"{part}.{task_attempt_id()}")
            sio.apply_storage_config(storage)
            fs, p = sio.filesystem(path)
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(p, "wb") as fh:
                pq.write_table(selected, fh)
        inject_failure("draw")
        yield _tally_batch(sl[starts][~short], np.add.reduceat(copies, starts)[~short], copies[picked],
                           sl[starts][disagree], have[disagree], path, selected.num_rows)
    return draw_partition


def _tally_batch(class_ids: np.ndarray, class_copies: np.ndarray, copies: np.ndarray,
                 disagree_ids: np.ndarray, disagree_records: np.ndarray, path: str, rows: int) -> pa.RecordBatch:
    """One drawing task's tally rows (``DRAWN_SCHEMA``)."""
    values, counts = np.unique(copies, return_counts=True)
    k, h, d = class_ids.size, values.size, disagree_ids.size
    f = 1 if path else 0
    return pa.RecordBatch.from_pydict({
        "file": [path] * f + [None] * (k + h + d),
        "copies": [None] * (f + k) + values.tolist() + [-1] * d,
        "lsid": [None] * f + class_ids.tolist() + [None] * h + disagree_ids.tolist(),
        "tally": [rows] * f + class_copies.tolist() + counts.tolist() + disagree_records.tolist(),
    }, schema=pa.schema([("file", pa.string()), ("copies", pa.int32()), ("lsid", pa.int64()),
                         ("tally", pa.int64())]))


def draw(spark, keyed_df, plan: S.ClassPlan, bounds: np.ndarray, partitions: int, class_w: np.ndarray,
         selection: str, name: str, only: np.ndarray | None = None):
    """Keep each class's records under its bound, group whole classes into
    ``partitions`` tasks and draw them; the tasks write ``part-<name>-*``
    files for ``selection`` (see :func:`write_drawn`). ``only``: a mask of
    plan classes to draw (the rest are skipped)."""
    from pyspark.sql import functions as F

    active = plan.counts > 0 if only is None else only & (plan.counts > 0)
    small = spark.createDataFrame(pa.table({"lsid": pa.array(plan.class_ids[active], pa.int64()),
                                            "bound": pa.array(bounds[active], pa.int64())}))
    full = bounds == S.ORDER_MAX
    return (keyed_df.select("key", "order", "lsid")
            .join(F.broadcast(small), on="lsid", how="inner")
            .where(F.col("order") <= F.col("bound"))
            .select("key", "order", "lsid")
            .repartition(partitions, "lsid")
            .mapInArrow(_draw_partition(plan, full, class_w, selection, name, sio.storage_config()), DRAWN_SCHEMA))


# -- statistics ---------------------------------------------------------------------

@dataclass
class Drawn:
    """What one draw wrote: copies per label set, the histogram of copies per
    example, total copies, unique examples, and the classes whose records
    disagreed with the count (lsid -> records seen; they drew nothing)."""

    per_set: dict[int, int]
    histogram: dict[int, int]
    total: int
    unique: int
    disagree: dict[int, int]

    def add(self, other: "Drawn") -> None:
        self.per_set.update(other.per_set)
        for k, v in other.histogram.items():
            self.histogram[k] = self.histogram.get(k, 0) + v
        self.histogram = dict(sorted(self.histogram.items()))
        self.total += other.total
        self.unique += other.unique
        self.disagree.update(other.disagree)


def write_drawn(drawn, selection: str, fresh: bool = True) -> Drawn:
    """Run the draw: its tasks write the selected rows (key, copies, weight)
    under ``selection/_attempts``; the driver renames the files of the
    successful attempts (the ones ``collect`` returns) into ``selection``,
    checks their rows, and returns the tallies. ``fresh``: clear
    ``selection`` first (else add to it: the redraw of short classes)."""
    if fresh:
        sio.remove_tree(selection)
    per_set: dict[int, int] = {}
    histogram: dict[int, int] = {}
    disagree: dict[int, int] = {}
    files: dict[str, int] = {}
    for t in drawn.collect():
        if t["file"] is not None:
            files[t["file"]] = int(t["tally"])
        elif t["lsid"] is None:
            histogram[int(t["copies"])] = histogram.get(int(t["copies"]), 0) + int(t["tally"])
        elif t["copies"] is None:
            per_set[int(t["lsid"])] = per_set.get(int(t["lsid"]), 0) + int(t["tally"])
        else:
            disagree[int(t["lsid"])] = int(t["tally"])
    written = 0
    for temp in sorted(files):
        final = sio.join(selection, temp.rsplit("/", 1)[-1].rsplit(".", 1)[0])
        sio.move(temp, final)
        fs, p = sio.filesystem(final)
        with fs.open(p, "rb") as fh:
            written += pq.ParquetFile(fh).metadata.num_rows
    sio.remove_tree(sio.join(selection, ATTEMPTS_DIR))  # what failed attempts left
    total = sum(k * n for k, n in histogram.items())
    unique = sum(histogram.values())
    if written != unique or sum(files.values()) != unique or sum(per_set.values()) != total:
        raise ValueError(f"internal error: wrote {written} rows to {selection}, the draw tallied {unique} "
                         f"examples with {total} copies")
    return Drawn(per_set, dict(sorted(histogram.items())), total, unique, disagree)


def label_distributions(desired: dict[int, int], realised: dict[int, int]) -> pa.Table:
    """label_id, desired (share of Σq over examples carrying it), realised (share of copies)."""
    d, r = desired, realised
    ids = sorted(set(d) | set(r))
    d_total = sum(d.values()) or 1
    r_total = sum(r.values()) or 1
    return pa.table({
        "label_id": pa.array(ids, pa.int32()),
        "desired": pa.array([float(Fraction(d.get(i, 0), d_total)) for i in ids], pa.float64()),
        "realised": pa.array([r.get(i, 0) / r_total for i in ids], pa.float64()),
        "realised_copies": pa.array([r.get(i, 0) for i in ids], pa.int64()),
    })


def total_variation(stats: pa.Table) -> float:
    d = stats.column("desired").to_numpy()
    r = stats.column("realised").to_numpy()
    return 0.5 * math.fsum(np.abs(d - r).tolist())


def plot_label_stats(stats: pa.Table, path: str, names: dict[int, str] | None = None,
                     top: int = 40) -> None:
    """Bar chart of realised against desired shares for the top labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = stats.column("label_id").to_numpy()
    d = stats.column("desired").to_numpy()
    r = stats.column("realised").to_numpy()
    order = np.argsort(-d, kind="stable")[:top]
    labels = [(names or {}).get(int(i), str(int(i))) for i in ids[order]]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(order) + 2), 4))
    x = np.arange(len(order))
    ax.bar(x - 0.2, d[order], width=0.4, label="desired")
    ax.bar(x + 0.2, r[order], width=0.4, label="realised")
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.set_ylabel("share of sampled labels")
    ax.set_title(f"Realised vs desired label distribution (top {len(order)} labels)")
    ax.legend()
    fig.tight_layout()
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    sio.write_bytes_atomic(path, buf.getvalue())


# -- the job ------------------------------------------------------------------------

def _bad_label_error(spark, job: ResampleJob, weighted_sets: pa.Table) -> SchemaError:
    """Name the file and key of the first example (smallest key) whose label list is bad."""
    from pyspark.sql import functions as F

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


def _check_label_sets(spark, job: ResampleJob, weighted_sets: pa.Table) -> tuple[int, int]:
    """Records, and records with a non-zero weight; raise for an index with
    no records, bad label lists, or no weight at all."""
    n_col = weighted_sets.column("n").to_numpy()
    records = int(n_col.sum())
    if records == 0:
        raise SchemaError("source index has no examples" + (" left after --exclude" if job.exclude else ""),
                          file=job.index)
    if pc.any(weighted_sets.column("bad")).as_py():
        raise _bad_label_error(spark, job, weighted_sets)
    positive = int(n_col[weighted_sets.column("q").to_numpy() > 0].sum())
    if positive == 0:
        raise ValueError(f"no example of {job.index} has a non-zero weight under scheme {job.scheme!r}")
    return records, positive


def _check_unique_keys(spark, job: ResampleJob, selection: str) -> None:
    """Refuse an index holding a selected key in more than one record: with
    different label lists its records fall in different classes, and both could
    be selected. One aggregation over the selection's keys (at most N rows, not
    the index: one task per selection file reads them); then a filter of the
    index for the first such key, to name its files."""
    from pyspark.sql import functions as F

    # Read through fsspec (Spark need not have the selection's filesystem: object stores).
    dup = (read_parquet_through_fsspec(spark, selection, ["key"])
           .groupBy("key").count().where(F.col("count") > 1).orderBy("key").first())
    if dup is not None:
        raise _not_unique(spark, job, dup["key"])


#: What ``sampling.sort_class`` raises in a drawing task for a key two records of one class share.
_DUPLICATE_IN_CLASS = re.compile(r"duplicate key (?P<q>['\"])(?P<key>.*?)(?P=q) in the source index")


def _not_unique(spark, job: ResampleJob, key: str) -> SchemaError:
    """The error for a key the index holds more than once, naming its files and labels."""
    from pyspark.sql import functions as F

    rows = (spark.read.parquet(job.index).where(F.col("key") == key)
            .select("_metadata.file_path", LS.labels_column().alias("labels")).collect())
    where = "; ".join(f"{r['file_path']} (labels {list(r['labels'])})"
                      for r in sorted(rows, key=lambda r: (r["file_path"], list(r["labels"]))))
    return SchemaError(f"key is not unique: {len(rows)} records of the source index have it: {where}",
                       file=job.index, key=key)


@dataclass
class Drawing:
    """What the draws wrote to the selection, and how they were planned."""

    plan: S.ClassPlan
    drawn: Drawn
    partitions: int
    expected_candidates: int
    redrawn: int


def _plan_and_draw(spark, job: ResampleJob, keyed_df, weighted_sets: pa.Table, selection: str,
                   stages: StageTimer, stored: bool) -> Drawing | None:
    """Plan the classes' copies from the label-set table, draw them into
    ``selection`` and check the totals. Where a class's records disagree
    with the table: ``None`` if the table was ``stored`` (read from
    ``--label-sets``: count again), else an error (the index changed)."""
    plan = S.make_class_plan(job.matcher, job.draw, job.size, job.seed, weighted_sets.column("lsid").to_numpy(),
                             weighted_sets.column("n").to_numpy(), weighted_sets.column("q").to_numpy())
    # The label-set table is sorted by lsid (distinct_label_sets), as are the plan's classes.
    class_w = weighted_sets.column("w").to_numpy()[
        np.searchsorted(weighted_sets.column("lsid").to_numpy(), plan.class_ids)]
    bounds, expected_candidates = candidate_bounds(plan, job.candidate_sigmas)
    # Whole waves of tasks: a last wave of one task on an idle cluster costs as much as a full one.
    cores = max(1, spark.sparkContext.defaultParallelism)
    partitions = cores * math.ceil(max(1, math.ceil(expected_candidates / job.rows_per_partition)) / cores)
    stages.lap("plan")

    # The drawing tasks write the selection; their tallies come back through collect (write_drawn).
    drawn = write_drawn(draw(spark, keyed_df, plan, bounds, partitions, class_w, selection, "draw"), selection)
    stages.lap("draw")
    planned = dict(zip(plan.class_ids.tolist(), plan.counts.tolist()))

    def unmet() -> list[int]:
        """Classes whose drawn copies are not what the plan gave them."""
        return sorted(c for c, k in planned.items() if k and drawn.per_set.get(c, 0) != k)

    short = np.array(unmet(), np.int64)
    if short.size and not drawn.disagree:  # a class's bound fell short: draw it again from all its records
        redo_mask = np.isin(plan.class_ids, short)
        if any(drawn.per_set.get(c, 0) for c in short.tolist()):
            raise ValueError("internal error: a class that fell short drew copies")
        drawn.add(write_drawn(draw(spark, keyed_df, plan, np.where(redo_mask, S.ORDER_MAX, bounds),
                                   max(1, min(partitions, int(short.size))), class_w, selection, "redraw",
                                   only=redo_mask), selection, fresh=False))
        stages.lap("redraw")
    missing = unmet()
    if drawn.disagree or missing:
        # Classes with more records than counted, or none where the count says some: other data.
        if stored:
            return None
        sets_n = dict(zip(weighted_sets.column("lsid").to_pylist(), weighted_sets.column("n").to_pylist()))
        lsid, seen = (next(iter(sorted(drawn.disagree.items()))) if drawn.disagree
                      else (missing[0], "too few"))
        raise ValueError(f"label set {lsid} has {seen} records in a drawing task but {sets_n.get(lsid)} when "
                         f"counted: did {job.index} change during the job?")
    if drawn.total != job.size:
        raise ValueError(f"internal error: drew {drawn.total} copies, expected {job.size} split as planned")
    return Drawing(plan, drawn, partitions, expected_candidates, int(short.size))


def read_index(spark, job: ResampleJob):
    """The index (less the ``--exclude`` keys), checked to have what the job reads."""
    index_df = spark.read.parquet(job.index)
    names = set(index_df.columns)
    if "key" not in names or "labels" not in names:
        raise SchemaError(f"source index has no 'key'/'labels' column (columns: {sorted(names)})",
                          file=job.index)
    if job.exclude:
        excluded = spark.read.parquet(job.exclude)
        if "key" not in excluded.columns:
            raise SchemaError(f"--exclude needs a 'key' column (columns: {sorted(excluded.columns)})",
                              file=job.exclude)
        index_df = index_df.join(excluded.select("key").distinct(), on="key", how="left_anti")
    return index_df


def run(spark, job: ResampleJob) -> dict[str, Any]:
    """Run the job with ``spark``; return the stats written to stats.json
    (with ``"reused": True`` where a finished output was there: no work done).

    Every input is read and checked before the output is touched; the result
    is built aside and committed whole (``schemas.stage_output``)."""
    t0 = time.time()
    require_reachable_outputs(spark, {"--output": job.output, "--label-sets": job.label_sets}, job.shared_output)
    output = StageOutput(job.output, "resample")
    for flag, path in (("--index", job.index), ("--weights", job.weights), ("--labels", job.labels),
                       ("--exclude", job.exclude)):
        if path:
            require_finished_input(path, flag)
    lw, info = label_weights_for(job)
    index_df = read_index(spark, job)
    if job.label_sets:
        LS.check_label_sets_path(job.label_sets)
    if output.check(job.overwrite):
        print(output.skip_line(), file=sys.stderr)
        return {**json.loads(sio.read_bytes(sio.join(job.output, "stats.json"))), "reused": True}
    work = output.begin()
    try:
        stats = _resample_into(spark, job, lw, info, index_df, work, t0)
    except BaseException:
        output.abort(work)
        raise
    output.commit(work)
    return stats


def _resample_into(spark, job: ResampleJob, lw: S.LabelWeights | None, info: dict[str, Any], index_df, work: str,
                   t0: float) -> dict[str, Any]:
    """Count, plan and draw into ``work``; write the statistics; return them."""
    config = job.config()
    stages = StageTimer()
    fingerprints = _fingerprints(job)
    hint, sets_key = None, {}
    if job.label_sets:
        # The label-set table depends on the index (and --exclude) only: every run over them can share it.
        sets_key = {"index": sio.listing_fingerprint(job.index, versions=True),
                    "exclude": fingerprints.get("exclude")}
        hint = LS.read_label_sets(job.label_sets, sets_key)
    keyed_df = keyed(index_df, job.seed)
    selection = sio.join(work, "selection")
    while True:
        counted = hint is None
        if counted:
            sets_table = distinct_label_sets(index_df)
            if job.label_sets:
                LS.write_label_sets(sets_table, job.label_sets, sets_key)
        else:
            sets_table = hint
        stages.lap("label_sets")
        weighted_sets = weigh_label_sets(sets_table, lw, job.aggregate)
        try:
            n_records, positive = _check_label_sets(spark, job, weighted_sets)
        except ValueError:
            if counted:
                raise
            hint = None  # bad input is only ever reported from a fresh count
            continue
        try:
            drawing = _plan_and_draw(spark, job, keyed_df, weighted_sets, selection, stages, stored=not counted)
        except Exception as e:  # noqa: BLE001 - a drawing task's error reaches here as Spark's, not ours
            duplicate = _DUPLICATE_IN_CLASS.search(str(e))
            if duplicate is None:
                raise
            raise _not_unique(spark, job, duplicate["key"]) from None
        if drawing is not None:
            break
        print(f"resample: the label-set table {job.label_sets} does not match the records of "
              f"{job.index}; counting again", file=sys.stderr)
        hint = None
    _check_unique_keys(spark, job, selection)
    stages.lap("unique_keys")
    plan, per_set, histogram = drawing.plan, drawing.drawn.per_set, drawing.drawn.histogram
    total_copies, unique = drawing.drawn.total, drawing.drawn.unique
    sets = LabelSets.from_table(weighted_sets)
    copies_hist = {str(k): v for k, v in histogram.items()}
    label_stats = label_distributions(sets.desired_label_mass(), sets.per_label(per_set))

    tv = total_variation(label_stats)
    vocab_names = {}
    if job.labels:
        vocab = sio.read_parquet(job.labels)
        vocab_names = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
    stats: dict[str, Any] = {
        "config": config.to_dict(),
        "job": {"index": job.index, "weights": job.weights, "labels": job.labels,
                "exclude": job.exclude, "partitions": drawing.partitions,
                "weight_bits": S.WEIGHT_BITS, "label_sets": int(weighted_sets.num_rows),
                "label_set_table": job.label_sets,
                "label_sets_counted": counted,
                "drawing_label_sets": int((plan.counts > 0).sum()),
                "expected_candidates": drawing.expected_candidates,
                "candidate_sigmas": job.candidate_sigmas, "redrawn_label_sets": drawing.redrawn},
        "inputs": fingerprints,
        "source_examples": n_records,
        "examples_with_weight": positive,
        "total_copies": total_copies,
        "unique_examples": unique,
        "copies_histogram": copies_hist,
        "max_copies": max((int(k) for k in copies_hist), default=0),
        "total_variation": tv,
        "labels_realised": int((label_stats.column("realised_copies").to_numpy() > 0).sum()),
    }
    if job.matcher == "elastic":
        elastic = plan
        sat_labels = 0
        if lw is not None and elastic.threshold is not None:
            sat_labels = int((lw.q >= elastic.threshold).sum())
        stats["elastic"] = {
            # π(x) = min(1, c·w(x)): c in the weights table's units (q = w·scale).
            "c": (float(elastic.c * Fraction(lw.scale if lw else 1 << S.WEIGHT_BITS))
                  if elastic.c is not None else None),
            "c_fixed_point": str(elastic.c) if elastic.c is not None else None,
            "saturated_examples": elastic.saturated,
            "saturated_labels": sat_labels,
            "threshold_weight": (elastic.threshold / (lw.scale if lw else 1 << S.WEIGHT_BITS))
            if elastic.threshold is not None else None,
        }
    if "weights_metadata" in info:
        stats["weights_metadata"] = info["weights_metadata"]
    stats["seconds"] = round(time.time() - t0, 2)
    stats["timings"] = stages.timings

    sio.write_parquet_atomic(label_stats.drop(["realised_copies"]), sio.join(work, "label_stats.parquet"))
    plot_label_stats(label_stats, sio.join(work, "label_stats.png"), vocab_names)
    sio.write_bytes_atomic(sio.join(work, "stats.json"), json.dumps(stats, indent=2) + "\n")
    return stats


def _fingerprints(job: ResampleJob) -> dict[str, str]:
    out = {"index": sio.listing_fingerprint(job.index)}
    for name in ("weights", "labels", "exclude"):
        path = getattr(job, name)
        if path:
            out[name] = sio.fingerprint_paths(path)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spark_jobs.resample",
                                description="Resample a source index by importance weights.")
    p.add_argument("--index", required=True, help="source index: Parquet file, directory or glob")
    p.add_argument("--weights", help="weights.parquet from beam_pipelines.importance_weights")
    p.add_argument("--size", required=True, help="samples to draw: 80M, 2M, 1.5B, 500K, 80000000")
    p.add_argument("--matcher", choices=["same", "elastic"], default="same")
    p.add_argument("--draw", choices=["multinomial", "systematic"], default="multinomial",
                   help="same matcher only (default: multinomial, the paper's)")
    p.add_argument("--aggregate", choices=["mean", "max", "sum"], default="mean",
                   help="per-example weight from its labels' weights (default: mean)")
    p.add_argument("--scheme", choices=SCHEMES, default="adaptive")
    p.add_argument("--labels", help="label vocabulary (needed for --scheme subset)")
    p.add_argument("--subset-labels", default="", help="comma-separated label names (scheme subset)")
    p.add_argument("--top-k", type=int, help="top-K labels by weight (topk-uniform, reversed, adaptive)")
    p.add_argument("--exclude", help="Parquet with a 'key' column: keys never to select")
    p.add_argument("--label-sets", metavar="PATH",
                   help="the index's label-set table (a Parquet file): read when it was counted over this index "
                        "and --exclude (checked against the records during the draw), else counted and written "
                        "here. Share one per index across runs (targets, sizes, schemes) to skip a full scan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="target name recorded in stats.json (default: from the weights)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    add_spark_arguments(p)
    p.add_argument("--rows-per-partition", type=int, default=DEFAULT_ROWS_PER_PARTITION)
    return p


def job_from_args(args: argparse.Namespace) -> ResampleJob:
    return ResampleJob(
        index=args.index, output=args.output, size=args.size, weights=args.weights,
        matcher=args.matcher, draw=args.draw, aggregate=args.aggregate, scheme=args.scheme,
        labels=args.labels,
        subset_labels=tuple(s.strip() for s in args.subset_labels.split(",") if s.strip()),
        top_k=args.top_k, exclude=args.exclude, seed=args.seed, target=args.target,
        rows_per_partition=args.rows_per_partition, overwrite=args.overwrite, label_sets=args.label_sets,
        shared_output=args.shared_output)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("resample", args, lambda: job_from_args(args), run,
                   lambda job, s: f"{s['total_copies']} samples, {s['unique_examples']} unique examples, "
                                  f"total variation {s['total_variation']:.4f} -> {job.output}")


if __name__ == "__main__":
    raise SystemExit(main())
