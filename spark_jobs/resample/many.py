"""Many targets' selections from one pass over the index (docs/design.md,
"Many targets").

:func:`run_many` takes the single-target jobs (:class:`ResampleJob`, one
per target, all over one index) and gives each target exactly the output
``run(spark, job)`` would give it: the same selection rows, stats.json
(less its timings), label statistics and, in its marker, the same
fingerprint, so single and many-target runs reuse each other's outputs.
What it shares is the reading:

- **label sets**: one count of the index's label lists, grouped by the set
  of targets that exclude each record's key (the exclusion files are small
  and read together), gives every target's table (the index's, less what
  it excludes: ``label_sets.count_label_sets_excluding``); a target whose
  ``--label-sets`` file holds its table reads it instead, as alone;
- **the draw**: one scan of the index tests each record against every
  target's candidate bound and shuffles only the candidates, grouped by
  (target, class); each target's classes are drawn with its own plan and
  seed (``many_draw``). The rare classes whose bound fell short are drawn
  again for all targets in one more pass.

Each target follows the output protocol on its own: its inputs are checked
before its output is touched, a finished output made from its fingerprint
is reused (its target not drawn), and its result is committed whole. A
target whose input is bad (weights of another vocabulary, an exclusion file
without a key column, a size larger than its examples with a weight) fails
alone with its one-line reason; the others finish and commit.

What grows with the number of targets K: the driver's memory (K label-set
tables, plans and candidate-bound vectors: per label set, never per
record), the small reads (each target's weights, vocabulary and exclusion
file), per-record work in the scans (one hash per distinct seed and K
comparisons), the rows shuffled (the targets' candidates, about the sum of
their sizes) and the requests that write and check each target's output
and selection. What does not: the reads of the index (the label-set count
and one drawing pass, as for one target).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from schemas import io as sio
from schemas.stage_output import StageOutput, require_finished_input

from .. import label_sets as LS
from ..progress import spark_progress
from ..session import StageTimer, require_reachable_outputs
from . import checks, report
from .draw import DrawRound, Drawing, Drawn, first_round, settle, short_classes
from .job import STAGE, ResampleJob, excluded_keys, read_index, read_source_index
from .many_draw import commit_many, draw_many, marked_index
from .weights import Weighting, label_weights_for, weigh_label_sets

__all__ = ["ManyResampleJob", "TargetResult", "run_many"]


@dataclass(frozen=True)
class ManyResampleJob:
    """Many targets' resampling runs over one index, drawn in one pass: one
    :class:`ResampleJob` per target (each with its own weights, settings,
    seed and ``output``). Raises ``ValueError`` where there is no job, two
    indexes, or two jobs with one output."""

    jobs: tuple[ResampleJob, ...]
    #: Tasks of the shared drawing pass (default: one per target's drawing
    #: task, in whole waves of cores). A performance knob: each target's
    #: selection is the same whatever it is.
    draw_tasks: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "jobs", tuple(self.jobs))
        _check_jobs(list(self.jobs))

    @classmethod
    def for_targets(cls, base: ResampleJob, weights: Mapping[str, str],
                    exclude: Mapping[str, str] | None = None) -> "ManyResampleJob":
        """The command line's jobs: ``base``'s settings for each target of
        ``weights`` (name -> weights file), named by it (``target``), with its
        output at ``base.output/<name>`` and its exclusions from ``exclude``
        (name -> file; default ``base.exclude``)."""
        exclude = dict(exclude or {})
        unknown = sorted(set(exclude) - set(weights))
        if unknown:
            raise ValueError(f"--exclude names {', '.join(unknown)}, not a target of --weights NAME=PATH")
        return cls(tuple(dataclasses.replace(base, weights=path, target=name, output=sio.join(base.output, name),
                                             exclude=exclude.get(name, base.exclude))
                         for name, path in weights.items()))

    @property
    def index(self) -> str:
        return self.jobs[0].index

    def fingerprint(self) -> dict[str, dict[str, Any]]:
        """Each target's fingerprint, by its output (each is reused or rebuilt on its own)."""
        return {job.output: job.fingerprint() for job in self.jobs}


