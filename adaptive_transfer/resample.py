"""``make resample TARGET=food101 SIZE=80M``: weights, near-duplicates, resample, shards, verify.

::

    python -m adaptive_transfer.resample --target food101[,stanford_cars,...] --size 80M [--source jft]
      [--matcher same|elastic] [--draw multinomial|systematic] [--seed 0]
      [--runner DirectRunner] [--master local[*]] [--output out]
      [--target-root PATH] [--checkpoint generalist.pt] [--samples-per-shard 10000]
      [--no-dedup] [--dedup-threshold T]

(``adaptive-transfer pipeline ...`` is the same command.)

Layout under ``--output`` (a local path or URL)::

    weights/<target>-<key>/                  importance weights
    embeddings/index-<key>-model-<key>/      source embeddings (one per index and generalist, every target)
    dedup/<target>-<key>/                    near-duplicates of the target's train and test images
    label-sets/index-<key>[-exclude-<key>].parquet
                                             the index's label-set table (shared by every run over it
                                             and the same exclusions)
    <target>/<size>-<matcher>[-<draw>]-<key>/
        resample/                            selection, stats.json, label_stats.png
        shards/                              shard-*.tar, manifest.json, _SUCCESS

Several targets (``--target food101,stanford_cars,birdsnap``; ``make
resample TARGET=a,b,c``) are built together, each where its own run would
put it: one Beam run for every target's weights (the source's labels
counted once), one for the near-duplicates (the source's embeddings read
once), one Spark scan of the index for every selection and one fetch pass
for every target's shards (each selected image read once). Each target's
outputs are identical to its single-target run's and follow the output
protocol on their own: a target that fails leaves the others' finished
results, and a rerun builds only what is missing.

``<key>`` names a directory by its inputs (listings of the index and target,
the vocabulary, the generalist) and options, so runs with other settings sit
side by side. Whether a stage's output there is reused is decided by the one
reuse rule (``schemas.stage_output``, through ``adaptive_transfer.stages``):
complete, and made from the same settings, inputs and code; otherwise it is
rebuilt. Training runs point at ``.../shards/manifest.json``.

The resampler never draws a near-duplicate of a target image (``--exclude``
with the dedup stage's ``exclude.parquet``); ``--no-dedup`` (``make
resample DEDUP=0``) draws from the whole source. ``--target demo`` (with
``--source demo``) runs the same path on generated data.
"""

from __future__ import annotations

import sys
import time
from argparse import ArgumentTypeError as _ArgumentTypeError
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from schemas import format_size, parse_size
from schemas import io as sio
from schemas.cli import ArgumentParser
from schemas.fingerprint import digest
from schemas.targets import list_target

from . import stages
from .registry import SourceConfig, TargetConfig, load_source, load_target

__all__ = ["build_parser", "TargetRun", "plan", "run", "main"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m adaptive_transfer.resample", description=__doc__)
    p.add_argument("--target", required=True, type=_targets,
                   help="a configs/targets name (food101, ...) or a YAML path; several, comma-separated, "
                        "are built in one pass over the source")
    p.add_argument("--size", required=True, type=_size, help="pre-training set size: 80M, 2M, 1.5B, ...")
    p.add_argument("--source", default=None, help="a configs/sources name (default jft; demo for --target demo)")
    p.add_argument("--matcher", choices=["same", "elastic"], default="same")
    p.add_argument("--draw", choices=["multinomial", "systematic"], default="multinomial")
    p.add_argument("--aggregate", choices=["mean", "max", "sum"], default="mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=_positive(float), default=2.0)
    p.add_argument("--runner", default="DirectRunner", help="Beam runner for the weights pipeline")
    p.add_argument("--beam-arg", action="append", default=[], help="extra Beam option, repeatable")
    p.add_argument("--master", default=None, help="Spark master (default local[*])")
    p.add_argument("--output", default="out", help="where every stage's output goes (default out)")
    p.add_argument("--target-root", help="where the target data lives (overrides the config)")
    p.add_argument("--checkpoint", help="the generalist (overrides the source config)")
    p.add_argument("--samples-per-shard", type=_positive(int), default=10000)
    p.add_argument("--max-side", type=_positive(int), metavar="N",
                   help="shards: re-encode images whose longer side exceeds N pixels (write_shards --max-side)")
    p.add_argument("--quality", type=_positive(int), metavar="Q", help="JPEG quality of re-encoded images "
                                                                        "(default 90)")
    p.add_argument("--allow-uri-prefix", action="append", default=[], metavar="PREFIX",
                   help="where a uri index's images may be read from, repeatable (default: the source "
                        "config's image_root or train_root, else the index's own directory)")
    p.add_argument("--no-dedup", dest="dedup", action="store_false",
                   help="keep near-duplicates of the target's train and test images in the source")
    p.add_argument("--dedup-threshold", type=float, default=None,
                   help="near-duplicate similarity threshold (default: beam_pipelines.near_duplicates')")
    p.add_aliases({"--out": "--output", "--spark-master": "--master", "--model": "--checkpoint"})
    return p


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",")))
    if not names or any(not n for n in names):
        raise _ArgumentTypeError(f"give target names separated by commas, got {text!r}")
    return names


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise _ArgumentTypeError(str(e)) from None


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise _ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


