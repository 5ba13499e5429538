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
import shutil
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
from .session import get_session, inject_failure

__all__ = ["ResampleJob", "weigh", "bucket_totals", "weight_histogram", "bucket_saturation", "draw",
           "desired_label_mass", "drawn_totals", "run", "main", "DEFAULT_BUCKETS"]

#: Fixed number of hash buckets. Part of the result's definition: changing it
#: changes which examples are drawn (it is recorded in stats.json).
DEFAULT_BUCKETS = 4096
#: Records per partition of the drawing stage (the whole partition is held in
#: one Python worker's memory: ~100 bytes a record).
DEFAULT_ROWS_PER_PARTITION = 1_000_000
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
    cache: bool = False
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

def weigh(index_df, lw: S.LabelWeights | None, aggregate: str, buckets: int, seed: int):
    """index (key, labels, ...) -> key, labels, bucket, order, q, w, bad.

    All native Spark expressions, no row goes through Python:
    ``bucket = xxhash64(key) mod buckets`` and ``order = xxhash64(key, seed)``
    are pure functions of the key; q, w and bad equal
    :func:`spark_jobs.sampling.example_weights` (the label weights travel as
    two array literals, null where a label id is not in the table, and are
    aggregated over ``labels`` with higher-order functions).
    """
    from pyspark.sql import functions as F

    df = index_df.select(
        F.col("key").cast("string").alias("key"),
        F.col("labels").cast("array<int>").alias("labels"),
        F.pmod(F.xxhash64("key"), F.lit(buckets)).cast("int").alias("bucket"),
        F.xxhash64(F.col("key"), F.lit(seed).cast("long")).alias("order"),
    )
    # Null or empty label lists are bad; size() is -1 or null for a null list.
    empty = "coalesce(size(labels), -1) <= 0"
    if lw is None:  # scheme 'entire': every example with labels weighs 1
        return df.select("*", F.expr(f"CASE WHEN {empty} THEN 0L ELSE {1 << S.WEIGHT_BITS}L END").alias("q"),
                         F.expr(f"CASE WHEN {empty} THEN 0D ELSE 1D END").alias("w"),
                         F.expr(empty).alias("bad"))
    n = len(lw.q)
    q_lit = F.lit([int(v) if p else None for v, p in zip(lw.q.tolist(), lw.present.tolist())])
    w_lit = F.lit([float(v) if p else None for v, p in zip(lw.weight.tolist(), lw.present.tolist())])
    df = df.select("*", q_lit.cast("array<bigint>").alias("_q_table"),
                   w_lit.cast("array<double>").alias("_w_table"))
    lookup = "transform(labels, l -> CASE WHEN l >= 0 AND l < {n} THEN element_at({t}, l + 1) END)"
    df = df.select("key", "labels", "bucket", "order",
                   F.expr(lookup.format(n=n, t="_q_table")).alias("_qs"),
                   F.expr(lookup.format(n=n, t="_w_table")).alias("_ws"))
    bad = f"({empty} OR exists(_qs, v -> v IS NULL))"
    if aggregate == "max":
        q, w = "array_max(_qs)", "array_max(_ws)"
    elif aggregate == "sum":
        q, w = "aggregate(_qs, 0L, (a, v) -> a + v)", "aggregate(_ws, 0D, (a, v) -> a + v)"
    elif aggregate == "mean":
        # Round half up in integers: (Σq + k div 2) div k, as example_weights does.
        q = "(aggregate(_qs, 0L, (a, v) -> a + v) + (size(labels) div 2)) div size(labels)"
        w = "aggregate(_ws, 0D, (a, v) -> a + v) / size(labels)"
    else:
        raise ValueError(f"aggregate must be mean, max or sum, got {aggregate!r}")
    return df.select("key", "labels", "bucket", "order",
                     F.expr(f"CASE WHEN coalesce({bad}, true) THEN 0L ELSE {q} END").alias("q"),
                     F.expr(f"CASE WHEN coalesce({bad}, true) THEN 0D ELSE {w} END").alias("w"),
                     F.expr(f"coalesce({bad}, true)").alias("bad"))


