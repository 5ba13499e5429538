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
(tests/test_near_duplicates.py; README "Near-duplicates"), conservative:
it errs on the side of removing.
"""

from __future__ import annotations

import contextlib
import json
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
from .execution import DATA_ERRORS, error_line, pipeline_options, run_pipeline
from .label_counts import LabelCounts, SumLabelCounts, match_files
from .matching import EXCLUDE_SCHEMA, NEAR_PAIRS, BestMatch, Matches, candidates, exclusion_table
from .near_duplicates_outputs import EXCLUDE_PARTS, DedupConfig, DedupMeasured, write_outputs
from .similarity import HISTOGRAM_BINS, similarity_histogram
from .target_histogram import inference_settings
from .unreadable import CountUnreadable

__all__ = ["STAGE", "DEFAULT_THRESHOLD", "DEFAULT_GRID", "COMPARE_ROWS", "OUTPUT_FILES", "EXCLUDE_SCHEMA",
           "RENAMED_FLAGS", "Matches", "BestMatch", "NearDuplicatesJob", "DedupPlan", "build_parser",
           "job_from_args", "check_inputs", "build_pipeline", "run", "describe", "main"]

STAGE = "near_duplicates"
#: Cosine similarity at or above which a source example is a near-duplicate
#: (measured on planted copies: README "Near-duplicates").
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

    def fingerprint(self) -> dict:
        """What this job's result is made from (the one reuse rule; reads the
        inputs as :func:`check_inputs` does, through Beam's filesystems with
        their default options)."""
        return check_inputs(self).fingerprint()

    def check(self) -> None:
        """Raise ``ValueError`` for settings out of range (no input is read)."""
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.grid < 1:
            raise ValueError(f"--grid must be >= 1, got {self.grid}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"--splits must name distinct splits, got {','.join(self.splits)!r}")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m beam_pipelines.near_duplicates",
                       description="Source examples that are near-duplicates of target images.")
    p.add_argument("--index", required=True, help="source index: Parquet file, directory or glob")
    p.add_argument("--labels", required=True, help="label vocabulary Parquet (checks the model's label space)")
    p.add_argument("--target-root", required=True, help="root of the target dataset")
    p.add_argument("--target-layout", default="imagefolder", help="imagefolder, food101, ...")
    p.add_argument("--splits", default="train,test",
                   help="comma-separated target splits to protect (default train,test)")
    p.add_argument("--checkpoint", required=True, help="generalist checkpoint (trainer.pretrain's generalist.pt)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"cosine similarity at or above which a source example is a near-duplicate "
                        f"(default {DEFAULT_THRESHOLD}: measured, see README)")
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
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="redo a finished output made from anything else")
    p.add_aliases(RENAMED_FLAGS)
    return p


def job_from_args(argv: Sequence[str] | None = None) -> tuple[NearDuplicatesJob, list[str]]:
    """The job of a command line, and the rest of it (Beam's options)."""
    args, beam_args = build_parser().parse_known_args(argv)
    flags = vars(args)
    flags["splits"] = tuple(s.strip() for s in flags["splits"].split(",") if s.strip())
    flags["allow_uri_prefixes"] = tuple(flags.pop("allow_uri_prefix") or ())
    return NearDuplicatesJob(**flags), beam_args


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


def _open_store(job: NearDuplicatesJob, plan: DedupPlan) -> DedupPlan:
    """``plan`` with the embeddings store opened (refused when made otherwise)."""
    c = plan.config
    fingerprint = {"format": STORE_FORMAT_VERSION, "model": c.model_fingerprint, "grid": c.grid, "dim": c.dim,
                   "index": plan.index_listing, "uri_prefixes": list(c.uri_prefixes)}
    store, stored = open_store(job.embeddings, fingerprint)
    return replace(plan, config=replace(c, store_fingerprint=fingerprint, stored=stored), store=store)


def check_inputs(job: NearDuplicatesJob) -> DedupPlan:
    """Read and check every input (settings, vocabulary, generalist and its
    label space, index schema, target listing, embeddings store) before any
    output is touched."""
    from trainer.models import build_model, checkpoint_fingerprint, embedding_dim, preprocess_spec, read_generalist

    job.check()
    vocab = sio.read_parquet(job.labels)
    validate_vocabulary(vocab, job.labels)
    ckpt = read_generalist(job.checkpoint, vocab)  # another label space: SchemaError naming both sizes
    dim = embedding_dim(build_model(ckpt["architecture"], ckpt["num_classes"]), job.grid)
    files = match_files(job.index)
    column = _index_column(files)
    items = [(split, path) for split in job.splits
             for path in list_target(job.target_root, job.target_layout, split).paths]
    model_fp = checkpoint_fingerprint(job.checkpoint)
    inputs = {"source_index": job.index, "source_index_files": len(files),
              "labels": sio.fingerprint_paths(job.labels), "model": model_fp, "target_images": job.target_root,
              "target_layout": job.target_layout, "splits": list(job.splits)}
    config = DedupConfig(float(job.threshold), job.grid, dim, column,
                         _uri_prefixes(job) if column == "uri" else (), job.splits, job.max_bad_fraction,
                         job.checkpoint, model_fp, inputs)
    plan = DedupPlan(job, config, files, items, preprocess_spec(ckpt).to_dict(),
                     sio.listing_fingerprint(job.index, versions=True))
    return _open_store(job, plan) if job.embeddings else plan


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


def _write(_, work: str, store_work: str | None, config: DedupConfig, **measured) -> dict:
    """The last step: the side inputs gathered into :class:`DedupMeasured`, then written."""
    return write_outputs(work, store_work, config, DedupMeasured(**measured))


def build_pipeline(p: beam.Pipeline, plan: DedupPlan, work: str, store_work: str | None = None) -> None:
    """Add the transforms to ``p``: embed the target (side input) and the
    source (or read it from the store; write the store when ``store_work``),
    best matches, then one step that writes the outputs into ``work``."""
    device = inference_settings(p.options)["device"]
    target = _embed_target(p, plan, device)
    side: dict[str, Any] = {"target": beam.pvalue.AsSingleton(target["target"]),
                            "target_unreadable": beam.pvalue.AsSingleton(
                                target["bad"] | "UnreadableTarget" >> CountUnreadable())}
    embedded = _source_embeddings(p, plan, store_work, device, side)
    matches = embedded | "BestMatch" >> beam.ParDo(BestMatch(), beam.pvalue.AsSingleton(target["target"]))
    _from_matches(matches, target["target"], plan.config.threshold, work, side)
    _ = (p | "Once" >> beam.Create([None])
           | "WriteOutputs" >> beam.Map(_write, work, store_work, plan.config, **side))


def run(job: NearDuplicatesJob, pipeline_args: Sequence[str] | PipelineOptions = ()) -> dict:
    """Run ``job`` with Beam's options ``pipeline_args`` (strings, or a
    ``PipelineOptions``); return the summary (``"reused": True`` where a
    finished output made from the same inputs, settings and code was there:
    no work done). Every input, the embeddings store included, is checked
    before an output is touched; both outputs are built aside and committed
    whole, the store first (good on its own); a failure aborts both."""
    output = StageOutput(job.output, STAGE)
    options = pipeline_options(pipeline_args)
    inference_settings(options)  # bad inference options fail before the output is touched
    FileSystems.set_options(options)
    plan = check_inputs(job)
    writes_store = plan.store is not None and not plan.reads_store

    def build(work: str) -> None:
        store = plan.store.build(plan.config.store_fingerprint) if writes_store else contextlib.nullcontext()
        with store as store_work:
            run_pipeline(options, lambda p: build_pipeline(p, plan, work, store_work))

    reused = output.run(build, fingerprint=plan.fingerprint(), overwrite=job.overwrite)
    summary = json.loads(sio.read_bytes(sio.join(output.path, "summary.json")))
    return {**summary, "reused": True} if reused else summary


def describe(summary: dict) -> str:
    """The one line ``main`` prints on success."""
    splits = ", ".join(f"{s} {n:,}" for s, n in summary["excluded_by_split"].items())
    return (f"{STAGE}: {summary['excluded']:,} of {summary['source_examples_compared']:,} source examples are "
            f"near-duplicates of target images (similarity >= {summary['threshold']}; by split: {splits})")


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
