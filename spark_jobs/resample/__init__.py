"""Resample the source index by importance weights (docs/design.md, "Sampling").

::

    python -m spark_jobs.resample --index PATH --weights weights.parquet \\
      --size 80M --matcher same|elastic [--draw multinomial|systematic] \\
      [--aggregate mean|max|sum] [--scheme adaptive|entire|subset|topk-uniform|reversed|balanced] \\
      [--labels vocab.parquet] [--subset-labels NAME,...] [--top-k K] \\
      [--exclude KEYS.parquet] [--label-sets PATH] [--seed 0] --output DIR [--master local[*]]

Writes ``DIR/selection/`` (Parquet: key, copies, weight), ``DIR/stats.json``,
``DIR/label_stats.parquet``, ``DIR/label_stats.png`` and, last, ``DIR/_SUCCESS``.

How it stays exact and deterministic (docs/design.md, "Exactness and
partition invariance"): records are grouped into classes, one per distinct
label list (``lsid = xxhash64(labels)``), so every record of a class has the
same fixed-point weight. One aggregation counts the records per class (and
one pass over the keys checks that each is held once); the driver computes the exact weights
and splits N across classes with Python integers
(``spark_jobs.sampling.make_class_plan``). Inside a class, records are
ranked by ``order = xxhash64(key, seed)`` (ties by key) and the copies go by
rank (``sampling.canonical_order``, ``sampling.assign_copies``). Only the
records whose order hash is under a per-class bound, about as many as the
class can select, leave their scan task: one shuffle of roughly N rows groups
them by class for the draw, whose tasks write the selection's Parquet files
themselves (under attempt-specific names; the driver keeps the files of the
successful attempts) and return only tallies. Nothing depends on Spark's
partitions, and task retries recompute the same classes from the same inputs.

The label-set table can be kept between runs (``--label-sets``): it depends
on the index alone, so every run over one index (targets, sizes, schemes)
can skip that full scan (``spark_jobs.label_sets``).

Many targets over one index, in one pass (docs/design.md, "Many
targets")::

    python -m spark_jobs.resample --index PATH --weights food101=W1.parquet \\
      --weights cars=W2.parquet [--exclude cars=KEYS.parquet] --size 80M ... --output DIR

writes each target's output at ``DIR/NAME``, the one a single-target run
with ``--target NAME --weights W --output DIR/NAME`` writes, file for file
(:class:`ManyResampleJob`, :mod:`.many`, :mod:`.many_draw`).

The modules, by responsibility: :mod:`.job` (the typed job, its input
checks and :func:`run` through the output protocol), :mod:`.weights` (label
and label-set weights for the scheme), :mod:`.draw` (the Spark plan and the
per-partition draw), :mod:`.checks` (bad input found while running, named by
file and key), :mod:`.report` (label distributions, total variation,
stats.json and the plot) and :mod:`.cli` (the command line).
"""

from __future__ import annotations

from ..label_sets import distinct_label_sets
from .cli import build_parser, job_from_args, jobs_from_args, main
from .draw import DrawRound, Drawing, Drawn, candidate_bounds, draw, keyed, write_drawn
from .job import DEFAULT_ROWS_PER_PARTITION, STAGE, ResampleJob, read_index, run
from .many import ManyResampleJob, TargetResult, run_many
from .report import LabelSets, label_distributions, plot_label_stats, total_variation
from .weights import Weighting, label_weights_for, weigh_label_sets

__all__ = ["ResampleJob", "STAGE", "DEFAULT_ROWS_PER_PARTITION", "run", "run_many", "ManyResampleJob",
           "TargetResult", "read_index", "main", "build_parser", "job_from_args", "jobs_from_args", "Weighting", "label_weights_for", "weigh_label_sets", "LabelSets",
           "distinct_label_sets", "keyed", "candidate_bounds", "DrawRound", "draw", "Drawn", "write_drawn",
           "Drawing", "label_distributions", "total_variation", "plot_label_stats"]
