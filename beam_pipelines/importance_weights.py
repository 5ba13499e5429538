"""Importance weights for one target or many: the Beam pipeline of
w(y) = P_t(y) / P_s(y) (docs/design.md, "Weights").

::

    python -m beam_pipelines.importance_weights \\
      --index PATH --labels PATH \\
      ( --target-root PATH --target-layout imagefolder|food101 --checkpoint CKPT
      | --target-histogram PARQUET ) [--target NAME] [--target-split train] \\
      [--temperature 2.0] [--max-bad-fraction 0.01] --output DIR [--overwrite] \\
      [any Beam pipeline option: --runner, --direct_num_workers, Dataflow options,
       --inference_device CPU|GPU, --large_model, --model_copies N (target_histogram.InferenceOptions)]

Several targets in one run: repeat ``--target NAME`` and give each target's
own flags (``--target-root``, ``--target-layout``, ``--target-split`` or
``--target-histogram``, and ``--output``) after its name::

    python -m beam_pipelines.importance_weights --index PATH --labels PATH --checkpoint CKPT \\
      --target food101 --target-root R1 --target-layout food101 --output OUT/food101/weights \\
      --target cars --target-root R2 --output OUT/cars/weights

The source's label counts are made once and every target's images go
through the generalist once, in one pipeline; each target's outputs are
those (and where) its single-target run writes, byte for byte, each under
the output protocol on its own (:mod:`beam_pipelines.many_targets`): a
target whose output is finished from the same fingerprint drops out of the
run, one whose input is bad fails alone (one line naming it; exit status 1),
the others are committed. From Python: ``run_targets(MultiWeightsJob(...))``
or ``run_targets(MultiWeightsJob.of([WeightsJob(...), ...]))``.

Scale, for K targets: the source side is one
pass over the index's ``labels`` column whatever K (a task holds one row
group's labels and one count vector of the vocabulary's size); the target
side reads each target's images once (sum over targets of their images: one
forward pass each, ``--batch-size`` images a task at a time) and keeps one
exact sum vector (vocabulary-sized) per target; the last step writes each
target's five files (K small tasks).

(The flags' earlier spellings ``--source-index``, ``--target-images``,
``--target-name`` and ``--model`` still work, with a deprecation note.)

From Python: ``run(WeightsJob(index=..., labels=..., target_root=...,
checkpoint=..., output=...), ["--runner", "DirectRunner"])``, one target.

Writes to DIR: ``label_counts.parquet``, ``target_histogram.parquet``,
``weights.parquet`` (one row per vocabulary label), ``summary.json``,
``weights.png`` and, last, ``_SUCCESS``. A rerun of the same job (same
inputs, settings and code: :meth:`WeightsPlan.fingerprint`) does nothing.

The embedded default runner runs in this process (:mod:`beam_pipelines.execution`:
nothing is downloaded at run time). On Dataflow, with workers from the
custom SDK container (``Dockerfile``; docs/scale.md, "Dataflow")::

    python -m beam_pipelines.importance_weights ... --runner DataflowRunner \\
      --project P --region R --temp_location gs://B/tmp \\
      --sdk_container_image REGION-docker.pkg.dev/P/REPO/adaptive-transfer-beam:cpu \\
      --sdk_location container
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from schemas import SchemaError, read_metadata, validate_histogram, validate_vocabulary
from schemas import io as sio
from schemas.cli import ArgumentParser
from schemas.fingerprint import code_digest, digest
from schemas.stage_output import MARKER, SUCCESS, StageOutput, require_finished_input
from schemas.targets import list_target

from .execution import DATA_ERRORS, counters, error_line, run_pipeline
from .label_counts import CountSourceLabels, match_files
from .many_targets import OutputSpec, PerTargetFlag, TargetsRun, failure_note, report, run_outputs, target_groups
from .target_histogram import KeyedTargetHistogram, inference_settings, stage_options
from .unreadable import FirstUnreadable, Unreadable
from .weights_outputs import Measured, WeightsConfig, write_outputs

__all__ = ["STAGE", "OUTPUT_FILES", "RENAMED_FLAGS", "WeightsJob", "WeightsTarget", "MultiWeightsJob", "WeightsPlan",
           "build_parser", "job_from_args", "check_inputs", "check_targets", "build_pipeline",
           "build_targets_pipeline", "run", "run_targets", "describe", "main"]

STAGE = "importance_weights"
OUTPUT_FILES = ("label_counts.parquet", "target_histogram.parquet", "weights.parquet", "summary.json",
                "weights.png", SUCCESS, MARKER)
#: Earlier spellings of flags, kept as hidden aliases: old -> new.
RENAMED_FLAGS = {"--source-index": "--index", "--target-images": "--target-root", "--target-name": "--target",
                 "--model": "--checkpoint"}
#: The settings every target of a :class:`MultiWeightsJob` shares.
SHARED = ("index", "labels", "checkpoint", "temperature", "max_bad_fraction", "batch_size")


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
        _check_shared(self)
        if not self.target_histogram and not (self.target_root and self.checkpoint):
            raise ValueError("give --target-root and --checkpoint, or --target-histogram")


def _check_shared(job) -> None:
    if not job.temperature > 0:
        raise ValueError(f"--temperature must be positive, got {job.temperature}")
    if not 0 <= job.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {job.max_bad_fraction}")
    if job.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {job.batch_size}")


@dataclass(frozen=True)
class WeightsTarget:
    """One target of a :class:`MultiWeightsJob`: its ``output`` directory, its
    images (``root``, ``layout``, ``split``) or its given P_t
    (``histogram``), the ``name`` recorded (default: the root's basename)
    and whether to ``overwrite`` a finished output made otherwise."""

    output: str
    root: str | None = None
    layout: str = "imagefolder"
    split: str = "train"
    name: str | None = None
    histogram: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class MultiWeightsJob:
    """The stage for several ``targets`` (:class:`WeightsTarget`) in one run:
    the settings of :class:`WeightsJob` that every target shares (the source
    ``index``, ``labels``, the generalist ``checkpoint``, ``temperature``,
    ``max_bad_fraction``, ``batch_size``). Each target's result is the one its
    single-target job (:meth:`jobs`) makes, with the same fingerprint."""

    index: str
    labels: str
    targets: tuple[WeightsTarget, ...]
    checkpoint: str | None = None
    temperature: float = 2.0
    max_bad_fraction: float = 0.01
    batch_size: int = 64

    @classmethod
    def of(cls, jobs: Sequence[WeightsJob]) -> "MultiWeightsJob":
        """The single-target ``jobs`` as one run; ``ValueError`` unless they
        share the source, vocabulary, settings and (those with images) the
        generalist."""
        if not jobs:
            raise ValueError("no target to build")
        imaged = [j for j in jobs if not j.target_histogram] or list(jobs)
        for j in jobs[1:]:
            for name in SHARED:
                ours, first = getattr(j, name), getattr(jobs[0] if name != "checkpoint" else imaged[0], name)
                if ours != first and (name != "checkpoint" or not j.target_histogram):
                    raise ValueError(f"the targets of one run share --{name.replace('_', '-')}: {j.target_name} "
                                     f"has {ours!r}, {jobs[0].target_name} {first!r}")
        targets = tuple(WeightsTarget(j.output, j.target_root, j.target_layout, j.target_split, j.target,
                                      j.target_histogram, j.overwrite) for j in jobs)
        return cls(jobs[0].index, jobs[0].labels, targets, imaged[0].checkpoint, jobs[0].temperature,
                   jobs[0].max_bad_fraction, jobs[0].batch_size)

    def jobs(self) -> list[WeightsJob]:
        """Each target's single-target job."""
        shared = {name: getattr(self, name) for name in SHARED}
        return [WeightsJob(output=t.output, target_root=t.root, target_layout=t.layout, target_split=t.split,
                           target=t.name, target_histogram=t.histogram, overwrite=t.overwrite, **shared)
                for t in self.targets]

    def check(self) -> None:
        """Raise ``ValueError`` for shared settings out of range, no target, or
        two targets writing one output (no input is read)."""
        _check_shared(self)
        if not self.targets:
            raise ValueError("no target to build")
        outputs = [StageOutput(t.output, STAGE).path for t in self.targets]
        twice = sorted({o for o in outputs if outputs.count(o) > 1})
        if twice:
            raise ValueError(f"several targets write {twice[0]}: give each target its own --output")

    def fingerprints(self) -> list[dict | None]:
        """Each target's fingerprint (that of its single-target job; ``None``
        for a target whose input is bad), the shared inputs read once."""
        self.check()
        return [plan.fingerprint() if isinstance(plan, WeightsPlan) else None for plan in check_targets(self)]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m beam_pipelines.importance_weights",
                       description="Importance weights P_t(y)/P_s(y) for one target, or several in one run.")
    p.add_argument("--index", required=True, help="source index: Parquet file, directory or glob")
    p.add_argument("--labels", required=True, help="label vocabulary Parquet")
    p.add_argument("--target-root", action=PerTargetFlag, help="root of the target dataset")
    p.add_argument("--target-layout", action=PerTargetFlag, default="imagefolder",
                   help="imagefolder, food101, ...")
    p.add_argument("--target-split", action=PerTargetFlag, default="train",
                   help="split whose images give P_t (default train)")
    p.add_argument("--target", action=PerTargetFlag,
                   help="name recorded in the outputs (default: the root's basename); repeated, each --target "
                        "NAME starts the flags of one of several targets (--target-root, --target-layout, "
                        "--target-split or --target-histogram, --output)")
    p.add_argument("--checkpoint", help="generalist checkpoint (trainer.pretrain's generalist.pt)")
    p.add_argument("--target-histogram", action=PerTargetFlag,
                   help="precomputed P_t (label_id, p_target) instead of --checkpoint")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature (default 2.0)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more target images than this are unreadable (default 0.01)")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size (default 64)")
    p.add_argument("--output", action=PerTargetFlag, required=True, help="directory to write (one per target)")
    p.add_argument("--overwrite", action="store_true", help="redo a finished output made from anything else")
    p.add_aliases(RENAMED_FLAGS)
    return p


