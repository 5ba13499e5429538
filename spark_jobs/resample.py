"""Resample the source index by importance weights (DESIGN.md §4).

::

    python -m spark_jobs.resample --index PATH --weights weights.parquet \\
      --size 80M --matcher same|elastic [--draw multinomial|systematic] \\
      [--aggregate mean|max|sum] [--scheme adaptive|entire|subset|topk-uniform|reversed] \\
      [--labels vocab.parquet] [--subset-labels NAME,...] [--top-k K] \\
      [--exclude KEYS.parquet] [--seed 0] --output DIR [--master local[*]]

Writes ``DIR/selection/`` (Parquet: key, copies, weight), ``DIR/stats.json``,
``DIR/label_stats.parquet``, ``DIR/label_stats.png`` and, last, ``DIR/_SUCCESS``.

How it stays exact and deterministic: each key hashes to one of ``--buckets``
fixed buckets (``xxhash64(key) mod B``, independent of Spark's partitions);
per-bucket integer totals of the fixed-point weights are summed exactly; the
driver splits N across buckets (``spark_jobs.sampling.make_plan``); each
bucket is then drawn in one task, over its records sorted by
``xxhash64(key, seed)``, with an RNG seeded by (seed, bucket). Task retries
recompute the same bucket from the same inputs and give the same rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import (Hierarchy, ResampleConfig, SchemaError, parse_size, read_metadata,
                     validate_weights)
from schemas import io as sio

from . import sampling as S
from .session import inject_failure, run_job

__all__ = ["ResampleJob", "LabelSets", "keyed", "distinct_label_sets", "weigh_label_sets", "weigh",
           "bucket_totals", "bucket_saturation",
           "draw", "drawn_totals", "run", "main", "DEFAULT_BUCKETS"]

#: Fixed number of hash buckets. Part of the result's definition: changing it
#: changes which examples are drawn (it is recorded in stats.json).
DEFAULT_BUCKETS = 4096
#: Records per partition of the drawing stage (the whole partition is held in
#: one Python worker's memory: ~100 bytes a record).
DEFAULT_ROWS_PER_PARTITION = 1_000_000
#: What the job writes in its output directory.
OUTPUT_ENTRIES = {"selection", "stats.json", "label_stats.parquet", "label_stats.png", "_SUCCESS"}
_MASK31 = (1 << 31) - 1


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
    buckets: int = DEFAULT_BUCKETS
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.size = parse_size(self.size)
        if self.buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {self.buckets}")
        if self.matcher == "elastic":
            self.draw = "systematic"
        if self.scheme == "subset":
            # Uniform over every example carrying a subset label, whatever else it carries.
            self.aggregate = "max"
        if self.scheme in ("adaptive", "topk-uniform", "reversed") and not self.weights:
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

def keyed(index_df, buckets: int, seed: int):
    """index (key, labels, ...) -> key, labels, bucket, order, lsid, lsid_check.

    Native expressions, pure functions of the row: ``bucket = xxhash64(key)
    mod buckets``; ``order = xxhash64(key, seed)``; ``lsid = xxhash64(labels)``
    (the label-set id: an example's weight depends only on its label list);
    ``lsid_check``, a second independent hash of the list, detects a
    collision of ``lsid``.
    """
    from pyspark.sql import functions as F

    labels = F.col("labels").cast("array<int>")
    return index_df.select(
        F.col("key").cast("string").alias("key"),
        labels.alias("labels"),
        F.pmod(F.xxhash64("key"), F.lit(buckets)).cast("int").alias("bucket"),
        F.xxhash64(F.col("key"), F.lit(seed).cast("long")).alias("order"),
        F.xxhash64(labels).alias("lsid"),
        F.hash(labels).alias("lsid_check"),
    )


def distinct_label_sets(keyed_df) -> pa.Table:
    """lsid, labels, n (records): one row per distinct label list, sorted by lsid."""
    from pyspark.sql import functions as F

    rows = (keyed_df.groupBy("lsid")
            .agg(F.first("labels").alias("labels"), F.count(F.lit(1)).alias("n"),
                 F.min("lsid_check").alias("c_min"), F.max("lsid_check").alias("c_max"))
            .collect())
    for r in rows:
        if r["c_min"] != r["c_max"]:
            raise ValueError(f"64-bit hash collision between label lists (one is {r['labels']}); "
                             "please report it")
    rows.sort(key=lambda r: r["lsid"])
    return pa.table({"lsid": pa.array([r["lsid"] for r in rows], pa.int64()),
                     "labels": pa.array([r["labels"] for r in rows], pa.list_(pa.int32())),
                     "n": pa.array([r["n"] for r in rows], pa.int64())})


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


def weigh(spark, keyed_df, weighted_sets: pa.Table):
    """keyed index -> key, labels, bucket, order, lsid, q, w (a broadcast join
    with the small label-set table; no row goes through Python)."""
    from pyspark.sql import functions as F

    small = spark.createDataFrame(weighted_sets.select(["lsid", "q", "w"]))
    return keyed_df.drop("lsid_check").join(F.broadcast(small), on="lsid", how="inner")


def bucket_totals(weighed) -> dict[int, dict[str, int]]:
    """Per bucket: records, positive records (q > 0) and exact Σq (summed as two
    31-bit halves so no long overflows). Integer sums are exact, so the result
    does not depend on partitioning."""
    from pyspark.sql import functions as F

    rows = (weighed.groupBy("bucket")
            .agg(F.count(F.lit(1)).alias("n"),
                 F.sum(F.when(F.col("q") > 0, 1).otherwise(0)).alias("positive"),
                 F.sum(F.shiftright("q", 31)).alias("q_hi"),
                 F.sum(F.col("q").bitwiseAND(F.lit(_MASK31))).alias("q_lo"))
            .collect())
    return {r["bucket"]: {"n": r["n"], "positive": r["positive"],
                          "q": (int(r["q_hi"]) << 31) + int(r["q_lo"])} for r in rows}


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

    def weight_histogram(self) -> tuple[list[int], list[int]]:
        hist: dict[int, int] = {}
        for _, n, q in self.sets.values():
            if q > 0:
                hist[q] = hist.get(q, 0) + n
        return list(hist), list(hist.values())

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


def bucket_saturation(weighed, threshold: int | None) -> dict[int, tuple[int, int]]:
    """Per bucket: saturated records (q >= threshold) and exact Σq of the rest."""
    from pyspark.sql import functions as F

    sat = F.col("q") >= F.lit(threshold) if threshold is not None else F.lit(False)
    unsat_q = F.when(~sat, F.col("q")).otherwise(F.lit(0))
    rows = (weighed.where("q > 0").groupBy("bucket")
            .agg(F.sum(sat.cast("long")).alias("sat"),
                 F.sum(F.shiftright(unsat_q, 31)).alias("hi"),
                 F.sum(unsat_q.bitwiseAND(F.lit(_MASK31))).alias("lo"))
            .collect())
    return {r["bucket"]: (int(r["sat"]), (int(r["hi"]) << 31) + int(r["lo"])) for r in rows}


DRAWN_SCHEMA = "key string, copies int, weight double, lsid long"


def _draw_partition(plan: S.SamplingPlan, set_lsid: np.ndarray, set_q: np.ndarray, set_w: np.ndarray):
    """mapInArrow over whole buckets: (key, bucket, order, lsid) -> selected
    (key, copies, weight, lsid). An example's weights are looked up from its
    label set (``set_*``, sorted by lsid), so they need not cross the shuffle."""

    def draw_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        collected = list(batches)
        if not collected:
            return
        table = pa.Table.from_batches(collected)
        bucket = table.column("bucket").to_numpy()
        order = table.column("order").to_numpy()
        which = np.searchsorted(set_lsid, table.column("lsid").to_numpy())
        q = set_q[which]
        perm = np.lexsort((order, bucket))
        sb, so = bucket[perm], order[perm]
        # Equal (bucket, order): resolve by key, and find duplicate keys.
        tie = (sb[1:] == sb[:-1]) & (so[1:] == so[:-1])
        keys_col = table.column("key")
        if tie.any():
            starts = np.flatnonzero(np.diff(np.concatenate([[0], tie.astype(np.int8), [0]])) == 1)
            ends = np.flatnonzero(np.diff(np.concatenate([[0], tie.astype(np.int8), [0]])) == -1) + 1
            for a, b in zip(starts, ends):
                members = perm[a:b]
                keys = [keys_col[int(i)].as_py() for i in members]
                local = S.sort_bucket(np.zeros(len(members), np.int64), keys)
                perm[a:b] = members[local]
        copies = np.zeros(perm.size, np.int64)
        bounds = np.flatnonzero(np.diff(sb)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [perm.size]])):
            copies[lo:hi] = S.draw_bucket(plan, int(sb[lo]), q[perm[lo:hi]])
        chosen = perm[copies > 0]
        out = table.take(pa.array(chosen))
        inject_failure("draw")
        step = 65536
        for start in range(0, out.num_rows, step):
            part = out.slice(start, step)
            yield pa.RecordBatch.from_arrays(
                [part.column("key").combine_chunks(),
                 pa.array(copies[copies > 0][start:start + step].astype(np.int32), pa.int32()),
                 pa.array(set_w[which[chosen[start:start + step]]], pa.float64()),
                 part.column("lsid").combine_chunks()],
                names=["key", "copies", "weight", "lsid"])
    return draw_partition


def draw(weighed, plan: S.SamplingPlan, partitions: int, weighted_sets: pa.Table):
    """Group whole buckets into ``partitions`` tasks and draw each bucket."""
    ordered = weighted_sets.sort_by("lsid")
    return (weighed.where("q > 0").select("key", "bucket", "order", "lsid")
            .repartition(partitions, "bucket")
            .mapInArrow(_draw_partition(plan, ordered.column("lsid").to_numpy(),
                                        ordered.column("q").to_numpy(), ordered.column("w").to_numpy()),
                        DRAWN_SCHEMA))


# -- statistics ---------------------------------------------------------------------

def drawn_totals(drawn) -> tuple[dict[int, int], dict[int, int], int, int]:
    """From the drawn rows: copies per label set, the histogram of copies per
    example, total copies and unique examples (one aggregation)."""
    from pyspark.sql import functions as F

    rows = (drawn.groupingSets([["lsid"], ["copies"]], "lsid", "copies")
            .agg(F.grouping_id().alias("gid"), F.count(F.lit(1)).alias("n"),
                 F.sum("copies").alias("copies_sum"))
            .collect())
    per_set: dict[int, int] = {}
    histogram: dict[int, int] = {}
    total = unique = 0
    for r in rows:
        if r["gid"] == 1:  # by label set
            per_set[int(r["lsid"])] = int(r["copies_sum"])
        else:
            histogram[int(r["copies"])] = int(r["n"])
            total += int(r["copies_sum"])
            unique += int(r["n"])
    return per_set, dict(sorted(histogram.items())), total, unique


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

def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _complete(output: str) -> bool:
    return sio.exists(sio.join(output, "_SUCCESS"))


def _bad_label_error(spark, job: ResampleJob, weighted_sets: pa.Table) -> SchemaError:
    """Name the file and key of the first example (smallest key) whose label list is bad."""
    from pyspark.sql import functions as F

    bad = weighted_sets.filter(weighted_sets.column("bad"))
    n_bad = int(pc.sum(bad.column("n")).as_py())
    bad_ids = bad.column("lsid").to_pylist()
    row = (keyed(spark.read.parquet(job.index), 1, 0).where(F.col("lsid").isin(bad_ids))
           .select("key", "labels", "_metadata.file_path").orderBy("key").first())
    file = row["file_path"] if row else job.index
    table = job.labels if job.scheme == "subset" else job.weights
    what = (f"labels {row['labels']} include a label that is not in {table}"
            if row and row["labels"] else "labels is empty or null")
    return SchemaError(f"{what} ({n_bad} example(s) affected)", file=file,
                       key=row["key"] if row else None)


def run(spark, job: ResampleJob) -> dict[str, Any]:
    """Run the job with ``spark``; return the stats written to stats.json."""
    t0 = time.time()
    if _complete(job.output) and not job.overwrite:
        print(f"resample: {job.output} is complete (_SUCCESS); nothing to do "
              "(--overwrite to redo)", file=sys.stderr)
        return json.loads(sio.read_bytes(sio.join(job.output, "stats.json")))
    sio.clear_output(job.output, lambda name: name in OUTPUT_ENTRIES)
    lw, info = label_weights_for(job)
    config = job.config()

    index_df = spark.read.parquet(job.index)
    names = set(index_df.columns)
    if "key" not in names or "labels" not in names:
        raise SchemaError(f"source index has no 'key'/'labels' column (columns: {sorted(names)})",
                          file=job.index)
    if job.exclude:
        excluded = spark.read.parquet(job.exclude).select("key").distinct()
        index_df = index_df.join(excluded, on="key", how="left_anti")
    timings: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(now - tick, 3)
        tick = now

    keyed_df = keyed(index_df, job.buckets, job.seed)
    weighted_sets = weigh_label_sets(distinct_label_sets(keyed_df), lw, job.aggregate)
    lap("label_sets")
    n_records = int(pc.sum(weighted_sets.column("n")).as_py() or 0)
    if n_records == 0:
        raise SchemaError("source index has no examples" + (" left after --exclude" if job.exclude else ""),
                          file=job.index)
    if pc.any(weighted_sets.column("bad")).as_py():
        raise _bad_label_error(spark, job, weighted_sets)
    sets = LabelSets.from_table(weighted_sets)
    weighed = weigh(spark, keyed_df, weighted_sets)
    totals = bucket_totals(weighed)
    lap("bucket_totals")
    positive = sum(t["positive"] for t in totals.values())
    if positive == 0:
        raise ValueError(f"no example of {job.index} has a non-zero weight under scheme {job.scheme!r}")
    bucket_q = {b: t["q"] for b, t in totals.items() if t["q"] > 0}

    elastic = saturation = None
    if job.matcher == "elastic":
        values, counts = sets.weight_histogram()
        elastic = S.water_fill(values, counts, job.size)
        saturation = bucket_saturation(weighed, elastic.threshold)
        lap("elastic_saturation")
    plan = S.make_plan(job.matcher, job.draw, job.size, job.seed, bucket_q, elastic, saturation)
    partitions = max(1, min(job.buckets, math.ceil(positive / job.rows_per_partition)))

    drawn = draw(weighed, plan, partitions, weighted_sets).persist()
    try:
        local = _is_local(job.output)
        final = job.output[len("file://"):] if job.output.startswith("file://") else job.output
        if local:
            parent = os.path.dirname(os.path.abspath(final)) or "."
            os.makedirs(parent, exist_ok=True)
            work = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:12]}")
        else:
            work = job.output  # object stores: written in place, _SUCCESS last
        drawn.select("key", "copies", "weight").write.mode("overwrite").parquet(sio.join(work, "selection"))
        lap("draw_and_write")

        per_set, histogram, total_copies, unique = drawn_totals(drawn)
        if total_copies != job.size:
            raise ValueError(f"internal error: drew {total_copies} copies, expected {job.size}")
        copies_hist = {str(k): v for k, v in histogram.items()}
        label_stats = label_distributions(sets.desired_label_mass(), sets.per_label(per_set))
        lap("statistics")
    finally:
        drawn.unpersist()

    tv = total_variation(label_stats)
    vocab_names = {}
    if job.labels:
        vocab = sio.read_parquet(job.labels)
        vocab_names = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
    stats: dict[str, Any] = {
        "config": config.to_dict(),
        "job": {"index": job.index, "weights": job.weights, "labels": job.labels,
                "exclude": job.exclude, "buckets": job.buckets, "partitions": partitions,
                "weight_bits": S.WEIGHT_BITS, "tick_bits": plan.bits},
        "inputs": _fingerprints(job),
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
    stats["timings"] = timings

    sio.write_parquet_atomic(label_stats.drop(["realised_copies"]), sio.join(work, "label_stats.parquet"))
    plot_label_stats(label_stats, sio.join(work, "label_stats.png"), vocab_names)
    sio.write_bytes_atomic(sio.join(work, "stats.json"), json.dumps(stats, indent=2) + "\n")
    sio.write_bytes_atomic(sio.join(work, "_SUCCESS"), "")
    if local and work != final:
        os.rename(work, final)  # cleared at the start: a stale result is never mixed in
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
    p.add_argument("--scheme", choices=["adaptive", "entire", "subset", "topk-uniform", "reversed"],
                   default="adaptive")
    p.add_argument("--labels", help="label vocabulary (needed for --scheme subset)")
    p.add_argument("--subset-labels", default="", help="comma-separated label names (scheme subset)")
    p.add_argument("--top-k", type=int, help="top-K labels by weight (topk-uniform, reversed, adaptive)")
    p.add_argument("--exclude", help="Parquet with a 'key' column: keys never to select")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="target name recorded in stats.json (default: from the weights)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    p.add_argument("--master", help="Spark master (default: local[*] unless run by spark-submit)")
    p.add_argument("--driver-memory", help="local mode heap (default: half the machine's memory)")
    p.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS,
                   help=f"fixed hash buckets (default: {DEFAULT_BUCKETS}; part of the result)")
    p.add_argument("--rows-per-partition", type=int, default=DEFAULT_ROWS_PER_PARTITION)
    return p


def job_from_args(args: argparse.Namespace) -> ResampleJob:
    return ResampleJob(
        index=args.index, output=args.output, size=args.size, weights=args.weights,
        matcher=args.matcher, draw=args.draw, aggregate=args.aggregate, scheme=args.scheme,
        labels=args.labels,
        subset_labels=tuple(s.strip() for s in args.subset_labels.split(",") if s.strip()),
        top_k=args.top_k, exclude=args.exclude, seed=args.seed, target=args.target,
        buckets=args.buckets, rows_per_partition=args.rows_per_partition, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        job = job_from_args(args)
    except ValueError as e:
        print(f"resample: error: {e}", file=sys.stderr)
        return 2
    return run_job("resample", args.master, args.driver_memory, lambda spark: run(spark, job),
                   lambda s: f"{s['total_copies']} samples, {s['unique_examples']} unique examples, "
                             f"total variation {s['total_variation']:.4f} -> {job.output}")


if __name__ == "__main__":
    raise SystemExit(main())
