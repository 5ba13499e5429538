"""Scale model of ``write_shards``: the work per writer fixed, the total x1, x4, x16.

::

    python -m benchmarks.shards_scale [--scales 1,4,16] [--designs new,old] [--baseline-rev REV]

Small images (~2 KB) and scaled-down constants so that the task and file
counts reach the real job's ratios: at scale k, ``64 k`` fetch tasks (one
index file each) and ``13 k`` writers of one shard of ``--samples-per-shard``
copies (at x16: 1,024 fetch tasks, 208 writers). Per scale and design it
prints bytes read per writer / bytes it wrote (max over writers), reads per
writer (mean, max), peak RSS per task (max over fetch tasks and over
writers), spill bytes / output bytes, wall time. The goal: each figure flat
from x1 to x16.

``old`` is today's design before issue 16 (runs sorted in memory, cut into
``RUN_BATCHES`` batches, read by every writer from every run), loaded from
git revision ``--baseline-rev`` and instrumented here (its reads counted
where its writers read run batches; its tasks' memory where they start and
end). ``new`` reports its own figures in the manifest (``extra.tasks``).
Both must write the same bytes: the benchmark checks the shards' digests.

Mixing (``new``): the mean total variation distance between each shard's
label distribution and the selection's, next to the same for a uniformly
random placement of the same copies (numpy), and how far apart an example's
copies land (shards apart, as a fraction of the shards; 1/3 for a uniform
placement) and how often two copies share a shard.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FETCH_PER_SCALE = 64
WRITERS_PER_SCALE = 13
LABELS = 50


def jpeg_pool(rng: np.random.Generator, count: int, side: int) -> list[bytes]:
    """``count`` distinct small JPEGs of random ``side`` x ``side`` RGB pixels
    (quality 90), for a benchmark index to reuse across its keys."""
    from PIL import Image

    pool = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    return pool


def make_inputs(work: str, scale: int, samples_per_shard: int, seed: int = 0) -> tuple[str, str, int]:
    """An index of ``64 * scale`` files and a selection of ``13 * scale *
    samples_per_shard`` copies (1 or 2 per example, labels Zipf-like over 50)."""
    rng = np.random.default_rng(seed)
    pool = jpeg_pool(rng, 256, 28)
    files = FETCH_PER_SCALE * scale
    copies_total = WRITERS_PER_SCALE * scale * samples_per_shard
    copies = np.where(np.arange(copies_total) % 3 == 0, 2, 1)
    copies = copies[np.cumsum(copies) <= copies_total]
    if copies.sum() < copies_total:
        copies = np.append(copies, copies_total - copies.sum())
    n = copies.size
    labels = np.minimum(rng.zipf(1.5, n), LABELS) - 1
    index = os.path.join(work, f"index-x{scale}")
    shutil.rmtree(index, ignore_errors=True)
    os.makedirs(index)
    keys = np.array([f"ex/{i:08d}.jpg" for i in range(n)])
    for f, part in enumerate(np.array_split(np.arange(n), files)):
        pq.write_table(pa.table({"key": keys[part], "labels": pa.array([[int(x)] for x in labels[part]],
                                                                        pa.list_(pa.int32())),
                                 "image": pa.array([pool[i % len(pool)] for i in part.tolist()], pa.binary())}),
                       os.path.join(index, f"part-{f:05d}.parquet"))
    selection = os.path.join(work, f"selection-x{scale}.parquet")
    pq.write_table(pa.table({"key": keys, "copies": pa.array(copies, pa.int32()), "weight": np.ones(n)}),
                   selection)
    return index, selection, int(np.mean([len(p) for p in pool]))


def load_revision(rev: str, work: str):
    """``spark_jobs.write_shards`` as of git revision ``rev`` (then one
    module), importable by this process and shipped by value to Spark's
    Python workers."""
    from pyspark import cloudpickle

    source = subprocess.run(["git", "show", f"{rev}:spark_jobs/write_shards.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(work, f"write_shards_{rev}.py")
    os.makedirs(work, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(source)
    name = f"spark_jobs._write_shards_{rev}"
    spec = importlib.util.spec_from_file_location(name, path)
    old = importlib.util.module_from_spec(spec)
    old.__package__ = "spark_jobs"
    sys.modules[name] = old
    spec.loader.exec_module(old)
    cloudpickle.register_pickle_by_value(old)  # the executors' Python workers cannot import it
    return old


def load_old(rev: str, stats_dir: str):
    """:func:`load_revision` with its writers' run reads and its tasks' peak
    memory recorded in ``stats_dir`` (a JSON line per event)."""
    old = load_revision(rev, os.path.dirname(stats_dir))
    read_runs, spill_partition = old._read_runs, old._spill_partition

    def record(kind: str, **fields):
        from spark_jobs.write_shards.spill import peak_rss
        with open(os.path.join(stats_dir, f"{kind}-{os.getpid()}.jsonl"), "a") as fh:
            fh.write(json.dumps({"kind": kind, "rss": peak_rss(), **fields}) + "\n")

    def counted_read_runs(paths, first, last, bucket_bits):
        from spark_jobs.write_shards.spill import reset_peak_rss
        reset_peak_rss()
        reads = nbytes = 0
        for p in paths:  # the batches the original reads: those that meet buckets first..last
            with pa.memory_map(p) as source:
                reader = pa.ipc.open_file(source)
                starts = json.loads(reader.schema.metadata[b"first_buckets"])
                ends = starts[1:] + [1 << bucket_bits]
                for i, (a, b) in enumerate(zip(starts, ends)):
                    if a <= last and b > first:
                        reads += 1
                        nbytes += reader.get_batch(i).nbytes
        table, images = read_runs(paths, first, last, bucket_bits)
        record("write", reads=reads, bytes_read=nbytes, images=int(sum(len(v) for v in images)))
        return table, images

    def counted_spill_partition(*args, **kwargs):
        spill = spill_partition(*args, **kwargs)

        def run(batches):
            from spark_jobs.write_shards.spill import reset_peak_rss
            reset_peak_rss()
            yield from spill(batches)
            record("fetch")
        return run

    old._read_runs = counted_read_runs
    old._spill_partition = counted_spill_partition
    return old


def shard_facts(out: str, manifest: dict) -> tuple[list, dict]:
    """Per shard: its labels (a list per sample) and (key -> shard list)."""
    labels, where = [], {}
    for s, info in enumerate(manifest["shards"]):
        mine = []
        with tarfile.open(os.path.join(out, info["name"])) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    mine.append(meta["labels"][0])
                    where.setdefault(meta["key"], []).append(s)
        labels.append(mine)
    return labels, where


def mixing(labels: list, where: dict, seed: int = 0) -> dict:
    """Mean total variation between each shard's label distribution and
    the whole's, ours and a uniform random placement's; copies' spread."""
    flat = np.concatenate([np.asarray(x) for x in labels])
    whole = np.bincount(flat, minlength=LABELS) / flat.size

    def mean_tv(groups):
        return float(np.mean([0.5 * np.abs(np.bincount(g, minlength=LABELS) / len(g) - whole).sum()
                              for g in groups if len(g)]))

    sizes = [len(x) for x in labels]
    perm = np.random.default_rng(seed).permutation(flat)
    uniform = np.split(perm, np.cumsum(sizes)[:-1])
    shards = len(labels)
    pairs = [(a[0], a[1]) for a in where.values() if len(a) >= 2]
    gaps = np.array([abs(a - b) for a, b in pairs], float)
    return {"tv_mean": round(mean_tv(labels), 4), "tv_uniform": round(mean_tv(uniform), 4),
            "copies_same_shard": round(float(np.mean(gaps == 0)), 4) if len(gaps) else None,
            "copies_same_shard_uniform": round(1 / shards, 4),
            "copy_gap_over_shards": round(float(gaps.mean() / shards), 3) if len(gaps) else None}


