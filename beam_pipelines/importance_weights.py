"""Importance weights for one target: the Beam pipeline of w(y) = P_t(y) / P_s(y)
(docs/design.md, "Weights").

::

    python -m beam_pipelines.importance_weights \\
      --index PATH --labels PATH \\
      ( --target-root PATH --target-layout imagefolder|food101 --checkpoint CKPT
      | --target-histogram PARQUET ) [--target NAME] [--target-split train] \\
      [--temperature 2.0] [--max-bad-fraction 0.01] --output DIR [--overwrite] \\
      [any Beam pipeline option: --runner, --direct_num_workers, Dataflow options,
       --inference_device CPU|GPU, --large_model, --model_copies N (target_histogram.InferenceOptions)]

(The flags' earlier spellings ``--source-index``, ``--target-images``,
``--target-name`` and ``--model`` still work, with a deprecation note.)

From Python: ``run(WeightsJob(index=..., labels=..., target_root=...,
checkpoint=..., output=...), ["--runner", "DirectRunner"])``.

Writes to DIR: ``label_counts.parquet``, ``target_histogram.parquet``,
``weights.parquet`` (one row per vocabulary label), ``summary.json``,
``weights.png`` and, last, ``_SUCCESS``. A rerun of the same job (same
inputs, settings and code: :meth:`WeightsPlan.fingerprint`) does nothing.

The embedded default runner runs in this process (:mod:`beam_pipelines.execution`:
nothing is downloaded at run time). On Dataflow, with workers from the
custom SDK container (``Dockerfile``; README "Running at scale")::

    python -m beam_pipelines.importance_weights ... --runner DataflowRunner \\
      --project P --region R --temp_location gs://B/tmp \\
      --sdk_container_image REGION-docker.pkg.dev/P/REPO/adaptive-transfer-beam:cpu \\
      --sdk_location container
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from schemas import SchemaError, read_metadata, validate_histogram, validate_vocabulary
from schemas import io as sio
from schemas.cli import ArgumentParser
from schemas.fingerprint import code_digest, digest
from schemas.stage_output import MARKER, SUCCESS, StageOutput, require_finished_input
from schemas.targets import list_target

from .execution import DATA_ERRORS, error_line, pipeline_options, run_pipeline
from .label_counts import CountSourceLabels, match_files
from .target_histogram import TargetHistogram, inference_settings
from .unreadable import CountUnreadable
from .weights_outputs import Measured, WeightsConfig, write_outputs

__all__ = ["STAGE", "OUTPUT_FILES", "RENAMED_FLAGS", "WeightsJob", "WeightsPlan", "build_parser", "job_from_args",
           "check_inputs", "build_pipeline", "run", "describe", "main"]

STAGE = "importance_weights"
OUTPUT_FILES = ("label_counts.parquet", "target_histogram.parquet", "weights.parquet", "summary.json",
                "weights.png", SUCCESS, MARKER)
#: Earlier spellings of flags, kept as hidden aliases: old -> new.
RENAMED_FLAGS = {"--source-index": "--index", "--target-images": "--target-root", "--target-name": "--target",
                 "--model": "--checkpoint"}


@dataclass(frozen=True)
class WeightsJob:
    """One run of the stage (the command line's flags).

    ``index``: the source index (Parquet file, directory or glob); ``labels``:
    the vocabulary; ``output``: the directory written. P_t comes from the
    generalist ``checkpoint`` over the images of ``target_root``
    (``target_layout``, split ``target_split``), or is given as
    ``target_histogram`` (Parquet of label_id, p_target). ``target``: the name
    recorded (default: the root's basename). ``temperature`` of the softmax
    (default 2.0); ``max_bad_fraction`` of unreadable target images before the
    run fails (default 0.01); ``batch_size``: images per forward pass (default
    64: a performance setting, left out of the fingerprint); ``overwrite``:
    redo a finished output made from anything else.
    """

    index: str
    labels: str
    output: str
    target_root: str | None = None
    target_layout: str = "imagefolder"
    target_split: str = "train"
    target: str | None = None
    checkpoint: str | None = None
    target_histogram: str | None = None
    temperature: float = 2.0
    max_bad_fraction: float = 0.01
    batch_size: int = 64
    overwrite: bool = False

    @property
    def target_name(self) -> str:
        """The name recorded in the outputs."""
        return self.target or (self.target_root or self.target_histogram or "target").rstrip("/").rsplit("/", 1)[-1]

    def fingerprint(self) -> dict:
        """What this job's result is made from (the one reuse rule; reads the
        inputs as :func:`check_inputs` does, through Beam's filesystems with
        their default options)."""
        return check_inputs(self).fingerprint()

    def check(self) -> None:
        """Raise ``ValueError`` for settings out of range (no input is read)."""
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.target_histogram and not (self.target_root and self.checkpoint):
            raise ValueError("give --target-root and --checkpoint, or --target-histogram")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m beam_pipelines.importance_weights",
                       description="Importance weights P_t(y)/P_s(y) for one target.")
    p.add_argument("--index", required=True, help="source index: Parquet file, directory or glob")
    p.add_argument("--labels", required=True, help="label vocabulary Parquet")
    p.add_argument("--target-root", help="root of the target dataset")
    p.add_argument("--target-layout", default="imagefolder", help="imagefolder, food101, ...")
    p.add_argument("--target-split", default="train", help="split whose images give P_t (default train)")
    p.add_argument("--target", help="name recorded in the outputs (default: the root's basename)")
    p.add_argument("--checkpoint", help="generalist checkpoint (trainer.pretrain's generalist.pt)")
    p.add_argument("--target-histogram", help="precomputed P_t (label_id, p_target) instead of --checkpoint")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature (default 2.0)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more target images than this are unreadable (default 0.01)")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size (default 64)")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="redo a finished output made from anything else")
    p.add_aliases(RENAMED_FLAGS)
    return p


def job_from_args(argv: Sequence[str] | None = None) -> tuple[WeightsJob, list[str]]:
    """The job of a command line, and the rest of it (Beam's options)."""
    args, beam_args = build_parser().parse_known_args(argv)
    return WeightsJob(**vars(args)), beam_args


@dataclass
class WeightsPlan:
    """A checked job: the last step's :class:`WeightsConfig`, the index files,
    and (from a generalist) the target images and the checkpoint's preprocessing."""

    job: WeightsJob
    config: WeightsConfig
    source_files: list[str]
    target_paths: list[str] = field(default_factory=list)
    preprocess: dict | None = None

    def fingerprint(self) -> dict:
        """What the result is made from (the one reuse rule): the index listing,
        the vocabulary, P_t's inputs and settings, and the stage's code; not
        the runner, the batch size or where the model runs."""
        job, config = self.job, self.config
        found = {"index": sio.listing_fingerprint(job.index, versions=True), "labels": config.inputs["labels"],
                 "target": config.target_name, "temperature": config.temperature,
                 "code": code_digest("beam_pipelines.importance_weights")}
        if config.precomputed is not None:
            return {**found, "target_histogram": config.inputs["target_histogram"]}
        return {**found, "checkpoint": config.model_fingerprint, "target_images": digest(self.target_paths),
                "target_layout": job.target_layout, "target_split": job.target_split,
                "max_bad_fraction": job.max_bad_fraction}


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


def _given_histogram(job: WeightsJob, common: dict, files: list[str], label_ids: np.ndarray) -> WeightsPlan:
    p_target, meta = _aligned_histogram(job.target_histogram, label_ids)
    common["inputs"]["target_histogram"] = sio.fingerprint_paths(job.target_histogram)
    config = WeightsConfig(**common, temperature=meta.get("temperature", job.temperature),
                           model_fingerprint=meta.get("model_fingerprint"), precomputed=tuple(p_target.tolist()),
                           num_images=meta.get("num_images"))
    return WeightsPlan(job, config, files)


def _from_generalist(job: WeightsJob, common: dict, files: list[str], vocab) -> WeightsPlan:
    from trainer.models import checkpoint_fingerprint, preprocess_spec, read_generalist

    ckpt = read_generalist(job.checkpoint, vocab)
    split = list_target(job.target_root, job.target_layout, job.target_split)
    model_fp = checkpoint_fingerprint(job.checkpoint)
    common["inputs"].update(model=model_fp, target_layout=job.target_layout, target_split=job.target_split)
    config = WeightsConfig(**common, temperature=job.temperature, model_fingerprint=model_fp,
                           model_label_ids=tuple(int(i) for i in ckpt["label_ids"]))
    return WeightsPlan(job, config, files, list(split.paths), preprocess_spec(ckpt).to_dict())


def check_inputs(job: WeightsJob) -> WeightsPlan:
    """Read and check every input (vocabulary, index listing, generalist or
    precomputed P_t, target image list) before the output is touched."""
    job.check()
    for flag, path in (("--index", job.index), ("--labels", job.labels), ("--checkpoint", job.checkpoint),
                       ("--target-histogram", job.target_histogram)):
        if path:
            require_finished_input(path, flag)
    vocab = sio.read_parquet(job.labels)
    validate_vocabulary(vocab, job.labels)
    label_ids = np.sort(vocab.column("label_id").to_numpy().astype(np.int64))
    files = match_files(job.index)
    common = {"label_ids": tuple(label_ids.tolist()),
              "names": dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist())),
              "target_name": job.target_name, "max_bad_fraction": job.max_bad_fraction,
              "inputs": {"source_index_files": len(files), "labels": sio.fingerprint_paths(job.labels)}}
    if job.target_histogram:
        return _given_histogram(job, common, files, label_ids)
    return _from_generalist(job, common, files, vocab)


