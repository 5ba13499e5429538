"""Target histogram: the Beam pipeline against a plain batched torch loop.

::

    .venv/bin/python -m benchmarks.target_histogram_bench [--images 4000] [--size 64]

Both read the same generated JPEGs from disk, decode and preprocess them with
``trainer.transforms.eval_transform`` (the checkpoint's spec), run the same
generalist in batches of ``--batch-size`` and sum ``softmax(logits / 2)``.
The pipeline runs ``TargetHistogram`` on the DirectRunner, in-process and
with 2 worker processes. Each side runs twice on warm files and keeps its best time. Prints images/s
and time ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import apache_beam as beam
import torch

from beam_pipelines.execution import new_pipeline
from beam_pipelines.target_histogram import TargetHistogram
from beam_pipelines.weights import softmax
from adaptive_transfer.synthetic import SourceSpec, TargetSpec, generate_source, generate_target
from schemas.targets import list_target
from trainer.models import build_model, load_generalist, preprocess_spec, read_generalist, save_generalist
from trainer.transforms import PreprocessSpec


def prepare(work: str, images: int, size: int) -> tuple[str, list[str]]:
    root = os.path.join(work, f"target-{images}-{size}")
    if not os.path.exists(os.path.join(root, "meta", "train.txt")):
        per_class = max(1, images // 8)
        generate_target(root, TargetSpec(layout="food101", num_classes=8, train_per_class=per_class,
                                         test_per_class=1, image_size=size))
    src = os.path.join(work, "bench-source")
    if not os.path.exists(os.path.join(src, "labels.parquet")):
        generate_source(src, SourceSpec(num_examples=500, num_files=1))
    model_path = os.path.join(work, "bench-generalist.pt")
    from schemas import io as sio
    vocab = sio.read_parquet(os.path.join(src, "labels.parquet"))
    torch.manual_seed(0)
    save_generalist(model_path, build_model("small", vocab.num_rows), "small",
                    vocab.column("label_id").to_pylist(), PreprocessSpec(32), vocab)
    return model_path, list_target(root, "food101", "train").paths


def plain_loop(model_path: str, paths: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    model, preprocess = load_generalist(model_path)
    total = None
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([preprocess(open(p, "rb").read()) for p in paths[i:i + batch_size]])
            s = softmax(model(x).numpy(), 2.0).sum(axis=0)
            total = s if total is None else total + s
    return time.perf_counter() - start


def pipeline(model_path: str, paths: list[str], batch_size: int, options: list[str]) -> float:
    spec = preprocess_spec(read_generalist(model_path)).to_dict()
    start = time.perf_counter()
    with new_pipeline(options) as p:
        _ = p | beam.Create(paths) | TargetHistogram(model_path, spec, 2.0, batch_size)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--size", type=int, default=64, help="side of the generated JPEGs, pixels")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--work", default="/tmp/target-bench")
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    model_path, paths = prepare(args.work, args.images, args.size)
    n = len(paths)
    for p in paths:  # page cache: both sides read warm files
        open(p, "rb").read()
    plain_loop(model_path, paths[:256], args.batch_size)  # warm torch
    t_plain = min(plain_loop(model_path, paths, args.batch_size) for _ in range(2))
    print(f"plain torch loop      {t_plain:6.1f}s  {n / t_plain:7.0f} images/s", flush=True)
    results = {"images": n, "plain_s": t_plain}
    for name, opts in (("pipeline in-process", ["--runner", "DirectRunner", "--direct_num_workers", "1"]),
                       ("pipeline 2 processes", ["--runner", "DirectRunner", "--direct_num_workers", "2",
                                                 "--direct_running_mode", "multi_processing"])):
        t = min(pipeline(model_path, paths, args.batch_size, opts) for _ in range(2))
        results[name] = t
        print(f"{name:21} {t:6.1f}s  {n / t:7.0f} images/s  ({t / t_plain:.2f}x the plain loop's time)",
              flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
