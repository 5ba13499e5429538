"""``adaptive-transfer``: one command, a subcommand per stage.

Each subcommand is the stage's own command line (the same parser and
``main`` as ``python -m MODULE``, which keeps working)::

    adaptive-transfer weights      ...   # beam_pipelines.importance_weights
    adaptive-transfer dedup        ...   # beam_pipelines.near_duplicates
    adaptive-transfer resample     ...   # spark_jobs.resample
    adaptive-transfer shards       ...   # spark_jobs.write_shards
    adaptive-transfer shards-many  ...   # spark_jobs.write_shards.many (several targets, one pass)
    adaptive-transfer verify       ...   # spark_jobs.verify
    adaptive-transfer pretrain     ...   # trainer.pretrain
    adaptive-transfer finetune     ...   # trainer.finetune
    adaptive-transfer evaluate     ...   # trainer.evaluate
    adaptive-transfer build-index  ...   # spark_jobs.build_index
    adaptive-transfer pipeline     ...   # make resample: weights -> dedup -> resample -> shards -> verify
    adaptive-transfer demo | experiment | generate | real-data

Only the chosen stage's module is imported (Beam, Spark and torch load
only where they are used).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence

from schemas.cli import PROG_ENV

__all__ = ["COMMANDS", "main"]

#: subcommand -> (module, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "weights": ("beam_pipelines.importance_weights", "importance weights: P_t / P_s per source label (Beam)"),
    "dedup": ("beam_pipelines.near_duplicates", "near-duplicates of the target's images in the source (Beam)"),
    "resample": ("spark_jobs.resample", "draw the pre-training set from the source index (Spark)"),
    "shards": ("spark_jobs.write_shards", "write the selection as WebDataset shards with a manifest (Spark)"),
    "shards-many": ("spark_jobs.write_shards.many",
                    "every target's shards in one pass over the index, OUTPUT/<target> each (Spark)"),
    "verify": ("spark_jobs.verify", "check shards against their manifest"),
    "pretrain": ("trainer.pretrain", "pre-train on shards (DeepSpeed)"),
    "finetune": ("trainer.finetune", "fine-tune on the target with a new head (DeepSpeed)"),
    "evaluate": ("trainer.evaluate", "evaluate a fine-tuned model on the target"),
    "build-index": ("spark_jobs.build_index", "an ImageNet-layout source index and vocabulary (Spark)"),
    "pipeline": ("adaptive_transfer.resample",
                 "make resample: weights, near-duplicates, resample, shards, verify for a target"),
    "demo": ("adaptive_transfer.demo", "make demo: the whole method on generated data"),
    "experiment": ("adaptive_transfer.experiment", "make experiment: the paper's findings with seeds"),
    "generate": ("adaptive_transfer.synthetic", "generated source and targets (tests, demo)"),
    "real-data": ("adaptive_transfer.real_data.fetch", "fetch the real-image datasets (make real-data)"),
}



def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: adaptive-transfer COMMAND [options]   (adaptive-transfer COMMAND --help for its options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"adaptive-transfer: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    os.environ[PROG_ENV] = f"adaptive-transfer {name}"
    try:
        return int(module.main(rest) or 0)
    finally:
        os.environ.pop(PROG_ENV, None)


if __name__ == "__main__":
    raise SystemExit(main())
