"""The Spark plan, on the driver: the fetch pass, its checks, the write pass.

:func:`build_shards` is the whole build into a work directory: a spill
directory (``spill_policy``), the fetch pass (``fetch.py``'s tasks: one row
per task), the tallies and bad examples checked against the selection, the
writer plan (``placement.py``) and the write pass (``write.py``'s tasks: one
row per shard), then the manifest (``manifest.py``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import Manifest, SchemaError
from schemas import io as sio

from ..session import observed_metrics, set_confs
from .context import ShardContext
from .fetch import DUPLICATE, FETCHED_SCHEMA, IMAGE_BATCH_ROWS, FetchTask, fetch_partition, fetched_arrow_schema
from .manifest import write_manifest
from .placement import bucket_bits, bucket_writers, contiguous_groups, partition_keys, shards_per_writer
from .spill_policy import no_space_message, spill_directory
from .tallies import TASK_ROW, combine_in_spark, per_target, sums_on_driver
from .write import ROUTED_SCHEMA, TEMPORARY, WRITTEN_SCHEMA, RouteTask, WriteTask, route_partition, write_partition

__all__ = ["build_shards", "fetch_pass", "write_target", "fetch_tasks_of", "pass_confs", "PassPlan", "FetchFacts",
           "Fetched", "Tally", "Written", "spark_file_path", "FETCH_TASKS_PER_CORE",
           "WRITERS_PER_CORE", "BROADCAST_INDEX_ROWS", "BROADCAST_INDEX_FILES"]

#: Fetch tasks per core; each reads a contiguous range of the index's files.
FETCH_TASKS_PER_CORE = 2
#: Shard writers per core at least (fewer shards each, so a slow one delays the stage less).
WRITERS_PER_CORE = 2
#: An index of at most this many rows (and ``BROADCAST_INDEX_FILES`` files, whose footers say so) is
#: broadcast to the selection's copies (~300 bytes a row, through the driver to each executor): the join
#: then needs no shuffle of either side (measured 5% of a 707 MB job); a larger one is joined by a shuffle.
BROADCAST_INDEX_ROWS = 1 << 18
BROADCAST_INDEX_FILES = 256


@dataclass(frozen=True)
class PassPlan:
    """How one target's passes are cut: ``spill_dir`` (the fetch pass's
    spill), ``bits`` (bits of the placement hash that name a bucket),
    ``fetch_tasks``, ``target`` (its number in the fetch pass) and
    ``release`` (writers may release the spill's pages: a lone target)."""

    spill_dir: str
    bits: int
    fetch_tasks: int
    target: int = 0
    release: bool = True


@dataclass
class FetchFacts:
    """What the fetch pass found for one target (on the driver: per bucket, per bad example, per task)."""

    starts: np.ndarray  # each bucket's first position, then the total
    bad: list  # (key, reason, copies), by key
    reencoded: np.ndarray  # images, bytes before, after
    spilled: int  # image bytes in the spill (several targets: the bytes of this target's images)
    fetch_rss: list  # peak resident memory of each fetch task, bytes
    rows_paths: list  # each fetch task's rows file
    index_read: dict  # what the whole fetch pass read from the index: images, bytes


@dataclass
class Fetched:
    """The fetch pass over one or more targets: each target's
    :class:`PassPlan`, :class:`FetchFacts` and selection counts (``rows,
    copies, min_copies``)."""

    plans: list
    facts: list
    counts: list


@dataclass(frozen=True)
class Tally:
    """The selection's counts, checked against the fetch: ``unique``
    examples and ``requested`` copies selected, ``total`` copies written,
    ``bad`` examples dropped."""

    unique: int
    requested: int
    total: int
    bad: int


@dataclass
class Written:
    """The write pass: its ``WRITTEN_SCHEMA`` rows (an Arrow table, a row per
    shard and attempt), the writers and their span in positions."""

    rows: pa.Table
    writers: int
    per_writer: int


def spark_file_path(uri: str) -> str:
    """A path as ``inputFiles()`` gives it, written as ``_metadata.file_path``
    is (Hadoop's ``Path.toUri``: ``file:///x`` is ``file:/x``)."""
    scheme, sep, rest = uri.partition(":///")
    return f"{scheme}:/{rest}" if sep and "/" not in scheme else uri


def fetch_tasks_of(ctx: ShardContext) -> int:
    """Fetch tasks: ``--fetch-tasks`` or ``FETCH_TASKS_PER_CORE`` per core, at most one per index file."""
    return max(1, min(len(ctx.inputs.files),
                      ctx.job.fetch_tasks or FETCH_TASKS_PER_CORE * ctx.spark.sparkContext.defaultParallelism))


def pass_confs(spark, tasks: int):
    """Set the confs of the passes; returns the function that restores them.
    Arrow batches of images; the index is scanned for keys and labels only,
    so split it by count (one split per fetch task), not by file bytes that
    are mostly the images this scan skips."""
    return set_confs(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(IMAGE_BATCH_ROWS),
                             "spark.sql.files.maxPartitionBytes": str(1 << 50),
                             "spark.sql.files.minPartitionNum": str(tasks)})