@dataclass(frozen=True)
class TargetResult:
    """What :func:`run_many` did for one target: its job, and either its
    statistics (stats.json's content; ``"reused": True`` where its finished
    output was reused) or the one-line reason it failed."""

    job: ResampleJob
    stats: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reused(self) -> bool:
        return bool(self.stats and self.stats.get("reused"))


@dataclass
class _Target:
    """One target's state on the driver through the run."""

    pos: int
    job: ResampleJob
    weighting: Weighting
    inputs: dict[str, str]
    output: StageOutput
    work: str | None = None
    sets_key: dict[str, Any] = field(default_factory=dict)
    table: pa.Table | None = None
    counted: bool = True
    weighted: pa.Table | None = None
    records: int = 0
    positive: int = 0
    round: DrawRound | None = None
    expected: int = 0
    drawn: Drawn | None = None
    redrawn: int = 0
    drawing: Drawing | None = None
    recount: bool = False
    stats: dict[str, Any] | None = None
    error: str | None = None
    given: ResampleJob | None = None  # the job as given, before the weights filled in target and temperature

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What the output records: the job as given (as ``run`` records it)."""
        return (self.given or self.job).fingerprint(self.inputs)

    @property
    def selection(self) -> str:
        return sio.join(self.work, "selection")


@contextlib.contextmanager
def _failing(target: _Target) -> Iterator[None]:
    """Bad input found for ``target`` (``ValueError``, ``FileNotFoundError``) fails it alone."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        target.error = str(e)


def run_many(spark, jobs: "ManyResampleJob | Sequence[ResampleJob]") -> list[TargetResult]:
    """Run every job of ``jobs`` (a :class:`ManyResampleJob`, or its jobs:
    one per target, all over one ``index``, each with its own ``output``)
    with ``spark``, reading the index as one job does; return one
    :class:`TargetResult` per job, in order.

    A job whose output is finished from its fingerprint is reused (the skip
    line on stderr) and not drawn; a job whose input is bad fails alone.
    Raises ``ValueError`` where ``jobs`` is empty, names two indexes or one
    output twice; an error of the engine itself (not bad input) aborts
    every unfinished output and is raised."""
    draw_tasks = jobs.draw_tasks if isinstance(jobs, ManyResampleJob) else None
    jobs = list(jobs.jobs if isinstance(jobs, ManyResampleJob) else jobs)
    _check_jobs(jobs)
    t0 = time.time()
    try:
        require_finished_input(jobs[0].index, "--index")
        sio.require_readable(jobs[0].index, "--index")
        index_df = read_source_index(spark, jobs[0].index)
        listing = sio.listing_fingerprint(jobs[0].index)
    except (ValueError, FileNotFoundError) as e:
        return [TargetResult(job, error=str(e)) for job in jobs]
    results: list[TargetResult | None] = [None] * len(jobs)
    checked = []
    for pos, job in enumerate(jobs):  # every target's inputs checked before any output is touched
        prepared = _prepare(spark, pos, job, listing)
        if isinstance(prepared, TargetResult):
            results[pos] = prepared
        else:
            checked.append(prepared)
    with contextlib.ExitStack() as locks:
        targets = []
        for tg in checked:
            begun = _begin(tg, locks)
            if begun is not None:
                results[tg.pos] = begun
            else:
                targets.append(tg)
        try:
            with spark_progress(spark, STAGE):
                _build(spark, index_df, targets, t0, draw_tasks)
        finally:
            for tg in targets:
                if tg.work is not None:  # not committed: a failed target, or the engine failed
                    tg.output.abort(tg.work)
    for tg in targets:
        results[tg.pos] = _result(tg)
    return results


def _check_jobs(jobs: list[ResampleJob]) -> None:
    if not jobs:
        raise ValueError("run_many needs at least one job")
    indexes = sorted({job.index for job in jobs})
    if len(indexes) > 1:
        raise ValueError(f"the jobs of one run must share their index; got {', '.join(indexes)}")
    outputs = [StageOutput(job.output, STAGE).path for job in jobs]
    twice = sorted({o for o in outputs if outputs.count(o) > 1})
    if twice:
        raise ValueError(f"two targets would write {twice[0]}; give each target its own --output")


