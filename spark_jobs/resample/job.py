"""The resampling job: its options typed (:class:`ResampleJob`), every input
checked before the output is touched, and :func:`run` through the output
protocol (``schemas.stage_output``: one reuse rule, built aside, committed
whole)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas import ResampleConfig, SchemaError, parse_size
from schemas import io as sio
from schemas.fingerprint import code_digest
from schemas.stage_output import StageOutput, require_finished_input

from .. import label_sets as LS
from .. import sampling as S
from ..progress import spark_progress
from ..session import StageTimer, require_reachable_outputs
from . import checks, report
from .draw import keyed, plan_and_draw
from .weights import Weighting, label_weights_for, weigh_label_sets

__all__ = ["ResampleJob", "STAGE", "DEFAULT_ROWS_PER_PARTITION", "read_index", "read_source_index",
           "excluded_keys", "run"]

#: The output protocol's name for this stage (``schemas.stage_output``).
STAGE = "resample"

#: Candidate records per partition of the drawing stage (the whole partition
#: is held in one Python worker's memory: ~170 bytes a record, measured).
DEFAULT_ROWS_PER_PARTITION = 1_000_000
#: The job's settings that decide the selection (and so its fingerprint).
SELECTION_SETTINGS = ("size", "matcher", "draw", "aggregate", "scheme", "subset_labels", "top_k", "seed",
                      "target", "temperature")


@dataclass
class ResampleJob:
    """One resampling run's inputs and options (the command line, typed)."""

    index: str
    output: str
    size: int
    weights: str | None = None
    matcher: str = "same"
    draw: str = "multinomial"
    aggregate: str = "mean"
    scheme: str = "adaptive"
    labels: str | None = None
    subset_labels: tuple[str, ...] = ()
    top_k: int | None = None
    exclude: str | None = None
    seed: int = 0
    target: str | None = None
    temperature: float | None = None
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION
    label_sets: str | None = None
    candidate_sigmas: float = S.CANDIDATE_SIGMAS
    overwrite: bool = False
    shared_output: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.size = parse_size(self.size)
        if self.matcher == "elastic":
            self.draw = "systematic"
        if self.scheme == "subset":
            # Uniform over every example carrying a subset label, whatever else it carries.
            self.aggregate = "max"
        if self.scheme in ("adaptive", "topk-uniform", "reversed", "balanced") and not self.weights:
            raise ValueError(f"scheme {self.scheme!r} needs --weights")
        if self.scheme == "subset" and not self.labels:
            raise ValueError("scheme 'subset' needs --labels (the label vocabulary)")
        if self.scheme == "subset" and not self.subset_labels:
            raise ValueError("scheme 'subset' needs --subset-labels NAME,...")

    def config(self) -> ResampleConfig:
        return ResampleConfig(target=self.target or "unknown", size=self.size, matcher=self.matcher,
                              draw=self.draw, seed=self.seed,
                              temperature=self.temperature if self.temperature else 2.0,
                              aggregation=self.aggregate, scheme=self.scheme,
                              subset_labels=tuple(self.subset_labels), top_k=self.top_k)

    def input_fingerprints(self, index_listing: str | None = None) -> dict[str, str]:
        """The inputs' fingerprints: the index's listing (file names and
        sizes; ``index_listing`` where it was taken already), the content of
        the weights, vocabulary and exclusions."""
        out = {"index": index_listing if index_listing is not None else sio.listing_fingerprint(self.index)}
        for name in ("weights", "labels", "exclude"):
            path = getattr(self, name)
            if path:
                out[name] = sio.fingerprint_paths(path)
        return out

    def fingerprint(self, inputs: dict[str, str] | None = None) -> dict[str, Any]:
        """What the selection is made from (the one reuse rule): the settings
        that decide it, the inputs (:meth:`input_fingerprints`, unless given)
        and the code. Not the performance knobs (rows per partition, candidate
        margin), nor where the label-set table is kept: they leave the
        selection as it is."""
        settings = {name: getattr(self, name) for name in SELECTION_SETTINGS}
        settings["subset_labels"] = list(self.subset_labels)
        return {**settings, **(inputs if inputs is not None else self.input_fingerprints()),
                "code": code_digest("spark_jobs.resample")}


def read_index(spark, job: ResampleJob):
    """The index (less the ``--exclude`` keys), checked to have what the job reads."""
    sio.require_readable(job.index, "--index")
    if job.exclude:
        sio.require_readable(job.exclude, "--exclude")
    index_df = read_source_index(spark, job.index)
    if job.exclude:
        index_df = index_df.join(excluded_keys(spark, job.exclude).distinct(), on="key", how="left_anti")
    return index_df


def read_source_index(spark, index: str):
    """The source index as a DataFrame, refused (``SchemaError`` naming it)
    without its ``key`` and ``labels`` columns."""
    index_df = spark.read.parquet(index)
    names = set(index_df.columns)
    if "key" not in names or "labels" not in names:
        raise SchemaError(f"source index has no 'key'/'labels' column (columns: {sorted(names)})", file=index)
    return index_df


