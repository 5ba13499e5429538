"""Fine-tune on the target with a new, randomly initialised head (DeepSpeed).

::

    python -m trainer.finetune --target food101|imagefolder|... --target-root PATH \\
      --init CKPT_DIR/generalist.pt --steps N --batch-size B [--seed 0] [--num-workers N] \\
      [--decode-scaling draft|none] --output FT_DIR
    python -m trainer.finetune ... --init none --model small     # random initialisation

Paper (§4): 20k steps, batch 256, SGD with momentum, linear warmup over 2k
steps then cosine decay; defaults keep the 10% warmup for any ``--steps``.
Writes ``FT_DIR/model.pt`` (fine-tuned checkpoint), ``FT_DIR/metrics.json`` and ``FT_DIR/_SUCCESS``
(top-1, mean per-class accuracy on ``--eval-split``, the training curve).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from schemas import io as sio
from schemas.stage_output import require_finished_input

from . import runtime as RT
from .data import TargetDataset, default_num_workers
from .evaluation import describe, evaluate
from .models import (DEFAULT_INPUT_SIZE, build_model, checkpoint_fingerprint, load_generalist,
                     preprocess_spec, read_generalist, replace_head, save_finetuned)
from .optim import deepspeed_config, default_lr, default_warmup, make_optimizer, make_scheduler
from .transforms import DECODE_SCALINGS, DEFAULT_DECODE_SCALING, PreprocessSpec

__all__ = ["build_parser", "index_batches", "run", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="target layout: food101, imagefolder, ...")
    p.add_argument("--target-root", required=True)
    p.add_argument("--init", required=True, help="generalist.pt to start from, or 'none' (random init)")
    p.add_argument("--model", default="small", help="architecture when --init none (default small)")
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
    return p


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


def run(args: argparse.Namespace) -> dict:
    info = RT.setup_distributed()
    init = None if args.init.lower() in ("none", "random") else args.init
    if init:
        require_finished_input(init, "--init")
        ckpt = read_generalist(init)
        architecture, spec = ckpt["architecture"], preprocess_spec(ckpt)
    else:
        architecture = args.model
        spec = PreprocessSpec(args.input_size or DEFAULT_INPUT_SIZE.get(args.model, 224))
    train = TargetDataset(args.target_root, args.target, args.train_split, spec, train=True, seed=args.seed,
                          decode_scaling=args.decode_scaling)
    test = TargetDataset(args.target_root, args.target, args.eval_split, spec, train=False)
    if test.classes != train.classes:
        raise ValueError(f"{args.eval_split} and {args.train_split} splits have different classes")
    classes = train.classes
    output, work, finished = RT.start_output(args.output, "finetune", args.overwrite, info)
    if finished is not None:
        return finished
    with RT.building(output, work):

        torch.manual_seed(args.seed)
        if init:
            model, _ = load_generalist(init)
            model.train()
        else:
            model = build_model(architecture, len(classes))
        head_rng = torch.Generator().manual_seed(args.seed)
        replace_head(model, len(classes), generator=head_rng)
        model.to(info.device)
        lr = args.lr if args.lr is not None else default_lr(args.batch_size, "finetune")
        warmup = args.warmup_steps if args.warmup_steps is not None else default_warmup(args.steps, "finetune")
        optimizer = make_optimizer(model, lr, args.momentum, args.weight_decay)
        scheduler = make_scheduler(optimizer, args.steps, warmup)
        config = (json.loads(sio.read_bytes(args.deepspeed_config)) if args.deepspeed_config else
                  deepspeed_config(args.batch_size, info.world_size, bf16=info.device.type == "cuda",
                                   log_every=args.log_every))
        engine, optimizer, scheduler = RT.initialize(model, optimizer, scheduler, config)

        micro = args.batch_size // info.world_size
        num_workers = default_num_workers() if args.num_workers is None else args.num_workers
        batches = index_batches(len(train), micro, info.rank, info.world_size, args.seed)
        loader = torch.utils.data.DataLoader(_EpochIndexed(train), batch_sampler=batches,
                                             num_workers=num_workers)
        progress = RT.Progress(args.steps, 0, args.batch_size, args.log_every, info.is_main)
        curve = []
        engine.train()
        it = iter(loader)
        for step in range(args.steps):
            x, y = next(it)
            logits = engine(x.to(info.device))
            loss = F.cross_entropy(logits.float(), y.to(info.device))
            lr_now = optimizer.param_groups[0]["lr"]  # the rate this step uses
            engine.backward(loss)
            engine.step()
            curve.append({"step": step + 1, "loss": float(loss.detach()), "lr": lr_now})
            progress.update(step, curve[-1]["loss"], lr_now)
        del it, loader

        RT.average_buffers(engine.module)
        metrics = evaluate(engine.module, test, classes, info.device, batch_size=max(64, micro),
                           num_workers=num_workers)
        result = {
            "target": args.target, "target_root": args.target_root, "init": init,
            "init_fingerprint": checkpoint_fingerprint(init) if init else None,
            "architecture": architecture, "steps": args.steps, "batch_size": args.batch_size, "lr": lr,
            "warmup_steps": warmup, "seed": args.seed, "world_size": info.world_size,
            "train_images": len(train), "eval_split": args.eval_split, "loader_workers": num_workers,
            "decode_scaling": args.decode_scaling, **metrics,
            "curve": curve,
        }
        if info.is_main:
            save_finetuned(os.path.join(work, "model.pt"), engine.module, architecture, classes, spec,
                           extra={"init": init, "steps": args.steps, "target": args.target})
        RT.write_json_main(os.path.join(work or args.output, "metrics.json"), result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return RT.cli_main("finetune", build_parser(), run,
                       lambda r, a: describe(r, a.eval_split, a.output), argv)


if __name__ == "__main__":
    raise SystemExit(main())