def _prepare(spark, pos: int, job: ResampleJob, listing: str) -> "_Target | TargetResult":
    """Check the target's own inputs and settings, as ``run`` does: the
    target, or a :class:`TargetResult` saying why it is refused."""
    try:
        require_reachable_outputs(spark, {"--output": job.output, "--label-sets": job.label_sets}, job.shared_output)
        for flag, path in (("--weights", job.weights), ("--labels", job.labels), ("--exclude", job.exclude)):
            if path:
                require_finished_input(path, flag)
        weighting = label_weights_for(job)
        given, job = job, weighting.resolve(job)
        job.config()  # checks the settings
        if job.exclude:
            excluded_keys(spark, job.exclude)
        if job.label_sets:
            LS.check_label_sets_path(job.label_sets)
        return _Target(pos, job, weighting, job.input_fingerprints(listing), StageOutput(job.output, STAGE),
                       given=given)
    except (ValueError, FileNotFoundError) as e:
        return TargetResult(job, error=str(e))


def _begin(tg: _Target, locks: contextlib.ExitStack) -> TargetResult | None:
    """Take the target's output (its lock held until ``locks`` close): a
    :class:`TargetResult` where it is reused (the skip line on stderr) or
    refused (made from another fingerprint, or busy), else ``None`` with its
    build begun."""
    try:
        locks.enter_context(tg.output.lock())
        if tg.output.check(tg.job.overwrite, tg.fingerprint):
            print(tg.output.skip_line(), file=sys.stderr)
            stats = json.loads(sio.read_bytes(sio.join(tg.job.output, "stats.json")))
            return TargetResult(tg.job, {**stats, "reused": True})
        tg.work = tg.output.begin(tg.fingerprint)
        return None
    except (ValueError, FileNotFoundError) as e:
        return TargetResult(tg.job, error=str(e))


def _result(tg: _Target) -> TargetResult:
    if tg.error is not None:
        return TargetResult(tg.job, error=tg.error)
    return TargetResult(tg.job, tg.stats)


def _build(spark, index_df, targets: list[_Target], t0: float, draw_tasks: int | None) -> None:
    """Count, plan, draw, check and report every target; commit each that
    succeeds (the others are aborted by the caller)."""
    if not targets:
        return
    stages = StageTimer()
    marked = marked_index(spark, index_df, {tg.pos: tg.job.exclude for tg in targets if tg.job.exclude})
    live, fresh = targets, False
    while live:
        _label_set_tables(spark, marked, live, fresh)
        stages.lap("label_sets")
        for tg in _ok(live):
            with _failing(tg):
                _weigh_and_plan(spark, tg)
        stages.lap("plan")
        _draw_all(spark, marked, [tg for tg in _ok(live) if tg.round is not None], stages, draw_tasks)
        live, fresh = [tg for tg in _ok(live) if tg.recount], True
        for tg in live:
            tg.recount, tg.round, tg.drawn, tg.drawing = False, None, None, None
    for tg in _ok(targets):
        with _failing(tg):
            checks.check_unique_keys(spark, tg.job, tg.selection)
    stages.lap("unique_keys")
    for tg in _ok(targets):
        with _failing(tg):
            _report(tg, stages.timings, t0)
            work, tg.work = tg.work, None  # a commit that fails keeps its build, as ``run``'s does
            tg.output.commit(work)


def _ok(targets: list[_Target]) -> list[_Target]:
    return [tg for tg in targets if tg.error is None]


def _label_set_tables(spark, marked, targets: list[_Target], fresh: bool) -> None:
    """Each target's label-set table: read from its ``--label-sets`` where
    that holds its table (not where ``fresh``: a stored table disagreed),
    else from one count shared by all the others (then stored there, once
    per file, as ``run`` stores it)."""
    need = []
    versions = None
    for tg in targets:
        tg.table = None
        if tg.job.label_sets:
            versions = versions or sio.listing_fingerprint(tg.job.index, versions=True)
            tg.sets_key = {"index": versions, "exclude": tg.inputs.get("exclude")}
            tg.table = None if fresh else LS.read_label_sets(tg.job.label_sets, tg.sets_key)
        tg.counted = tg.table is None
        if tg.counted:
            need.append(tg)
    if not need:
        return
    try:
        count, tables = LS.count_label_sets_excluding(marked)
    except (ValueError, FileNotFoundError) as e:  # bad input of the index itself: every target's
        for tg in need:
            tg.error = str(e)
        return
    written: set[str] = set()
    for tg in need:
        with _failing(tg):
            if count.shared_hashes:  # a key held twice, or a hash collision: check this target's records
                shared = LS.duplicate_key(read_index(spark, tg.job), count)
                if shared is not None:
                    raise checks.not_unique(spark, tg.job, shared)
            tg.table = tables.get(tg.pos, count.table) if tg.job.exclude else count.table
            if tg.job.label_sets and tg.job.label_sets not in written:
                LS.write_label_sets(tg.table, tg.job.label_sets, tg.sets_key)
                written.add(tg.job.label_sets)