def job_from_args(argv: Sequence[str] | None = None) -> tuple[WeightsJob | MultiWeightsJob, list[str]]:
    """The job of a command line (a :class:`MultiWeightsJob` where it names
    several targets), and the rest of it (Beam's options)."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    flags = vars(args)
    try:
        groups = target_groups(flags)
    except ValueError as e:
        parser.error(str(e))
    if groups is None:
        return WeightsJob(**flags), beam_args
    targets = []
    for g in groups:
        if "output" not in g:
            parser.error(f"target {g['target']}: --output is required")
        targets.append(WeightsTarget(g["output"], g.get("target_root"), g.get("target_layout", "imagefolder"),
                                     g.get("target_split", "train"), g["target"], g.get("target_histogram"),
                                     flags["overwrite"]))
    return MultiWeightsJob(**{name: flags[name] for name in SHARED}, targets=tuple(targets)), beam_args


@dataclass
class WeightsPlan:
    """A checked job: the last step's :class:`WeightsConfig`, the index files,
    (from a generalist) the target images and the checkpoint's
    preprocessing, and the index listing's fingerprint."""

    job: WeightsJob
    config: WeightsConfig
    source_files: list[str]
    target_paths: list[str] = field(default_factory=list)
    preprocess: dict | None = None
    index_listing: str | None = None

    def fingerprint(self) -> dict:
        """What the result is made from (the one reuse rule): the index listing,
        the vocabulary, P_t's inputs and settings, and the stage's code; not
        the runner, the batch size or where the model runs."""
        job, config = self.job, self.config
        listing = self.index_listing or sio.listing_fingerprint(job.index, versions=True)
        found = {"index": listing, "labels": config.inputs["labels"],
                 "target": config.target_name, "temperature": config.temperature,
                 "code": code_digest("beam_pipelines.importance_weights")}
        if config.precomputed is not None:
            return {**found, "target_histogram": config.inputs["target_histogram"]}
        return {**found, "checkpoint": config.model_fingerprint, "target_images": digest(self.target_paths),
                "target_layout": job.target_layout, "target_split": job.target_split,
                "max_bad_fraction": job.max_bad_fraction}