def bucket_totals(weighed) -> dict[int, dict[str, Any]]:
    """Per bucket: records, positive records (q > 0), exact Σq (summed as two
    31-bit halves so no long overflows), bad records and the smallest bad key.
    Integer sums are exact, so the result does not depend on partitioning."""
    from pyspark.sql import functions as F

    rows = (weighed.groupBy("bucket")
            .agg(F.count(F.lit(1)).alias("n"),
                 F.sum(F.when(F.col("q") > 0, 1).otherwise(0)).alias("positive"),
                 F.sum(F.shiftright("q", 31)).alias("q_hi"),
                 F.sum(F.col("q").bitwiseAND(F.lit(_MASK31))).alias("q_lo"),
                 F.sum(F.col("bad").cast("int")).alias("bad"),
                 F.min(F.when(F.col("bad"), F.col("key"))).alias("bad_key"))
            .collect())
    return {r["bucket"]: {"n": r["n"], "positive": r["positive"],
                          "q": (int(r["q_hi"]) << 31) + int(r["q_lo"]),
                          "bad": r["bad"], "bad_key": r["bad_key"]} for r in rows}


def weight_histogram(weighed) -> tuple[list[int], list[int]]:
    """Distinct positive q values and how many examples have each (exact)."""
    rows = weighed.where("q > 0").groupBy("q").count().collect()
    return [int(r["q"]) for r in rows], [int(r["count"]) for r in rows]


def desired_label_mass(weighed) -> dict[int, int]:
    """label id -> exact Σq over the examples carrying it (the label
    distribution a perfect sampler would realise)."""
    from pyspark.sql import functions as F

    rows = (weighed.where("q > 0")
            .select(F.explode("labels").alias("label_id"), "q")
            .groupBy("label_id")
            .agg(F.sum(F.shiftright("q", 31)).alias("hi"),
                 F.sum(F.col("q").bitwiseAND(F.lit(_MASK31))).alias("lo"))
            .collect())
    return {r["label_id"]: (int(r["hi"]) << 31) + int(r["lo"]) for r in rows}


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


DRAWN_SCHEMA = "key string, copies int, weight double, labels array<int>, bucket int, order long"


def _draw_partition(plan: S.SamplingPlan):
    def draw_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        collected = list(batches)
        if not collected:
            return
        table = pa.Table.from_batches(collected)
        bucket = table.column("bucket").to_numpy()
        order = table.column("order").to_numpy()
        q = table.column("q").to_numpy()
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
                 part.column("w").combine_chunks(), part.column("labels").combine_chunks(),
                 part.column("bucket").combine_chunks(), part.column("order").combine_chunks()],
                names=["key", "copies", "weight", "labels", "bucket", "order"])
    return draw_partition


def draw(weighed, plan: S.SamplingPlan, partitions: int):
    """Group whole buckets into ``partitions`` tasks and draw each bucket."""
    return (weighed.where("q > 0").select("key", "labels", "bucket", "order", "q", "w")
            .repartition(partitions, "bucket")
            .mapInArrow(_draw_partition(plan), DRAWN_SCHEMA))


# -- statistics ---------------------------------------------------------------------

def drawn_totals(drawn) -> tuple[dict[int, int], dict[int, int], int, int]:
    """From the drawn rows: realised copies per label, the histogram of
    copies per example, total copies and unique examples (one aggregation)."""
    from pyspark.sql import functions as F

    rows = (drawn.groupingSets([["labels"], ["copies"]], "labels", "copies")
            .agg(F.grouping_id().alias("gid"), F.count(F.lit(1)).alias("n"),
                 F.sum("copies").alias("copies_sum"))
            .collect())
    per_label: dict[int, int] = {}
    histogram: dict[int, int] = {}
    total = unique = 0
    for r in rows:
        if r["gid"] == 1:  # by labels
            for label in r["labels"] or ():
                per_label[label] = per_label.get(label, 0) + int(r["copies_sum"])
        else:
            histogram[int(r["copies"])] = int(r["n"])
            total += int(r["copies_sum"])
            unique += int(r["n"])
    return per_label, dict(sorted(histogram.items())), total, unique


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


