"""The Spark side of drawing many targets' selections in one pass over the
index (docs/design.md, "Many targets").

:func:`marked_index` is the index (key, labels) with, per record, the
targets whose ``--exclude`` holds its key (one join with the small
exclusion files, whatever the number of targets). :func:`draw_many` keys
every record once: its class (``lsid``), and one order hash per distinct
seed of the targets drawn. One broadcast join gives each record's class
its candidate bounds, one per target (a list of K longs, null where the
target draws nothing from the class); a record leaves its scan task once
per target whose bound it is under and that does not exclude it, as the
row (key, lsid, target, part, order), ``part`` being the drawing task the
single-target job gives the class. One shuffle by (target, part) puts each
such group whole in one task, which draws it exactly as the single-target
job's task ``part`` does (:func:`draw.draw_classes`, with that target's
round: its plan, seed and selection directory), into the same file, and
returns tally rows tagged with the target: each target's selection is the
single-target job's file for file, whatever task drew each group. :func:`commit_many` splits the tallies by target
and commits each target's files as the single-target job does.

Costs for K targets: one read of the index's key and label columns per
pass; per record, one hash per distinct seed and K comparisons; rows
shuffled: the targets' candidates (about the sum of their sizes); a
drawing task holds its groups' candidates (about ``rows_per_partition``
each; a task may hold a few groups where the hash puts them together); the
driver ships K candidate-bound vectors (one long per target and drawn
class) and collects tally rows per target and drawn class.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Iterator, Mapping

import numpy as np
import pyarrow as pa

from schemas import io as sio

from .. import label_sets as LS
from .draw import DRAWN_SCHEMA, DrawRound, Drawn, commit_drawn, draw_classes

__all__ = ["MANY_DRAWN_SCHEMA", "marked_index", "bounds_table", "draw_many", "commit_many", "shared_partitions"]

#: What a drawing task of many targets returns: :data:`draw.DRAWN_SCHEMA`'s
#: rows, each with the target (its number in the run) it is about.
MANY_DRAWN_SCHEMA = "target int, " + DRAWN_SCHEMA


def marked_index(spark, index_df, excludes: Mapping[int, str]):
    """index (key, labels, ...) -> key, labels, excluded: the targets (ints,
    sorted) whose exclusion file (``excludes``: target -> Parquet with a
    ``key`` column, already checked) holds the record's key; null where none
    does. The exclusion files are read together (one small table, one row
    per excluded key) and joined to the index once."""
    from pyspark.sql import functions as F

    records = index_df.select("key", "labels")
    if not excludes:
        return records.withColumn("excluded", F.lit(None).cast("array<int>"))
    key_type = index_df.schema["key"].dataType
    parts = [spark.read.parquet(path).select(F.col("key").cast(key_type).alias("key"),
                                             F.lit(int(t)).cast("int").alias("target"))
             for t, path in sorted(excludes.items())]
    excluded = (functools.reduce(lambda a, b: a.unionByName(b), parts)
                .groupBy("key").agg(F.array_sort(F.collect_set("target")).alias("excluded")))
    return records.join(excluded, on="key", how="left")


def bounds_table(rounds: Mapping[int, DrawRound]) -> tuple[pa.Table, list[int]]:
    """The broadcast side of the candidate test: one row per class that any
    of ``rounds`` (target -> round) draws, ``lsid`` and ``bounds`` (one
    inclusive bound on ``order`` per target, in the order of the returned
    target list; null where that target does not draw the class)."""
    targets = sorted(rounds)
    if not targets:
        raise ValueError("internal error: a draw of no target")
    active = [rounds[t].active() for t in targets]
    ids = np.unique(np.concatenate([rounds[t].plan.class_ids[a] for t, a in zip(targets, active)])).astype(np.int64)
    values = np.zeros((ids.size, len(targets)), np.int64)
    present = np.zeros((ids.size, len(targets)), bool)
    for j, (t, a) in enumerate(zip(targets, active)):
        r = rounds[t]
        rows = np.searchsorted(ids, r.plan.class_ids[a])
        values[rows, j] = r.bounds[a]
        present[rows, j] = True
    flat = pa.array(values.reshape(-1), pa.int64(), mask=~present.reshape(-1))
    offsets = pa.array(np.arange(ids.size + 1, dtype=np.int64) * len(targets), pa.int32())
    bounds = pa.ListArray.from_arrays(offsets, flat)
    return pa.table({"lsid": pa.array(ids, pa.int64()), "bounds": bounds}), targets


def _candidates(marked_df, rounds: Mapping[int, DrawRound], seeds: Mapping[int, int], bounds_df, targets):
    """marked index -> (key, lsid, target, part, order): one row per record
    and target whose candidate bound it is under and that keeps it; ``part``
    is the drawing task the single-target job gives the record's class
    (Spark's hash partitioning of ``lsid`` into the target's round's
    ``partitions``: ``pmod(murmur3(lsid), partitions)``)."""
    from pyspark.sql import functions as F

    distinct = sorted(set(seeds[t] for t in targets))
    order_of = {s: f"_order{i}" for i, s in enumerate(distinct)}
    keyed = marked_df.select(
        F.col("key").cast("string").alias("key"),
        F.xxhash64(LS.labels_column()).alias("lsid"),
        "excluded",
        *[F.xxhash64(F.col("key"), F.lit(s).cast("long")).alias(name) for s, name in order_of.items()])
    joined = keyed.join(F.broadcast(bounds_df), on="lsid", how="inner")

    def kept(j: int, t: int):
        under = F.col(order_of[seeds[t]]) <= F.col("bounds")[j]
        return under & (F.col("excluded").isNull() | ~F.array_contains("excluded", F.lit(t)))

    tests = [kept(j, t) for j, t in enumerate(targets)]
    picked = F.array(*[F.when(test, F.struct(F.lit(t).cast("int").alias("target"),
                                             F.pmod(F.hash("lsid"), F.lit(rounds[t].partitions)).alias("part"),
                                             F.col(order_of[seeds[t]]).alias("order")))
                       for test, t in zip(tests, targets)])
    return (joined.where(functools.reduce(operator.or_, tests))
            .select("key", "lsid", F.explode(F.filter(picked, lambda c: c.isNotNull())).alias("c"))
            .select("key", "lsid", "c.target", "c.part", "c.order"))


def shared_partitions(spark, rounds: Mapping[int, DrawRound]) -> int:
    """Drawing tasks of one pass: at least one per (target, part) group
    (each target's round's ``partitions``, as its single-target job runs it),
    in whole waves of the cluster's cores. A performance knob only: each
    group is drawn alone whatever task holds it."""
    cores = max(1, spark.sparkContext.defaultParallelism)
    groups = sum(r.partitions for r in rounds.values())
    return cores * math.ceil(max(1, groups) / cores)


def draw_many(spark, marked_df, rounds: Mapping[int, DrawRound], seeds: Mapping[int, int],
              partitions: int | None = None):
    """One pass over the index drawing every round of ``rounds`` (target ->
    its round; ``seeds``: target -> seed of its order hash) in
    ``partitions`` tasks (default :func:`shared_partitions`): each (target,
    part) group of candidates is drawn as the single-target job's task
    ``part`` draws it, into the same ``part-<name>-<part>`` file under the
    target's selection; the tasks return tally rows
    (:data:`MANY_DRAWN_SCHEMA`); see :func:`commit_many`."""
    table, targets = bounds_table(rounds)
    bounds_df = spark.createDataFrame(table)
    partitions = partitions or shared_partitions(spark, rounds)
    return (_candidates(marked_df, rounds, seeds, bounds_df, targets)
            .repartition(partitions, "target", "part")
            .mapInArrow(_draw_many_partition(dict(rounds), sio.storage_config()), MANY_DRAWN_SCHEMA))


def _draw_many_partition(rounds: dict[int, DrawRound], storage: dict):
    """mapInArrow over whole (target, part) groups: each drawn alone with its
    target's round (:func:`draw.draw_classes`, named by its part), the
    tallies tagged with the target."""

    def draw_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        collected = list(batches)
        if not collected:
            return
        table = pa.Table.from_batches(collected)
        group = np.stack([table.column("target").to_numpy().astype(np.int64),
                          table.column("part").to_numpy().astype(np.int64)], axis=1)
        out = []
        for t, part in np.unique(group, axis=0).tolist():
            rows = table.filter(pa.array((group[:, 0] == t) & (group[:, 1] == part)))
            tallies = draw_classes(rows.select(["key", "order", "lsid"]), rounds[t], storage, part=part)
            if tallies is not None:
                out.append(tallies.add_column(0, "target", pa.array(np.full(tallies.num_rows, t, np.int32))))
        for tallies in out:
            yield from tallies.to_batches()
    return draw_partition


def commit_many(rows, rounds: Mapping[int, DrawRound]) -> dict[int, Drawn | ValueError]:
    """The driver's side of :func:`draw_many`: the tally rows split by
    target, each target's files committed into its selection
    (:func:`draw.commit_drawn`). Returns target -> its tallies, or the
    error that stopped its commit (the other targets' are unaffected)."""
    by_target: dict[int, list] = {t: [] for t in rounds}
    for row in rows:
        by_target[int(row["target"])].append(row)
    out: dict[int, Drawn | ValueError] = {}
    for t, r in rounds.items():
        try:
            out[t] = commit_drawn(by_target[t], r.selection)
        except (ValueError, OSError) as e:
            out[t] = e if isinstance(e, ValueError) else ValueError(f"{r.selection}: {e}")
    return out
