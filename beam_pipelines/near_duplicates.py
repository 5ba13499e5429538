"""Near-duplicates of a target's images in the source: the keys to exclude.

::

    python -m beam_pipelines.near_duplicates --index IDX --labels vocab.parquet \\
      --target-root ROOT --target-layout food101 [--splits train,test] --checkpoint generalist.pt \\
      [--threshold 0.965] [--grid 2] [--embeddings DIR] [--allow-uri-prefix P ...] \\
      [--max-bad-fraction 0.01] [--batch-size 64] --output DIR [--overwrite] \\
      [any Beam pipeline option: --runner, --direct_num_workers, Dataflow options,
       --inference_device CPU|GPU]

(The flags' earlier spellings ``--source-index``, ``--target-images`` and
``--model`` still work, with a deprecation note.) From Python:
``run(NearDuplicatesJob(index=..., labels=..., target_root=...,
checkpoint=..., output=...), ["--runner", "DirectRunner"])``.

Several targets in one run: repeat ``--target NAME`` and give each target's
own flags (``--target-root``, ``--target-layout``, ``--splits``,
``--output``) after its name; the others are shared::

    python -m beam_pipelines.near_duplicates --index IDX --labels vocab.parquet --checkpoint generalist.pt \
      --embeddings DIR \
      --target food101 --target-root R1 --target-layout food101 --output OUT/food101/near_duplicates \
      --target cars --target-root R2 --output OUT/cars/near_duplicates

The source's embeddings (read from the store, or made once and stored) go
through one pass, each batch compared with every target's embeddings; each
target's outputs are those its single-target run writes, byte for byte,
each under the output protocol on its own (:mod:`beam_pipelines.many_targets`:
a finished one is reused, one whose input is bad fails alone: one line
naming it, exit status 1; the others are committed). From Python:
``run_targets(MultiNearDuplicatesJob.of([NearDuplicatesJob(...), ...]))``.
Scale: the source side costs what one target's does (one read of the store,
or one forward pass per source image); the comparisons are one matrix
product per batch and target, and each target's embeddings are a side input.

The paper removes every near-duplicate of the target's training *and test*
images from the source before pre-training (a CNN-based detector with a
conservative threshold). Here the generalist embeds every image
(:mod:`beam_pipelines.embeddings`: its last feature map pooled over a
``--grid`` x ``--grid`` grid, square-rooted, L2-normalised), every source embedding is
compared with every target embedding (the target is a side input; the
source streams in batches, one matrix product per batch:
:mod:`beam_pipelines.matching`) and each source example keeps its most
similar target image. Those at or above ``--threshold`` are near-duplicates.

Writes to DIR (:mod:`beam_pipelines.near_duplicates_outputs`):
``exclude.parquet`` (``key``, ``target_file``, ``target_split``,
``similarity``: what ``spark_jobs.resample --exclude`` reads),
``summary.json`` (counts per target split, threshold, model fingerprint, the
pairs nearest the threshold, unreadable images),
``similarity_histogram.png`` (best similarities, threshold marked),
``contact_sheet.png`` (the pairs nearest above and below the threshold) and,
last, ``_SUCCESS``. A rerun of the same job (same inputs, settings and
code: :meth:`DedupPlan.fingerprint`) does nothing.

``--embeddings DIR`` keeps the source embeddings (the expensive part: one
forward pass per source image) for every later target: written by the
first run (stage ``source_embeddings``), read by the next ones when they
were made with the same model, grid, index listing and uri prefixes; a
store made otherwise is refused.

Default threshold and grid: measured on planted near-duplicates
(tests/test_near_duplicates.py; docs/near-duplicates.md, "The default threshold, measured"), conservative:
it errs on the side of removing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from schemas import check_index_schema, validate_vocabulary
from schemas import io as sio
from schemas.cli import ArgumentParser
from schemas.fingerprint import code_digest, digest
from schemas.stage_output import MARKER, SUCCESS, StageOutput
from schemas.targets import list_target

from .embeddings import STORE_FORMAT_VERSION, EmbedSource, EmbedTarget, ReadStore, WriteStore, concat_rows, open_store
from .execution import DATA_ERRORS, counters, error_line, run_pipeline
from .label_counts import LabelCounts, SumLabelCounts, match_files
from .matching import EXCLUDE_SCHEMA, NEAR_PAIRS, BestMatch, Matches, candidates, exclusion_table
from .many_targets import OutputSpec, PerTargetFlag, TargetsRun, failure_note, read_failure, report, run_outputs, \
    target_groups
from .near_duplicates_outputs import EXCLUDE_PARTS, DedupConfig, DedupMeasured, describe_store, write_outputs
from .similarity import HISTOGRAM_BINS, similarity_histogram
from .target_histogram import inference_settings, stage_options
from .unreadable import CountUnreadable

__all__ = ["STAGE", "DEFAULT_THRESHOLD", "DEFAULT_GRID", "COMPARE_ROWS", "OUTPUT_FILES", "EXCLUDE_SCHEMA",
           "RENAMED_FLAGS", "SHARED", "Matches", "BestMatch", "NearDuplicatesJob", "MultiNearDuplicatesJob",
           "DedupPlan", "build_parser", "job_from_args", "check_inputs", "check_targets", "build_pipeline",
           "build_targets_pipeline", "run", "run_targets", "describe", "main"]

STAGE = "near_duplicates"
#: Cosine similarity at or above which a source example is a near-duplicate
#: (measured on planted copies: docs/near-duplicates.md).
DEFAULT_THRESHOLD = 0.965
#: Cells per side of the pooling grid over the last feature map (1: the penultimate layer).
DEFAULT_GRID = 2
#: Source rows per matrix product against the target (a float32 product of
#: 1,024 rows runs about 5x as many pairs a second as one of 64 on this VM);
#: stored embeddings are read this many at a time, fresh ones regrouped.
COMPARE_ROWS = 1024
OUTPUT_FILES = ("exclude.parquet", "summary.json", "similarity_histogram.png", "contact_sheet.png", SUCCESS,
                MARKER)
#: Earlier spellings of flags, kept as hidden aliases: old -> new.
RENAMED_FLAGS = {"--source-index": "--index", "--target-images": "--target-root", "--model": "--checkpoint"}
#: The settings every target of a :class:`MultiNearDuplicatesJob` shares (given once on the command line).
SHARED = ("index", "labels", "checkpoint", "threshold", "grid", "embeddings", "allow_uri_prefixes",
          "max_bad_fraction", "batch_size")


@dataclass(frozen=True)
class NearDuplicatesJob:
    """One run of the stage (the command line's flags).

    ``index``: the source index (Parquet file, directory or glob); ``labels``:
    the vocabulary (checks the generalist's label space); the target's images
    under ``target_root`` (``target_layout``), those of ``splits`` protected;
    ``checkpoint``: the generalist; ``output``: the directory written.
    ``threshold``: cosine similarity at or above which a source example is a
    near-duplicate (default :data:`DEFAULT_THRESHOLD`); ``grid``: pooling cells
    per side (default :data:`DEFAULT_GRID`); ``embeddings``: the store of
    source embeddings (read, or written when empty); ``allow_uri_prefixes``: a
    uri index's images are read only under these (default: the index's own
    storage, ``schemas.uri_policy``); ``max_bad_fraction`` of unreadable target
    images before the run fails (default 0.01); ``batch_size``: images per
    forward pass (default 64: a performance setting, left out of the
    fingerprint); ``overwrite``: redo a finished output made from anything else.
    """

    index: str
    labels: str
    target_root: str
    checkpoint: str
    output: str
    target_layout: str = "imagefolder"
    splits: tuple[str, ...] = ("train", "test")
    threshold: float = DEFAULT_THRESHOLD
    grid: int = DEFAULT_GRID
    embeddings: str | None = None
    allow_uri_prefixes: tuple[str, ...] = ()
    max_bad_fraction: float = 0.01
    batch_size: int = 64
    overwrite: bool = False
    target: str | None = None

    @property
    def target_name(self) -> str:
        """The target's name in messages (default: the root's basename; not
        part of the result)."""
        return self.target or self.target_root.rstrip("/").rsplit("/", 1)[-1]

    def fingerprint(self) -> dict:
        """What this job's result is made from (the one reuse rule; reads the
        inputs as :func:`check_inputs` does, through Beam's filesystems with
        their default options)."""
        return check_inputs(self).fingerprint()

    def check(self) -> None:
        """Raise ``ValueError`` for settings out of range (no input is read)."""
        _check_shared(self)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"--splits must name distinct splits, got {','.join(self.splits)!r}")


def _check_shared(job: NearDuplicatesJob) -> None:
    if not -1.0 <= job.threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine similarity in [-1, 1], got {job.threshold}")
    if job.grid < 1:
        raise ValueError(f"--grid must be >= 1, got {job.grid}")
    if job.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {job.batch_size}")
    if not 0 <= job.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {job.max_bad_fraction}")


@dataclass(frozen=True)
class MultiNearDuplicatesJob:
    """The stage for several targets in one run: ``targets``, each target's
    own :class:`NearDuplicatesJob` (its images, splits, output, name,
    overwrite), all sharing the settings in :data:`SHARED` (the source and
    its embeddings store, the generalist, threshold, grid...). The source's
    embeddings (read from the store, or made once) go through one pass and
    are compared with every target's; each target's output is the one its
    own job makes, with the same fingerprint."""

    targets: tuple[NearDuplicatesJob, ...]

    @classmethod
    def of(cls, jobs: Sequence[NearDuplicatesJob]) -> "MultiNearDuplicatesJob":
        return cls(tuple(jobs))

    def jobs(self) -> list[NearDuplicatesJob]:
        """Each target's single-target job."""
        return list(self.targets)

    def check(self) -> None:
        """Raise ``ValueError`` for no target, targets that do not share
        :data:`SHARED`, shared settings out of range or two targets writing one
        output (no input is read)."""
        if not self.targets:
            raise ValueError("no target to build")
        first = self.targets[0]
        for j in self.targets[1:]:
            for name in SHARED:
                if getattr(j, name) != getattr(first, name):
                    raise ValueError(f"the targets of one run share --{name.replace('_', '-')}: {j.target_name} "
                                     f"has {getattr(j, name)!r}, {first.target_name} {getattr(first, name)!r}")
        _check_shared(first)
        outputs = [StageOutput(j.output, STAGE).path for j in self.targets]
        twice = sorted({o for o in outputs if outputs.count(o) > 1})
        if twice:
            raise ValueError(f"several targets write {twice[0]}: give each target its own --output")

    def fingerprints(self) -> list[dict | None]:
        """Each target's fingerprint (that of its single-target job; ``None``
        for a target whose own input is bad), the shared inputs read once."""
        return [plan.fingerprint() if isinstance(plan, DedupPlan) else None for plan in check_targets(self)]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m beam_pipelines.near_duplicates",
                       description="Source examples that are near-duplicates of target images (one target, or "
                                   "several in one pass over the source).")
    p.add_argument("--index", required=True, help="source index: Parquet file, directory or glob")
    p.add_argument("--labels", required=True, help="label vocabulary Parquet (checks the model's label space)")
    p.add_argument("--target", action=PerTargetFlag,
                   help="the target's name, in messages (default: the root's basename); repeated, each --target "
                        "NAME starts the flags of one of several targets (--target-root, --target-layout, "
                        "--splits, --output)")
    p.add_argument("--target-root", action=PerTargetFlag, required=True, help="root of the target dataset")
    p.add_argument("--target-layout", action=PerTargetFlag, default="imagefolder", help="imagefolder, food101, ...")
    p.add_argument("--splits", action=PerTargetFlag, default="train,test",
                   help="comma-separated target splits to protect (default train,test)")
    p.add_argument("--checkpoint", required=True, help="generalist checkpoint (trainer.pretrain's generalist.pt)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"cosine similarity at or above which a source example is a near-duplicate "
                        f"(default {DEFAULT_THRESHOLD}: measured, see docs/near-duplicates.md)")
    p.add_argument("--grid", type=int, default=DEFAULT_GRID,
                   help=f"pool the last feature map over GRID x GRID cells (default {DEFAULT_GRID}; "
                        "1: the penultimate layer)")
    p.add_argument("--embeddings", help="store of source embeddings, reused by later runs with the same model "
                                        "and source (written when empty)")
    p.add_argument("--allow-uri-prefix", action="append", metavar="PREFIX",
                   help="repeatable: read a uri index's images only under these prefixes (default: the index's "
                        "own storage; schemas.uri_policy)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more target images than this are unreadable (default 0.01)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--output", action=PerTargetFlag, required=True, help="directory to write (one per target)")
    p.add_argument("--overwrite", action="store_true", help="redo a finished output made from anything else")
    p.add_aliases(RENAMED_FLAGS)
    return p