def _bad_label_error(spark, job: ResampleJob, totals: dict) -> SchemaError:
    from pyspark.sql import functions as F

    bad_keys = [t["bad_key"] for t in totals.values() if t["bad"]]
    key = min(bad_keys)
    n_bad = sum(t["bad"] for t in totals.values())
    row = (spark.read.parquet(job.index).where(F.col("key") == key)
           .select("_metadata.file_path", "labels").first())
    file = row["file_path"] if row else job.index
    labels = row["labels"] if row else None
    table = job.weights if job.scheme != "subset" else job.labels
    return SchemaError(f"labels {labels} include a label that is not in {table} or is empty "
                       f"({n_bad} example(s) affected)", file=file, key=key)


def run(spark, job: ResampleJob) -> dict[str, Any]:
    """Run the job with ``spark``; return the stats written to stats.json."""
    t0 = time.time()
    if _complete(job.output) and not job.overwrite:
        print(f"resample: {job.output} is complete (_SUCCESS); nothing to do "
              "(--overwrite to redo)", file=sys.stderr)
        return json.loads(sio.read_bytes(sio.join(job.output, "stats.json")))
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
    weighed = weigh(index_df, lw, job.aggregate, job.buckets, job.seed)
    if job.cache:
        weighed = weighed.persist()
    timings: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(now - tick, 3)
        tick = now

    totals = bucket_totals(weighed)
    lap("bucket_totals")
    n_records = sum(t["n"] for t in totals.values())
    if n_records == 0:
        raise SchemaError("source index has no examples" + (" left after --exclude" if job.exclude else ""),
                          file=job.index)
    if any(t["bad"] for t in totals.values()):
        raise _bad_label_error(spark, job, totals)
    positive = sum(t["positive"] for t in totals.values())
    if positive == 0:
        raise ValueError(f"no example of {job.index} has a non-zero weight under scheme {job.scheme!r}")
    bucket_q = {b: t["q"] for b, t in totals.items() if t["q"] > 0}

    elastic = saturation = None
    if job.matcher == "elastic":
        values, counts = weight_histogram(weighed)
        elastic = S.water_fill(values, counts, job.size)
        saturation = bucket_saturation(weighed, elastic.threshold)
        lap("elastic_saturation")
    plan = S.make_plan(job.matcher, job.draw, job.size, job.seed, bucket_q, elastic, saturation)
    partitions = max(1, min(job.buckets, math.ceil(positive / job.rows_per_partition)))

    drawn = draw(weighed, plan, partitions).persist()
    try:
        local = _is_local(job.output)
        final = job.output[len("file://"):] if job.output.startswith("file://") else job.output
        if local:
            parent = os.path.dirname(os.path.abspath(final)) or "."
            os.makedirs(parent, exist_ok=True)
            work = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:12]}")
        else:
            work = job.output
            fs, p = sio.filesystem(work)
            if fs.exists(p):
                fs.rm(p, recursive=True)
        drawn.select("key", "copies", "weight").write.mode("overwrite").parquet(sio.join(work, "selection"))
        lap("draw_and_write")

        realised, histogram, total_copies, unique = drawn_totals(drawn)
        if total_copies != job.size:
            raise ValueError(f"internal error: drew {total_copies} copies, expected {job.size}")
        copies_hist = {str(k): v for k, v in histogram.items()}
        label_stats = label_distributions(desired_label_mass(weighed), realised)
        lap("statistics")
    finally:
        drawn.unpersist()
        if job.cache:
            weighed.unpersist()

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
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(work, final)
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
    spark = get_session("adaptive-transfer resample", args.master, driver_memory=args.driver_memory)
    try:
        stats = run(spark, job)
    except (ValueError, FileNotFoundError) as e:
        print(f"resample: error: {e}", file=sys.stderr)
        return 1
    finally:
        spark.stop()
    print(f"resample: {stats['total_copies']} samples, {stats['unique_examples']} unique examples, "
          f"total variation {stats['total_variation']:.4f} -> {job.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