@dataclass
class _Shared:
    """What every target of a run is checked against, read once: the
    vocabulary (``vocab``, ascending ``label_ids``), the index ``files`` and
    ``listing``, the labels' fingerprint and (where a target has images) the
    ``generalist``: (checkpoint dict, its fingerprint, its preprocessing)."""

    vocab: Any
    label_ids: np.ndarray
    files: list[str]
    listing: str
    labels: str
    generalist: tuple[dict, str, dict] | None = None

    def common(self, job: WeightsJob) -> dict:
        return {"label_ids": tuple(self.label_ids.tolist()),
                "names": dict(zip(self.vocab.column("label_id").to_pylist(), self.vocab.column("name").to_pylist())),
                "target_name": job.target_name, "max_bad_fraction": job.max_bad_fraction,
                "inputs": {"source_index_files": len(self.files), "labels": self.labels}}


def _shared_inputs(job: WeightsJob | MultiWeightsJob, with_generalist: bool) -> _Shared:
    """Read and check the inputs every target shares (index, vocabulary,
    generalist where ``with_generalist``)."""
    from trainer.models import checkpoint_fingerprint, preprocess_spec, read_generalist

    for flag, path in (("--index", job.index), ("--labels", job.labels), ("--checkpoint", job.checkpoint)):
        if path:
            require_finished_input(path, flag)
    vocab = sio.read_parquet(job.labels)
    validate_vocabulary(vocab, job.labels)
    label_ids = np.sort(vocab.column("label_id").to_numpy().astype(np.int64))
    files = match_files(job.index)
    shared = _Shared(vocab, label_ids, files, sio.listing_fingerprint(job.index, versions=True),
                     sio.fingerprint_paths(job.labels))
    if with_generalist:
        if not job.checkpoint:
            raise ValueError("give --checkpoint (the generalist) for targets given by their images")
        ckpt = read_generalist(job.checkpoint, vocab)
        shared.generalist = (ckpt, checkpoint_fingerprint(job.checkpoint), preprocess_spec(ckpt).to_dict())
    return shared


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


