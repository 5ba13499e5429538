"""Trainer throughput: the shard loader against a plain PIL loop, and
training steps/s of the small model on CPU.

::

    .venv/bin/python -m benchmarks.trainer_bench [--samples 8000] [--workers 1,2]

* ``plain PIL loop``: one process reads the same tar shards with ``tarfile``,
  decodes each JPEG with PIL and applies the same train transform;
* ``ShardStream``: the trainer's loader (WebDataset tar iterators, shuffle
  buffer, decode, augmentation) through a DataLoader with N workers,
  reported per worker;
* ``train steps/s``: ``trainer.pretrain`` (its job, in this process:
  DeepSpeed, gloo) on the small model, batch 64, from its ``metrics.jsonl``
  (the second half of the steps).

Prints images/s and ratios; asserts nothing. At real image sizes (and
other decoders, ``write_shards --max-side``) see ``benchmarks/loader_bench.py``;
for ResNet-50 on a GPU ``benchmarks/gpu_resnet50.py`` and
``benchmarks/gpu_pretrain_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from schemas import io as sio
from adaptive_transfer.synthetic import SourceSpec, generate_source
from spark_jobs.session import get_session
from spark_jobs import write_shards as W
from trainer import pretrain
from trainer.data import LoaderConfig, LoaderState, ShardStream, collate, shard_urls
from trainer.transforms import PreprocessSpec, decode_image, train_transform


def make_shards(work: str, samples: int) -> tuple[str, str]:
    manifest = os.path.join(work, "shards", "manifest.json")
    source = os.path.join(work, "source")
    if not os.path.exists(manifest):
        data = generate_source(source, SourceSpec(num_examples=samples, image_size=64, num_files=4))
        keys = sio.read_parquet(data.index_path, columns=["key"]).column("key")
        pq.write_table(pa.table({"key": keys, "copies": pa.array(np.ones(len(keys), np.int32)),
                                 "weight": np.ones(len(keys))}), os.path.join(work, "selection.parquet"))
        spark = get_session("trainer-bench", "local[2]")
        W.run(spark, W.ShardJob(selection=os.path.join(work, "selection.parquet"), index=data.index_path,
                                output=os.path.join(work, "shards"), samples_per_shard=1000))
        spark.stop()
    return manifest, os.path.join(source, "labels.parquet")


def plain_loop(urls, spec, limit) -> float:
    rng = np.random.default_rng(0)
    n = 0
    start = time.perf_counter()
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    train_transform(decode_image(tar.extractfile(m).read()), spec, rng)
                    n += 1
                    if n == limit:
                        return n / (time.perf_counter() - start)
    return n / (time.perf_counter() - start)


def stream_rate(urls, spec, workers, limit, batch=64) -> float:
    stream = ShardStream(LoaderConfig(urls, spec, seed=0, shuffle_buffer=1000, normalise=False),
                         state=LoaderState(workers=max(1, workers)))  # as pretrain: uint8, normalised on the device
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=collate)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n, start = 0, time.perf_counter()
    while n < limit:
        n += len(next(it)[1])
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", default="/tmp/trainer-bench")
    args = ap.parse_args(argv)
    manifest, labels = make_shards(args.work, args.samples)
    urls = shard_urls(manifest)
    spec = PreprocessSpec(32)
    limit = args.samples // 2
    plain = plain_loop(urls, spec, limit)
    print(f"plain PIL loop        {plain:7.0f} images/s (1 process)", flush=True)
    results = {"plain": plain}
    for w in (int(x) for x in args.workers.split(",")):
        rate = stream_rate(urls, spec, w, limit)
        results[f"stream_{w}"] = rate
        print(f"ShardStream {w} worker(s) {rate:7.0f} images/s = {rate / w:.0f} per worker "
              f"({rate / w / plain:.2f}x the plain loop per worker)", flush=True)
    out = os.path.join(args.work, "pretrain")
    half = max(1, args.steps // 2)
    pretrain.run(pretrain.PretrainJob(shards=manifest, labels=labels, output=out, steps=2 * half, batch_size=64,
                                      num_workers=2, log_every=half, save_every=2 * half, overwrite=True))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rates = [r["images_per_second"] for r in records[1:]]  # the second half: past start-up
    results["train_images_per_s"] = rates[-1]
    print(f"pretrain small model  {rates[-1]:7.0f} images/s = {rates[-1] / 64:.2f} steps/s "
          "(batch 64, DeepSpeed, 1 process, CPU)", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