def build_shards(ctx: ShardContext, work: str) -> Manifest:
    """Fetch, spill (where ``ctx.spill`` says) and write the shards and the
    manifest into ``work``; returns the manifest."""
    if ctx.spill.note:
        print(ctx.spill.note, file=sys.stderr)
    tasks = fetch_tasks_of(ctx)
    restore_confs = pass_confs(ctx.spark, tasks)
    try:
        with spill_directory(ctx.spill.location, ctx.job.spill_dir, work) as spill_dir:
            done = fetch_pass([ctx], spill_dir, tasks)
            plan, facts = done.plans[0], done.facts[0]
            tally, written = write_target(ctx, plan, facts, done.counts[0], work)
    finally:
        restore_confs()
    sio.remove_tree(sio.join(work, TEMPORARY))
    return write_manifest(ctx, work, plan, facts, tally, written)


def write_target(ctx: ShardContext, plan: PassPlan, facts: FetchFacts, counts, work: str) -> tuple[Tally, Written]:
    """One target after the fetch pass: its tallies and bad examples checked
    against its selection, its shards written into ``work``."""
    tally = _check_fetched(ctx, facts, counts)
    ctx.stages.lap("fetch")
    written = _write(ctx, plan, work, facts, tally.total)
    _refuse_errors(ctx, written.rows.column("error").to_pylist(), plan)
    ctx.stages.lap("write")
    return tally, written


def _refuse_errors(ctx: ShardContext, errors: list, plan: PassPlan) -> None:
    """Raise ``ValueError`` (one line, naming where) for the first error a
    task reported instead of failing: a full filesystem (``spill.no_space``)."""
    reported = [e for e in errors if e]
    if reported:
        in_spill = reported[0].startswith(plan.spill_dir.rstrip("/"))
        raise ValueError(no_space_message(reported[0], ctx.job, ctx.spill.location if in_spill else "output"))


def _copies(ctx: ShardContext, target: int, observed, measures):
    """A target's copy rows ``key, weight, copy, h, target`` (its selection observed)."""
    from pyspark.sql import functions as F

    asked = F.coalesce(F.col("copies"), F.lit(0))
    return (ctx.inputs.selection.observe(observed, *measures)
            .where(asked > 0)
            .select("key", "weight", F.explode(F.sequence(F.lit(0), F.col("copies") - 1)).alias("copy"))
            .withColumn("h", F.xxhash64(F.col("key"), F.col("copy"), F.lit(ctx.job.seed).cast("long")))
            .withColumn("target", F.lit(target).cast("int")))