def _plan(job: WeightsJob, shared: _Shared) -> WeightsPlan:
    """``job``'s plan against the ``shared`` inputs: its own inputs read and checked."""
    common = shared.common(job)
    if job.target_histogram:
        require_finished_input(job.target_histogram, "--target-histogram")
        p_target, meta = _aligned_histogram(job.target_histogram, shared.label_ids)
        common["inputs"]["target_histogram"] = sio.fingerprint_paths(job.target_histogram)
        config = WeightsConfig(**common, temperature=meta.get("temperature", job.temperature),
                               model_fingerprint=meta.get("model_fingerprint"),
                               precomputed=tuple(p_target.tolist()), num_images=meta.get("num_images"))
        return WeightsPlan(job, config, shared.files, index_listing=shared.listing)
    ckpt, model_fp, preprocess = shared.generalist
    split = list_target(job.target_root, job.target_layout, job.target_split)
    common["inputs"].update(model=model_fp, target_layout=job.target_layout, target_split=job.target_split)
    config = WeightsConfig(**common, temperature=job.temperature, model_fingerprint=model_fp,
                           model_label_ids=tuple(int(i) for i in ckpt["label_ids"]))
    return WeightsPlan(job, config, shared.files, list(split.paths), preprocess, shared.listing)


def check_inputs(job: WeightsJob) -> WeightsPlan:
    """Read and check every input (vocabulary, index listing, generalist or
    precomputed P_t, target image list) before the output is touched."""
    job.check()
    return _plan(job, _shared_inputs(job, with_generalist=not job.target_histogram))


def check_targets(job: MultiWeightsJob) -> list[WeightsPlan | str]:
    """Each target's plan (as :func:`check_inputs` makes it for its
    single-target job), or why its own input is bad (one line); the shared
    inputs are read once, and a bad one raises."""
    jobs = job.jobs()
    shared = _shared_inputs(job, with_generalist=any(not j.target_histogram for j in jobs))
    plans: list[WeightsPlan | str] = []
    for j in jobs:
        try:
            j.check()
            plans.append(_plan(j, shared))
        except DATA_ERRORS as e:
            plans.append(error_line(e))
    return plans


# -- the pipeline ----------------------------------------------------------------------------

def _write(i: int, works: Sequence[str], configs: Sequence[WeightsConfig], counts, sums=None,
           unreadable=None) -> None:
    """The last step of target ``i``: the side inputs gathered into
    :class:`Measured` and written into ``works[i]`` (its bad input: a failure note)."""
    measured = Measured(counts, (sums or {}).get(i), (unreadable or {}).get(i) or Unreadable())
    with failure_note(works[i]):
        write_outputs(works[i], configs[i], measured)