def excluded_keys(spark, exclude: str):
    """The ``key`` column of an ``--exclude`` file, refused (``SchemaError``
    naming it) where there is none."""
    sio.require_readable(exclude, "--exclude")
    excluded = spark.read.parquet(exclude)
    if "key" not in excluded.columns:
        raise SchemaError(f"--exclude needs a 'key' column (columns: {sorted(excluded.columns)})", file=exclude)
    return excluded.select("key")


def run(spark, job: ResampleJob) -> dict[str, Any]:
    """Run the job with ``spark``; return the stats written to stats.json
    (with ``"reused": True`` where a finished output made from the same
    fingerprint was there: no work done). A ``ManyResampleJob`` (many
    targets, one pass) is run by ``many.run_many`` and returns its list of
    ``TargetResult``.

    Every input is read and checked before the output is touched; the result
    is built aside and committed whole (``schemas.stage_output``)."""
    if not isinstance(job, ResampleJob):
        from .many import run_many

        return run_many(spark, job)
    t0 = time.time()
    require_reachable_outputs(spark, {"--output": job.output, "--label-sets": job.label_sets}, job.shared_output)
    output = StageOutput(job.output, STAGE)
    for flag, path in (("--index", job.index), ("--weights", job.weights), ("--labels", job.labels),
                       ("--exclude", job.exclude)):
        if path:
            require_finished_input(path, flag)
    weighting = label_weights_for(job)
    given, job = job, weighting.resolve(job)  # the target and temperature the weights table names
    job.config()  # checks the settings
    index_df = read_index(spark, job)
    if job.label_sets:
        LS.check_label_sets_path(job.label_sets)
    inputs = job.input_fingerprints()
    stats: dict[str, Any] = {}

    def build(work: str) -> None:
        stats.update(_resample_into(spark, job, weighting, index_df, inputs, work, t0))

    # the job as given (as the composed commands see it before running it): the
    # weights' content, in the inputs, already pins what resolve() took from it
    with spark_progress(spark, STAGE):
        reused = output.run(build, fingerprint=given.fingerprint(inputs), overwrite=job.overwrite)
    if reused:
        return {**json.loads(sio.read_bytes(sio.join(job.output, "stats.json"))), "reused": True}
    return stats


def _resample_into(spark, job: ResampleJob, weighting: Weighting, index_df, inputs: dict[str, str], work: str,
                   t0: float) -> dict[str, Any]:
    """Count, plan and draw into ``work``; write the statistics; return them."""
    stages = StageTimer()
    selection = sio.join(work, "selection")
    outcome = _count_and_draw(spark, job, weighting, index_df, inputs, selection, stages)
    checks.check_unique_keys(spark, job, selection)
    stages.lap("unique_keys")
    stats, label_stats = report.statistics(job, weighting, outcome, inputs)
    stats["seconds"] = round(time.time() - t0, 2)
    stats["timings"] = stages.timings
    report.write_report(work, stats, label_stats, job.labels)
    return stats


def _count_and_draw(spark, job: ResampleJob, weighting: Weighting, index_df, inputs: dict[str, str],
                    selection: str, stages: StageTimer) -> report.Outcome:
    """The label-set table (read from ``--label-sets`` where it was counted
    over these inputs, else counted), weighed and checked, then the draw. A
    stored table that the records contradict (bad input, or classes that
    disagree in the draw) is counted again: bad input is only ever reported
    from a fresh count."""
    # The label-set table depends on the index (and --exclude) only: every run over them can share it.
    sets_key = {"index": sio.listing_fingerprint(job.index, versions=True),
                "exclude": inputs.get("exclude")} if job.label_sets else {}
    hint = LS.read_label_sets(job.label_sets, sets_key) if job.label_sets else None
    keyed_df = keyed(index_df, job.seed)
    while True:
        counted = hint is None
        sets_table = _count_label_sets(spark, job, index_df, sets_key) if counted else hint
        stages.lap("label_sets")
        weighted_sets = weigh_label_sets(sets_table, weighting.label_weights, job.aggregate)
        try:
            records, positive = checks.check_label_sets(spark, job, weighted_sets)
        except ValueError:
            if counted:
                raise
            hint = None
            continue
        drawing = plan_and_draw(spark, job, keyed_df, weighted_sets, selection, stages, stored=not counted)
        if drawing is not None:
            return report.Outcome(weighted_sets, counted, records, positive, drawing)
        print(f"resample: the label-set table {job.label_sets} does not match the records of "
              f"{job.index}; counting again", file=sys.stderr)
        hint = None


def _count_label_sets(spark, job: ResampleJob, index_df, sets_key: dict[str, Any]) -> pa.Table:
    """Count the label sets (``label_sets.count_label_sets``: the index's
    labels and keys read once), refusing a key held by more than one record,
    whatever its labels, naming it and its files; store the table at
    ``--label-sets`` where given."""
    count = LS.count_label_sets(index_df)
    shared = LS.duplicate_key(index_df, count)
    if shared is not None:
        raise checks.not_unique(spark, job, shared)
    if job.label_sets:
        LS.write_label_sets(count.table, job.label_sets, sets_key)
    return count.table