def fetch_pass(ctxs: list, spill_dir: str, tasks: int) -> Fetched:
    """The fetch pass of one or more targets over the same index (``ctxs``,
    their inputs checked): each selected image read and spilled once,
    however many targets selected it; the tasks' tally rows summed
    (``tallies``); each target's facts and selection counts."""
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    first, spark = ctxs[0], ctxs[0].spark
    files = first.inputs.files
    # Each fetch task takes a contiguous range of about as many files as the
    # others (rows of a file the table misses, if any, are spread by hash).
    task_keys = np.asarray(partition_keys(tasks))[contiguous_groups(len(files), tasks)].tolist()
    # From Arrow: a local relation, which needs no Spark job (a list of rows would).
    task_of_file = spark.createDataFrame(pa.table({
        "file": pa.array([spark_file_path(f) for f in files], pa.string()),
        "task": pa.array(task_keys, pa.int32())}))
    asked = F.coalesce(F.col("copies"), F.lit(0))
    measures = [F.count(F.lit(1)).alias("rows"),
                F.sum(F.greatest(asked, F.lit(0)).cast("long")).alias("copies"), F.min(asked).alias("min_copies")]
    observed = [Observation(f"selection{t}") for t in range(len(ctxs))]
    copies = _copies(first, 0, observed[0], measures)
    for t, ctx in enumerate(ctxs[1:], 1):
        copies = copies.unionByName(_copies(ctx, t, observed[t], measures))
    bits = tuple(bucket_bits(c.inputs.selected.copies if c.inputs.selected is not None else 0,
                             c.job.samples_per_shard) for c in ctxs)
    job = first.job
    task = FetchTask(column=first.inputs.column, bits=bits, storage=sio.storage_config(), spill_dir=spill_dir,
                     spill_file_bytes=job.run_bytes, uri_prefixes=tuple(job.uri_prefixes), reencode=job.reencode,
                     decode=job.decode_check)
    small = first.inputs.index_rows is not None and first.inputs.index_rows <= BROADCAST_INDEX_ROWS
    located = first.inputs.located
    fetched = (copies.join(F.broadcast(located) if small else located, on="key", how="left")
               .join(F.broadcast(task_of_file), on="file", how="left")
               .repartition(tasks, F.coalesce(F.col("task"), F.hash("file")))
               .drop("task").sortWithinPartitions("file", "row", "key", "target", "copy")
               .mapInArrow(fetch_partition(task), FETCHED_SCHEMA))
    if not sums_on_driver(tasks, task.layout):  # tasks x buckets too many for the driver: sum in Spark
        fetched = combine_in_spark(fetched, fetched_arrow_schema(), FETCHED_SCHEMA)
    rows = fetched.toArrow()  # task rows, and a row per target and block of buckets
    is_task = pc.equal(rows.column("target"), TASK_ROW)
    task_rows = rows.filter(is_task)
    for ctx in ctxs:
        _refuse_errors(ctx, task_rows.column("error").to_pylist(), PassPlan(spill_dir, 0, tasks))
    per_bucket = per_target(task.layout, rows.filter(pc.invert(is_task)))
    plans = [PassPlan(spill_dir=spill_dir, bits=b, fetch_tasks=tasks, target=t, release=len(ctxs) == 1)
             for t, b in enumerate(bits)]
    facts = [_fetch_facts(task_rows, per_bucket[t], t, len(ctxs)) for t in range(len(ctxs))]
    counts = [observed_metrics(o) or c.inputs.selection.agg(*measures).first() for o, c in zip(observed, ctxs)]
    return Fetched(plans=plans, facts=facts, counts=counts)


def _fetch_facts(task_rows: pa.Table, per_bucket: np.ndarray, target: int, targets: int) -> FetchFacts:
    """One target's tallies per bucket, bad examples and the tasks' figures,
    from the fetch tasks' rows."""
    mine = pc.equal(pc.list_flatten(task_rows.column("bad_targets")), target).to_numpy(zero_copy_only=False)
    bad = sorted(zip(*(np.asarray(pc.list_flatten(task_rows.column(c)).to_pylist(), object)[mine].tolist()
                       for c in ("bad_keys", "bad_reasons", "bad_copies"))))
    reencoded = np.zeros(3, np.int64)
    for r in task_rows.column("reencoded").to_pylist():
        reencoded += np.asarray(r, np.int64).reshape(targets, 3)[target]
    if targets == 1:
        spilled = int(pc.sum(task_rows.column("task_spilled")).as_py() or 0)
    else:
        spilled = int(sum(r[target] for r in task_rows.column("target_bytes").to_pylist()))
    return FetchFacts(starts=np.concatenate([[0], np.cumsum(per_bucket)]).astype(np.int64), bad=bad,
                      reencoded=reencoded, spilled=spilled, fetch_rss=task_rows.column("task_rss").to_pylist(),
                      rows_paths=task_rows.column("rows_path").to_pylist(),
                      index_read={"images": int(pc.sum(task_rows.column("read_images")).as_py() or 0),
                                  "bytes": int(pc.sum(task_rows.column("read_bytes")).as_py() or 0)})


