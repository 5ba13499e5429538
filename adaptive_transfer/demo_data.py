"""Generated data for ``TARGET=demo`` / ``SOURCE=demo`` and ``make demo``.

Under ``DIR``: ``source/`` (index + vocabulary, adaptive_transfer.synthetic),
``target/`` (Food-101 layout, mostly the 'food' branch) and ``generalist/``
(a small CNN pre-trained on the entire source: the paper's generalist, made
with the project's own resampler, shard writer and trainer). Each part is
made once and reused (a finished stage output, ``schemas.stage_output``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from schemas.stage_output import StageOutput
from adaptive_transfer.synthetic import SourceSpec, TargetSpec, generate_source, generate_target

__all__ = ["DemoData", "DEMO_SOURCE", "DEMO_TARGET", "ensure_demo_data"]

#: 6 leaves per group (66 leaves, 4 roots), 8,000 examples of 32 px.
DEMO_SOURCE = SourceSpec(num_examples=8000, leaves_per_group=6, image_size=32, num_files=4, seed=0)
#: 12 classes, 9 of them from 'food'; few training images so pre-training matters.
DEMO_TARGET = TargetSpec(name="demo", layout="food101", branch="food", num_classes=12, branch_fraction=0.75,
                         train_per_class=10, test_per_class=25, leaves_per_group=6, domain_shift=0.35, seed=1)


@dataclass
class DemoData:
    root: str
    index: str
    labels: str
    target: str
    generalist: str


def ensure_demo_data(root: str, spark=None, generalist_steps: int = 300, log=print) -> DemoData:
    """Make (or reuse) the demo source, target and generalist under ``root``
    (each one a finished stage output: ``schemas.stage_output``)."""
    source, target, gen = (os.path.join(root, d) for d in ("source", "target", "generalist"))
    parts = [(source, "demo source", f"generating the source ({DEMO_SOURCE.num_examples} examples)",
              lambda work: generate_source(work, DEMO_SOURCE)),
             (target, "demo target", "generating the target (Food-101 layout)",
              lambda work: generate_target(work, DEMO_TARGET))]
    data = DemoData(root, os.path.join(source, "index"), os.path.join(source, "labels.parquet"), target,
                    os.path.join(gen, "pretrain", "generalist.pt"))
    parts.append((gen, "demo generalist", "training the generalist on the entire source",
                  lambda work: train_on_entire_source(data, work, spark, generalist_steps, log)))
    for path, stage, what, make in parts:
        out = StageOutput(path, stage)
        if out.check():
            continue
        log(f"[demo data] {what}")
        with out.build() as work:
            make(work)
    return data


def train_on_entire_source(data: DemoData, out: str, spark, steps: int, log=print) -> None:
    """Entire source, each example once -> shards -> pretrain (the generalist)."""
    from spark_jobs import resample as R
    from spark_jobs import write_shards as W

    R.run(spark, R.ResampleJob(index=data.index, scheme="entire", size=DEMO_SOURCE.num_examples,
                               draw="systematic", labels=data.labels, target="entire-source",
                               output=os.path.join(out, "entire")))
    W.run(spark, W.ShardJob(selection=os.path.join(out, "entire"), index=data.index,
                            output=os.path.join(out, "shards"), samples_per_shard=1000))
    run_pretrain(os.path.join(out, "shards", "manifest.json"), data.labels, os.path.join(out, "pretrain"),
                 steps, log=log)


def run_pretrain(manifest: str, labels: str, out: str, steps: int, batch: int = 64, lr: float = 0.1,
                 seed: int = 0, log=print) -> None:
    """trainer.pretrain in this process (its typed job)."""
    from trainer import pretrain

    pretrain.run(pretrain.PretrainJob(shards=manifest, labels=labels, output=out, arch="small", steps=steps,
                                      batch_size=batch, lr=lr, seed=seed, num_workers=2,
                                      log_every=max(1, steps // 4), save_every=steps, keep_checkpoints=1))


def run_finetune(target_root: str, init: str, out: str, steps: int, seed: int = 0, log=print) -> dict:
    """trainer.finetune on the demo target (``init``: generalist.pt or 'none'),
    in this process (its typed job); returns its metrics."""
    from trainer import finetune

    finetune.run(finetune.FinetuneJob(target_layout="food101", target_root=target_root, init=init, output=out,
                                      arch="small", steps=steps, batch_size=32, lr=0.05, seed=seed, num_workers=2,
                                      log_every=steps))
    with open(os.path.join(out, "metrics.json")) as fh:
        return json.load(fh)
