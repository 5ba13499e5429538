"""Many targets' selections in one pass against K single-target runs.

::

    .venv/bin/python -m benchmarks.resample_many_bench --records 1M --size 100K --targets 1,2,4 \\
        [--master local[2]] [--work /tmp/resample-many-bench]

On one generated index (``benchmarks.resample_bench.generate_index``) and K
targets' weights (one seed each), in ONE SparkSession: K single-target runs
(``resample.run``, one after another) and one many-target run
(``resample.ManyResampleJob``), each from scratch (no stored label-set
table). Per K: wall seconds, the input bytes of the stages run (Spark's task
metrics; under Spark 4 / Hadoop 3.4 on a local file system they count
far fewer bytes than the column chunks read, so compare them across runs,
not with the index's size), and whether every target's selection is the same file for
file. Prints one JSON line per K; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import urllib.request

from schemas import parse_size
from spark_jobs import resample as R
from spark_jobs.session import get_session

from .resample_bench import generate_index, generate_weights

__all__ = ["main"]


def bytes_read(spark) -> int:
    """The input bytes of every stage run so far (Spark's task metrics,
    from the UI's REST API once its listener has caught up)."""
    url = f"{spark.sparkContext.uiWebUrl}/api/v1/applications/{spark.sparkContext.applicationId}/stages"
    last = -1
    while True:
        time.sleep(2.0)
        total = sum(s.get("inputBytes", 0) for s in json.load(urllib.request.urlopen(url)))
        if total == last:
            return total
        last = total


def timed(spark, work) -> tuple[float, int]:
    """(seconds, bytes read) of ``work()``."""
    before, t0 = bytes_read(spark), time.perf_counter()
    work()
    return time.perf_counter() - t0, bytes_read(spark) - before


def selection_files(output: str) -> dict[str, bytes]:
    folder = os.path.join(output, "selection")
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", default="1M")
    p.add_argument("--size", default="100K")
    p.add_argument("--targets", default="1,2,4")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--work", default="/tmp/resample-many-bench")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    index = os.path.join(args.work, "index")
    generate_index(index, parse_size(args.records))
    ks = [int(k) for k in args.targets.split(",")]
    weights = [os.path.join(args.work, f"w{i}.parquet") for i in range(max(ks))]
    for i, w in enumerate(weights):
        generate_weights(index, w, seed=i + 1)
    spark = get_session("resample-many-bench", args.master, extra={"spark.ui.enabled": "true"})
    warm = R.ResampleJob(index=index, weights=weights[0], size=args.size, output=os.path.join(args.work, "warm"))
    R.run(spark, warm)
    for k in ks:
        root = os.path.join(args.work, f"k{k}")
        jobs = [R.ResampleJob(index=index, weights=weights[i], size=args.size, seed=i, target=f"t{i}",
                              output=os.path.join(root, "many", f"t{i}")) for i in range(k)]
        alone = [R.ResampleJob(**{**job.__dict__, "output": os.path.join(root, "alone", job.target)}) for job in jobs]
        single_s, single_b = timed(spark, lambda: [R.run(spark, job) for job in alone])
        many_s, many_b = timed(spark, lambda: R.run(spark, R.ManyResampleJob(tuple(jobs))))
        same = all(selection_files(a.output) == selection_files(m.output) for a, m in zip(alone, jobs))
        print(json.dumps({"targets": k, "records": args.records, "size": args.size, "master": args.master,
                          "single_seconds": round(single_s, 2), "single_bytes_read": single_b,
                          "many_seconds": round(many_s, 2), "many_bytes_read": many_b,
                          "selections_identical": same}), flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