def _check_fetched(ctx: ShardContext, facts: FetchFacts, counts) -> Tally:
    """The selection's counts (``counts``: rows, copies, min_copies) checked
    against what the fetch kept and dropped: raises ``SchemaError`` for an
    empty selection, copies < 1, a key in two selection rows or two index
    rows; ``ValueError`` past ``--max-bad-fraction`` or with nothing usable."""
    job, selection_path = ctx.job, ctx.inputs.selection_path
    unique, requested = int(counts["rows"]), int(counts["copies"] or 0)
    if unique == 0:
        raise SchemaError("selection is empty", file=selection_path)
    if int(counts["min_copies"]) < 1:
        raise SchemaError(f"copies must be > 0 (found {int(counts['min_copies'])})", file=selection_path)
    duplicated = [key for key, reason, _ in facts.bad if reason == DUPLICATE]
    if duplicated:
        raise SchemaError(f"{len(duplicated)} keys appear in more than one row (first: "
                          f"{sorted(duplicated)[:3]})", file=selection_path)
    dropped = sum(int(c) for _, _, c in facts.bad)
    total = int(facts.starts[-1])
    if total + dropped > requested:  # a copy met two index rows
        dup = (ctx.inputs.located.join(ctx.inputs.selection.select("key"), on="key").groupBy("key").count()
               .where("count > 1").select("key").orderBy("key").first())
        raise SchemaError(f"key {dup['key'] if dup else '?'!r} appears more than once in the source index",
                          file=job.index)
    if total + dropped != requested:
        raise ValueError(f"internal error: the fetch kept {total} copies and dropped {dropped}, "
                         f"expected {requested}")
    n_bad = len(facts.bad)
    if n_bad / unique > job.max_bad_fraction:
        raise ValueError(f"{n_bad} of {unique} selected examples have a missing or unrecognisable "
                         f"image ({n_bad / unique:.3%} > --max-bad-fraction {job.max_bad_fraction:.3%}); "
                         f"first: {[k for k, _, _ in facts.bad[:3]]}")
    if total == 0:
        raise ValueError("no selected example has a usable image")
    return Tally(unique=unique, requested=requested, total=total, bad=n_bad)


def _write(ctx: ShardContext, plan: PassPlan, work: str, facts: FetchFacts, total: int) -> Written:
    """The writer pass: plan (whole shards per writer), send each writer the
    copy rows of its buckets (read from the fetch tasks' rows files), write."""
    job, sc = ctx.job, ctx.spark.sparkContext
    num_shards = math.ceil(total / job.samples_per_shard)
    sample_bytes = max(1.0, facts.spilled / total)
    per_writer = job.samples_per_shard * shards_per_writer(
        num_shards, sample_bytes, job.samples_per_shard, job.writer_bytes, WRITERS_PER_CORE * sc.defaultParallelism)
    writers = math.ceil(total / per_writer)
    first, last = bucket_writers(facts.starts, per_writer)
    route = RouteTask(bits=plan.bits, first=first, last=last, keys=np.asarray(partition_keys(writers), np.int64),
                      storage=sio.storage_config(), target=plan.target)
    # Release written images' spill pages where the spill is local and no
    # other attempt of a writer can still read it: local mode (a failed
    # attempt has stopped; on a cluster one on a lost executor may still run)
    # without speculative attempts; one target (several share the spill's images).
    release = (plan.release and sc.master.startswith("local") and sio.is_local(plan.spill_dir)
               and sc.getConf().get("spark.speculation", "false").lower() != "true")
    task = WriteTask(output=work, prefix=job.prefix, samples_per_shard=job.samples_per_shard, total=total,
                     per_writer=per_writer, starts=facts.starts, bits=plan.bits, storage=sio.storage_config(),
                     read_bytes=job.read_bytes, release=release)
    readers = max(1, min(len(facts.rows_paths), sc.defaultParallelism))
    paths = ctx.spark.createDataFrame(pa.table({"rows_path": pa.array(facts.rows_paths, pa.string())}))
    written = (paths.repartition(readers)
               .mapInArrow(route_partition(route), ROUTED_SCHEMA)
               .repartition(writers, "wkey").drop("wkey")
               .mapInArrow(write_partition(task), WRITTEN_SCHEMA))
    return Written(rows=written.toArrow(), writers=writers, per_writer=per_writer)

