"""Shards of K targets in one fetch pass against K single-target runs.

::

    python -m benchmarks.many_targets [--ks 1,2,4,8] [--examples 40000] [--share 0.25] [--master local[2]]

One generated index (small distinct JPEGs inline, ``--files`` Parquet files
of 1,024-row row groups) and eight targets' selections over it, each a
random ``--share`` of the examples with 1 to 3 copies (like a resampler's:
every target reads most row groups). First each target's single-target
``write_shards`` run (timed, in this process), then per K the
``write_shards.many`` run of the first K targets. Per K it prints: the
index bytes read (``extra.index_read`` of the manifests: compressed image
column chunks of the row groups read) by the one pass and by the K single
runs; wall time of the pass against the sum of the K single runs'; peak
resident memory of the driver's Python process (sampled every 20 ms) and
of the fetch and writer tasks (max, from the manifests); and whether every
target's shards are byte-identical to its single-target run's.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.shards_scale import jpeg_pool
from schemas import io as sio

TARGETS = 8


def make_inputs(work: str, examples: int, files: int, share: float, seed: int = 0) -> tuple[str, list]:
    """The index and ``TARGETS`` selections (bare Parquet directories)."""
    rng = np.random.default_rng(seed)
    pool = jpeg_pool(rng, 512, 40)
    index = os.path.join(work, "index")
    shutil.rmtree(index, ignore_errors=True)
    os.makedirs(index)
    keys = np.array([f"ex/{i:08d}.jpg" for i in range(examples)])
    labels = np.minimum(rng.zipf(1.5, examples), 50) - 1
    for f, part in enumerate(np.array_split(np.arange(examples), files)):
        pq.write_table(pa.table({"key": keys[part], "labels": pa.array([[int(x)] for x in labels[part]],
                                                                        pa.list_(pa.int32())),
                                 "image": pa.array([pool[i % len(pool)] for i in part.tolist()], pa.binary())}),
                       os.path.join(index, f"part-{f:05d}.parquet"), row_group_size=1024)
    selections = []
    for t in range(TARGETS):
        chosen = np.flatnonzero(rng.random(examples) < share)
        path = os.path.join(work, f"selection-{t}")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        pq.write_table(pa.table({"key": keys[chosen], "copies": pa.array(rng.integers(1, 4, chosen.size), pa.int32()),
                                 "weight": np.ones(chosen.size)}), os.path.join(path, "part-0.parquet"))
        selections.append(path)
    return index, selections


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled)."""

    def __enter__(self):
        import psutil

        self.peak, self._stop, proc = 0, threading.Event(), psutil.Process()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _tars(out: str) -> dict:
    return {f: sio.file_sha256(os.path.join(out, f)) for f in sorted(os.listdir(out)) if f.endswith(".tar")}


def _task_rss(manifests) -> tuple[int, int]:
    return (max(m.extra["tasks"]["fetch_peak_rss_max"] for m in manifests),
            max(m.extra["tasks"]["writer_peak_rss_max"] for m in manifests))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--examples", type=int, default=40000)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--share", type=float, default=0.25, help="share of the examples each target selects")
    ap.add_argument("--samples-per-shard", type=int, default=2000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--work", default="/tmp/many-targets")
    args = ap.parse_args(argv)
    from spark_jobs import write_shards as W
    from spark_jobs.session import get_session
    from spark_jobs.write_shards import many as M

    ks = [int(k) for k in args.ks.split(",")]
    os.makedirs(args.work, exist_ok=True)
    index, selections = make_inputs(args.work, args.examples, args.files, args.share)
    print(f"index: {sum(os.path.getsize(os.path.join(index, f)) for f in os.listdir(index)) / 1e6:.0f} MB, "
          f"{args.examples} examples in {args.files} files", flush=True)
    spark = get_session("many-targets", args.master, extra={"spark.ui.enabled": "false"})
    common = dict(index=index, samples_per_shard=args.samples_per_shard)
    # Warm the JVM once (untimed), then each target alone.
    W.run(spark, W.ShardJob(selection=selections[0], output=os.path.join(args.work, "warm"), overwrite=True, **common))
    single = []
    for t in range(max(ks)):
        out = os.path.join(args.work, "single", f"t{t}")
        shutil.rmtree(out, ignore_errors=True)
        with PeakRss() as rss:
            start = time.perf_counter()
            m = W.run(spark, W.ShardJob(selection=selections[t], output=out, **common))
            wall = time.perf_counter() - start
        single.append({"wall": wall, "read": m.extra["index_read"]["bytes"], "tars": _tars(out), "manifest": m,
                       "driver_rss": rss.peak, "output": sum(s.bytes for s in m.shards)})
        print(f"single t{t}: {wall:.1f} s, {m.total_samples} samples, read {single[-1]['read'] / 1e6:.0f} MB",
              flush=True)
    rows = []
    for k in ks:
        out = os.path.join(args.work, f"many-k{k}")
        shutil.rmtree(out, ignore_errors=True)
        with PeakRss() as rss:
            start = time.perf_counter()
            ms = M.run(spark, M.ManyShardJob(targets=[(f"t{t}", selections[t]) for t in range(k)], output=out,
                                             **common))
            wall = time.perf_counter() - start
        identical = all(_tars(os.path.join(out, f"t{t}")) == single[t]["tars"] for t in range(k))
        fetch_rss, writer_rss = _task_rss(ms.values())
        s_fetch, s_writer = _task_rss([single[t]["manifest"] for t in range(k)])
        row = {"k": k, "wall": wall, "singles_wall": sum(single[t]["wall"] for t in range(k)),
               "one_wall": single[0]["wall"], "read": ms["t0"].extra["index_read"]["bytes"],
               "singles_read": sum(single[t]["read"] for t in range(k)), "driver_rss": rss.peak,
               "singles_driver_rss": max(single[t]["driver_rss"] for t in range(k)), "fetch_rss": fetch_rss,
               "writer_rss": writer_rss, "singles_fetch_rss": s_fetch, "singles_writer_rss": s_writer,
               "identical": identical, "output": sum(single[t]["output"] for t in range(k)),
               "timings": {n: m.extra["timings"] for n, m in ms.items()}}
        rows.append(row)
        print({x: y for x, y in row.items() if x != "timings"}, flush=True)
    spark.stop()
    print()
    print("| K | output (MB) | index read, one pass (MB) | index read, K single runs (MB) | wall, one pass (s) "
          "| wall, K single runs (s) | pass / one target's run | driver Python peak RSS, pass / single (MB) "
          "| fetch task peak RSS, pass / single (MB) | writer peak RSS, pass / single (MB) | byte-identical |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['k']} | {r['output'] / 1e6:.0f} | {r['read'] / 1e6:.0f} | {r['singles_read'] / 1e6:.0f} "
              f"| {r['wall']:.1f} | {r['singles_wall']:.1f} | {r['wall'] / r['one_wall']:.2f}x "
              f"| {r['driver_rss'] / 2**20:.0f} / {r['singles_driver_rss'] / 2**20:.0f} "
              f"| {r['fetch_rss'] / 2**20:.0f} / {r['singles_fetch_rss'] / 2**20:.0f} "
              f"| {r['writer_rss'] / 2**20:.0f} / {r['singles_writer_rss'] / 2**20:.0f} | {r['identical']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
