"""Evaluate a fine-tuned model on a target split.

::

    python -m trainer.evaluate --target food101|imagefolder|... --target-root PATH \\
      --checkpoint FT_DIR/model.pt --output DIR [--split test] [--batch-size 256]

Writes ``DIR/metrics.json``: top-1, mean per-class accuracy, per-class
accuracy and counts. Runs as one process or under the DeepSpeed launcher
(ranks evaluate disjoint slices; counts are summed).
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from schemas.stage_output import require_finished_input

from . import runtime as RT
from .data import TargetDataset
from .evaluation import describe, evaluate
from .models import checkpoint_fingerprint, load_finetuned

__all__ = ["build_parser", "run", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="target layout: food101, imagefolder, ...")
    p.add_argument("--target-root", required=True)
    p.add_argument("--checkpoint", required=True, help="a fine-tuned model.pt from trainer.finetune")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> dict:
    info = RT.setup_distributed()
    require_finished_input(args.checkpoint, "--checkpoint")
    probe = TargetDataset(args.target_root, args.target, args.split, spec=None, train=False)
    model, spec, ckpt = load_finetuned(args.checkpoint, probe.classes, device=str(info.device))
    dataset = TargetDataset(args.target_root, args.target, args.split, spec, train=False)
    output, work, finished = RT.start_output(args.output, "evaluate", args.overwrite, info)
    if finished is not None:
        return finished
    with RT.building(output, work):
        metrics = evaluate(model, dataset, dataset.classes, info.device, args.batch_size, args.num_workers)
        result = {"target": args.target, "target_root": args.target_root, "split": args.split,
                  "checkpoint": args.checkpoint, "checkpoint_fingerprint": checkpoint_fingerprint(args.checkpoint),
                  "architecture": ckpt["architecture"], **metrics}
        RT.write_json_main(os.path.join(work or args.output, "metrics.json"), result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return RT.cli_main("evaluate", build_parser(), run,
                       lambda r, a: describe(r, a.split, a.output), argv)


if __name__ == "__main__":
    raise SystemExit(main())
