"""``python -m spark_jobs.resample``: the command line of :class:`ResampleJob`."""

from __future__ import annotations

import argparse
from typing import Sequence

from schemas.cli import ArgumentParser
from schemas.manifest import SCHEMES

from ..session import add_spark_arguments, run_cli
from .job import DEFAULT_ROWS_PER_PARTITION, ResampleJob, run

__all__ = ["build_parser", "job_from_args", "main"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m spark_jobs.resample",
                       description="Resample a source index by importance weights.")
    p.add_argument("--index", required=True, help="source index: Parquet file, directory or glob")
    p.add_argument("--weights", help="weights.parquet from beam_pipelines.importance_weights")
    p.add_argument("--size", required=True, help="samples to draw: 80M, 2M, 1.5B, 500K, 80000000")
    p.add_argument("--matcher", choices=["same", "elastic"], default="same")
    p.add_argument("--draw", choices=["multinomial", "systematic"], default="multinomial",
                   help="same matcher only (default: multinomial, the paper's)")
    p.add_argument("--aggregate", choices=["mean", "max", "sum"], default="mean",
                   help="per-example weight from its labels' weights (default: mean)")
    p.add_argument("--scheme", choices=SCHEMES, default="adaptive")
    p.add_argument("--labels", help="label vocabulary (needed for --scheme subset)")
    p.add_argument("--subset-labels", default="", help="comma-separated label names (scheme subset)")
    p.add_argument("--top-k", type=int, help="top-K labels by weight (topk-uniform, reversed, adaptive)")
    p.add_argument("--exclude", help="Parquet with a 'key' column: keys never to select")
    p.add_argument("--label-sets", metavar="PATH",
                   help="the index's label-set table (a Parquet file): read when it was counted over this index "
                        "and --exclude (checked against the records during the draw), else counted and written "
                        "here. Share one per index across runs (targets, sizes, schemes) to skip a full scan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="target name recorded in stats.json (default: from the weights)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    add_spark_arguments(p)
    p.add_argument("--rows-per-partition", type=int, default=DEFAULT_ROWS_PER_PARTITION)
    return p


def job_from_args(args: argparse.Namespace) -> ResampleJob:
    return ResampleJob(
        index=args.index, output=args.output, size=args.size, weights=args.weights,
        matcher=args.matcher, draw=args.draw, aggregate=args.aggregate, scheme=args.scheme,
        labels=args.labels,
        subset_labels=tuple(s.strip() for s in args.subset_labels.split(",") if s.strip()),
        top_k=args.top_k, exclude=args.exclude, seed=args.seed, target=args.target,
        rows_per_partition=args.rows_per_partition, overwrite=args.overwrite, label_sets=args.label_sets,
        shared_output=args.shared_output)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("resample", args, lambda: job_from_args(args), run,
                   lambda job, s: f"{s['total_copies']} samples, {s['unique_examples']} unique examples, "
                                  f"total variation {s['total_variation']:.4f} -> {job.output}")
