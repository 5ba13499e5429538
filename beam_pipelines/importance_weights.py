"""Importance weights for one target: the Beam pipeline of DESIGN.md §1-2.

::

    python -m beam_pipelines.importance_weights \\
      --source-index PATH --labels PATH \\
      ( --target-images PATH --target-layout imagefolder|food101 --model CKPT
      | --target-histogram PARQUET ) \\
      [--temperature 2.0] [--max-bad-fraction 0.01] --output DIR \\
      [any Beam pipeline option: --runner, --direct_num_workers, Dataflow options,
       --inference_device CPU|GPU, --large_model, --model_copies N (target_histogram.InferenceOptions)]

Writes to DIR: ``label_counts.parquet``, ``target_histogram.parquet``,
``weights.parquet`` (one row per vocabulary label), ``summary.json``,
``weights.png`` and, last, ``_SUCCESS``.

The embedded default runner is the DirectRunner (pinned: nothing is
downloaded at run time). On Dataflow, with workers from the custom SDK
container (``Dockerfile``; README "Running at scale")::

    python -m beam_pipelines.importance_weights ... --runner DataflowRunner \\
      --project P --region R --temp_location gs://B/tmp \\
      --sdk_container_image REGION-docker.pkg.dev/P/REPO/adaptive-transfer-beam:cpu \\
      --sdk_location container
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from schemas import (SchemaError, read_metadata, validate_histogram, validate_vocabulary,
                     with_metadata)
from schemas import io as sio
from schemas.stage_output import MARKER, SUCCESS, StageOutput, require_finished_input
from schemas.targets import list_target

from .label_counts import CountSourceLabels, match_files
from .report import plot_top_weights
from .target_histogram import TargetHistogram, inference_settings
from .weights import (counts_table, entropy, histogram_table, importance_weights,
                      mean_from_fixed_point)

__all__ = ["build_parser", "check_inputs", "build_pipeline", "write_outputs", "run", "main", "OUTPUT_FILES"]

OUTPUT_FILES = ("label_counts.parquet", "target_histogram.parquet", "weights.parquet", "summary.json",
                "weights.png", SUCCESS, MARKER)
TOP_LABELS = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m beam_pipelines.importance_weights",
                                description="Importance weights P_t(y)/P_s(y) for one target.")
    p.add_argument("--source-index", required=True, help="Parquet file, directory or glob")
    p.add_argument("--labels", required=True, help="label vocabulary Parquet")
    p.add_argument("--target-images", help="root of the target dataset")
    p.add_argument("--target-layout", default="imagefolder", help="imagefolder, food101, ...")
    p.add_argument("--target-split", default="train", help="split whose images give P_t (default train)")
    p.add_argument("--target-name", help="name recorded in the outputs (default: the root's basename)")
    p.add_argument("--model", help="generalist checkpoint (trainer.pretrain's generalist.pt)")
    p.add_argument("--target-histogram", help="precomputed P_t (label_id, p_target) instead of --model")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature (default 2.0)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more target images than this are unreadable (default 0.01)")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size (default 64)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    return p


def _pin_runner(options: PipelineOptions) -> PipelineOptions:
    std = options.view_as(StandardOptions)
    if not std.runner:
        # Left unset, Beam may pick the Prism runner and download its binary.
        std.runner = "DirectRunner"
    return options


def _aligned_histogram(path: str, label_ids: np.ndarray) -> tuple[np.ndarray, dict]:
    table = sio.read_parquet(path)
    validate_histogram(table, path)
    ids = table.column("label_id").to_numpy()
    outside = np.setdiff1d(ids, label_ids)
    if outside.size:
        raise SchemaError(f"label {int(outside[0])} is not in the label vocabulary "
                          f"({outside.size} such labels)", file=path)
    p = np.zeros(label_ids.size)
    p[np.searchsorted(label_ids, ids)] = table.column("p_target").to_numpy()
    return p, read_metadata(table.schema)


def write_outputs(_, *, config: dict, counts, sums=None, bad_count: int = 0, bad_names=(),
                  precomputed: list | None = None) -> dict:
    """Join counts and P_t into weights and write every output (runs once)."""
    label_ids = np.asarray(config["label_ids"])
    names = {int(k): v for k, v in config["names"].items()}
    out = config["output"]
    if precomputed is not None:
        p_target = np.asarray(precomputed, np.float64)
        num_images = config.get("num_images")
    else:
        read = sums.count if sums is not None else 0
        total = read + bad_count
        if total == 0:
            raise ValueError(f"{config['target_images']}: the target split lists no images")
        fraction = bad_count / total
        if fraction > config["max_bad_fraction"]:
            raise ValueError(f"{bad_count} of {total} target images are unreadable ({fraction:.2%} > "
                             f"--max-bad-fraction {config['max_bad_fraction']:.2%}); first: "
                             f"{list(bad_names)[:5]}")
        mean = mean_from_fixed_point(sums.hi, sums.lo, sums.count)
        order = np.argsort(np.asarray(config["model_label_ids"]))
        p_target = np.zeros(label_ids.size)
        p_target[np.searchsorted(label_ids, np.asarray(config["model_label_ids"])[order])] = mean[order]
        num_images = read
    weights, lost = importance_weights(label_ids, counts.counts, counts.num_examples, p_target)
    meta = {"target": config["target_name"], "temperature": config["temperature"],
            "model_fingerprint": config.get("model_fingerprint"), "num_images": num_images,
            "num_examples": counts.num_examples}
    sio.write_parquet_atomic(counts_table(label_ids, counts.counts, counts.num_examples),
                             sio.join(out, "label_counts.parquet"))
    sio.write_parquet_atomic(histogram_table(label_ids, p_target, num_images or 0, config["temperature"],
                                             config.get("model_fingerprint")),
                             sio.join(out, "target_histogram.parquet"))
    sio.write_parquet_atomic(with_metadata(weights, meta), sio.join(out, "weights.parquet"))
    w = weights.column("weight").to_numpy()
    top = np.lexsort((label_ids, -w))[:TOP_LABELS]
    h = entropy(p_target)
    summary = {
        "target": config["target_name"],
        "source_examples": int(counts.num_examples),
        "labels_per_example": float(counts.counts.sum() / counts.num_examples),
        "target_images": num_images,
        "temperature": config["temperature"],
        "model_fingerprint": config.get("model_fingerprint"),
        "top_labels": [{"label_id": int(label_ids[i]), "name": names.get(int(label_ids[i])),
                        "weight": float(w[i]), "p_target": float(p_target[i]),
                        "p_source": float(weights.column("p_source")[int(i)].as_py()),
                        "count": int(counts.counts[i])} for i in top],
        "p_target_entropy_nats": h,
        "p_target_perplexity": math.exp(h),
        "target_mass_without_source_examples": lost,
        "labels_without_source_examples": int((counts.counts == 0).sum()),
        "unreadable_images": int(bad_count),
        "unreadable_image_names": sorted(bad_names)[:100],
        "inputs": config["inputs"],
    }
    sio.write_bytes_atomic(sio.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    plot_top_weights(weights, names, sio.join(out, "weights.png"),
                     title=f"{config['target_name']}: top source labels by importance weight")
    return summary


def check_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Read and check every input (vocabulary, index listing, generalist or
    precomputed P_t, target image list) before the output is touched; return
    the run's configuration (its ``output`` is set once writing begins)."""
    for flag, path in (("--source-index", args.source_index), ("--labels", args.labels),
                       ("--model", args.model), ("--target-histogram", args.target_histogram)):
        if path:
            require_finished_input(path, flag)
    vocab = sio.read_parquet(args.labels)
    validate_vocabulary(vocab, args.labels)
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    label_ids = np.sort(vocab.column("label_id").to_numpy().astype(np.int64))
    names = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
    files = match_files(args.source_index)
    config: dict[str, Any] = {
        "label_ids": label_ids.tolist(), "names": {str(k): v for k, v in names.items()},
        "output": None, "temperature": args.temperature, "source_files": files,
        "max_bad_fraction": args.max_bad_fraction, "target_images": args.target_images,
        "target_name": args.target_name or (args.target_images or args.target_histogram or "target")
        .rstrip("/").rsplit("/", 1)[-1],
        "inputs": {"source_index_files": len(files), "labels": sio.fingerprint_paths(args.labels)},
    }
    if args.target_histogram:
        p_target, meta = _aligned_histogram(args.target_histogram, label_ids)
        config.update(num_images=meta.get("num_images"), model_fingerprint=meta.get("model_fingerprint"),
                      temperature=meta.get("temperature", args.temperature), precomputed=p_target.tolist())
        config["inputs"]["target_histogram"] = sio.fingerprint_paths(args.target_histogram)
    else:
        if not (args.target_images and args.model):
            raise ValueError("give --target-images and --model, or --target-histogram")
        from trainer.models import checkpoint_fingerprint, preprocess_spec, read_generalist

        ckpt = read_generalist(args.model, vocab)
        split = list_target(args.target_images, args.target_layout, args.target_split)
        config.update(model_fingerprint=checkpoint_fingerprint(args.model),
                      model_label_ids=[int(i) for i in ckpt["label_ids"]], target_paths=list(split.paths),
                      preprocess=preprocess_spec(ckpt).to_dict())
        config["inputs"].update(model=config["model_fingerprint"], target_layout=args.target_layout,
                                target_split=args.target_split)
    return config


