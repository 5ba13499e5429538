"""Shard writing throughput against webdataset.TarWriter and a raw copy.

::

    .venv/bin/python -m benchmarks.shards_bench [--images 30000] [--repeat 3] [--rounds 2] [--master local[2]]

On one generated index of ~25 KB JPEGs (inline bytes), every example
selected once:

* ``raw copy``: one process reads the image column and writes the bytes
  back to back to one file (the I/O floor);
* ``TarWriter``: one process reads the index and writes the same samples
  (image + json) with ``webdataset.TarWriter`` into shards of the same size;
* ``write_shards``: this project's Spark job (fetch, write, manifest) on
  ``--master``.

Runs them in ``--rounds`` rounds of ``--repeat`` runs of each (dirty pages
flushed before each run), after ``--warmup`` untimed write_shards runs (the
steady state of a long-lived JVM; ``--warmup 1`` measures one that has run
the job once), and prints MB/s of image payload for each (best run) and
write_shards' throughput per core used against TarWriter's (goal: >= 0.8x).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from spark_jobs import write_shards as W
from spark_jobs.session import get_session
from schemas.shard_format import sample_json, sample_key


def make_index(path: str, images: int, seed: int = 0) -> int:
    """Noise JPEGs of ~25 KB (quality 90, 160x160 px) written inline; returns bytes."""
    done = os.path.join(path, "_DONE")
    if os.path.exists(done):
        return int(open(done).read())
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    rng = np.random.default_rng(seed)
    total = 0
    per_file = 1000
    for f in range(0, images, per_file):
        keys, data = [], []
        for i in range(f, min(images, f + per_file)):
            px = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(px).save(buf, format="JPEG", quality=90)
            keys.append(f"n{i % 100:08d}/n{i % 100:08d}_{i}.JPEG")
            data.append(buf.getvalue())
            total += len(data[-1])
        pq.write_table(pa.table({"key": keys, "labels": pa.array([[i % 100] for i in range(f, f + len(keys))],
                                                                  pa.list_(pa.int32())),
                                 "image": pa.array(data, pa.binary())}),
                       os.path.join(path, f"part-{f // per_file:05d}.parquet"), row_group_size=256)
    open(done, "w").write(str(total))
    return total


def settled() -> None:
    """Flush dirty pages before a timed run, so that no run pays for the
    write-back of an earlier one's output (2 cores: the kernel's flusher
    threads compete with the job)."""
    os.sync()
    time.sleep(0.5)


def raw_copy(index: str, out: str) -> float:
    settled()
    start = time.perf_counter()
    with open(out, "wb") as fh:
        for f in sorted(os.listdir(index)):
            if f.endswith(".parquet"):
                for b in pq.read_table(os.path.join(index, f), columns=["image"]).column("image").to_pylist():
                    fh.write(b)
    return time.perf_counter() - start


def tar_writer(index: str, out: str, per_shard: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    settled()
    start = time.perf_counter()
    with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for f in sorted(os.listdir(index)):
            if not f.endswith(".parquet"):
                continue
            t = pq.read_table(os.path.join(index, f)).to_pydict()
            for key, labels, image in zip(t["key"], t["labels"], t["image"]):
                sink.write({"__key__": sample_key(key, 0), "jpg": image, "json": sample_json(key, 0, labels, 1.0)})
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=30000)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--work", default="/tmp/shards-bench")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each per round; the best is reported")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline-rev", help="also run write_shards as of this git revision (e.g. aaf56fa, "
                    "before issue 16), side by side, warmed up the same")
    ap.add_argument("--warmup", type=int, default=15,
                    help="untimed write_shards runs first: the JVM's JIT compilers spend 1 to 1.7 CPU-s per "
                         "707 MB run for the first few runs, 0.3 to 0.7 s after about 15")
    args = ap.parse_args(argv)
    index = os.path.join(args.work, f"index-{args.images}")
    payload = make_index(index, args.images)
    mb = payload / 1e6
    print(f"index: {args.images} images, {mb:.0f} MB, {payload / args.images / 1e3:.1f} KB each", flush=True)
    keys = pa.concat_tables([pq.read_table(os.path.join(index, f), columns=["key"])
                             for f in sorted(os.listdir(index)) if f.endswith(".parquet")]).column("key")
    selection = os.path.join(args.work, f"selection-{args.images}.parquet")
    pq.write_table(pa.table({"key": keys, "copies": pa.array(np.ones(len(keys), np.int32)),
                             "weight": np.ones(len(keys))}), selection)
    spark = get_session("shards-bench", args.master)
    cores = spark.sparkContext.defaultParallelism
    out = os.path.join(args.work, "ours")
    contenders = {"write_shards": W}
    if args.baseline_rev:
        from benchmarks.shards_scale import load_revision
        contenders[f"write_shards@{args.baseline_rev}"] = load_revision(args.baseline_rev, args.work)
    for _ in range(args.warmup):
        for module in contenders.values():
            module.run(spark, module.ShardJob(selection=selection, index=index, output=out + "-warm",
                                              samples_per_shard=args.samples_per_shard, overwrite=True))
    shutil.rmtree(out + "-warm", ignore_errors=True)
    # Side by side: each round runs every contender --repeat times back to
    # back (each in its steady state: the Spark job's JVM and Python workers
    # warm, like a single process's), and the rounds alternate, so that a slow
    # spell of this shared machine does not fall on one contender only.
    raws, tars = [], []
    times = {name: [] for name in contenders}
    manifests = {}
    for r in range(args.rounds):
        raws += [raw_copy(index, os.path.join(args.work, "raw.bin")) for _ in range(args.repeat)]
        tars += [tar_writer(index, os.path.join(args.work, "tarwriter"), args.samples_per_shard)
                 for _ in range(args.repeat)]
        order = list(contenders.items())
        for name, module in (order if r % 2 == 0 else order[::-1]):  # each design first in every other round
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)  # as tar_writer does: the last output goes untimed
                settled()
                start = time.perf_counter()
                m = module.run(spark, module.ShardJob(selection=selection, index=index, output=out,
                                                      samples_per_shard=args.samples_per_shard, overwrite=True))
                times[name].append(time.perf_counter() - start)
                if times[name][-1] == min(times[name]):
                    manifests[name] = m
        seconds = {name: " ".join(f"{t:.2f}" for t in ts[-args.repeat:])
                   for name, ts in (("raw", raws), ("TarWriter", tars), *times.items())}
        print(f"round {r + 1} (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items()), flush=True)
    t_raw, t_tar = min(raws), min(tars)
    spark.stop()
    print(f"raw copy      {t_raw:6.2f}s  {mb / t_raw:7.1f} MB/s")
    print(f"TarWriter     {t_tar:6.2f}s  {mb / t_tar:7.1f} MB/s (1 process)")
    result = {"images": args.images, "mb": mb, "raw_s": t_raw, "tarwriter_s": t_tar, "cores": cores}
    for name, ts in times.items():
        per_core = (mb / min(ts) / cores) / (mb / t_tar)
        print(f"{name}  {min(ts):6.2f}s  {mb / min(ts):7.1f} MB/s ({cores} cores; per core "
              f"{per_core:.2f}x TarWriter)")
        print(f"{name} stages (s):", manifests[name].extra.get("timings"), "spill:",
              manifests[name].extra.get("spill"), f"warm-up runs: {args.warmup}")
        result[f"{name}_s"] = min(ts)
        result[f"{name}_per_core_vs_tarwriter"] = per_core
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