@dataclass(frozen=True)
class TargetRun:
    """Everything one target's run does, as typed jobs (no work done yet)."""

    target: TargetConfig
    source: str
    weights: Any  # beam_pipelines.importance_weights.WeightsJob
    dedup: Any  # beam_pipelines.near_duplicates.NearDuplicatesJob, or None (--no-dedup)
    set: stages.SetPlan  # resample -> shards -> verify


@dataclass(frozen=True)
class _Inputs:
    index: str
    labels: str
    checkpoint: str
    root: str
    keys: dict


def _inputs(args, target: TargetConfig, source: SourceConfig, engines: stages.Engines) -> _Inputs:
    """The source's and target's files (the demo's generated on first use) and their fingerprints."""
    index, labels = source.index, source.labels
    checkpoint, root = args.checkpoint or source.generalist, target.root
    if "generated" in (index, labels, checkpoint, root) or target.name == "demo":
        from .demo_data import ensure_demo_data

        data = ensure_demo_data(sio.join(args.output, "demo-data"), engines)
        index, labels = data.index, data.labels
        checkpoint = args.checkpoint or data.generalist
        root = args.target_root or data.target
    if not checkpoint:
        raise ValueError(f"source {source.name!r} names no generalist; pass --checkpoint generalist.pt "
                         "(train one with trainer.pretrain on the entire source)")
    split = list_target(root, target.layout, target.train_split)
    keys = {"index": sio.listing_fingerprint(index), "labels": sio.fingerprint_paths(labels),
            "model": sio.file_sha256(checkpoint), "target_images": digest(split.paths)}
    return _Inputs(index, labels, checkpoint, root, keys)


def _dedup_job(args, target: TargetConfig, inputs: _Inputs, allowed):
    from beam_pipelines.near_duplicates import DEFAULT_GRID, DEFAULT_THRESHOLD, NearDuplicatesJob

    splits = tuple(dict.fromkeys([target.train_split, target.test_split]))
    listed = [list_target(inputs.root, target.layout, s).paths for s in splits]
    threshold = DEFAULT_THRESHOLD if args.dedup_threshold is None else args.dedup_threshold
    key = digest({"index": inputs.keys["index"], "model": inputs.keys["model"], "layout": target.layout,
                  "splits": list(splits), "target_images": digest(listed), "threshold": threshold,
                  "grid": DEFAULT_GRID})
    embeddings = sio.join(args.output, "embeddings",
                          f"index-{inputs.keys['index'][:12]}-model-{inputs.keys['model'][:12]}")
    return NearDuplicatesJob(index=inputs.index, labels=inputs.labels, target_root=inputs.root,
                             target_layout=target.layout, splits=splits, checkpoint=inputs.checkpoint,
                             threshold=threshold, embeddings=embeddings, allow_uri_prefixes=tuple(allowed or ()),
                             output=sio.join(args.output, "dedup", f"{target.name}-{key[:12]}")), key


def plan(args, engines: stages.Engines, name: str | None = None) -> TargetRun:
    """Resolve configs and fingerprints into target ``name``'s typed jobs
    (default: the only one of ``--target``; the demo's data are generated
    here on first use; no stage runs)."""
    from beam_pipelines.importance_weights import WeightsJob
    from spark_jobs.resample import ResampleJob

    name = name or _only(args.target)
    target = load_target(name, args.target_root)
    source_name = args.source or ("demo" if name == "demo" else "jft")
    source = load_source(source_name)
    inputs = _inputs(args, target, source, engines)
    weights_key = digest({"inputs": inputs.keys, "layout": target.layout, "split": target.train_split,
                          "temperature": args.temperature})
    weights = WeightsJob(index=inputs.index, labels=inputs.labels, target_root=inputs.root,
                         target_layout=target.layout, target_split=target.train_split, target=target.name,
                         checkpoint=inputs.checkpoint, temperature=args.temperature,
                         output=sio.join(args.output, "weights", f"{target.name}-{weights_key[:12]}"))
    image_root = source.extra.get("image_root") or source.extra.get("train_root")
    allowed = args.allow_uri_prefix or ([image_root] if image_root else None)
    dedup, dedup_key = _dedup_job(args, target, inputs, allowed) if args.dedup else (None, None)
    draw = args.draw if args.matcher == "same" else "systematic"
    options = {"size": args.size, "matcher": args.matcher, "draw": draw, "aggregate": args.aggregate,
               "seed": args.seed, "samples_per_shard": args.samples_per_shard,
               **({"max_side": args.max_side, "quality": args.quality} if args.max_side else {})}
    run_key = digest({"weights": weights_key, **({"dedup": dedup_key} if dedup else {}), **options})
    label = f"{format_size(args.size)}-{args.matcher}" + (f"-{args.draw}" if args.matcher == "same" else "")
    label_sets = sio.join(args.output, "label-sets", f"index-{inputs.keys['index'][:12]}"
                          + (f"-exclude-{dedup_key[:12]}" if dedup else "") + ".parquet")
    selection = ResampleJob(index=inputs.index, output="", weights=sio.join(weights.output, "weights.parquet"),
                            size=args.size, matcher=args.matcher, draw=draw, aggregate=args.aggregate,
                            seed=args.seed, labels=inputs.labels, target=target.name, temperature=args.temperature,
                            exclude=sio.join(dedup.output, "exclude.parquet") if dedup else None,
                            label_sets=label_sets)
    chain = stages.plan_set(sio.join(args.output, target.name, f"{label}-{run_key[:12]}"), selection,
                            samples_per_shard=args.samples_per_shard, allow_uri_prefixes=allowed,
                            max_side=args.max_side, quality=args.quality)
    return TargetRun(target, source_name, weights, dedup, chain)


