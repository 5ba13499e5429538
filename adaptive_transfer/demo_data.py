"""Generated data for ``TARGET=demo`` / ``SOURCE=demo`` and ``make demo``.

Under ``DIR``: ``source/`` (index + vocabulary, ``adaptive_transfer.synthetic``),
``target/`` (Food-101 layout, mostly the 'food' branch) and ``generalist/``
(a small CNN pre-trained on the entire source, each example once: the
paper's generalist, made by the chain every pre-training set goes through,
``adaptive_transfer.stages.build_set``). Each part is a stage output, reused
while its settings and code are unchanged.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from adaptive_transfer.synthetic import SourceSpec, TargetSpec, generate_source, generate_target

from . import stages

__all__ = ["DemoData", "DEMO_SOURCE", "DEMO_TARGET", "ensure_demo_data", "generalist_set", "GeneralistTraining"]

#: 6 leaves per group (66 leaves, 4 roots), 8,000 examples of 32 px.
DEMO_SOURCE = SourceSpec(num_examples=8000, leaves_per_group=6, image_size=32, num_files=4, seed=0)
#: 12 classes, 9 of them from 'food'; few training images so pre-training matters.
DEMO_TARGET = TargetSpec(name="demo", layout="food101", branch="food", num_classes=12, branch_fraction=0.75,
                         train_per_class=10, test_per_class=25, leaves_per_group=6, domain_shift=0.35, seed=1)


@dataclass
class DemoData:
    """Where the demo's parts are."""

    root: str
    index: str
    labels: str
    target: str
    generalist: str


@dataclass(frozen=True)
class GeneralistTraining:
    """How the generalist is pre-trained: optimiser steps, seed of its
    selection, batch size (images), learning rate, samples per shard and
    data-loader workers."""

    steps: int
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.1
    samples_per_shard: int = 1000
    num_workers: int = 2


def generalist_set(root: str, index: str, labels: str, num_examples: int,
                   training: GeneralistTraining) -> stages.SetPlan:
    """The generalist's pre-training set under ``root``: the entire source
    (``num_examples``), each example once (systematic draw), and a small CNN
    pre-trained on it as ``training`` says."""
    from spark_jobs.resample import ResampleJob

    t = training
    entire = ResampleJob(index=index, output="", scheme="entire", size=num_examples, draw="systematic",
                         labels=labels, target="entire-source", seed=t.seed)
    return stages.plan_set(root, entire, samples_per_shard=t.samples_per_shard,
                           pretrain={"arch": "small", "steps": t.steps, "batch_size": t.batch_size, "lr": t.lr,
                                     "num_workers": t.num_workers, "log_every": max(1, t.steps // 4),
                                     "save_every": t.steps, "keep_checkpoints": 1})


def ensure_demo_data(root: str, engines: stages.Engines, generalist_steps: int = 300) -> DemoData:
    """Make (or reuse) the demo source, target and generalist under ``root``."""
    source, target, gen = (os.path.join(root, d) for d in ("source", "target", "generalist"))
    stages.generated(source, "demo_source", {"spec": asdict(DEMO_SOURCE)},
                     lambda work: generate_source(work, DEMO_SOURCE), "adaptive_transfer.synthetic",
                     f"[demo data] the source ({DEMO_SOURCE.num_examples:,} generated examples)", engines)
    stages.generated(target, "demo_target", {"spec": asdict(DEMO_TARGET)},
                     lambda work: generate_target(work, DEMO_TARGET), "adaptive_transfer.synthetic",
                     "[demo data] the target (Food-101 layout)", engines)
    index, labels = os.path.join(source, "index"), os.path.join(source, "labels.parquet")
    plan = generalist_set(gen, index, labels, DEMO_SOURCE.num_examples, GeneralistTraining(generalist_steps))
    built = stages.build_set(plan, engines)
    return DemoData(root, index, labels, target, built.model)