def _weigh_and_plan(spark, tg: _Target) -> None:
    """Weigh the target's label sets, check them (a stored table found
    wanting is counted again, as ``run`` does) and plan its first round."""
    tg.weighted = weigh_label_sets(tg.table, tg.weighting.label_weights, tg.job.aggregate)
    try:
        tg.records, tg.positive = checks.check_label_sets(spark, tg.job, tg.weighted)
    except ValueError:
        if tg.counted:
            raise
        tg.recount = True
        return
    tg.round, tg.expected = first_round(spark, tg.job, tg.weighted, tg.selection)


def _draw_all(spark, marked, planned: list[_Target], stages: StageTimer, draw_tasks: int | None) -> None:
    """One drawing pass for every planned target (and one more for the
    classes whose bound fell short, where any did); then each target's
    totals checked (:func:`draw.settle`)."""
    if not planned:
        return
    by_pos = {tg.pos: tg for tg in planned}
    for tg in planned:
        sio.remove_tree(tg.selection)
    first = _pass(spark, marked, {tg.pos: tg.round for tg in planned}, by_pos, draw_tasks)
    stages.lap("draw")
    redo: dict[int, DrawRound] = {}
    for pos, drawn in first.items():
        tg = by_pos[pos]
        with _failing(tg):
            tg.drawn = _taken(spark, tg, drawn)
            short = short_classes(tg.round, tg.drawn)
            tg.redrawn = len(short)
            if short:
                redo[pos] = tg.round.redraw(np.array(short, np.int64))
    if redo:
        again = _pass(spark, marked, redo, by_pos, draw_tasks)
        for pos, drawn in again.items():
            with _failing(by_pos[pos]):
                by_pos[pos].drawn.add(_taken(spark, by_pos[pos], drawn))
        stages.lap("redraw")
    for tg in _ok(planned):
        with _failing(tg):
            tg.drawing = settle(tg.job, tg.round, tg.drawn, tg.weighted, tg.expected, tg.redrawn,
                                stored=not tg.counted)
            if tg.drawing is None:
                print(f"resample: the label-set table {tg.job.label_sets} does not match the records of "
                      f"{tg.job.index}; counting again", file=sys.stderr)
                tg.recount = True


def _pass(spark, marked, rounds: dict[int, DrawRound], by_pos: dict[int, _Target],
          draw_tasks: int | None) -> dict[int, Drawn | ValueError]:
    """One drawing pass over the index for ``rounds`` (target -> round)."""
    seeds = {pos: by_pos[pos].job.seed for pos in rounds}
    return commit_many(draw_many(spark, marked, rounds, seeds, draw_tasks).collect(), rounds)


def _taken(spark, tg: _Target, drawn: Drawn | ValueError) -> Drawn:
    """A target's tallies of a pass; its commit's error, or a key two of its
    records share (a drawing task's report), raised naming it."""
    if isinstance(drawn, ValueError):
        raise drawn
    if drawn.duplicates:
        raise checks.not_unique(spark, tg.job, drawn.duplicates[0])
    return drawn


def _report(tg: _Target, timings: dict[str, float], t0: float) -> None:
    """Write the target's statistics, label statistics and plot into its build."""
    outcome = report.Outcome(tg.weighted, tg.counted, tg.records, tg.positive, tg.drawing)
    stats, label_stats = report.statistics(tg.job, tg.weighting, outcome, tg.inputs)
    stats["seconds"] = round(time.time() - t0, 2)
    stats["timings"] = dict(timings)
    report.write_report(tg.work, stats, label_stats, tg.job.labels)
    tg.stats = stats
