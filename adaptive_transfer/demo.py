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

    python -m adaptive_transfer.demo [--out demo_out] [--size 6000] [--pretrain-steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Sequence

from . import demo_data as D

__all__ = ["main", "ROWS"]

#: (row name, resampler options) in the order of the paper's tables.
ROWS = [
    ("Entire source", {"scheme": "entire", "matcher": "same", "draw": "multinomial"}),
    ("Hand-picked subset: food", {"scheme": "subset", "subset_labels": ("food",), "matcher": "same",
                                  "draw": "multinomial"}),
    ("Adaptive transfer, same distribution matcher", {"scheme": "adaptive", "matcher": "same",
                                                      "draw": "multinomial"}),
    ("Adaptive transfer, elastic distribution matcher", {"scheme": "adaptive", "matcher": "elastic"}),
]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaptive_transfer.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--size", type=int, default=6000, help="examples in each pre-training set")
    ap.add_argument("--generalist-steps", type=int, default=300)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spark-master", default=None)
    args = ap.parse_args(argv)

    from beam_pipelines import importance_weights as IW
    from spark_jobs import resample as R
    from spark_jobs import verify as V
    from spark_jobs import write_shards as W
    from schemas.stage_output import is_complete

    from .experiment.runner import reuse_or_build
    from spark_jobs.session import get_session

    t0 = time.time()
    out = os.path.abspath(args.out)
    report_dir = os.path.join(out, "demo")
    os.makedirs(report_dir, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    spark = get_session("adaptive-transfer demo", args.spark_master)
    try:
        data = D.ensure_demo_data(os.path.join(out, "demo-data"), spark, args.generalist_steps, log)
        weights = os.path.join(out, "weights")
        if not is_complete(weights):
            log("importance weights (Beam DirectRunner)")
            IW.run(IW.WeightsJob(index=data.index, labels=data.labels, target_root=data.target,
                                 target_layout="food101", target="demo", checkpoint=data.generalist, output=weights))
        summary = json.loads(open(os.path.join(weights, "summary.json")).read())
        log("top labels: " + ", ".join(f"{t['name']} ({t['weight']:.2f})" for t in summary["top_labels"][:8]))
        shutil.copy(os.path.join(weights, "weights.png"), os.path.join(report_dir, "weights.png"))

        def finetuned(init: str, init_digest: str | None, slug: str) -> dict:
            """Fine-tune from ``init`` (reused when the model, steps and seed are the same)."""
            path = os.path.join(out, "runs", f"seed-{args.seed}", "finetune", slug)
            reuse_or_build(path, {"init": init_digest, "steps": args.finetune_steps, "seed": args.seed},
                           lambda p: D.run_finetune(data.target, init, p, args.finetune_steps, args.seed, log), log)
            return json.loads(open(os.path.join(path, "metrics.json")).read())

        results = []
        for i, (name, options) in enumerate(ROWS):
            slug = ["entire", "subset-food", "adaptive-same", "adaptive-elastic"][i]
            # per seed, and rebuilt when any setting it was made from changed (never another seed's model)
            run_dir = os.path.join(out, "runs", f"seed-{args.seed}", slug)
            fingerprint = {"options": options, "size": args.size, "seed": args.seed,
                           "pretrain_steps": args.pretrain_steps, "weights": weights,
                           "generalist_steps": args.generalist_steps}

            def build(path, name=name, options=options, slug=slug):
                log(f"{name}: resample {args.size} examples")
                R.run(spark, R.ResampleJob(index=data.index, weights=os.path.join(weights, "weights.parquet"),
                                           labels=data.labels, size=args.size, seed=args.seed, target="demo",
                                           output=os.path.join(path, "resample"),
                                           label_sets=os.path.join(out, "label-sets.parquet"), **options))
                manifest = W.run(spark, W.ShardJob(selection=os.path.join(path, "resample"), index=data.index,
                                                   output=os.path.join(path, "shards"), samples_per_shard=500,
                                                   seed=args.seed))
                check = V.verify(os.path.join(path, "shards"))
                if not check.ok:
                    raise RuntimeError(f"verify failed for {slug}: {check.problems[:3]}")
                log(f"{name}: pre-train {args.pretrain_steps} steps on {manifest.total_samples} samples")
                D.run_pretrain(os.path.join(path, "shards", "manifest.json"), data.labels,
                               os.path.join(path, "pretrain"), args.pretrain_steps, seed=args.seed, log=log)

            model_digest, reused = reuse_or_build(run_dir, fingerprint, build, log)
            if reused:
                log(f"{name}: pre-trained model reused (same settings and seed)")
            stats = json.loads(open(os.path.join(run_dir, "resample", "stats.json")).read())
            shutil.copy(os.path.join(run_dir, "resample", "label_stats.png"),
                        os.path.join(report_dir, f"label_stats-{slug}.png"))
            log(f"{name}: fine-tune {args.finetune_steps} steps")
            metrics = finetuned(os.path.join(run_dir, "pretrain", "generalist.pt"), model_digest, slug)
            results.append({"pre-training set": name, "unique examples": stats["unique_examples"],
                            "samples": stats["total_copies"], "total variation": stats["total_variation"],
                            "top1": metrics["top1"], "mean per-class": metrics["mean_per_class_accuracy"]})
        log("Random initialisation (no pre-training): fine-tune")
        metrics = finetuned("none", None, "random-init")
        results.append({"pre-training set": "Random initialisation", "unique examples": 0, "samples": 0,
                        "total variation": None, "top1": metrics["top1"],
                        "mean per-class": metrics["mean_per_class_accuracy"]})
    finally:
        spark.stop()

    table = ["| Pre-training set | Unique examples | Target top-1 | Mean per-class |",
             "|---|---:|---:|---:|"]
    table += [f"| {r['pre-training set']} | {r['unique examples']:,} | {100 * r['top1']:.1f} | "
              f"{100 * r['mean per-class']:.1f} |" for r in results]
    minutes = (time.time() - t0) / 60
    text = "\n".join([
        "# Demo: domain adaptive transfer on generated data", "",
        f"Source: {D.DEMO_SOURCE.num_examples} generated examples, 66 leaf labels in 4 branches; target: "
        f"{D.DEMO_TARGET.num_classes} classes ({D.DEMO_TARGET.train_per_class} train images each), mostly food.",
        f"Each pre-training set has {args.size} samples; {args.pretrain_steps} pre-training and "
        f"{args.finetune_steps} fine-tuning steps of a small CNN on CPU (seed {args.seed}).", "",
        *table, "",
        "Plots: weights.png (top labels by importance weight), label_stats-*.png (realised vs desired).",
        f"Took {minutes:.1f} minutes.", ""])
    open(os.path.join(report_dir, "report.md"), "w").write(text)
    open(os.path.join(report_dir, "results.json"), "w").write(json.dumps(results, indent=2) + "\n")
    print()
    print("\n".join(table))
    print(f"\nreport, table and plots: {report_dir}  ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
