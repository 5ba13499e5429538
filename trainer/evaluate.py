"""Evaluate a fine-tuned model on a target split.

::

    python -m trainer.evaluate --target-layout food101|imagefolder|... --target-root PATH \\
      --checkpoint FT_DIR/model.pt --output DIR [--split test] [--batch-size 256]

Writes ``DIR/metrics.json``: top-1, mean per-class accuracy, per-class
accuracy and counts. Runs as one process or under the DeepSpeed launcher
(ranks evaluate disjoint slices; counts are summed). A rerun reuses a
finished ``DIR`` made from the same checkpoint (its sha256), target listing,
split and code, and refuses one made from anything else unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

from schemas.cli import ArgumentParser
from schemas.fingerprint import code_digest
from schemas.stage_output import require_finished_input

from . import runtime as RT
from .data import TargetDataset
from .evaluation import describe, evaluate
from .models import checkpoint_fingerprint, load_finetuned

__all__ = ["EvaluateJob", "STAGE", "build_parser", "job_from_args", "run", "main"]

#: The output protocol's name for this stage (``schemas.stage_output``).
STAGE = "evaluate"


@dataclass
class EvaluateJob:
    """One evaluation (the flags of ``python -m trainer.evaluate``):
    ``checkpoint`` (a fine-tuned ``model.pt``) on ``split`` of the target;
    ``batch_size`` and ``num_workers`` (loader processes) change only the speed."""

    target_layout: str
    target_root: str
    checkpoint: str
    output: str
    split: str = "test"
    batch_size: int = 256
    num_workers: int = 2
    overwrite: bool = False

    def fingerprint(self) -> dict[str, Any]:
        """What determines the result: the checkpoint's sha256, the split's listing, and the code."""
        probe = TargetDataset(self.target_root, self.target_layout, self.split, spec=None, train=False)
        return fingerprint(self, probe)


def fingerprint(job: EvaluateJob, dataset: TargetDataset) -> dict[str, Any]:
    return {"checkpoint": checkpoint_fingerprint(job.checkpoint), "target": dataset.listing_digest(),
            "code": code_digest("trainer.evaluate")}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m trainer.evaluate", description=__doc__)
    p.add_argument("--target-layout", required=True, help="target layout: food101, imagefolder, ...")
    p.add_argument("--target-root", required=True)
    p.add_argument("--checkpoint", required=True, help="a fine-tuned model.pt from trainer.finetune")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_alias("--target", "--target-layout")
    return p


def job_from_args(args: argparse.Namespace) -> EvaluateJob:
    """The job the parsed flags describe."""
    names = {f.name for f in dataclasses.fields(EvaluateJob)}
    return EvaluateJob(**{k: v for k, v in vars(args).items() if k in names})


def run(job: EvaluateJob) -> dict:
    """Evaluate as ``job`` says (on this process's rank); returns the metrics."""
    info = RT.setup_distributed()
    require_finished_input(job.checkpoint, "--checkpoint")
    probe = TargetDataset(job.target_root, job.target_layout, job.split, spec=None, train=False)
    model, spec, ckpt = load_finetuned(job.checkpoint, probe.classes, device=str(info.device))
    # uint8 images, normalised on the device
    dataset = TargetDataset(job.target_root, job.target_layout, job.split, spec, train=False, normalise=False)
    fp = fingerprint(job, probe)
    output, work, finished = RT.start_output(job.output, STAGE, job.overwrite, info, fp)
    if finished is not None:
        return finished
    with RT.building(output, work):
        metrics = evaluate(model, dataset, dataset.classes, info.device, job.batch_size, job.num_workers)
        result = {"target": job.target_layout, "target_root": job.target_root, "split": job.split,
                  "checkpoint": job.checkpoint, "checkpoint_fingerprint": fp["checkpoint"],
                  "architecture": ckpt["architecture"], **metrics}
        RT.write_json_main(os.path.join(work or job.output, "metrics.json"), result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return RT.cli_main("evaluate", build_parser(), lambda args: run(job_from_args(args)),
                       lambda r, a: describe(r, a.split, a.output), argv)


if __name__ == "__main__":
    raise SystemExit(main())