def _write(_, work: str, config: WeightsConfig, **measured) -> dict:
    """The last step: the side inputs gathered into :class:`Measured`, then written."""
    return write_outputs(work, config, Measured(**measured))


def build_pipeline(p: beam.Pipeline, plan: WeightsPlan, work: str) -> None:
    """Add the transforms to ``p``: the source's label counts, P_t's softmax
    sums over the target images (unless given), then one step that writes
    every output into ``work``."""
    counts = (p | "SourceFiles" >> beam.Create(plan.source_files)
                | "CountSourceLabels" >> CountSourceLabels(np.asarray(plan.config.label_ids, np.int64)))
    side = {"counts": beam.pvalue.AsSingleton(counts)}
    if plan.config.precomputed is None:
        job = plan.job
        hist = (p | "TargetImages" >> beam.Create(plan.target_paths)
                  | "TargetHistogram" >> TargetHistogram(job.checkpoint, plan.preprocess, job.temperature,
                                                         job.batch_size, **inference_settings(p.options)))
        side["sums"] = beam.pvalue.AsSingleton(hist["sums"])
        side["unreadable"] = beam.pvalue.AsSingleton(hist["bad"] | "UnreadableTarget" >> CountUnreadable())
    _ = (p | "Once" >> beam.Create([None])
           | "WriteOutputs" >> beam.Map(_write, work, plan.config, **side))