def build_targets_pipeline(p: beam.Pipeline, plans: Sequence[WeightsPlan], works: Sequence[str]) -> None:
    """Add the transforms to ``p``: the source's label counts (once), P_t's
    softmax sums over every target's images (one pass through the
    generalist, kept apart by target), then one step per target that writes
    its outputs into its ``works`` directory."""
    first = plans[0]
    counts = (p | "SourceFiles" >> beam.Create(first.source_files)
                | "CountSourceLabels" >> CountSourceLabels(np.asarray(first.config.label_ids, np.int64)))
    side = {"counts": beam.pvalue.AsSingleton(counts)}
    imaged = [i for i, plan in enumerate(plans) if plan.config.precomputed is None]
    if imaged:
        job, preprocess = plans[imaged[0]].job, plans[imaged[0]].preprocess
        items = [(i, path) for i in imaged for path in plans[i].target_paths]
        hist = (p | "TargetImages" >> beam.Create(items)
                  | "TargetHistogram" >> KeyedTargetHistogram(job.checkpoint, preprocess, job.temperature,
                                                              job.batch_size, **inference_settings(p.options)))
        side["sums"] = beam.pvalue.AsDict(hist["sums"])
        side["unreadable"] = beam.pvalue.AsDict(
            hist["bad"] | "UnreadableTarget" >> beam.CombinePerKey(FirstUnreadable()))
    _ = (p | "Targets" >> beam.Create(list(range(len(plans))))
           | "WriteOutputs" >> beam.Map(_write, list(works), [plan.config for plan in plans], **side))


def build_pipeline(p: beam.Pipeline, plan: WeightsPlan, work: str) -> None:
    """:func:`build_targets_pipeline` for one target."""
    build_targets_pipeline(p, [plan], [work])


def _build(options: PipelineOptions, plans: Sequence[WeightsPlan]):
    """``build(works)`` for :func:`~beam_pipelines.many_targets.run_outputs`: one pipeline for the targets to build."""
    def build(works: dict[int, str]) -> dict[str, int]:
        order = sorted(works)
        result = run_pipeline(options, lambda p: build_targets_pipeline(p, [plans[i] for i in order],
                                                                        [works[i] for i in order]), STAGE)
        return counters(result)
    return build


def run(job: WeightsJob, pipeline_args: Sequence[str] | PipelineOptions = ()) -> dict:
    """Run ``job`` with Beam's options ``pipeline_args`` (strings, or a
    ``PipelineOptions``); return the summary (``"reused": True`` where a
    finished output made from the same inputs, settings and code was there:
    no work done). Every input is checked before the output is touched; the
    outputs are built aside and committed whole (``schemas.stage_output``)."""
    output = StageOutput(job.output, STAGE)
    options = stage_options(pipeline_args)
    plan = check_inputs(job)
    spec = OutputSpec(job.target_name, output, plan.fingerprint(), job.overwrite)
    (outcome,) = run_outputs([spec], _build(options, [plan]), catch=()).outcomes
    if outcome.error is not None:
        raise ValueError(outcome.error)
    return {**outcome.summary, "reused": True} if outcome.reused else outcome.summary


def run_targets(job: MultiWeightsJob, pipeline_args: Sequence[str] | PipelineOptions = (), *,
                quiet: bool = False) -> TargetsRun:
    """Run every target of ``job`` in one pipeline (Beam's options
    ``pipeline_args``): the source read once, each target's output under the
    output protocol on its own. A target finished from the same fingerprint
    is reused (it drops out; its skip line is printed unless ``quiet``); one
    whose own input is bad fails alone, with its reason. Bad shared input
    (index, vocabulary, generalist, settings) raises before any output is
    touched. Returns each target's outcome (summary, reused, error) in the
    order given, and the pipeline's counters."""
    options = stage_options(pipeline_args)
    job.check()
    plans = check_targets(job)
    specs = [OutputSpec(j.target_name, StageOutput(j.output, STAGE), plan.fingerprint(), j.overwrite)
             if isinstance(plan, WeightsPlan) else OutputSpec(j.target_name, StageOutput(j.output, STAGE), error=plan)
             for j, plan in zip(job.jobs(), plans)]
    return run_outputs(specs, _build(options, plans), quiet=quiet)


def describe(summary: dict) -> str:
    """The one line ``main`` prints on success."""
    top = ", ".join(f"{t['name']} ({t['weight']:.3g})" for t in summary["top_labels"][:5])
    return (f"{STAGE}: {summary['source_examples']} source examples, {summary['target_images']} target images; "
            f"top labels: {top}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line (own flags, then Beam's options) and :func:`run`
    (:func:`run_targets` for several targets: a line per target); bad input
    is one line on standard error and exit status 1."""
    try:
        job, beam_args = job_from_args(argv)
        if isinstance(job, MultiWeightsJob):
            return report(STAGE, run_targets(job, beam_args), describe)
        print(describe(run(job, beam_args)))
    except DATA_ERRORS as e:
        print(f"{STAGE}: error: {error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
