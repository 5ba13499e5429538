"""``make demo``: the whole method on generated data, with the embedded engines.

1. generate a JFT-like source and a Food-101-layout target (mostly 'food');
2. train a small generalist on the entire source (resample 'entire' ->
   shards -> DeepSpeed pre-training);
3. importance weights for the target (Beam, DirectRunner);
4. four pre-training sets of the same size (Spark ``local[*]``): the entire
   source, the hand-picked 'food' subset, adaptive with the same distribution
   matcher and with the elastic one; shards for each, verified;
5. pre-train a model on each and fine-tune it on the target (DeepSpeed, CPU);
6. print the paper's table (rows: pre-training set; columns: unique
   examples, target accuracy) and write it with the plots under ``OUT/demo``.

::

    python -m adaptive_transfer.demo [--output demo_out] [--size 6000] [--pretrain-steps 300]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Sequence

from schemas import io as sio
from schemas.cli import ArgumentParser

from . import demo_data as D
from . import stages

__all__ = ["main", "build_parser", "ROWS", "SLUGS"]

#: (row name, resampler options) in the order of the paper's tables.
ROWS = [
    ("Entire source", {"scheme": "entire", "matcher": "same", "draw": "multinomial"}),
    ("Hand-picked subset: food", {"scheme": "subset", "subset_labels": ("food",), "matcher": "same",
                                  "draw": "multinomial"}),
    ("Adaptive transfer, same distribution matcher", {"scheme": "adaptive", "matcher": "same",
                                                      "draw": "multinomial"}),
    ("Adaptive transfer, elastic distribution matcher", {"scheme": "adaptive", "matcher": "elastic"}),
]
#: Each row's directory under ``OUT/runs/seed-S/``.
SLUGS = ["entire", "subset-food", "adaptive-same", "adaptive-elastic"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m adaptive_transfer.demo", description=__doc__)
    p.add_argument("--output", default="demo_out", help="where everything goes (default demo_out)")
    p.add_argument("--size", type=int, default=6000, help="examples in each pre-training set")
    p.add_argument("--generalist-steps", type=int, default=300)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--master", default=None, help="Spark master (default local[*])")
    p.add_aliases({"--out": "--output", "--spark-master": "--master"})
    return p


def _finetune(data: D.DemoData, init: str, output: str, args, engines) -> dict:
    """Fine-tune the demo target from ``init`` (a generalist.pt, or 'none')."""
    from trainer.finetune import FinetuneJob

    stages.finetune(FinetuneJob(target_layout="food101", target_root=data.target, init=init, output=output,
                                arch="small", steps=args.finetune_steps, batch_size=32, lr=0.05, seed=args.seed,
                                num_workers=2, log_every=args.finetune_steps), engines)
    with open(os.path.join(output, "metrics.json")) as fh:
        return json.load(fh)


def _row(name: str, options: dict, slug: str, data: D.DemoData, weights: str, args, engines) -> dict:
    """One pre-training set of the table: built, pre-trained, fine-tuned."""
    from spark_jobs.resample import ResampleJob

    runs = os.path.join(os.path.abspath(args.output), "runs", f"seed-{args.seed}")
    job = ResampleJob(index=data.index, output="", weights=os.path.join(weights, "weights.parquet"),
                      labels=data.labels, size=args.size, seed=args.seed, target="demo",
                      label_sets=os.path.join(os.path.abspath(args.output), "label-sets.parquet"), **options)
    engines.log(f"{name}: {args.size} samples, {args.pretrain_steps} pre-training steps")
    built = stages.build_set(stages.plan_set(
        os.path.join(runs, slug), job, samples_per_shard=500,
        pretrain={"arch": "small", "steps": args.pretrain_steps, "batch_size": 64, "lr": 0.1, "num_workers": 2,
                  "log_every": max(1, args.pretrain_steps // 4), "save_every": args.pretrain_steps,
                  "keep_checkpoints": 1}), engines)
    metrics = _finetune(data, built.model, os.path.join(runs, "finetune", slug), args, engines)
    return {"pre-training set": name, "unique examples": built.stats["unique_examples"],
            "samples": built.stats["total_copies"], "total variation": built.stats["total_variation"],
            "top1": metrics["top1"], "mean per-class": metrics["mean_per_class_accuracy"],
            "label_stats": os.path.join(built.plan.resample.output, "label_stats.png")}


def _report(report_dir: str, results: list[dict], args, minutes: float) -> list[str]:
    """The paper's table (rows: pre-training set) in report.md and results.json."""
    table = ["| Pre-training set | Unique examples | Target top-1 | Mean per-class |",
             "|---|---:|---:|---:|"]
    table += [f"| {r['pre-training set']} | {r['unique examples']:,} | {100 * r['top1']:.1f} | "
              f"{100 * r['mean per-class']:.1f} |" for r in results]
    text = "\n".join([
        "# Demo: domain adaptive transfer on generated data", "",
        f"Source: {D.DEMO_SOURCE.num_examples} generated examples, 66 leaf labels in 4 branches; target: "
        f"{D.DEMO_TARGET.num_classes} classes ({D.DEMO_TARGET.train_per_class} train images each), mostly food.",
        f"Each pre-training set has {args.size} samples; {args.pretrain_steps} pre-training and "
        f"{args.finetune_steps} fine-tuning steps of a small CNN on CPU (seed {args.seed}).", "",
        *table, "",
        "Plots: weights.png (top labels by importance weight), label_stats-*.png (realised vs desired).",
        f"Took {minutes:.1f} minutes.", ""])
    with open(os.path.join(report_dir, "report.md"), "w") as fh:
        fh.write(text)
    rows = [{k: v for k, v in r.items() if k != "label_stats"} for r in results]
    with open(os.path.join(report_dir, "results.json"), "w") as fh:
        fh.write(sio.json_text(rows, indent=2) + "\n")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from beam_pipelines.importance_weights import WeightsJob

    t0 = time.time()
    out = os.path.abspath(args.output)
    report_dir = os.path.join(out, "demo")
    os.makedirs(report_dir, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    engines = stages.Engines(master=args.master, log=log)
    try:
        data = D.ensure_demo_data(os.path.join(out, "demo-data"), engines, args.generalist_steps)
        weights = os.path.join(out, "weights")
        summary = stages.weights(WeightsJob(index=data.index, labels=data.labels, target_root=data.target,
                                            target_layout="food101", target="demo", checkpoint=data.generalist,
                                            output=weights), engines)
        log("top labels: " + ", ".join(f"{t['name']} ({t['weight']:.2f})" for t in summary["top_labels"][:8]))
        shutil.copy(os.path.join(weights, "weights.png"), os.path.join(report_dir, "weights.png"))
        results = []
        for (name, options), slug in zip(ROWS, SLUGS):
            results.append(_row(name, options, slug, data, weights, args, engines))
            shutil.copy(results[-1]["label_stats"], os.path.join(report_dir, f"label_stats-{slug}.png"))
        log("Random initialisation (no pre-training): fine-tune")
        metrics = _finetune(data, "none", os.path.join(out, "runs", f"seed-{args.seed}", "finetune", "random-init"),
                            args, engines)
        results.append({"pre-training set": "Random initialisation", "unique examples": 0, "samples": 0,
                        "total variation": None, "top1": metrics["top1"],
                        "mean per-class": metrics["mean_per_class_accuracy"]})
    except (ValueError, OSError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    finally:
        engines.stop()
    minutes = (time.time() - t0) / 60
    table = _report(report_dir, results, args, minutes)
    print()
    print("\n".join(table))
    print(f"\nreport, table and plots: {report_dir}  ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
