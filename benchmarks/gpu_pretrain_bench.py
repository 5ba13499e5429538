"""``trainer.pretrain`` itself on a GPU, fed from shards, against the same
model's synthetic step (issue 26).

Prepared for a GPU machine (torch with CUDA, torchvision, DeepSpeed: an
air-gapped one installs them from ``scripts/gpu_bundle.sh``'s bundle); never
part of the tests::

    python -m benchmarks.gpu_pretrain_bench [--images 4096] [--batch-size 256] [--steps 60] [--warmup 20]
        [--archs resnet50,inception_v3] [--variants plain,channels_last,compile,channels_last+compile]
        [--work /tmp/gpu-pretrain-bench]
    python -m benchmarks.gpu_pretrain_bench --cpu-smoke      # the same path on CPU, a tiny model

For each architecture (ResNet-50 at 224, Inception-v3 at 299; bf16 autocast
with fp32 weights, as the trainer's DeepSpeed config) and each variant
(``channels_last``: the weights and inputs in channels-last memory format;
``compile``: ``torch.compile`` of the model), two numbers:

* ``synthetic``: the DeepSpeed step on a uint8 batch already on the device
  (normalised there, the trainer's loss): the model's ceiling;
* ``pretrain``: ``trainer.pretrain.run`` (a ``PretrainJob``) on ImageNet-like
  JPEG shards with a manifest (checked as they stream), its default loader
  workers, pinned memory: images/s and the share of step time spent waiting
  for data, read from the run's ``metrics.jsonl`` after ``--warmup`` steps.

Prints a Markdown table (for benchmarks/README.md) and writes
``WORK/results.json``. Asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from benchmarks.loader_bench import SIZE_MIX, make_source
from schemas import ResampleConfig
from schemas.shard_format import image_extension, sample_json, sample_key, write_tar
from trainer import pretrain
from trainer import runtime as RT
from trainer.data import soft_targets
from trainer.models import DEFAULT_INPUT_SIZE, build_model
from trainer.optim import deepspeed_config, make_optimizer, make_scheduler
from trainer.transforms import PreprocessSpec, normalise_batch

VARIANTS = ("plain", "channels_last", "compile", "channels_last+compile")
#: The CPU smoke run: small images, a small model, a few steps.
SMOKE_MIX = (((64, 48), 0.6), ((48, 64), 0.4))


def write_shard_folder(index: str, out: str, shards: int) -> str:
    """``index``'s images as shards with a manifest (what write_shards leaves:
    the trainer checks each shard against it as it streams), written directly
    (no Spark on a GPU node); returns the manifest's path (reused when there)."""
    manifest = os.path.join(out, "manifest.json")
    if os.path.exists(os.path.join(out, "_SUCCESS")):
        return manifest
    table = pq.read_table(index)
    keys, labels, images = (table.column(c).to_pylist() for c in ("key", "labels", "image"))
    os.makedirs(out, exist_ok=True)
    per = -(-len(keys) // shards)
    entries = []
    for i in range(shards):
        rows = range(i * per, min(len(keys), (i + 1) * per))
        buf = io.BytesIO()
        n, size, sha = write_tar(buf, [(sample_key(keys[r], 0), image_extension(images[r]), images[r],
                                        sample_json(keys[r], 0, labels[r], 1.0)) for r in rows])
        name = f"shard-{i:06d}.tar"
        with open(os.path.join(out, name), "wb") as fh:
            fh.write(buf.getvalue())
        entries.append({"name": name, "samples": n, "bytes": size, "sha256": sha})
    doc = {"format_version": 1, "config": ResampleConfig(target="bench", size=len(keys)).to_dict(), "inputs": {},
           "shards": entries, "total_samples": len(keys), "unique_examples": len(keys),
           "label_distribution": {}, "bad_records": [], "extra": {"prefix": "shard"}}
    with open(manifest, "w") as fh:
        json.dump(doc, fh)
    open(os.path.join(out, "_SUCCESS"), "w").close()
    return manifest


def _flags(variant: str) -> tuple[bool, bool]:
    return "channels_last" in variant, "compile" in variant


def synthetic_rate(arch: str, classes: int, batch: int, steps: int, warmup: int, variant: str) -> float:
    """Images/s of the trainer's DeepSpeed step on a uint8 batch already on the device."""
    info = RT.setup_distributed()
    channels_last, compile_ = _flags(variant)
    size = DEFAULT_INPUT_SIZE.get(arch, 224)
    spec = PreprocessSpec(size)
    torch.manual_seed(0)
    model = build_model(arch, classes).to(info.device)
    optimizer = make_optimizer(model, 0.1)
    engine, optimizer, _ = RT.initialize(model, optimizer, make_scheduler(optimizer, steps + warmup, 1),
                                         deepspeed_config(batch * info.world_size, info.world_size,
                                                          bf16=info.device.type == "cuda", log_every=1000))
    RT.speed_settings(engine, channels_last, compile_)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=info.device)
    y = soft_targets([[i % classes] for i in range(batch)], {i: i for i in range(classes)}, classes).to(info.device)
    engine.train()
    for step in range(warmup + steps):
        if step == warmup:
            _sync(info.device)
            start = time.perf_counter()
        logits = engine(normalise_batch(x8, spec).contiguous(memory_format=memory_format))
        loss = -(y * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
        engine.backward(loss)
        engine.step()
    _sync(info.device)
    return steps * batch * info.world_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pretrain_rate(manifest: str, labels: str, out: str, arch: str, batch: int, steps: int, warmup: int,
                  variant: str) -> dict:
    """``trainer.pretrain.run`` fed from the shards: images/s and data wait
    over the steps after ``warmup`` (its ``metrics.jsonl``, one record per step)."""
    channels_last, compile_ = _flags(variant)
    job = pretrain.PretrainJob(shards=manifest, labels=labels, output=out, arch=arch, steps=warmup + steps,
                               batch_size=batch, lr=0.1, log_every=1,
                               save_every=warmup + steps, keep_checkpoints=1, overwrite=True,
                               channels_last=channels_last, compile=compile_)
    result = pretrain.run(job)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][warmup:]
    seconds = sum(batch / r["images_per_second"] for r in records)
    waited = sum(r["data_wait_seconds"] for r in records)
    return {"images_per_second": len(records) * batch / seconds, "data_wait_share": waited / seconds,
            "loader_workers": result["loader_workers"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096, help="ImageNet-like JPEGs in the shards")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch")
    ap.add_argument("--steps", type=int, default=60, help="timed steps")
    ap.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation, cuDNN autotuning)")
    ap.add_argument("--archs", default="resnet50,inception_v3")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", default="/tmp/gpu-pretrain-bench")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="the same path on CPU with a tiny model and data (shows the script works)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.images, args.shards, args.batch_size = min(args.images, 128), min(args.shards, 8), 16
        args.steps, args.warmup, args.archs = min(args.steps, 6), min(args.warmup, 2), "small"
    elif not torch.cuda.is_available():
        print("gpu_pretrain_bench: no GPU here (torch.cuda.is_available() is False); --cpu-smoke runs the CPU path")
        return 2
    torch.backends.cudnn.benchmark = True
    work = os.path.join(args.work, "smoke" if args.cpu_smoke else "imagenet-like")
    index, labels, _ = make_source(work, args.images, SMOKE_MIX if args.cpu_smoke else SIZE_MIX)
    manifest = write_shard_folder(index, os.path.join(work, "shards"), args.shards)
    classes = pq.read_table(labels).num_rows
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = []
    for arch in args.archs.split(","):
        for variant in args.variants.split(","):
            synthetic = synthetic_rate(arch, classes, args.batch_size, args.steps, args.warmup, variant)
            fed = pretrain_rate(manifest, labels, os.path.join(work, f"run-{arch}-{variant}"), arch,
                                args.batch_size, args.steps, args.warmup, variant)
            rows.append({"arch": arch, "variant": variant, "synthetic": synthetic, **fed})
            print(f"  {arch} {variant}: synthetic {synthetic:,.0f} img/s, trainer.pretrain from shards "
                  f"{fed['images_per_second']:,.0f} img/s ({fed['images_per_second'] / synthetic:.2f}x), "
                  f"waiting for data {100 * fed['data_wait_share']:.0f}% of step time", flush=True)
    print(f"\n{device}, global batch {args.batch_size}, {args.steps} timed steps after {args.warmup}; "
          f"{args.images} images in {args.shards} shards\n")
    print("| model | variant | synthetic step img/s | trainer.pretrain from shards img/s | ratio | data wait | "
          "loader workers |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['variant']} | {r['synthetic']:,.0f} | {r['images_per_second']:,.0f} | "
              f"{r['images_per_second'] / r['synthetic']:.2f} | {100 * r['data_wait_share']:.0f}% | "
              f"{r['loader_workers']} |")
    with open(os.path.join(work, "results.json"), "w") as fh:
        json.dump({"device": device, "args": vars(args), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
