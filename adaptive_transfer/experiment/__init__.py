"""``make experiment``: the paper's findings with seeds and error bars, on
generated data (default) or real images (``--data real``, ``make experiment DATA=real``).

Three targets from different branches of a hierarchical source (generated:
shaped like Food-101, Birdsnap and Stanford Cars; real: Fashion-MNIST
footwear, Animal-MNIST, MNIST digits), ten arms each (entire source,
hand-picked subset, wrong-domain subset, adaptive with the same and the
elastic matcher, Table 6's adaptive / uniform / reversed weights on the same
top-k labels, a class-balanced control, random initialisation), Figure 3's
size sweep, five seeds (real data: over two data draws, near-duplicates of
the targets' images removed from every pre-training set), all through the
real stages (Beam weights and near-duplicates, Spark resample and shards,
DeepSpeed pre-training and fine-tuning). Writes ``OUT/report/report.md``,
``results.json`` (every per-seed metric) and the plots.

::

    python -m adaptive_transfer.experiment [--output experiment_out] [--quick] [--seeds 0,1,2,3,4]
        [--data generated|real] [--draws 0,1] [--real-data DIR] [--torch-threads N]

``--quick``: one seed, tiny sizes and steps (a few minutes; ``make test`` runs
it). The full run takes about an hour on 2 cores; stages already finished
with the same fingerprint are reused, so an interrupted run continues, and
processes with disjoint ``--seeds`` can share one ``--output`` once its
``data/`` is made (a stage another process is building is refused, never
built twice; one run over all seeds then reuses their work and writes the
whole report).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from argparse import ArgumentTypeError
from typing import Sequence

from schemas.cli import ArgumentParser

from .plan import configs, finetune_runs, hypothesis_runs

__all__ = ["main", "build_parser"]


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m adaptive_transfer.experiment", description=__doc__)
    p.add_argument("--output", default="experiment_out", help="outputs, per seed and arm (default experiment_out)")
    p.add_argument("--quick", action="store_true", help="one seed, tiny sizes and steps")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: 0-4, or 0 with --quick)")
    p.add_argument("--data", choices=("generated", "real"), default="generated",
                   help="generated data (default) or the real images of `make real-data`")
    p.add_argument("--draws", type=_seeds,
                   help="comma-separated data draws of the real images (default 0,1; 0 with --quick)")
    p.add_argument("--hypotheses", type=_names, default=(),
                   help="comma-separated extra runs testing the generated result's explanations: "
                        "oracle, leaves, temperature, generalist (adaptive_transfer.experiment.plan.HYPOTHESES)")
    p.add_argument("--source-size", type=int,
                   help="generated data: examples in the source (default 12,000; 1,500 with --quick)")
    p.add_argument("--finished-only", action="store_true",
                   help="build nothing past the data: report the fine-tuning runs already finished under "
                        "--output (a run stopped part way)")
    p.add_argument("--real-data", help="where `make real-data` put the images (default data/real)")
    p.add_argument("--master", default=None, help="Spark master (default local[*])")
    p.add_argument("--torch-threads", type=int,
                   help="torch's threads in this process (default torch's own). 1 when several runs share "
                        "the cores, e.g. two processes with disjoint --seeds under one --output")
    p.add_aliases({"--out": "--output", "--spark-master": "--master"})
    return p


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = configs(args.data, args.quick, args.real_data)
        if args.seeds:
            config = replace(config, seeds=args.seeds)
        if args.draws:
            config = replace(config, draws=args.draws)
        if args.source_size:
            if config.world.kind != "generated":
                raise ValueError("--source-size is for generated data")
            config = replace(config, world=replace(config.world, source=replace(config.world.source,
                                                                                 num_examples=args.source_size)))
        hypotheses = tuple(args.hypotheses)
        hypothesis_runs(config, config.seeds[0], hypotheses)  # names checked before anything runs
        if args.data == "real":
            config.world.require_data()
    except ValueError as e:
        print(f"experiment: error: {e}", file=sys.stderr)
        return 2
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    from .. import stages
    from .report import write_report
    from .runner import Experiment

    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", file=sys.__stdout__, flush=True)

    engines = stages.Engines(master=args.master, log=log)
    records, generalist, data, dedup = [], {}, {}, {}
    try:
        for draw in config.draws:
            out = args.output if config.world.kind == "generated" else os.path.join(args.output, f"draw-{draw}")
            exp = Experiment(config, out, engines, draw)
            records += exp.run(lambda seed: finetune_runs(config, seed) + hypothesis_runs(config, seed, hypotheses),
                               finished_only=args.finished_only)
            generalist[str(draw)] = {t.name: exp.generalist_facts(t.name) for t in config.targets}
            data[str(draw)], dedup[str(draw)] = exp.world.facts, exp.dedup_facts()
        labels = generalist[str(config.draws[0])][config.targets[0].name]["labels"]
        built = {"built": engines.built, "reused": engines.reused}
    except (ValueError, OSError) as e:
        print(f"experiment: error: {e}", file=sys.stderr)
        return 1
    finally:
        engines.stop()
    meta = {"command": " ".join(["python -m adaptive_transfer.experiment", *(argv if argv is not None else
                                                                              sys.argv[1:])]),
            "commit": _commit(), "config": config.to_json(), "generalist": generalist, "labels": labels,
            "setup": config.world.describe(), "hypotheses": list(hypotheses), "finished_only": args.finished_only, "data": data, "near_duplicates": dedup,
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "minutes": (time.time() - t0) / 60, "stages": built,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    report_dir = os.path.join(os.path.abspath(args.output), "report")
    summary = write_report(report_dir, records, meta)
    for c in summary["claims"]:
        log(f"{c['claim']}: " + "; ".join(f"{t} {v}" for t, v in c["verdicts"].items()))
    log(f"report: {os.path.join(report_dir, 'report.md')}")
    return 0
