"""Resampler throughput against Spark's ``sampleBy`` and single-process numpy.

::

    .venv/bin/python -m benchmarks.resample_bench --records 5M,10M,20M [--size 2M] \\
        [--master local[2]] [--work /tmp/resample-bench] [--only-ours]

For each index size, in ONE SparkSession on the same generated Parquet
index (keys shaped like ImageNet paths, 1.25 labels per example, Zipf class
sizes, 1,000 labels):

* ``sampleBy``: ``DataFrame.sampleBy`` on the first label with per-label
  fractions ``min(1, N·w(y)/Σ)``: approximate, without replacement, the
  built-in a user would reach for; its keys are written to Parquet.
* ``first-run``: this project's job (same/multinomial) as a first run over
  an index: it counts the index's label sets and stores them
  (``--label-sets``, a fresh file each time);
* ``same/multinomial``, ``same/systematic``, ``elastic``: the job as every
  later run over the same index (another target, size, scheme or seed) runs
  it, reading the stored label-set table. Exact N, partition-invariant,
  writing selection, stats and plots.
* ``numpy``: one process, pyarrow + numpy over the same files
  (``example_weights`` then one multinomial draw over all records).

Prints seconds (best of ``--repeat`` runs: this machine is noisy) and the
ratio to ``sampleBy`` for each; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import WEIGHTS_SCHEMA, parse_size
from schemas import io as sio
from spark_jobs import resample as R
from spark_jobs import sampling as S
from spark_jobs.session import get_session

NUM_LABELS = 1000


def generate_index(path: str, records: int, files: int = 8, seed: int = 0) -> None:
    """Keys + labels (+ a uri) for ``records`` examples, written vectorised."""
    if os.path.exists(os.path.join(path, "_DONE")):
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    rng = np.random.default_rng(seed)
    sizes = 1.0 / np.arange(1, NUM_LABELS + 1) ** 1.0
    p = sizes / sizes.sum()
    per_file = np.array_split(np.arange(records), files)
    for f, rows in enumerate(per_file):
        n = len(rows)
        leaf = rng.choice(NUM_LABELS, size=n, p=p).astype(np.int32)
        extra = rng.random(n) < 0.25
        parent = (leaf // 10).astype(np.int32)  # a coarser label in the same id space
        lengths = np.where(extra, 2, 1)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = np.empty(offsets[-1], np.int32)
        values[offsets[:-1]] = leaf
        values[offsets[:-1][extra] + 1] = parent[extra]
        labels = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        wnid = pc.utf8_lpad(pc.cast(pa.array(1440764 + leaf.astype(np.int64) * 7919), pa.string()), 8, "0")
        serial = pc.cast(pa.array(rows.astype(np.int64) + 10000), pa.string())
        key = pc.binary_join_element_wise("n", wnid, "/n", wnid, "_", serial, ".JPEG", "")
        uri = pc.binary_join_element_wise("gs://bucket/train/", key, "")
        pq.write_table(pa.table({"key": key, "labels": labels, "uri": uri}),
                       os.path.join(path, f"part-{f:05d}.parquet"), row_group_size=1 << 20)
    open(os.path.join(path, "_DONE"), "w").close()


def generate_weights(index: str, path: str, seed: int = 1) -> None:
    counts = np.zeros(NUM_LABELS, np.int64)
    n = 0
    for f in sio.expand_paths(index):
        t = pq.read_table(f, columns=["labels"])
        counts += np.bincount(t.column("labels").combine_chunks().flatten().to_numpy(), minlength=NUM_LABELS)
        n += t.num_rows
    p_t = np.random.default_rng(seed).dirichlet(np.full(NUM_LABELS, 0.3))
    p_s = counts / n
    w = np.where(counts > 0, p_t / np.maximum(p_s, 1e-300), 0.0)
    pq.write_table(pa.table({"label_id": pa.array(np.arange(NUM_LABELS), pa.int32()),
                             "count": counts, "p_source": p_s, "p_target": p_t, "weight": w},
                            schema=WEIGHTS_SCHEMA), path)


def run_sample_by(spark, index: str, weights: str, size: int, out: str) -> float:
    from pyspark.sql import functions as F

    t = pq.read_table(weights)
    ids = t.column("label_id").to_numpy()
    w = t.column("weight").to_numpy()
    counts = t.column("count").to_numpy()
    mass = w * counts
    fractions = {int(i): float(min(1.0, size * wi / mass.sum())) for i, wi in zip(ids, w)}
    start = time.perf_counter()
    df = spark.read.parquet(index).withColumn("label0", F.col("labels")[0])
    df.sampleBy("label0", fractions, seed=0).select("key").write.mode("overwrite").parquet(out)
    return time.perf_counter() - start


def run_numpy(index: str, weights: str, size: int) -> float:
    start = time.perf_counter()
    t = pq.read_table(weights)
    lw = S.quantize_label_weights(t.column("label_id").to_numpy(), t.column("weight").to_numpy())
    keys, qs = [], []
    for f in sio.expand_paths(index):
        part = pq.read_table(f, columns=["key", "labels"])
        labels = part.column("labels").combine_chunks()
        offsets = labels.offsets.to_numpy()
        _, q, _ = S.example_weights(offsets - offsets[0], labels.values.to_numpy(), lw)
        keys.append(part.column("key"))
        qs.append(q)
    q = np.concatenate(qs)
    p = q.astype(np.float64)
    copies = np.random.default_rng(0).multinomial(size, p / p.sum())
    chosen = np.flatnonzero(copies)
    keys_all = pa.chunked_array([c for k in keys for c in k.chunks])
    pq.write_table(pa.table({"key": keys_all.take(pa.array(chosen)), "copies": copies[chosen].astype(np.int32)}),
                   "/tmp/resample-bench-numpy.parquet")
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="5M,10M,20M")
    ap.add_argument("--size", default="2M", help="samples to draw (default 2M, the paper's ImageNet size)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--work", default="/tmp/resample-bench")
    ap.add_argument("--only-ours", action="store_true", help="skip the baselines (e.g. for 100M)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    ap.add_argument("--matchers", default="same/multinomial,same/systematic,elastic")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    spark = get_session("resample-bench", args.master)
    # Warm the JVM (JIT, class loading) on a small index so that the first
    # measured run is not charged for it.
    warm = os.path.join(args.work, "index-warmup")
    generate_index(warm, 200_000)
    generate_weights(warm, warm + "-weights.parquet")
    run_sample_by(spark, warm, warm + "-weights.parquet", 50_000, os.path.join(args.work, "warm-out"))
    R.run(spark, R.ResampleJob(index=warm, weights=warm + "-weights.parquet", size=50_000,
                               output=os.path.join(args.work, "warm-ours"), overwrite=True))
    results = []
    for rec_text in args.records.split(","):
        records = parse_size(rec_text)
        index = os.path.join(args.work, f"index-{rec_text}")
        t0 = time.perf_counter()
        generate_index(index, records)
        weights = os.path.join(args.work, f"weights-{rec_text}.parquet")
        generate_weights(index, weights)
        print(f"[{rec_text}] data ready in {time.perf_counter() - t0:.1f}s", flush=True)
        row = {"records": records, "size": size}
        if not args.only_ours:
            row["sampleBy"] = min(run_sample_by(spark, index, weights, size, os.path.join(args.work, "sampleby-out"))
                                  for _ in range(args.repeat))
            print(f"[{rec_text}] sampleBy {row['sampleBy']:.1f}s", flush=True)
            row["numpy"] = min(run_numpy(index, weights, size) for _ in range(args.repeat))
            print(f"[{rec_text}] numpy {row['numpy']:.1f}s", flush=True)
        label_sets = os.path.join(args.work, f"label-sets-{rec_text}.parquet")
        for spec in ["first-run"] + args.matchers.split(","):
            matcher, _, draw = ("same/multinomial" if spec == "first-run" else spec).partition("/")
            job = R.ResampleJob(index=index, weights=weights, size=size, matcher=matcher,
                                draw=draw or "multinomial", overwrite=True, label_sets=label_sets,
                                output=os.path.join(args.work, f"out-{spec.replace('/', '-')}"))
            row[spec] = float("inf")
            for _ in range(args.repeat):
                if spec == "first-run" and os.path.exists(label_sets):
                    os.remove(label_sets)
                start = time.perf_counter()
                stats = R.run(spark, job)
                row[spec] = min(row[spec], time.perf_counter() - start)
                if stats["job"]["label_sets_counted"] != (spec == "first-run"):
                    raise RuntimeError(f"{spec}: the label-set table was not used as intended")
            print(f"[{rec_text}] {spec} {row[spec]:.1f}s {stats['timings']} (unique {stats['unique_examples']}, "
                  f"tv {stats['total_variation']:.4f})", flush=True)
        results.append(row)
    spark.stop()
    print("\nrecords  " + "  ".join(f"{k:>18}" for k in results[0] if k not in ("records", "size")))
    for row in results:
        cells = []
        for k, v in row.items():
            if k in ("records", "size"):
                continue
            ratio = f" ({v / row['sampleBy']:.2f}x)" if "sampleBy" in row and k != "sampleBy" else ""
            cells.append(f"{v:>9.1f}s{ratio:>9}")
        print(f"{row['records']:>9,}  " + "  ".join(cells))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
