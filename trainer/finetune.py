"""Fine-tune on the target with a new, randomly initialised head (DeepSpeed).

::

    python -m trainer.finetune --target-layout food101|imagefolder|... --target-root PATH \\
      --init CKPT_DIR/generalist.pt --steps N --batch-size B [--seed 0] [--num-workers N] \\
      [--decode-scaling draft|none] --output FT_DIR
    python -m trainer.finetune ... --init none --arch small     # random initialisation
    tensorboard --logdir FT_DIR                                 # the curves

Paper (§4): 20k steps, batch 256, SGD with momentum, linear warmup over 2k
steps then cosine decay; defaults keep the 10% warmup for any ``--steps``.
Writes ``FT_DIR/model.pt`` (fine-tuned checkpoint), ``FT_DIR/metrics.json``
(top-1, mean per-class accuracy on ``--eval-split``, the training curve),
``FT_DIR/metrics.jsonl`` and TensorBoard event files in
``FT_DIR/tensorboard/`` (:mod:`trainer.curves`), and ``FT_DIR/_SUCCESS``.
A rerun reuses a finished ``FT_DIR`` made from the same init checkpoint,
target listing, settings and code, and refuses one made from anything else
(naming what differs) unless ``--overwrite``.

Batches travel as uint8 images and are normalised on the device (the same
values as normalising on the CPU, a quarter of the bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from schemas import io as sio
from schemas.cli import ArgumentParser
from schemas.fingerprint import code_digest
from schemas.stage_output import require_finished_input

from . import runtime as RT
from .curves import Progress, TrainingCurves
from .data import TargetDataset, default_num_workers
from .evaluation import describe, evaluate
from .models import (DEFAULT_INPUT_SIZE, build_model, checkpoint_fingerprint, load_generalist,
                     preprocess_spec, read_generalist, replace_head, save_finetuned)
from .optim import deepspeed_config, default_lr, default_warmup, make_optimizer, make_scheduler
from .transforms import DECODE_SCALINGS, DEFAULT_DECODE_SCALING, PreprocessSpec, normalise_batch

__all__ = ["FinetuneJob", "STAGE", "build_parser", "job_from_args", "index_batches", "run", "main"]

#: The output protocol's name for this stage (``schemas.stage_output``).
STAGE = "finetune"


@dataclass
class FinetuneJob:
    """One fine-tuning run (the flags of ``python -m trainer.finetune``).

    ``init``: a ``generalist.pt``, or ``"none"`` / ``"random"`` (then
    ``arch`` and ``input_size``, default per architecture, say the model).
    ``batch_size``: global (default 256, the paper's); ``lr`` default 0.01 x
    batch / 256; ``warmup_steps`` default 10% of ``steps``; ``num_workers``
    (loader processes per rank) default from the cores.
    """

    target_layout: str
    target_root: str
    init: str
    output: str
    steps: int
    arch: str = "small"
    input_size: int | None = None
    batch_size: int = 256
    lr: float | None = None
    warmup_steps: int | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    train_split: str = "train"
    eval_split: str = "test"
    num_workers: int | None = None
    decode_scaling: str = DEFAULT_DECODE_SCALING
    log_every: int = 10
    deepspeed_config: str | None = None
    overwrite: bool = False

    @property
    def init_path(self) -> str | None:
        """The starting checkpoint (``None``: random initialisation)."""
        return None if self.init.lower() in ("none", "random") else self.init

    def fingerprint(self) -> dict[str, Any]:
        """What determines the result, and the code (reads the init checkpoint and the target's listing)."""
        return fingerprint(self, _plan(self))


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m trainer.finetune", description=__doc__)
    p.add_argument("--target-layout", required=True, help="target layout: food101, imagefolder, ...")
    p.add_argument("--target-root", required=True)
    p.add_argument("--init", required=True, help="generalist.pt to start from, or 'none' (random init)")
    p.add_argument("--arch", default="small", help="architecture when --init none (default small)")
    p.add_argument("--input-size", type=int, help="input side when --init none (default per architecture)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256, the paper's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.01 x batch / 256)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup (default 10%% of --steps, as the paper)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--num-workers", type=int,
                   help="loader worker processes per rank (default: the cores this process may use, shared "
                        "by the node's ranks (LOCAL_WORLD_SIZE or LOCAL_SIZE), less one, at least 1)")
    p.add_argument("--decode-scaling", choices=DECODE_SCALINGS, default=DEFAULT_DECODE_SCALING,
                   help="training images: 'draft' decodes a JPEG at 1/2, 1/4 or 1/8 scale when its random crop "
                        "still has at least the input size in pixels at that scale (other pixels: a different "
                        f"resampling path); 'none' decodes whole (default {DEFAULT_DECODE_SCALING}). "
                        "Evaluation always decodes whole")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--deepspeed-config", help="a DeepSpeed JSON config instead of the generated one")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_aliases({"--target": "--target-layout", "--model": "--arch"})
    return p


def job_from_args(args: argparse.Namespace) -> FinetuneJob:
    """The job the parsed flags describe."""
    names = {f.name for f in dataclasses.fields(FinetuneJob)}
    return FinetuneJob(**{k: v for k, v in vars(args).items() if k in names})


def index_batches(n: int, micro_batch: int, rank: int, world: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of dataset positions for one rank: epoch ``e`` is a
    ``(seed, e)`` permutation, ranks take disjoint strided slices, batches run
    across epoch ends. A position ``e * n + i`` names item ``i`` in epoch ``e``
    (the dataset uses it to seed the augmentation)."""
    if n < world:
        raise ValueError(f"{n} training images cannot be split over {world} ranks")
    pending: list[int] = []
    epoch = 0
    while True:
        perm = np.random.default_rng([seed, epoch, 0xF7]).permutation(n)
        usable = (n // world) * world
        pending.extend(int(epoch * n + i) for i in perm[:usable][rank::world])
        while len(pending) >= micro_batch:
            yield pending[:micro_batch]
            pending = pending[micro_batch:]
        epoch += 1


class _EpochIndexed(torch.utils.data.Dataset):
    """Maps a position ``e * n + i`` to item ``i`` augmented for epoch ``e``."""

    def __init__(self, dataset: TargetDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, position: int):
        n = len(self.dataset)
        self.dataset.epoch = position // n
        return self.dataset[position % n]


# -- what the run reads and resolves -----------------------------------------------------

@dataclass
class _Plan:
    """The run's inputs, read and checked, and its resolved settings."""

    init: str | None
    arch: str
    spec: PreprocessSpec
    train: TargetDataset
    test: TargetDataset
    lr: float
    warmup: int

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def _plan(job: FinetuneJob) -> _Plan:
    init = job.init_path
    if init:
        require_finished_input(init, "--init")
        ckpt = read_generalist(init)
        arch, spec = ckpt["architecture"], preprocess_spec(ckpt)
    else:
        arch, spec = job.arch, PreprocessSpec(job.input_size or DEFAULT_INPUT_SIZE.get(job.arch, 224))
    # uint8 images (normalised on the device)
    train = TargetDataset(job.target_root, job.target_layout, job.train_split, spec, train=True, seed=job.seed,
                          decode_scaling=job.decode_scaling, normalise=False)
    test = TargetDataset(job.target_root, job.target_layout, job.eval_split, spec, train=False, normalise=False)
    if test.classes != train.classes:
        raise ValueError(f"{job.eval_split} and {job.train_split} splits have different classes")
    lr = job.lr if job.lr is not None else default_lr(job.batch_size, "finetune")
    warmup = job.warmup_steps if job.warmup_steps is not None else default_warmup(job.steps, "finetune")
    return _Plan(init, arch, spec, train, test, lr, warmup)


def fingerprint(job: FinetuneJob, plan: _Plan) -> dict[str, Any]:
    """What determines a fine-tuning result: the init checkpoint's sha256,
    the target's listings, the model, batch, schedule, seed and decoding, and
    the code. Not the number of ranks or loader workers, nor where the
    target lies."""
    return {"init": checkpoint_fingerprint(plan.init) if plan.init else None,
            "train": plan.train.listing_digest(), "eval": plan.test.listing_digest(), "arch": plan.arch,
            "input_size": plan.spec.input_size, "steps": job.steps, "batch_size": job.batch_size, "lr": plan.lr,
            "warmup_steps": plan.warmup, "momentum": job.momentum, "weight_decay": job.weight_decay,
            "seed": job.seed, "decode_scaling": job.decode_scaling,
            "deepspeed_config": sio.file_sha256(job.deepspeed_config) if job.deepspeed_config else None,
            "code": code_digest("trainer.finetune")}


def _engine(job: FinetuneJob, plan: _Plan, info: RT.DistInfo):
    """``(engine, optimizer)``: the init checkpoint (or a random model) with a new head."""
    torch.manual_seed(job.seed)
    if plan.init:
        model, _ = load_generalist(plan.init)
        model.train()
    else:
        model = build_model(plan.arch, len(plan.classes))
    replace_head(model, len(plan.classes), generator=torch.Generator().manual_seed(job.seed))
    model.to(info.device)
    optimizer = make_optimizer(model, plan.lr, job.momentum, job.weight_decay)
    scheduler = make_scheduler(optimizer, job.steps, plan.warmup)
    config = (json.loads(sio.read_bytes(job.deepspeed_config)) if job.deepspeed_config else
              deepspeed_config(job.batch_size, info.world_size, bf16=info.device.type == "cuda",
                               log_every=job.log_every))
    engine, optimizer, _ = RT.initialize(model, optimizer, scheduler, config)
    return engine, optimizer


def _train(job: FinetuneJob, plan: _Plan, engine, optimizer, info: RT.DistInfo, curves: TrainingCurves
           ) -> list[dict]:
    """The training steps; returns the curve (step, loss, lr per step)."""
    micro = job.batch_size // info.world_size
    batches = index_batches(len(plan.train), micro, info.rank, info.world_size, job.seed)
    loader = torch.utils.data.DataLoader(_EpochIndexed(plan.train), batch_sampler=batches,
                                         num_workers=_workers(job), pin_memory=info.device.type == "cuda")
    progress = Progress(job.steps, 0, job.batch_size, job.log_every, info.is_main)
    curve = []
    engine.train()
    it = iter(loader)
    for step in range(job.steps):
        t0 = time.perf_counter()
        x, y = next(it)
        waited = time.perf_counter() - t0
        logits = engine(normalise_batch(x.to(info.device, non_blocking=True), plan.spec))
        loss = F.cross_entropy(logits.float(), y.to(info.device, non_blocking=True))
        lr_now = optimizer.param_groups[0]["lr"]  # the rate this step uses
        engine.backward(loss)
        engine.step()
        curve.append({"step": step + 1, "loss": float(loss.detach()), "lr": lr_now})
        progress.update(step, curve[-1]["loss"], lr_now, waited)
        curves.step(step + 1, curve[-1]["loss"], lr_now, time.perf_counter() - t0, waited)
    del it, loader
    return curve


def _workers(job: FinetuneJob) -> int:
    return default_num_workers() if job.num_workers is None else job.num_workers


def run(job: FinetuneJob) -> dict:
    """Fine-tune as ``job`` says (on this process's rank); returns the metrics."""
    info = RT.setup_distributed()
    plan = _plan(job)
    fp = fingerprint(job, plan)
    output, work, finished = RT.start_output(job.output, STAGE, job.overwrite, info, fp)
    if finished is not None:
        return finished
    with RT.building(output, work):
        engine, optimizer = _engine(job, plan, info)
        curves = TrainingCurves(work or job.output, info.is_main, job.batch_size, job.log_every,
                                total_steps=job.steps)
        try:
            curve = _train(job, plan, engine, optimizer, info, curves)
            RT.average_buffers(engine.module)
            metrics = evaluate(engine.module, plan.test, plan.classes, info.device,
                               batch_size=max(64, job.batch_size // info.world_size), num_workers=_workers(job))
            curves.write(job.steps, {"eval/top1": metrics["top1"],
                                     "eval/mean_per_class_accuracy": metrics["mean_per_class_accuracy"]})
        finally:
            curves.close()
        result = {
            "target": job.target_layout, "target_root": job.target_root, "init": plan.init,
            "init_fingerprint": fp["init"],
            "architecture": plan.arch, "steps": job.steps, "batch_size": job.batch_size, "lr": plan.lr,
            "warmup_steps": plan.warmup, "seed": job.seed, "world_size": info.world_size,
            "train_images": len(plan.train), "eval_split": job.eval_split, "loader_workers": _workers(job),
            "decode_scaling": job.decode_scaling, **metrics, "curve": curve,
        }
        if info.is_main:
            save_finetuned(os.path.join(work, "model.pt"), engine.module, plan.arch, plan.classes, plan.spec,
                           extra={"init": plan.init, "steps": job.steps, "target": job.target_layout})
        RT.write_json_main(os.path.join(work or job.output, "metrics.json"), result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return RT.cli_main("finetune", build_parser(), lambda args: run(job_from_args(args)),
                       lambda r, a: describe(r, a.eval_split, a.output), argv)


if __name__ == "__main__":
    raise SystemExit(main())