def _only(names) -> str:
    names = (names,) if isinstance(names, str) else tuple(names)
    if len(names) != 1:
        raise ValueError(f"one target expected here, got {list(names)}")
    return names[0]


def run(args, engines: stages.Engines | None = None) -> dict:
    """Run every stage of ``args``' target not already built; return the
    summary (several targets: ``{"targets": [summary, ...]}``)."""
    engines = engines or stages.Engines(master=args.master, beam_args=("--runner", args.runner, *args.beam_arg))
    names = (args.target,) if isinstance(args.target, str) else tuple(args.target)
    if len(names) > 1:
        return {"targets": run_many(args, names, engines)}
    log = engines.log
    t0 = time.time()
    p = plan(args, engines, names[0])
    weights = stages.weights(p.weights, engines)
    excluded = 0
    if p.dedup is None:
        log("near-duplicates: off (--no-dedup): the source may hold copies of target images")
    else:
        found = stages.near_duplicates(p.dedup, engines)
        excluded = found["excluded"]
        log(f"      {excluded:,} source examples excluded (by split: "
            + ", ".join(f"{s} {n:,}" for s, n in found["excluded_by_split"].items()) + ")")
    built = stages.build_set(p.set, engines)
    summary = _summary(p, built, weights, excluded, time.time() - t0)
    _describe(summary, log)
    return summary


def run_many(args, names: Sequence[str], engines: stages.Engines) -> list[dict]:
    """Every stage of several targets, each stage once for all of them (one
    pass over the source); each target's outputs where its own run puts
    them. Returns each target's summary, in order."""
    if args.target_root:
        raise ValueError("--target-root names one target's images; with several targets each config's root is "
                         "used (or give each target its own YAML)")
    if "demo" in names:
        raise ValueError("--target demo builds alone; give it without other targets")
    t0 = time.time()
    plans = [plan(args, engines, n) for n in names]
    engines.log(f"{len(plans)} targets, one pass over the source per stage: " + ", ".join(names))
    weights = stages.weights_many([p.weights for p in plans], engines)
    excluded = [0] * len(plans)
    if args.dedup:
        found = stages.near_duplicates_many([p.dedup for p in plans], engines)
        excluded = [f["excluded"] for f in found]
    else:
        engines.log("near-duplicates: off (--no-dedup): the source may hold copies of target images")
    built = stages.build_sets([p.set for p in plans], engines)
    summaries = [_summary(p, b, w, x, time.time() - t0) for p, b, w, x in zip(plans, built, weights, excluded)]
    for summary in summaries:
        _describe(summary, engines.log)
    return summaries


def _summary(p: TargetRun, built: stages.BuiltSet, weights: dict, excluded: int, seconds: float) -> dict:
    manifest = built.manifest
    return {"target": p.target.name, "source": p.source, "shards": built.manifest_path,
            "samples": manifest.total_samples, "unique_examples": manifest.unique_examples,
            "shard_files": len(manifest.shards), "total_variation": built.stats["total_variation"],
            "top_labels": [(t["name"], round(t["weight"], 4)) for t in weights["top_labels"][:10]],
            "weights": p.weights.output, "resample": p.set.resample.output, "seconds": round(seconds, 1),
            "dedup": p.dedup.output if p.dedup else None, "excluded": excluded}


def _describe(summary: dict, log: Callable[[str], None]) -> None:
    log("")
    log(f"target:   {summary['target']}")
    log(f"shards:   {summary['shards']}")
    log(f"samples:  {summary['samples']:,} in {summary['shard_files']} shards, "
        f"{summary['unique_examples']:,} unique examples (total variation {summary['total_variation']:.4f})")
    log("top labels by importance weight: " + ", ".join(f"{n} ({w:g})" for n, w in summary["top_labels"]))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # every argument is checked here, before any work
    engines = stages.Engines(master=args.master, beam_args=("--runner", args.runner, *args.beam_arg))
    try:
        run(args, engines)
    except (ValueError, OSError) as e:
        print(f"resample: error: {e}", file=sys.stderr)
        return 1
    finally:
        engines.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