def run(job: WeightsJob, pipeline_args: Sequence[str] | PipelineOptions = ()) -> dict:
    """Run ``job`` with Beam's options ``pipeline_args`` (strings, or a
    ``PipelineOptions``); return the summary (``"reused": True`` where a
    finished output made from the same inputs, settings and code was there:
    no work done). Every input is checked before the output is touched; the
    outputs are built aside and committed whole (``schemas.stage_output``)."""
    output = StageOutput(job.output, STAGE)
    options = pipeline_options(pipeline_args)
    inference_settings(options)  # bad inference options fail before the output is touched
    # The inputs are listed through Beam's filesystems before the pipeline exists:
    # their options (--s3_endpoint_url, credentials, GCP project) apply from here.
    FileSystems.set_options(options)
    plan = check_inputs(job)
    reused = output.run(lambda work: run_pipeline(options, lambda p: build_pipeline(p, plan, work)),
                        fingerprint=plan.fingerprint(), overwrite=job.overwrite)
    summary = json.loads(sio.read_bytes(sio.join(output.path, "summary.json")))
    return {**summary, "reused": True} if reused else summary


def describe(summary: dict) -> str:
    """The one line ``main`` prints on success."""
    top = ", ".join(f"{t['name']} ({t['weight']:.3g})" for t in summary["top_labels"][:5])
    return (f"{STAGE}: {summary['source_examples']} source examples, {summary['target_images']} target images; "
            f"top labels: {top}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line (own flags, then Beam's options) and :func:`run`;
    bad input is one line on standard error and exit status 1."""
    try:
        job, beam_args = job_from_args(argv)
        print(describe(run(job, beam_args)))
    except DATA_ERRORS as e:
        print(f"{STAGE}: error: {error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