def run_one(spark, design: str, module, index: str, selection: str, out: str, scale: int, samples_per_shard: int,
            image_bytes: int, stats_dir: str) -> dict:
    fetch_tasks = FETCH_PER_SCALE * scale
    writer_bytes = int(samples_per_shard * image_bytes * 1.2)  # one shard per writer
    shutil.rmtree(out, ignore_errors=True)
    for f in os.listdir(stats_dir):
        os.remove(os.path.join(stats_dir, f))
    start = time.perf_counter()
    if design == "old":
        module.FETCH_TASKS_PER_CORE = fetch_tasks // spark.sparkContext.defaultParallelism
        m = module.run(spark, module.ShardJob(selection=selection, index=index, output=out,
                                              samples_per_shard=samples_per_shard, writer_bytes=writer_bytes,
                                              run_bytes=1 << 20))
    else:
        m = module.run(spark, module.ShardJob(selection=selection, index=index, output=out,
                                              samples_per_shard=samples_per_shard, writer_bytes=writer_bytes,
                                              fetch_tasks=fetch_tasks))
    wall = time.perf_counter() - start
    output = sum(s.bytes for s in m.shards)
    per_writer_written = output / len(m.shards)  # one shard per writer
    if design == "old":
        events = [json.loads(line) for f in os.listdir(stats_dir) for line in open(os.path.join(stats_dir, f))]
        writes = [e for e in events if e["kind"] == "write"]
        fetches = [e for e in events if e["kind"] == "fetch"]
        row = {"fetch_tasks": len(fetches), "writers": len(writes),
               "read_per_written": max(e["bytes_read"] for e in writes) / per_writer_written,
               "reads_mean": float(np.mean([e["reads"] for e in writes])),
               "reads_max": max(e["reads"] for e in writes),
               "fetch_rss": max(e["rss"] for e in fetches), "writer_rss": max(e["rss"] for e in writes),
               "spill_per_output": m.extra["spill"]["run_bytes"] / output}
    else:
        t = m.extra["tasks"]
        row = {"fetch_tasks": t["fetch"], "writers": t["writers"],
               "read_per_written": t["writer_read_per_written_max"], "reads_mean": t["writer_reads_mean"],
               "reads_max": t["writer_reads_max"], "fetch_rss": t["fetch_peak_rss_max"],
               "writer_rss": t["writer_peak_rss_max"], "spill_per_output": m.extra["spill"]["image_bytes"] / output}
    row.update({"design": design, "scale": scale, "shards": len(m.shards), "samples": m.total_samples,
                "output_mb": output / 1e6, "wall_s": wall,
                "digests": {s.name: s.sha256 for s in m.shards}})
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--designs", default="new,old")
    ap.add_argument("--baseline-rev", default="aaf56fa", help="git revision of today's (old) design")
    ap.add_argument("--samples-per-shard", type=int, default=50)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--work", default="/tmp/shards-scale")
    args = ap.parse_args(argv)
    from spark_jobs import write_shards as new
    from spark_jobs.session import get_session

    os.makedirs(os.path.join(args.work, "stats"), exist_ok=True)
    stats_dir = os.path.join(args.work, "stats")
    designs = args.designs.split(",")
    modules = {"new": new, "old": load_old(args.baseline_rev, stats_dir) if "old" in designs else None}
    spark = get_session("shards-scale", args.master, extra={"spark.ui.enabled": "false"})
    rows = []
    for scale in [int(x) for x in args.scales.split(",")]:
        index, selection, image_bytes = make_inputs(args.work, scale, args.samples_per_shard)
        for design in designs:
            out = os.path.join(args.work, f"out-{design}-x{scale}")
            row = run_one(spark, design, modules[design], index, selection, out, scale, args.samples_per_shard,
                          image_bytes, stats_dir)
            if design == "new":
                manifest = json.load(open(os.path.join(out, "manifest.json")))
                row["mixing"] = mixing(*shard_facts(out, manifest))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "digests"}), flush=True)
        by = {r["design"]: r["digests"] for r in rows if r["scale"] == scale}
        if len(by) == 2:
            print(f"x{scale}: old and new shards byte-identical: {by['old'] == by['new']}", flush=True)
    spark.stop()
    print()
    print("| design | scale | fetch tasks | writers | read/written per writer (max) | reads per writer (mean / max) "
          "| peak RSS fetch task (MB) | peak RSS writer (MB) | spill/output | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["design"], r["scale"])):
        print(f"| {r['design']} | x{r['scale']} | {r['fetch_tasks']} | {r['writers']} | {r['read_per_written']:.2f} "
              f"| {r['reads_mean']:.0f} / {r['reads_max']} | {r['fetch_rss'] / 2**20:.0f} "
              f"| {r['writer_rss'] / 2**20:.0f} | {r['spill_per_output']:.2f} | {r['wall_s']:.1f} |")
    print()
    for r in rows:
        if "mixing" in r:
            print(f"mixing x{r['scale']} ({r['shards']} shards of {args.samples_per_shard}): {r['mixing']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
