"""The Spark side of the draw (thin: the arithmetic is :mod:`spark_jobs.sampling`'s).

The driver plans the classes' copies from the label-set table
(:func:`plan_and_draw`); one Spark pass (:func:`draw`) keys the index's
records, keeps each class's records under its candidate bound
(:func:`candidate_bounds`), groups whole classes into tasks and draws them:
each task orders its records (``sampling.canonical_order``), gives them
their copies (``sampling.assign_copies``), writes its selected rows as one
Parquet file and returns tally rows (:data:`DRAWN_SCHEMA`). The driver keeps
the files of the successful attempts (:func:`write_drawn`) and checks the
tallies against the plan. A task reports the problems it finds as rows too
(keys two records of one class share, classes whose records disagree with the
count); the driver turns them into errors naming file and key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SELECTION_SCHEMA
from schemas import io as sio

from .. import label_sets as LS
from .. import sampling as S
from ..session import StageTimer, inject_failure, task_attempt_id
from . import checks

if TYPE_CHECKING:
    from .job import ResampleJob

__all__ = ["keyed", "candidate_bounds", "DRAWN_SCHEMA", "ATTEMPTS_DIR", "DrawRound", "draw", "draw_classes",
           "Drawn", "write_drawn", "commit_drawn", "Drawing", "first_round", "unmet", "short_classes", "settle",
           "plan_and_draw"]

#: What a drawing task returns (it writes its selected rows itself), one row
#: per fact, by ``kind``: ``file`` (``name``: the temporary path of the file it
#: wrote, ``tally``: its rows); ``class`` (``lsid``, ``tally``: copies drawn);
#: ``copies`` (``copies``, ``tally``: examples with that many); ``disagree``
#: (a class whose records disagree with the count: ``lsid``, ``tally``: the
#: records seen; it drew nothing); ``duplicate`` (``name``: a key that two
#: records of one class share, ``lsid``: that class; the task drew nothing).
DRAWN_SCHEMA = "kind string, name string, lsid long, copies int, tally long"
_DRAWN_ARROW = pa.schema([("kind", pa.string()), ("name", pa.string()), ("lsid", pa.int64()),
                          ("copies", pa.int32()), ("tally", pa.int64())])
#: Where drawing tasks write, under the selection, before the driver commits.
ATTEMPTS_DIR = "_attempts"


def keyed(index_df, seed: int):
    """index (key, labels, ...) -> key, labels, order, lsid.

    Native expressions, pure functions of the row: ``order = xxhash64(key,
    seed)`` ranks records inside their class; ``lsid = xxhash64(labels)`` is
    the class (the label-set id: an example's weight depends only on its
    label list).
    """
    from pyspark.sql import functions as F

    labels = LS.labels_column()
    return index_df.select(
        F.col("key").cast("string").alias("key"),
        labels.alias("labels"),
        F.xxhash64(F.col("key"), F.lit(seed).cast("long")).alias("order"),
        F.xxhash64(labels).alias("lsid"),
    )


def candidate_bounds(plan: S.ClassPlan, sigmas: float = S.CANDIDATE_SIGMAS) -> tuple[np.ndarray, int]:
    """Per plan class: the inclusive bound on ``order`` under which its records
    are drawn from (``sampling.candidate_bound``), and the expected number of
    such records in all."""
    needed = S.ranks_needed(plan.draw, plan.counts, plan.records, sigmas)
    bounds = np.array([S.candidate_bound(k, m, sigmas) for k, m in zip(needed.tolist(), plan.records.tolist())],
                      dtype=np.int64)
    share = (bounds.astype(np.float64) + 2.0 ** 63 + 1) / 2.0 ** 64
    expected = int(np.minimum(plan.records, np.ceil(plan.records * share)).sum())
    return bounds, expected


@dataclass(frozen=True)
class DrawRound:
    """One drawing pass: the plan, each plan class's candidate ``bounds`` on
    ``order`` (``S.ORDER_MAX``: every record) and selection weight
    ``class_w``, the number of drawing tasks, where they write (the selection
    directory; files ``part-<name>-*``) and ``only``, a mask of the plan
    classes to draw (``None``: all that draw copies)."""

    plan: S.ClassPlan
    bounds: np.ndarray
    class_w: np.ndarray
    partitions: int
    selection: str
    name: str = "draw"
    only: np.ndarray | None = None

    def active(self) -> np.ndarray:
        """Mask of the plan classes this round draws."""
        drawing = self.plan.counts > 0
        return drawing if self.only is None else self.only & drawing

    def whole(self) -> np.ndarray:
        """Mask of the plan classes that send every record."""
        return self.bounds == S.ORDER_MAX

    def redraw(self, classes: np.ndarray) -> "DrawRound":
        """The round that draws ``classes`` (plan class ids) again from all their records."""
        redo = np.isin(self.plan.class_ids, classes)
        return dataclasses.replace(self, bounds=np.where(redo, S.ORDER_MAX, self.bounds), name="redraw",
                                   partitions=max(1, min(self.partitions, int(np.asarray(classes).size))),
                                   only=redo)


def draw(spark, keyed_df, r: DrawRound):
    """Keep each class's records under its bound, group whole classes into
    ``r.partitions`` tasks and draw them; the tasks write ``part-<name>-*``
    files for ``r.selection`` (see :func:`write_drawn`) and return tally rows
    (:data:`DRAWN_SCHEMA`)."""
    from pyspark.sql import functions as F

    active = r.active()
    small = spark.createDataFrame(pa.table({"lsid": pa.array(r.plan.class_ids[active], pa.int64()),
                                            "bound": pa.array(r.bounds[active], pa.int64())}))
    return (keyed_df.select("key", "order", "lsid")
            .join(F.broadcast(small), on="lsid", how="inner")
            .where(F.col("order") <= F.col("bound"))
            .select("key", "order", "lsid")
            .repartition(r.partitions, "lsid")
            .mapInArrow(_draw_partition(r, sio.storage_config()), DRAWN_SCHEMA))


class _Keys:
    """An Arrow string column as a sequence of ``str``, read one at a time
    (``sampling.canonical_order`` reads keys only at ties)."""

    def __init__(self, column) -> None:
        self.column = column

    def __getitem__(self, i: int) -> str:
        return self.column[int(i)].as_py()

    def __len__(self) -> int:
        return len(self.column)


def _draw_partition(r: DrawRound, storage: dict):
    """mapInArrow over whole classes: candidate (key, order, lsid) -> the
    selected (key, copies, weight), written as one Parquet file under
    ``selection/_attempts`` (:func:`_write_part`), and tally rows
    (:func:`draw_classes`)."""

    def draw_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        collected = list(batches)
        if not collected:
            return
        tallies = draw_classes(pa.Table.from_batches(collected), r, storage)
        if tallies is not None:
            yield from tallies.to_batches()
    return draw_partition


def draw_classes(table: pa.Table, r: DrawRound, storage: dict, part: int | None = None) -> pa.Table | None:
    """Draw a task's whole classes of one round: candidate rows (key, order,
    lsid) -> the selected (key, copies, weight), written as one Parquet file
    under ``selection/_attempts`` (:func:`_write_part`; ``part``: the number
    in its name, default the task's partition), and the tally rows
    (:data:`DRAWN_SCHEMA`; ``None``: no candidates). A class with fewer
    candidates than it selects (its bound fell short: below 1e-11 rare)
    draws nothing; the driver sees its total missing and draws it again from
    all its records. Keys that two records of one class share are reported,
    and nothing is drawn."""
    lsid = table.column("lsid").to_numpy()
    perm, duplicates = S.canonical_order(lsid, table.column("order").to_numpy(), _Keys(table.column("key")))
    if duplicates:
        return _tally_table(("duplicate", {"name": duplicates}))
    if perm.size == 0:
        return None
    a = S.assign_copies(r.plan, lsid[perm], r.whole())
    picked = a.copies > 0
    selected = pa.Table.from_arrays(
        [table.column("key").take(pa.array(perm[picked])).combine_chunks(),
         pa.array(a.copies[picked].astype(np.int32), pa.int32()),
         pa.array(r.class_w[a.record_plan_index()[picked]], pa.float64())], schema=SELECTION_SCHEMA)
    path = _write_part(selected, r, storage, part) if selected.num_rows else ""
    inject_failure("draw")
    return _tallies(r.plan, a, path, selected.num_rows)


def _write_part(selected: pa.Table, r: DrawRound, storage: dict, part: int | None = None) -> str:
    """Write a task's selected rows to ``selection/_attempts/part-<name>-<part>.parquet.<attempt>``
    (``part``: default the task's partition)."""
    from pyspark import TaskContext

    if part is None:
        ctx = TaskContext.get()
        part = ctx.partitionId() if ctx else 0
    name = f"part-{r.name}-{part:05d}.parquet"
    path = sio.join(r.selection, ATTEMPTS_DIR, f"{name}.{task_attempt_id()}")
    sio.apply_storage_config(storage)
    fs, p = sio.filesystem(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(p, "wb") as fh:
        pq.write_table(selected, fh)
    return path


def _tallies(plan: S.ClassPlan, a: S.Allotment, path: str, rows: int) -> pa.Table:
    """A drawing task's tally rows (:data:`DRAWN_SCHEMA`)."""
    class_ids = plan.class_ids[a.plan_index]
    drew = ~a.short
    values, counts = np.unique(a.copies[a.copies > 0], return_counts=True)
    return _tally_table(("file", {"name": [path] if path else [], "tally": [rows] if path else []}),
                        ("class", {"lsid": class_ids[drew], "tally": a.class_copies()[drew]}),
                        ("copies", {"copies": values, "tally": counts}),
                        ("disagree", {"lsid": class_ids[a.disagree], "tally": a.have[a.disagree]}))


def _tally_table(*parts: tuple[str, dict]) -> pa.Table:
    """Rows of :data:`DRAWN_SCHEMA` from ``(kind, {column: values})`` parts
    (the columns a kind does not name are null)."""
    tables = []
    for kind, columns in parts:
        n = len(next(iter(columns.values())))
        arrays = [pa.array([kind] * n, pa.string())]
        arrays += [pa.array(np.asarray(columns[f.name]).tolist() if f.name in columns else [None] * n, f.type)
                   for f in _DRAWN_ARROW][1:]
        tables.append(pa.Table.from_arrays(arrays, schema=_DRAWN_ARROW))
    return pa.concat_tables(tables).combine_chunks()


@dataclass
class Drawn:
    """What one draw wrote: copies per label set, the histogram of copies per
    example, total copies, unique examples, the classes whose records
    disagreed with the count (lsid -> records seen; they drew nothing) and
    the keys that two records of one class share (sorted; nothing was drawn
    where they were)."""

    per_set: dict[int, int]
    histogram: dict[int, int]
    total: int
    unique: int
    disagree: dict[int, int]
    duplicates: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: "Drawn") -> None:
        self.per_set.update(other.per_set)
        for k, v in other.histogram.items():
            self.histogram[k] = self.histogram.get(k, 0) + v
        self.histogram = dict(sorted(self.histogram.items()))
        self.total += other.total
        self.unique += other.unique
        self.disagree.update(other.disagree)
        self.duplicates = sorted(set(self.duplicates) | set(other.duplicates))


def write_drawn(drawn, selection: str, fresh: bool = True) -> Drawn:
    """Run the draw: its tasks write the selected rows (key, copies, weight)
    under ``selection/_attempts``; the driver renames the files of the
    successful attempts (the ones ``collect`` returns) into ``selection``,
    checks their rows, and returns the tallies. ``fresh``: clear
    ``selection`` first (else add to it: the redraw of short classes)."""
    if fresh:
        sio.remove_tree(selection)
    return commit_drawn(drawn.collect(), selection)


def commit_drawn(rows, selection: str) -> Drawn:
    """The driver's side of a draw into ``selection``, from the tally rows
    of its successful task attempts (:data:`DRAWN_SCHEMA`): rename the files
    they wrote into ``selection``, remove what failed attempts left, check
    the rows written against the tallies; return the tallies."""
    tallies, files = _read_tallies(rows)
    written = 0
    for temp in sorted(files):
        final = sio.join(selection, temp.rsplit("/", 1)[-1].rsplit(".", 1)[0])
        sio.move(temp, final)
        fs, p = sio.filesystem(final)
        with fs.open(p, "rb") as fh:
            written += pq.ParquetFile(fh).metadata.num_rows
    sio.remove_tree(sio.join(selection, ATTEMPTS_DIR))  # what failed attempts left
    if written != tallies.unique or sum(files.values()) != tallies.unique \
            or sum(tallies.per_set.values()) != tallies.total:
        raise ValueError(f"internal error: wrote {written} rows to {selection}, the draw tallied "
                         f"{tallies.unique} examples with {tallies.total} copies")
    return tallies


def _read_tallies(rows) -> tuple[Drawn, dict[str, int]]:
    """The drawing tasks' tally rows, summed: the draw's tallies, and the
    files written (temporary path -> rows)."""
    per_set: dict[int, int] = {}
    histogram: dict[int, int] = {}
    disagree: dict[int, int] = {}
    duplicates: set[str] = set()
    files: dict[str, int] = {}
    for t in rows:
        kind = t["kind"]
        if kind == "file":
            files[t["name"]] = int(t["tally"])
        elif kind == "copies":
            histogram[int(t["copies"])] = histogram.get(int(t["copies"]), 0) + int(t["tally"])
        elif kind == "class":
            per_set[int(t["lsid"])] = per_set.get(int(t["lsid"]), 0) + int(t["tally"])
        elif kind == "disagree":
            disagree[int(t["lsid"])] = int(t["tally"])
        elif kind == "duplicate":
            duplicates.add(t["name"])
        else:
            raise ValueError(f"internal error: a drawing task returned a tally of kind {kind!r}")
    total = sum(k * n for k, n in histogram.items())
    return Drawn(per_set, dict(sorted(histogram.items())), total, sum(histogram.values()), disagree,
                 sorted(duplicates)), files


@dataclass
class Drawing:
    """What the draws wrote to the selection, and how they were planned."""

    plan: S.ClassPlan
    drawn: Drawn
    partitions: int
    expected_candidates: int
    redrawn: int


def first_round(spark, job: "ResampleJob", weighted_sets: pa.Table, selection: str) -> tuple[DrawRound, int]:
    """The plan of the classes' copies from the label-set table, as the first
    drawing round, and the number of candidates it expects."""
    plan = S.make_class_plan(job.matcher, job.draw, job.size, job.seed, weighted_sets.column("lsid").to_numpy(),
                             weighted_sets.column("n").to_numpy(), weighted_sets.column("q").to_numpy())
    # The label-set table is sorted by lsid (label_sets.count_label_sets), as are the plan's classes.
    class_w = weighted_sets.column("w").to_numpy()[
        np.searchsorted(weighted_sets.column("lsid").to_numpy(), plan.class_ids)]
    bounds, expected = candidate_bounds(plan, job.candidate_sigmas)
    # Whole waves of tasks: a last wave of one task on an idle cluster costs as much as a full one.
    cores = max(1, spark.sparkContext.defaultParallelism)
    partitions = cores * math.ceil(max(1, math.ceil(expected / job.rows_per_partition)) / cores)
    return DrawRound(plan, bounds, class_w, partitions, selection), expected


def _draw_round(spark, job: "ResampleJob", keyed_df, r: DrawRound, fresh: bool) -> Drawn:
    """Draw one round into the selection; refuse a key two records of one
    class share (a drawing task's report), naming it and its files."""
    drawn = write_drawn(draw(spark, keyed_df, r), r.selection, fresh)
    if drawn.duplicates:
        raise checks.not_unique(spark, job, drawn.duplicates[0])
    return drawn


def unmet(plan: S.ClassPlan, drawn: Drawn) -> list[int]:
    """Classes whose drawn copies are not what the plan gave them."""
    return sorted(c for c, k in zip(plan.class_ids.tolist(), plan.counts.tolist())
                  if k and drawn.per_set.get(c, 0) != k)


def short_classes(r: DrawRound, drawn: Drawn) -> list[int]:
    """The classes of round ``r`` to draw again from all their records:
    those whose candidate bound fell short (none where a class's records
    disagreed with the count: the table is wrong, not the bound)."""
    short = unmet(r.plan, drawn)
    if not short or drawn.disagree:
        return []
    if any(drawn.per_set.get(c, 0) for c in short):
        raise ValueError("internal error: a class that fell short drew copies")
    return short


def settle(job: "ResampleJob", r: DrawRound, drawn: Drawn, weighted_sets: pa.Table, expected: int,
           redrawn: int, stored: bool) -> Drawing | None:
    """Check the totals of the draws of ``r`` (and its redraw of
    ``redrawn`` classes). Where a class's records disagree with the table:
    ``None`` if the table was ``stored`` (read from ``--label-sets``: count
    again), else an error (the index changed)."""
    missing = unmet(r.plan, drawn)
    if drawn.disagree or missing:
        # Classes with more records than counted, or none where the count says some: other data.
        if stored:
            return None
        sets_n = dict(zip(weighted_sets.column("lsid").to_pylist(), weighted_sets.column("n").to_pylist()))
        lsid, seen = (next(iter(sorted(drawn.disagree.items()))) if drawn.disagree
                      else (missing[0], "too few"))
        raise ValueError(f"label set {lsid} has {seen} records in a drawing task but {sets_n.get(lsid)} when "
                         f"counted: did {job.index} change during the job?")
    if drawn.total != job.size:
        raise ValueError(f"internal error: drew {drawn.total} copies, expected {job.size} split as planned")
    return Drawing(r.plan, drawn, r.partitions, expected, redrawn)


def plan_and_draw(spark, job: "ResampleJob", keyed_df, weighted_sets: pa.Table, selection: str,
                  stages: StageTimer, stored: bool) -> Drawing | None:
    """Plan the classes' copies from the label-set table, draw them into
    ``selection`` and check the totals (:func:`settle`: ``None`` where a
    ``stored`` table disagrees with the records)."""
    r, expected = first_round(spark, job, weighted_sets, selection)
    stages.lap("plan")
    drawn = _draw_round(spark, job, keyed_df, r, fresh=True)
    stages.lap("draw")
    short = short_classes(r, drawn)
    if short:  # a class's bound fell short: draw it again from all its records
        drawn.add(_draw_round(spark, job, keyed_df, r.redraw(np.array(short, np.int64)), fresh=False))
        stages.lap("redraw")
    return settle(job, r, drawn, weighted_sets, expected, len(short), stored)
