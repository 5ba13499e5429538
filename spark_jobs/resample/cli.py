"""``python -m spark_jobs.resample``: the command line of :class:`ResampleJob`,
and of :class:`ManyResampleJob` where ``--weights NAME=PATH`` is given once
per target (outputs at ``--output``/NAME; ``--exclude`` PATH for every
target or NAME=PATH for one)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from schemas.cli import ArgumentParser
from schemas.manifest import SCHEMES

from ..session import add_spark_arguments, run_cli
from schemas import io as sio

from .job import DEFAULT_ROWS_PER_PARTITION, ResampleJob, run
from .many import ManyResampleJob

__all__ = ["build_parser", "job_from_args", "jobs_from_args", "main"]

#: ``NAME=PATH``: a target's name (letters, digits, ``_.-``) and its file.
_NAMED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)=(.+)$")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m spark_jobs.resample",
                       description="Resample a source index by importance weights.")
    p.add_argument("--index", required=True, help="source index: Parquet file, directory or glob")
    p.add_argument("--weights", action="append", metavar="[NAME=]PATH",
                   help="weights.parquet from beam_pipelines.importance_weights; NAME=PATH once per target draws "
                        "every target's selection in one pass over the index, each into --output/NAME")
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
    p.add_argument("--exclude", action="append", metavar="[NAME=]PATH",
                   help="Parquet with a 'key' column: keys never to select (NAME=PATH: for target NAME only)")
    p.add_argument("--label-sets", metavar="PATH",
                   help="the index's label-set table (a Parquet file): read when it was counted over this index "
                        "and --exclude (checked against the records during the draw), else counted and written "
                        "here. Share one per index across runs (targets, sizes, schemes) to skip a full scan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="target name recorded in stats.json (default: from the weights)")
    p.add_argument("--output", required=True, help="the output directory (many targets: their parent)")
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    add_spark_arguments(p)
    p.add_argument("--rows-per-partition", type=int, default=DEFAULT_ROWS_PER_PARTITION)
    return p


def job_from_args(args: argparse.Namespace) -> ResampleJob:
    """The single-target job of the command line (``ValueError`` where it names many targets)."""
    job = jobs_from_args(args)
    if isinstance(job, ManyResampleJob):
        raise ValueError("--weights NAME=PATH names targets; run them with jobs_from_args")
    return job


def jobs_from_args(args: argparse.Namespace) -> ResampleJob | ManyResampleJob:
    """The command line's job: one target, or many where ``--weights`` is NAME=PATH."""
    weights, excludes = _named(args.weights or [], "--weights"), _named(args.exclude or [], "--exclude")
    if weights is None and (args.weights or []) and len(args.weights) > 1:
        raise ValueError("--weights given more than once: name each target's, --weights NAME=PATH")
    if excludes is None and len(args.exclude or []) > 1:
        raise ValueError("--exclude given more than once: name each target's, --exclude NAME=PATH")
    if weights is None and excludes is not None:
        raise ValueError("--exclude NAME=PATH names a target: give the targets' weights as --weights NAME=PATH")
    base = ResampleJob(
        index=args.index, output=args.output, size=args.size,
        weights=next(iter(weights.values())) if weights is not None else (args.weights or [None])[0],
        matcher=args.matcher, draw=args.draw, aggregate=args.aggregate, scheme=args.scheme,
        labels=args.labels,
        subset_labels=tuple(s.strip() for s in args.subset_labels.split(",") if s.strip()),
        top_k=args.top_k, exclude=None if excludes is not None else (args.exclude or [None])[0],
        seed=args.seed, target=args.target,
        rows_per_partition=args.rows_per_partition, overwrite=args.overwrite, label_sets=args.label_sets,
        shared_output=args.shared_output)
    if weights is None:
        return base
    if args.target:
        raise ValueError("--target with --weights NAME=PATH: the names are the targets'")
    return ManyResampleJob.for_targets(base, weights, excludes)


def _named(values: list[str], flag: str) -> dict[str, str] | None:
    """``flag``'s values as NAME -> PATH where every one is NAME=PATH (a
    value that is an existing path is a path, whatever it holds); ``None``
    where none is; a mix, or a name given twice, is refused."""
    named = [None if sio.exists(v) else _NAMED.match(v) for v in values]
    if not values or not any(named):
        return None
    if not all(named):
        raise ValueError(f"{flag}: give every value as NAME=PATH or one PATH, not both")
    out: dict[str, str] = {}
    for m in named:
        if m.group(1) in out:
            raise ValueError(f"{flag}: target {m.group(1)} given twice")
        out[m.group(1)] = m.group(2)
    return out


def _describe(job, result) -> str:
    if isinstance(job, ResampleJob):
        return (f"{result['total_copies']} samples, {result['unique_examples']} unique examples, "
                f"total variation {result['total_variation']:.4f} -> {job.output}")
    return f"{len(result)} targets ({', '.join(r.job.target for r in result)}), one pass over {job.index}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("resample", args, lambda: jobs_from_args(args), _run, _describe)


def _run(spark, job):
    """``run``; many targets: each target's line (its statistics, or why it
    failed), then ``ValueError`` naming the failed targets (exit status 1)."""
    result = run(spark, job)
    if isinstance(job, ResampleJob):
        return result
    for r in result:
        if r.ok:
            print(f"resample: {r.job.target}: {r.stats['total_copies']} samples, {r.stats['unique_examples']} "
                  f"unique examples, total variation {r.stats['total_variation']:.4f}"
                  f"{' (reused)' if r.reused else ''} -> {r.job.output}")
        else:
            print(f"resample: {r.job.target}: error: {r.error}", file=sys.stderr)
    failed = [r.job.target for r in result if not r.ok]
    if failed:
        raise ValueError(f"{len(failed)} of {len(result)} targets failed ({', '.join(failed)}); "
                         "the others' outputs are finished")
    return result