def _splits(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def job_from_args(argv: Sequence[str] | None = None) -> tuple[NearDuplicatesJob | MultiNearDuplicatesJob, list[str]]:
    """The job of a command line (a :class:`MultiNearDuplicatesJob` where it
    names several targets), and the rest of it (Beam's options)."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    flags = vars(args)
    flags["allow_uri_prefixes"] = tuple(flags.pop("allow_uri_prefix") or ())
    try:
        groups = target_groups(flags)
    except ValueError as e:
        parser.error(str(e))
    flags["splits"] = _splits(flags["splits"])
    if groups is None:
        return NearDuplicatesJob(**flags), beam_args
    jobs = []
    for g in groups:
        for dest in ("target_root", "output"):
            if dest not in g:
                parser.error(f"target {g['target']}: --{dest.replace('_', '-')} is required")
        own = {**g, "splits": _splits(g.get("splits", "train,test")),
               "target_layout": g.get("target_layout", "imagefolder")}
        jobs.append(NearDuplicatesJob(**{**flags, **own}))
    return MultiNearDuplicatesJob(tuple(jobs)), beam_args


@dataclass
class DedupPlan:
    """A checked job: the steps' :class:`DedupConfig`, the index files, the
    target images ``(split, path)``, the checkpoint's preprocessing, the
    index listing's fingerprint and the embeddings store (``None``: none)."""

    job: NearDuplicatesJob
    config: DedupConfig
    source_files: list[str]
    target_items: list[tuple[str, str]]
    preprocess: dict
    index_listing: str
    store: StageOutput | None = None

    @property
    def reads_store(self) -> bool:
        return self.config.stored is not None

    def fingerprint(self) -> dict:
        """What the result is made from (the one reuse rule): the index listing,
        vocabulary, generalist, target listing, settings and the stage's
        code; not the runner, the batch size, where the model runs or the
        embeddings store (a store gives the same embeddings)."""
        job, config = self.job, self.config
        return {"index": self.index_listing, "labels": config.inputs["labels"], "checkpoint": config.model_fingerprint,
                "target_images": digest(self.target_items), "target_layout": job.target_layout,
                "splits": list(config.splits), "threshold": config.threshold, "grid": config.grid,
                "uri_prefixes": list(config.uri_prefixes), "max_bad_fraction": config.max_bad_fraction,
                "code": code_digest("beam_pipelines.near_duplicates")}


def _uri_prefixes(job: NearDuplicatesJob) -> tuple[str, ...]:
    from schemas.uri_policy import canonical_prefix, default_prefixes

    if job.allow_uri_prefixes:
        return tuple(dict.fromkeys(canonical_prefix(p) for p in job.allow_uri_prefixes))
    return default_prefixes(job.index)


def _index_column(files: list[str]) -> str:
    """``image`` or ``uri``: the column of the index that holds the images."""
    with FileSystems.open(files[0]) as fh:
        return check_index_schema(pq.ParquetFile(fh).schema_arrow, files[0])


@dataclass
class _Shared:
    """What every target of a run is checked against, read once: the
    generalist (``ckpt``, its ``model_fp``, its ``preprocess``ing), the
    embedding ``dim``, the index ``files``, its image ``column`` and
    ``listing``, the allowed uri ``prefixes``, the vocabulary's fingerprint
    (``labels``) and the embeddings store (``None``: none): (store, its
    fingerprint, its description where it is read)."""

    ckpt: dict
    model_fp: str
    preprocess: dict
    dim: int
    files: list[str]
    column: str
    listing: str
    prefixes: tuple[str, ...]
    labels: str
    store: tuple[StageOutput, dict, dict | None] | None = None


def _shared_inputs(job: NearDuplicatesJob) -> _Shared:
    """Read and check the inputs every target shares (vocabulary, generalist
    and its label space, index schema); the store is opened by :func:`_open_store`."""
    from trainer.models import build_model, checkpoint_fingerprint, embedding_dim, preprocess_spec, read_generalist

    vocab = sio.read_parquet(job.labels)
    validate_vocabulary(vocab, job.labels)
    ckpt = read_generalist(job.checkpoint, vocab)  # another label space: SchemaError naming both sizes
    dim = embedding_dim(build_model(ckpt["architecture"], ckpt["num_classes"]), job.grid)
    files = match_files(job.index)
    column = _index_column(files)
    return _Shared(ckpt, checkpoint_fingerprint(job.checkpoint), preprocess_spec(ckpt).to_dict(), dim, files,
                   column, sio.listing_fingerprint(job.index, versions=True),
                   _uri_prefixes(job) if column == "uri" else (), sio.fingerprint_paths(job.labels))


def _open_store(job: NearDuplicatesJob, shared: _Shared) -> None:
    """Open ``job``'s embeddings store into ``shared`` (refused when made otherwise)."""
    if job.embeddings:
        fingerprint = {"format": STORE_FORMAT_VERSION, "model": shared.model_fp, "grid": job.grid,
                       "dim": shared.dim, "index": shared.listing, "uri_prefixes": list(shared.prefixes)}
        shared.store = (*open_store(job.embeddings, fingerprint), fingerprint)


def _plan(job: NearDuplicatesJob, shared: _Shared) -> DedupPlan:
    """``job``'s plan against the ``shared`` inputs: its own target listed."""
    items = [(split, path) for split in job.splits
             for path in list_target(job.target_root, job.target_layout, split).paths]
    inputs = {"source_index": job.index, "source_index_files": len(shared.files), "labels": shared.labels,
              "model": shared.model_fp, "target_images": job.target_root, "target_layout": job.target_layout,
              "splits": list(job.splits)}
    config = DedupConfig(float(job.threshold), job.grid, shared.dim, shared.column, shared.prefixes, job.splits,
                         job.max_bad_fraction, job.checkpoint, shared.model_fp, inputs)
    return DedupPlan(job, config, shared.files, items, shared.preprocess, shared.listing)


def _with_store(plan: DedupPlan, shared: _Shared) -> DedupPlan:
    """``plan`` with the store opened into ``shared`` (where there is one)."""
    if shared.store is None:
        return plan
    store, stored, fingerprint = shared.store
    return replace(plan, config=replace(plan.config, store_fingerprint=fingerprint, stored=stored), store=store)


def check_inputs(job: NearDuplicatesJob) -> DedupPlan:
    """Read and check every input (settings, vocabulary, generalist and its
    label space, index schema, target listing, embeddings store) before any
    output is touched."""
    job.check()
    shared = _shared_inputs(job)
    plan = _plan(job, shared)  # the target's listing is checked before the store
    _open_store(job, shared)
    return _with_store(plan, shared)


def check_targets(job: MultiNearDuplicatesJob) -> list[DedupPlan | str]:
    """Each target's plan (as :func:`check_inputs` makes it for its
    single-target job), or why its own input is bad (one line); the shared
    inputs (the store included) are read once, and a bad one raises."""
    job.check()
    shared = _shared_inputs(job.targets[0])
    _open_store(job.targets[0], shared)
    plans: list[DedupPlan | str] = []
    for j in job.jobs():
        try:
            j.check()
            plans.append(_with_store(_plan(j, shared), shared))
        except DATA_ERRORS as e:
            plans.append(error_line(e))
    return plans


# -- the pipeline ------------------------------------------------------------------------

def _embed_target(p: beam.Pipeline, plan: DedupPlan, device: str) -> dict:
    items = [(i, split, path) for i, (split, path) in enumerate(plan.target_items)]
    return (p | "TargetImages" >> beam.Create(items)
              | "EmbedTarget" >> EmbedTarget(plan.job.checkpoint, plan.preprocess, plan.config.grid,
                                             plan.job.batch_size, device))


def _source_embeddings(p: beam.Pipeline, plan: DedupPlan, store_work: str | None, device: str, side: dict):
    """The source's embeddings, read from the store or computed (and then
    written to ``store_work`` when given), in batches of about
    :data:`COMPARE_ROWS` rows; adds the side inputs this makes to ``side``."""
    c, batch = plan.config, plan.job.batch_size
    if plan.reads_store:
        return (p | "StoreFiles" >> beam.Create(match_files(plan.store.path))
                  | "ReadStore" >> ReadStore(c.dim, COMPARE_ROWS))
    source = (p | "SourceFiles" >> beam.Create(plan.source_files)
                | "EmbedSource" >> EmbedSource(plan.job.checkpoint, plan.preprocess, c.column, c.grid, batch,
                                               c.uri_prefixes, device))
    embedded = source["embeddings"]
    side["source_unreadable"] = beam.pvalue.AsSingleton(source["bad"] | "UnreadableSource" >> CountUnreadable())
    if store_work is not None:
        written = embedded | "WriteStore" >> WriteStore(sio.join(store_work, "part"), c.dim, batch)
        side["store_files"] = beam.pvalue.AsList(written)
    per_product = max(1, COMPARE_ROWS // batch)
    return (embedded
            | "GroupForCompare" >> beam.BatchElements(min_batch_size=per_product, max_batch_size=per_product)
            | "ConcatRows" >> beam.Map(concat_rows))


def _binned(m: Matches) -> LabelCounts:
    """A batch's best similarities as histogram counts (the label counts' exact int64 sum serves)."""
    return LabelCounts(similarity_histogram(m.similarity), len(m.keys))


def _from_matches(matches, target, threshold: float, work: str, side: dict) -> None:
    """The side inputs made from the matches (``target``: the target's
    embeddings): the exclusion parts written under ``work``, the histogram
    and the pairs nearest the threshold."""
    side["exclude_files"] = beam.pvalue.AsList(
        matches
        | "Exclusions" >> beam.Map(exclusion_table, threshold, beam.pvalue.AsSingleton(target))
        | "NonEmpty" >> beam.Filter(lambda t: t.num_rows > 0)
        | "WriteExclusions" >> beam.io.WriteToParquetBatched(sio.join(work, EXCLUDE_PARTS, "part"),
                                                             EXCLUDE_SCHEMA, file_name_suffix=".parquet"))
    side["histogram"] = beam.pvalue.AsSingleton(
        matches | "BinSimilarities" >> beam.Map(_binned)
        | "SumHistogram" >> beam.CombineGlobally(SumLabelCounts(HISTOGRAM_BINS)))
    side["above"] = beam.pvalue.AsSingleton(
        matches | "CandidatesAbove" >> beam.FlatMap(candidates, threshold, "above")
        | "NearestAbove" >> beam.combiners.Top.Smallest(NEAR_PAIRS))
    side["below"] = beam.pvalue.AsSingleton(
        matches | "CandidatesBelow" >> beam.FlatMap(candidates, threshold, "below")
        | "NearestBelow" >> beam.combiners.Top.Largest(NEAR_PAIRS))


def _write(_, work: str, config: DedupConfig, **measured) -> None:
    """A target's last step: the side inputs gathered into :class:`DedupMeasured`,
    then written into ``work`` (its bad input: a failure note, that target only)."""
    with failure_note(work):
        write_outputs(work, None, config, DedupMeasured(**measured))


class _CompareTarget(beam.PTransform):
    """Source ``EmbeddedRows`` -> one target's outputs written into ``work``:
    the target embedded (a side input), each source batch's best match in it,
    the exclusions, histogram and nearest pairs, then the last step.
    ``source_side``: the side inputs made from the source (its unreadable images)."""

    def __init__(self, plan: DedupPlan, work: str, device: str, source_side: dict):
        super().__init__()
        self.plan, self.work, self.device, self.source_side = plan, work, device, source_side

    def expand(self, embedded):
        p = embedded.pipeline
        target = _embed_target(p, self.plan, self.device)
        side: dict[str, Any] = {**self.source_side, "target": beam.pvalue.AsSingleton(target["target"]),
                                "target_unreadable": beam.pvalue.AsSingleton(
                                    target["bad"] | "UnreadableTarget" >> CountUnreadable())}
        matches = embedded | "BestMatch" >> beam.ParDo(BestMatch(), beam.pvalue.AsSingleton(target["target"]))
        _from_matches(matches, target["target"], self.plan.config.threshold, self.work, side)
        return (p | "Once" >> beam.Create([None])
                  | "WriteOutputs" >> beam.Map(_write, self.work, self.plan.config, **side))


def _describe_store(_, store_work: str, config: DedupConfig, examples: int, source_unreadable,
                    store_files) -> None:
    describe_store(store_work, config, examples, source_unreadable, store_files)


def build_targets_pipeline(p: beam.Pipeline, plans: Sequence[DedupPlan], works: Sequence[str],
                           store_work: str | None = None) -> None:
    """Add the transforms to ``p``: the source's embeddings once (read from
    the store, or made, and then written to ``store_work`` when given), each
    batch of them compared with every target (one :class:`_CompareTarget` per
    target, writing its outputs into its ``works`` directory); the store's
    description once."""
    device = inference_settings(p.options)["device"]
    source_side: dict[str, Any] = {}
    embedded = _source_embeddings(p, plans[0], store_work, device, source_side)
    store_files = source_side.pop("store_files", None)
    for k, (plan, work) in enumerate(zip(plans, works)):
        _ = embedded | f"Target{k}" >> _CompareTarget(plan, work, device, source_side)
    if store_work is not None:
        examples = embedded | "CountEmbedded" >> beam.Map(len) | "SumEmbedded" >> beam.CombineGlobally(sum)
        _ = (p | "StoreOnce" >> beam.Create([None])
               | "DescribeStore" >> beam.Map(_describe_store, store_work, plans[0].config,
                                             beam.pvalue.AsSingleton(examples), source_side["source_unreadable"],
                                             store_files))


def build_pipeline(p: beam.Pipeline, plan: DedupPlan, work: str, store_work: str | None = None) -> None:
    """:func:`build_targets_pipeline` for one target."""
    build_targets_pipeline(p, [plan], [work], store_work)


def _build(options: PipelineOptions, plans: Sequence[DedupPlan]):
    """``build(works)`` for :func:`~beam_pipelines.many_targets.run_outputs`:
    one pipeline for the targets to build. A store to write is built beside
    them: committed when at least one target's outputs were written (it is
    good on its own), aborted otherwise."""
    first = next(plan for plan in plans if isinstance(plan, DedupPlan))
    writes_store = first.store is not None and not first.reads_store

    def build(works: dict[int, str]) -> dict[str, int]:
        order = sorted(works)
        store_work = first.store.begin(first.config.store_fingerprint) if writes_store else None
        try:
            result = run_pipeline(options, lambda p: build_targets_pipeline(
                p, [plans[i] for i in order], [works[i] for i in order], store_work), STAGE)
        except BaseException:
            if store_work is not None:
                first.store.abort(store_work)
            raise
        if store_work is not None:
            written = any(read_failure(works[i]) is None for i in order)
            (first.store.commit if written else first.store.abort)(store_work)
        return counters(result)
    return build


def run(job: NearDuplicatesJob, pipeline_args: Sequence[str] | PipelineOptions = ()) -> dict:
    """Run ``job`` with Beam's options ``pipeline_args`` (strings, or a
    ``PipelineOptions``); return the summary (``"reused": True`` where a
    finished output made from the same inputs, settings and code was there:
    no work done). Every input, the embeddings store included, is checked
    before an output is touched; both outputs are built aside and committed
    whole, the store first (good on its own); a failure aborts both."""
    options = stage_options(pipeline_args)
    plan = check_inputs(job)
    spec = OutputSpec(job.target_name, StageOutput(job.output, STAGE), plan.fingerprint(), job.overwrite)
    (outcome,) = run_outputs([spec], _build(options, [plan]), catch=()).outcomes
    if outcome.error is not None:
        raise ValueError(outcome.error)
    return {**outcome.summary, "reused": True} if outcome.reused else outcome.summary


def run_targets(job: MultiNearDuplicatesJob, pipeline_args: Sequence[str] | PipelineOptions = (), *,
                quiet: bool = False) -> TargetsRun:
    """Run every target of ``job`` in one pipeline (Beam's options
    ``pipeline_args``): the source's embeddings read (or made) once and
    compared with every target's; each target's output under the output
    protocol on its own. A target finished from the same fingerprint is
    reused (it drops out; its skip line is printed unless ``quiet``); one
    whose own input is bad (its listing, its unreadable images) fails alone,
    with its reason, its output untouched. Bad shared input (index,
    vocabulary, generalist, store, settings) raises before any output is
    touched. Returns each target's outcome in the order given, and the
    pipeline's counters."""
    options = stage_options(pipeline_args)
    plans = check_targets(job)
    specs = [OutputSpec(j.target_name, StageOutput(j.output, STAGE), plan.fingerprint(), j.overwrite)
             if isinstance(plan, DedupPlan) else OutputSpec(j.target_name, StageOutput(j.output, STAGE), error=plan)
             for j, plan in zip(job.jobs(), plans)]
    if not any(isinstance(plan, DedupPlan) for plan in plans):
        return run_outputs(specs, lambda works: {}, quiet=quiet)
    return run_outputs(specs, _build(options, plans), quiet=quiet)


def describe(summary: dict) -> str:
    """The one line ``main`` prints on success."""
    splits = ", ".join(f"{s} {n:,}" for s, n in summary["excluded_by_split"].items())
    return (f"{STAGE}: {summary['excluded']:,} of {summary['source_examples_compared']:,} source examples are "
            f"near-duplicates of target images (similarity >= {summary['threshold']}; by split: {splits})")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line (own flags, then Beam's options) and :func:`run`
    (:func:`run_targets` for several targets: a line per target); bad input
    is one line on standard error and exit status 1."""
    try:
        job, beam_args = job_from_args(argv)
        if isinstance(job, MultiNearDuplicatesJob):
            return report(STAGE, run_targets(job, beam_args), describe)
        print(describe(run(job, beam_args)))
    except DATA_ERRORS as e:
        print(f"{STAGE}: error: {error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
