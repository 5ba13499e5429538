"""Label counts: the Beam transform against numpy and the naive Beam way.

::

    .venv/bin/python -m benchmarks.label_counts_bench [--records 20M] [--naive-records 2M]

On one generated index (benchmarks.resample_bench.generate_index: ImageNet
keys, 1.25 labels per example, 1,000 labels):

* ``numpy``: one process, pyarrow reads each file's ``labels`` column,
  ``numpy.bincount`` (the floor);
* ``pipeline``: ``CountSourceLabels`` on the DirectRunner (row groups in
  parallel, bincount per row group, exact combine);
* ``naive``: one Beam element per label (``FlatMap`` + ``CombinePerKey``),
  on the first ``--naive-records`` records only (it is ~100x slower), with its
  time scaled to the full index.

Prints seconds, records/s and the ratios to numpy; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq

from beam_pipelines.execution import new_pipeline
from beam_pipelines.label_counts import CountSourceLabels, match_files
from benchmarks.resample_bench import NUM_LABELS, generate_index
from schemas import parse_size


def run_numpy(files: list[str]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    counts = np.zeros(NUM_LABELS, np.int64)
    for f in files:
        labels = pq.read_table(f, columns=["labels"]).column("labels").combine_chunks()
        counts += np.bincount(labels.flatten().to_numpy(), minlength=NUM_LABELS)
    return time.perf_counter() - start, counts


def run_pipeline(files: list[str], options: list[str], out: str) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    with new_pipeline(options) as p:
        (p | beam.Create(files) | CountSourceLabels(np.arange(NUM_LABELS))
           | beam.Map(lambda r: np.save(out, r.counts)))
    return time.perf_counter() - start, np.load(out)


def run_naive(files: list[str], records: int, options: list[str]) -> float:
    def labels_of(path):
        table = pq.read_table(path, columns=["labels"]).slice(0, records // len(files))
        for row in table.column("labels").to_pylist():
            for label in row:
                yield label, 1

    start = time.perf_counter()
    with new_pipeline(options) as p:
        _ = p | beam.Create(files) | beam.FlatMap(labels_of) | beam.CombinePerKey(sum)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="20M")
    ap.add_argument("--naive-records", default="2M")
    ap.add_argument("--work", default="/tmp/resample-bench")
    ap.add_argument("--direct-num-workers", default="2")
    args = ap.parse_args(argv)
    records = parse_size(args.records)
    index = os.path.join(args.work, f"index-{args.records}")
    generate_index(index, records)
    files = match_files(index)
    options = ["--runner", "DirectRunner", "--direct_num_workers", args.direct_num_workers,
               "--direct_running_mode", "multi_processing"]
    t_np, c_np = run_numpy(files)
    print(f"numpy      {t_np:7.1f}s  {records / t_np / 1e6:6.1f}M records/s", flush=True)
    t_pl, c_pl = run_pipeline(files, options, os.path.join(args.work, "label-counts.npy"))
    if not (c_pl == c_np).all():
        raise SystemExit("pipeline counts differ from numpy's")
    print(f"pipeline   {t_pl:7.1f}s  {records / t_pl / 1e6:6.1f}M records/s  ({t_pl / t_np:.2f}x numpy)",
          flush=True)
    naive_records = parse_size(args.naive_records)
    t_nv = run_naive(files, naive_records, options)
    scaled = t_nv * records / naive_records
    print(f"naive      {t_nv:7.1f}s on {naive_records:,} records -> {scaled:.0f}s scaled "
          f"({scaled / t_np:.0f}x numpy, {scaled / t_pl:.0f}x pipeline)", flush=True)
    print(json.dumps({"records": records, "numpy_s": t_np, "pipeline_s": t_pl,
                      "naive_s_scaled": scaled, "pipeline_over_numpy": t_pl / t_np,
                      "naive_over_pipeline": scaled / t_pl}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