def build_pipeline(p: beam.Pipeline, args: argparse.Namespace, config: dict[str, Any]) -> None:
    """Add the transforms to ``p`` for a configuration from :func:`check_inputs`."""
    label_ids = np.asarray(config["label_ids"], np.int64)
    counts = (p | "SourceFiles" >> beam.Create(config["source_files"])
                | "CountSourceLabels" >> CountSourceLabels(label_ids))
    side: dict[str, Any] = {"counts": beam.pvalue.AsSingleton(counts)}
    written = {k: v for k, v in config.items() if k not in ("source_files", "target_paths", "precomputed")}
    if "precomputed" in config:
        extra = {"precomputed": config["precomputed"]}
    else:
        hist = (p | "TargetImages" >> beam.Create(config["target_paths"])
                  | "TargetHistogram" >> TargetHistogram(args.model, config["preprocess"], args.temperature,
                                                         args.batch_size, **inference_settings(p.options)))
        side["sums"] = beam.pvalue.AsSingleton(hist["sums"])
        side["bad_count"] = beam.pvalue.AsSingleton(hist["bad"] | "CountBad" >> beam.combiners.Count.Globally())
        side["bad_names"] = beam.pvalue.AsSingleton(
            hist["bad"] | "BadNames" >> beam.Map(lambda pr: pr[0])
            | "First100Bad" >> beam.combiners.Top.Smallest(100))
        extra = {}
    _ = (p | "Once" >> beam.Create([None])
           | "WriteOutputs" >> beam.Map(write_outputs, config=written, **side, **extra))


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (own flags + Beam options), run the pipeline, return the
    summary (with ``"reused": True`` where a finished output was there: no
    work done). Every input is checked before the output is touched; the
    outputs are built aside and committed whole (``schemas.stage_output``)."""
    args, beam_args = build_parser().parse_known_args(argv)
    output = StageOutput(args.output, "importance_weights")
    options = _pin_runner(PipelineOptions(beam_args))
    inference_settings(options)  # bad inference options fail before the output is touched
    # The inputs are listed through Beam's filesystems before the pipeline exists:
    # their options (--s3_endpoint_url, credentials, GCP project) apply from here.
    FileSystems.set_options(options)
    config = check_inputs(args)
    if output.check(args.overwrite):
        print(output.skip_line(), file=sys.stderr)
        return {**json.loads(sio.read_bytes(sio.join(args.output, "summary.json"))), "reused": True}
    work = output.begin()
    config["output"] = work
    try:
        with beam.Pipeline(options=options) as p:
            build_pipeline(p, args, config)
    except BaseException:
        output.abort(work)
        raise
    output.commit(work)
    return json.loads(sio.read_bytes(sio.join(args.output, "summary.json")))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        summary = run(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"importance_weights: error: {e}", file=sys.stderr)
        return 1
    top = ", ".join(f"{t['name']} ({t['weight']:.3g})" for t in summary["top_labels"][:5])
    print(f"importance_weights: {summary['source_examples']} source examples, "
          f"{summary['target_images']} target images; top labels: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
