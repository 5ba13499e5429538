"""The job: command line, plan, the two Spark passes, commit.

plan (inputs checked, buckets) -> fetch tasks (``fetch.py``) -> tallies and
bad examples -> writer plan (``placement.py``) -> writer tasks
(``write.py``) -> manifest, ``_SUCCESS`` (``schemas.stage_output``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import Manifest, ResampleConfig, SchemaError, ShardInfo, check_index_schema, parse_size
from schemas import io as sio
from schemas.stage_output import StageOutput, require_complete, require_finished_input

from ..session import (StageTimer, add_spark_arguments, observed_metrics, read_parquet_columns,
                       read_parquet_through_fsspec, require_reachable_outputs, run_cli, set_confs)
from schemas.shard_format import shard_name
from ..reencode import REENCODE_QUALITY, encoder_version
from .fetch import DUPLICATE, FETCHED_SCHEMA, IMAGE_BATCH_ROWS, FetchTask, fetch_partition
from .spill import PAGE
from .placement import bucket_bits, bucket_starts, bucket_writers, contiguous_groups, partition_keys, shards_per_writer
from .write import (READ_BYTES, ROUTED_SCHEMA, TEMPORARY, WRITTEN_SCHEMA, RouteTask, WriteTask, route_partition,
                    write_partition)

__all__ = ["ShardJob", "run", "main", "build_parser", "resolve_selection"]

#: A fetch task starts a new spill file past this many image bytes.
SPILL_FILE_BYTES = 1 << 30
#: Fetch tasks per core; each reads a contiguous range of the index's files.
FETCH_TASKS_PER_CORE = 2
#: Shard writers per core at least (fewer shards each, so a slow one delays the stage less).
WRITERS_PER_CORE = 2
#: Bytes of images one shard-writing task writes (it takes whole shards).
WRITER_BYTES = 1 << 30
#: Local mode without --spill-dir: the spill goes to memory (``MEMORY_SPILL_DIR``, a tmpfs)
#: when the index's files fit in this share of both the memory available and the tmpfs's free space.
MEMORY_SPILL_SHARE = 0.25
MEMORY_SPILL_DIR = "/dev/shm"
#: On a cluster, a spill estimated above this (bytes) under an object-store --output is refused
#: unless --spill-dir says where it goes (the spill is written once and read once: as many bytes as the shards).
OBJECT_STORE_SPILL_LIMIT = 256 << 30
#: Bytes per image assumed for a ``uri`` index (its images' sizes are not known before they are read).
URI_IMAGE_BYTES = 128 << 10
#: An index of at most this many rows (and ``BROADCAST_INDEX_FILES`` files, whose footers say so) is
#: broadcast to the selection's copies (~300 bytes a row, through the driver to each executor): the join
#: then needs no shuffle of either side (measured 5% of a 707 MB job); a larger one is joined by a shuffle.
BROADCAST_INDEX_ROWS = 1 << 18
BROADCAST_INDEX_FILES = 256


@dataclass
class ShardJob:
    """One shard-writing run (the command line, typed).

    ``allow_uri_prefixes``: where a ``uri`` index's images may be read from
    (``--allow-uri-prefix``, schemas.uri_policy); None: the index's own storage.
    ``uri_prefixes`` (set here, not an argument) is the effective list, in
    normal form: what the fetch enforces and the manifest records.
    ``max_side``: re-encode the images whose longer side exceeds it
    (``--max-side``; None: every image as the index holds it) as JPEGs of
    ``quality`` (``--quality``, default 90). ``shared_output``: a local
    ``output``/``spill_dir`` is mounted by every executor (``--shared-output``;
    ``session.require_reachable_outputs``). ``run_bytes``: a fetch task starts
    a new spill file past this many image bytes (``--run-bytes``);
    ``writer_bytes``: image bytes of the shards one writer task writes;
    ``fetch_tasks``: fetch tasks (``--fetch-tasks``; default
    ``FETCH_TASKS_PER_CORE`` per core, at most one per index file);
    ``decode_check``: decode every image whole (``--decode-check``), not only
    check its structure; ``read_bytes``: image bytes a writer holds at a time.
    """

    selection: str
    index: str
    output: str
    samples_per_shard: int = 10000
    prefix: str = "shard"
    seed: int = 0
    overwrite: bool = False
    max_bad_fraction: float = 0.001
    spill_dir: str | None = None
    run_bytes: int = SPILL_FILE_BYTES
    writer_bytes: int = WRITER_BYTES
    fetch_tasks: int | None = None
    decode_check: bool = False
    read_bytes: int = READ_BYTES
    allow_uri_prefixes: Sequence[str] | None = None
    max_side: int | None = None
    quality: int | None = None
    shared_output: bool = False

    def __post_init__(self) -> None:
        from schemas.uri_policy import canonical_prefix, default_prefixes

        if isinstance(self.allow_uri_prefixes, str):
            self.allow_uri_prefixes = (self.allow_uri_prefixes,)
        if self.allow_uri_prefixes is None:
            self.uri_prefixes = default_prefixes(self.index)
        else:
            self.uri_prefixes = tuple(dict.fromkeys(canonical_prefix(p) for p in self.allow_uri_prefixes))
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if not self.prefix or "/" in self.prefix:
            raise ValueError(f"--prefix must be a plain file name prefix, got {self.prefix!r}")
        if self.run_bytes < 1:
            raise ValueError(f"--run-bytes must be >= 1, got {self.run_bytes}")
        if self.fetch_tasks is not None and self.fetch_tasks < 1:
            raise ValueError(f"--fetch-tasks must be >= 1, got {self.fetch_tasks}")
        if self.read_bytes < 1 or self.writer_bytes < 1:
            raise ValueError("read_bytes and writer_bytes must be >= 1")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"--max-side must be >= 1, got {self.max_side}")
        if self.quality is not None and self.max_side is None:
            raise ValueError("--quality is the quality of images re-encoded for --max-side: give --max-side too")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")

    @property
    def reencode(self) -> tuple[int, int] | None:
        """``(max_side, quality)`` when images are re-encoded, else None."""
        if self.max_side is None:
            return None
        return self.max_side, REENCODE_QUALITY if self.quality is None else self.quality


def resolve_selection(path: str) -> tuple[str, str | None]:
    """``(selection parquet dir, resampler output dir or None)`` for a path that
    is either the resampler's output directory or its ``selection/``."""
    inner = sio.join(path, "selection")
    if sio.exists(inner):
        return inner, path.rstrip("/")
    parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
    if path.rstrip("/").endswith("/selection") and sio.exists(sio.join(parent, "stats.json")):
        return path, parent
    return path, None


def _spark_file_path(uri: str) -> str:
    """A path as ``inputFiles()`` gives it, written as ``_metadata.file_path``
    is (Hadoop's ``Path.toUri``: ``file:///x`` is ``file:/x``)."""
    scheme, sep, rest = uri.partition(":///")
    return f"{scheme}:/{rest}" if sep and "/" not in scheme else uri


def _resample_stats(resample_dir: str | None) -> dict | None:
    """The resampler's stats.json beside the selection, if there is one."""
    if resample_dir and sio.exists(sio.join(resample_dir, "stats.json")):
        return json.loads(sio.read_bytes(sio.join(resample_dir, "stats.json")))
    return None


@dataclass
class SelectionFacts:
    """What the selection's Parquet footers say, read before any work:
    ``rows`` (examples), ``copies`` (the resampler's total when its stats are
    there, else ``rows``: at most a few fewer than the copies) and
    ``min_copies`` (None where a row group has no statistics)."""

    rows: int
    copies: int
    min_copies: int | None


def _selection_facts(selection_path: str, stats: dict | None) -> SelectionFacts | None:
    """:class:`SelectionFacts` from the footers (read in parallel: a few
    requests per file, never the data); None when the files cannot be listed
    (Spark's reader then says what is wrong)."""
    try:
        paths = sio.expand_paths(selection_path)
    except FileNotFoundError:
        return None

    rows, lows = 0, []
    for meta in _in_parallel(_footer, paths):
        rows += meta.num_rows
        paths_in = [meta.schema.column(i).path for i in range(meta.num_columns)]
        at = paths_in.index("copies") if "copies" in paths_in else None
        integer = at is not None and meta.schema.column(at).physical_type in ("INT32", "INT64")
        for g in range(meta.num_row_groups):
            stat = meta.row_group(g).column(at).statistics if integer else None
            lows.append(stat.min if stat is not None and stat.has_min_max else None)
    total = stats["total_copies"] if stats and isinstance(stats.get("total_copies"), int) else rows
    return SelectionFacts(rows=rows, copies=total,
                          min_copies=None if None in lows or not lows else int(min(lows)))


def _config_from(stats: dict | None, total: int) -> tuple[ResampleConfig, dict]:
    """The resampler's configuration and input fingerprints, for the manifest."""
    if stats:
        return ResampleConfig.from_dict(stats["config"]), stats.get("inputs", {})
    return ResampleConfig(target="unknown", size=max(total, 1)), {}


#: URL schemes of object stores (no rename, per-request cost): where a large spill is refused by default.
OBJECT_STORE_SCHEMES = ("s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2")


def is_object_store(path: str) -> bool:
    """Whether ``path`` is a URL of an object store (``OBJECT_STORE_SCHEMES``),
    not a local or cluster filesystem (``file:``, ``hdfs:``, a mount)."""
    return path.split("://", 1)[0].lower() in OBJECT_STORE_SCHEMES if "://" in path else False


def spill_location(given: str | None, output: str, local_master: bool, estimate: int | None,
                   memory_free: int | None) -> str:
    """Where the spill goes: ``"given"`` (``--spill-dir``), ``"memory"``
    (local mode, when ``estimate``, the spill's bytes at most, fits in
    ``MEMORY_SPILL_SHARE`` of ``memory_free``, the memory this process may
    still use and the tmpfs's free space, the smaller; a tmpfs spill costs no
    filesystem work and no write-back: measured 25% faster in
    ``shards_bench``) or ``"output"`` (``OUTPUT/_temporary``). Raises
    ``ValueError`` on a cluster when the spill is known to put more than
    ``OBJECT_STORE_SPILL_LIMIT`` on an object-store ``output``. Pure."""
    if given:
        return "given"
    if local_master and estimate is not None and memory_free and estimate <= MEMORY_SPILL_SHARE * memory_free:
        return "memory"
    if not local_master and is_object_store(output) and estimate is not None and estimate > OBJECT_STORE_SPILL_LIMIT:
        raise ValueError(
            f"the spill (about {estimate / 2**30:,.0f} GiB of image bytes, written once and read once by the "
            f"shard writers) would go to {sio.join(output, TEMPORARY)} on the object store: give --spill-dir on "
            "the cluster's own filesystem (e.g. hdfs:///tmp/write_shards; every executor must reach it), or "
            f"--spill-dir {sio.join(output, TEMPORARY)} to accept the object store")
    return "output"


def _memory_free() -> int | None:
    """Bytes a spill in ``MEMORY_SPILL_DIR`` could take: the smallest of the
    memory available (``/proc/meminfo``), what this process's cgroup may
    still use (``memory.max - memory.current``, cgroup v2; a tmpfs's pages
    are charged to it) and the tmpfs's free space; None where the first or
    the last is unknown."""
    try:
        with open("/proc/meminfo") as fh:
            room = [next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))]
        st = os.statvfs(MEMORY_SPILL_DIR)
    except (OSError, StopIteration):
        return None
    room.append(st.f_bavail * st.f_frsize)
    try:
        with open("/proc/self/cgroup") as fh:
            group = next(line.strip().split("::", 1)[1] for line in fh if line.startswith("0::"))
        base = os.path.join("/sys/fs/cgroup", group.lstrip("/"))
        limit = open(os.path.join(base, "memory.max")).read().strip()
        if limit != "max":
            room.append(int(limit) - int(open(os.path.join(base, "memory.current")).read()))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return max(0, min(room))


def _footer(path: str) -> pq.FileMetaData:
    """A Parquet file's footer (a few ranged reads, never the data)."""
    fs, p = sio.filesystem(path)
    with fs.open(p, "rb") as fh:
        return pq.read_metadata(fh)


def _in_parallel(function, items: list) -> list:
    """``[function(item) for item in items]``, 16 at a time (requests to a store)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(function, items))


def _index_rows(files: list[str], max_files: int | None = None) -> int | None:
    """The index's rows, from its files' footers (read in parallel); None for
    more than ``max_files`` files or when a footer cannot be read."""
    if max_files is not None and len(files) > max_files:
        return None

    try:
        return sum(meta.num_rows for meta in _in_parallel(_footer, files))
    except (OSError, ValueError, pa.ArrowException):
        return None


def _spill_estimate(files: list[str], column: str, selected: int, index_rows: int | None) -> int | None:
    """The spill's bytes at most: an inline index's file sizes (every image
    once) plus a page of padding per row (a local spill aligns each image);
    ``selected`` examples of ``URI_IMAGE_BYTES`` for a ``uri`` index. None
    when the sizes or the rows cannot be read."""
    if column == "uri":
        return selected * URI_IMAGE_BYTES
    if index_rows is None:
        return None
    try:
        fs, _ = sio.filesystem(files[0])
        return int(sum(_in_parallel(lambda f: fs.size(sio.filesystem(f)[1]), files))) + index_rows * PAGE
    except (OSError, IndexError, ValueError):
        return None


class MemorySpill:
    """A spill directory in memory (``MEMORY_SPILL_DIR``), held by this run:
    a lock file inside it stays ``flock``-ed until :meth:`close`, so that a
    later run (in any process or container sharing the tmpfs) removes only
    spills whose lock it can take: those of ended runs (killed ones too)."""

    PREFIX = "adaptive-transfer-spill-"
    LOCK = "_lock"

    def __init__(self) -> None:
        import fcntl

        self.remove_stale()
        self.path = os.path.join(MEMORY_SPILL_DIR, f"{self.PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
        os.makedirs(self.path)
        self._lock = os.open(os.path.join(self.path, self.LOCK), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    @classmethod
    def remove_stale(cls) -> list[str]:
        """Remove this user's spills that no run holds; returns them. A spill
        without its lock file is left alone (a run may be creating it)."""
        import fcntl
        import shutil

        removed = []
        for entry in os.listdir(MEMORY_SPILL_DIR):
            path = os.path.join(MEMORY_SPILL_DIR, entry)
            try:
                if not entry.startswith(cls.PREFIX) or os.stat(path).st_uid != os.getuid():
                    continue
                fd = os.open(os.path.join(path, cls.LOCK), os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: a running job's
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            finally:
                os.close(fd)
        return removed

    def close(self) -> None:
        """Remove the spill, then let go of it."""
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)


def run(spark, job: ShardJob) -> Manifest:
    """Write the shards; return the manifest (also at ``output/manifest.json``).

    Every input is checked before the output is touched; the shards are built
    aside and committed whole (``schemas.stage_output``)."""
    from pyspark.sql import functions as F

    from pyspark.sql.pandas.types import to_arrow_schema

    t0 = time.time()
    stages = StageTimer()
    require_reachable_outputs(spark, {"--output": job.output, "--spill-dir": job.spill_dir}, job.shared_output)
    output = StageOutput(job.output, "write_shards")

    selection_path, resample_dir = resolve_selection(job.selection)
    if resample_dir:
        require_complete(resample_dir, "the resampler")
    require_finished_input(job.index, "--index")
    # The resampler writes its selection through fsspec: on an object store, read it that way too
    # (Spark's reader would need the cluster's connector for the scheme).
    selection = (read_parquet_columns if sio.is_local(selection_path) else read_parquet_through_fsspec)(
        spark, selection_path, ["key", "copies", "weight"])
    for col in ("key", "copies"):
        if col not in selection.columns:
            raise SchemaError(f"selection has no '{col}' column", file=selection_path)
    if "weight" not in selection.columns:
        selection = selection.withColumn("weight", F.lit(0.0))
    selection = selection.select(F.col("key").cast("string"), F.col("copies").cast("int"),
                                 F.col("weight").cast("double"))
    index = read_parquet_columns(spark, job.index, ["key", "labels", "image", "uri"])
    column = check_index_schema(to_arrow_schema(index.schema), file=job.index)  # "image" or "uri"
    located = index.select(
        F.col("key").cast("string").alias("key"), F.col("labels").cast("array<int>").alias("labels"),
        F.col("_metadata.file_path").alias("file"), F.col("_metadata.row_index").alias("row"),
        (F.col("uri") if column == "uri" else F.lit(None).cast("string")).alias("uri"))
    if output.check(job.overwrite):
        print(output.skip_line(), file=sys.stderr)
        manifest_path = sio.join(job.output, "manifest.json")
        return Manifest.from_json(sio.read_bytes(manifest_path).decode(), manifest_path)
    resample_stats = _resample_stats(resample_dir)
    facts = _selection_facts(selection_path, resample_stats)
    if facts is not None and facts.rows == 0:
        raise SchemaError("selection is empty", file=selection_path)
    if facts is not None and facts.min_copies is not None and facts.min_copies < 1:
        raise SchemaError(f"copies must be > 0 (found {facts.min_copies})", file=selection_path)
    files = sorted(index.inputFiles())
    index_rows = _index_rows(files, BROADCAST_INDEX_FILES)  # a small index's rows (read once)
    spill = _choose_spill(spark, job, files, column, facts, index_rows)
    work = output.begin()  # every input is checked: the output may be touched now
    try:
        manifest = _write_into(spark, job, work, selection, selection_path, resample_stats, files, spill, column,
                               located, facts, index_rows, stages, t0)
    except BaseException:
        output.abort(work)
        raise
    output.commit(work)
    return manifest



def _fetch(spark, job: ShardJob, selection, located, files: list[str], column: str, spill_dir: str, tasks: int,
           bits: int, index_rows: int | None):
    """The fetch pass: its ``FETCHED_SCHEMA`` rows (an Arrow table, a row per
    fetch task) and the Observation of the selection's facts."""
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    # Each fetch task takes a contiguous range of about as many files as the
    # others (rows of a file the table misses, if any, are spread by hash).
    task_keys = np.asarray(partition_keys(tasks))[contiguous_groups(len(files), tasks)].tolist()
    # From Arrow: a local relation, which needs no Spark job (a list of rows would).
    task_of_file = spark.createDataFrame(pa.table({"file": pa.array([_spark_file_path(f) for f in files], pa.string()),
                                                   "task": pa.array(task_keys, pa.int32())}))
    observed = Observation("selection")
    asked = F.coalesce(F.col("copies"), F.lit(0))
    measures = [F.count(F.lit(1)).alias("rows"),
                F.sum(F.greatest(asked, F.lit(0)).cast("long")).alias("copies"), F.min(asked).alias("min_copies")]
    copies = (selection.observe(observed, *measures)
              .where(asked > 0)
              .select("key", "weight", F.explode(F.sequence(F.lit(0), F.col("copies") - 1)).alias("copy"))
              .withColumn("h", F.xxhash64(F.col("key"), F.col("copy"), F.lit(job.seed).cast("long"))))
    task = FetchTask(column=column, bits=bits, storage=sio.storage_config(), spill_dir=spill_dir,
                     spill_file_bytes=job.run_bytes, uri_prefixes=tuple(job.uri_prefixes), reencode=job.reencode,
                     decode=job.decode_check)
    small = index_rows is not None and index_rows <= BROADCAST_INDEX_ROWS
    fetched = (copies.join(F.broadcast(located) if small else located, on="key", how="left")
               .join(F.broadcast(task_of_file), on="file", how="left")
               .repartition(tasks, F.coalesce(F.col("task"), F.hash("file")))
               .drop("task").sortWithinPartitions("file", "row", "key", "copy")
               .mapInArrow(fetch_partition(task), FETCHED_SCHEMA)
               .toArrow())  # a row per fetch task: small
    return fetched, observed, measures


@dataclass
class FetchFacts:
    """What the fetch pass found (on the driver: per bucket, per bad example, per task)."""

    starts: np.ndarray  # each bucket's first position, then the total
    bad: list  # (key, reason, copies), by key
    reencoded: np.ndarray  # images, bytes before, after
    spilled: int  # image bytes in the spill
    fetch_rss: list  # peak resident memory of each fetch task, bytes


def _facts(fetched: pa.Table, bits: int) -> FetchFacts:
    """Tallies per bucket, the bad examples and the tasks' figures, from the
    fetch tasks' rows."""
    buckets = pc.list_flatten(fetched.column("buckets")).to_numpy(zero_copy_only=False)
    counts = pc.list_flatten(fetched.column("counts")).to_numpy(zero_copy_only=False)
    bad = sorted(zip(pc.list_flatten(fetched.column("bad_keys")).to_pylist(),
                     pc.list_flatten(fetched.column("bad_reasons")).to_pylist(),
                     pc.list_flatten(fetched.column("bad_copies")).to_pylist()))
    reencoded = np.zeros(3, np.int64)
    for r in fetched.column("reencoded").to_pylist():
        reencoded += np.asarray(r, np.int64)
    return FetchFacts(starts=bucket_starts(buckets, counts, bits), bad=bad, reencoded=reencoded,
                      spilled=int(pc.sum(fetched.column("task_spilled")).as_py() or 0),
                      fetch_rss=fetched.column("task_rss").to_pylist())


def _write(spark, job: ShardJob, work: str, rows_paths: list[str], facts: FetchFacts, bits: int, total: int,
           spill_dir: str):
    """The writer pass: plan (whole shards per writer), send each writer the
    copy rows of its buckets (read from the fetch tasks' rows files), write;
    returns the ``WRITTEN_SCHEMA`` rows (an Arrow table), the writers and
    their span in positions."""
    num_shards = math.ceil(total / job.samples_per_shard)
    sample_bytes = max(1.0, facts.spilled / total)
    per_writer = job.samples_per_shard * shards_per_writer(
        num_shards, sample_bytes, job.samples_per_shard, job.writer_bytes,
        WRITERS_PER_CORE * spark.sparkContext.defaultParallelism)
    writers = math.ceil(total / per_writer)
    starts = facts.starts
    first, last = bucket_writers(starts, per_writer)
    route = RouteTask(bits=bits, first=first, last=last, keys=np.asarray(partition_keys(writers), np.int64),
                      storage=sio.storage_config())
    # Release written images' spill pages where the spill is local and no
    # other attempt of a writer can still read it: local mode (a failed
    # attempt has stopped; on a cluster one on a lost executor may still run)
    # without speculative attempts.
    release = (spark.sparkContext.master.startswith("local") and sio.is_local(spill_dir)
               and spark.sparkContext.getConf().get("spark.speculation", "false").lower() != "true")
    task = WriteTask(output=work, prefix=job.prefix, samples_per_shard=job.samples_per_shard, total=total,
                     per_writer=per_writer, starts=starts, bits=bits, storage=sio.storage_config(),
                     read_bytes=job.read_bytes, release=release)
    readers = max(1, min(len(rows_paths), spark.sparkContext.defaultParallelism))
    paths = spark.createDataFrame(pa.table({"rows_path": pa.array(rows_paths, pa.string())}))
    written = (paths.repartition(readers)
               .mapInArrow(route_partition(route), ROUTED_SCHEMA)
               .repartition(writers, "wkey").drop("wkey")
               .mapInArrow(write_partition(task), WRITTEN_SCHEMA))
    rows = written.toArrow()
    return rows, writers, per_writer


def _choose_spill(spark, job: ShardJob, files: list[str], column: str, facts: SelectionFacts | None,
                  index_rows: int | None) -> str:
    """:func:`spill_location` for this job, with the estimate it needs, from
    the index's file sizes and footers (``index_rows``: its rows where it is
    small, else None): all of it in local mode (an upper bound), the share of
    its rows selected on a cluster."""
    local_master = spark.sparkContext.master.startswith("local")
    selected = facts.rows if facts is not None else None
    estimate = memory = None
    if job.spill_dir:
        pass
    elif local_master:
        memory = _memory_free()
        if memory and column == "image":
            estimate = _spill_estimate(files, column, selected or 0, index_rows)
    elif is_object_store(job.output) and selected is not None:
        rows = (index_rows if index_rows is not None else _index_rows(files)) if column == "image" else None
        estimate = _spill_estimate(files, column, selected, rows)
        if estimate is not None and rows:
            estimate = int(estimate * min(1.0, selected / rows))
        if estimate is None:
            print(f"write_shards: the spill's size could not be estimated; it goes to "
                  f"{sio.join(job.output, TEMPORARY)} on the object store (give --spill-dir to choose)",
                  file=sys.stderr)
    return spill_location(job.spill_dir, job.output, local_master, estimate, memory)


def _write_into(spark, job: ShardJob, work: str, selection, selection_path: str, resample_stats: dict | None,
                files: list[str], spill: str, column: str, located, selected: SelectionFacts | None,
                index_rows: int | None, stages: StageTimer, t0: float) -> Manifest:
    """Fetch, spill (``spill``: :func:`spill_location`) and write the shards
    and the manifest into ``work``."""
    memory = MemorySpill() if spill == "memory" else None
    spill_dir = (memory.path if memory else
                 sio.join(job.spill_dir if spill == "given" else sio.join(work, TEMPORARY),
                          f"spill-{uuid.uuid4().hex[:12]}"))
    bits = bucket_bits(selected.copies if selected is not None else 0, job.samples_per_shard)
    tasks = max(1, min(len(files), job.fetch_tasks or FETCH_TASKS_PER_CORE * spark.sparkContext.defaultParallelism))
    # Arrow batches of images; the index is scanned for keys and labels only,
    # so split it by count (one split per fetch task), not by file bytes that
    # are mostly the images this scan skips.
    restore_confs = set_confs(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(IMAGE_BATCH_ROWS),
                                      "spark.sql.files.maxPartitionBytes": str(1 << 50),
                                      "spark.sql.files.minPartitionNum": str(tasks)})
    try:
        fetched, observed, measures = _fetch(spark, job, selection, located, files, column, spill_dir, tasks, bits,
                                             index_rows)
        facts = _facts(fetched, bits)
        # No metrics come back when nothing was selected: then count directly.
        counts = observed_metrics(observed) or selection.agg(*measures).first()
        unique, requested_total = int(counts["rows"]), int(counts["copies"] or 0)
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
        if total + dropped > requested_total:  # a copy met two index rows
            dup = (located.join(selection.select("key"), on="key").groupBy("key").count()
                   .where("count > 1").select("key").orderBy("key").first())
            raise SchemaError(f"key {dup['key'] if dup else '?'!r} appears more than once in the source index",
                              file=job.index)
        if total + dropped != requested_total:
            raise ValueError(f"internal error: the fetch kept {total} copies and dropped {dropped}, "
                             f"expected {requested_total}")
        n_bad = len(facts.bad)
        if n_bad / unique > job.max_bad_fraction:
            raise ValueError(f"{n_bad} of {unique} selected examples have a missing or unrecognisable "
                             f"image ({n_bad / unique:.3%} > --max-bad-fraction {job.max_bad_fraction:.3%}); "
                             f"first: {[k for k, _, _ in facts.bad[:3]]}")
        if total == 0:
            raise ValueError("no selected example has a usable image")
        stages.lap("fetch")
        rows, writers, per_writer = _write(spark, job, work, fetched.column("rows_path").to_pylist(), facts, bits,
                                           total, spill_dir)
        stages.lap("write")
    finally:
        restore_confs()
        if memory:
            memory.close()
        else:
            sio.remove_tree(spill_dir)

    num_shards = math.ceil(total / job.samples_per_shard)
    by_shard = {}
    for r in rows.to_pylist():
        by_shard.setdefault(r["shard"], r)  # one successful attempt per shard
    if sorted(by_shard) != list(range(num_shards)):
        raise ValueError(f"internal error: shards written {sorted(by_shard)[:10]}..., expected 0..{num_shards - 1}")
    shards, label_counts = [], {}
    for s in range(num_shards):
        r = by_shard[s]
        shards.append(ShardInfo(name=shard_name(job.prefix, s), samples=int(r["samples"]), bytes=int(r["bytes"]),
                                sha256=r["sha256"]))
        for label, n in json.loads(r["labels"]).items():
            label_counts[int(label)] = label_counts.get(int(label), 0) + n
    sio.remove_tree(sio.join(work, TEMPORARY))

    per_writer_rows = {}
    for r in by_shard.values():
        per_writer_rows.setdefault(r["writer"], r)
    written_by = {}
    for s in range(num_shards):
        w = by_shard[s]["writer"]
        written_by[w] = written_by.get(w, 0) + int(by_shard[s]["bytes"])
    ratios = [per_writer_rows[w]["bytes_read"] / max(1, written_by[w]) for w in per_writer_rows]
    config, resample_inputs = _config_from(resample_stats, requested_total)
    bad_records = [{"key": k, "reason": r} for k, r, _ in facts.bad[:1000]]
    manifest = Manifest(
        config=config,
        inputs={"selection": sio.listing_fingerprint(selection_path), "index": sio.listing_fingerprint(job.index),
                **{f"resample.{k}": v for k, v in resample_inputs.items()}},
        shards=shards, total_samples=total, unique_examples=unique - n_bad,
        label_distribution=label_counts, bad_records=bad_records,
        extra={"samples_per_shard": job.samples_per_shard, "prefix": job.prefix, "seed": job.seed,
               "requested_samples": requested_total, "bad_examples": n_bad, "image_source": column,
               "allowed_uri_prefixes": list(job.uri_prefixes) if column == "uri" else None,
               "max_side": job.max_side, "reencoded": _reencode_record(job, facts.reencoded),
               "image_check": "decode" if job.decode_check else "structure",
               "spill": {"location": spill, "image_bytes": facts.spilled,
                         "released_while_writing": sum(int(r["released"]) for r in by_shard.values()),
                         "shards_reused_by_retries": sum(bool(r["reused"]) for r in by_shard.values())},
               "tasks": {"fetch": tasks, "writers": writers, "shards_per_writer": per_writer // job.samples_per_shard,
                         "fetch_peak_rss_max": max(facts.fetch_rss or [0]),
                         "writer_peak_rss_max": max(r["task_rss"] for r in per_writer_rows.values()),
                         "writer_reads_max": max(r["reads"] for r in per_writer_rows.values()),
                         "writer_reads_mean": round(sum(r["reads"] for r in per_writer_rows.values())
                                                    / len(per_writer_rows), 1),
                         "writer_read_per_written_max": round(max(ratios), 4)},
               "seconds": round(time.time() - t0, 2), "timings": stages.timings})
    sio.write_bytes_atomic(sio.join(work, "manifest.json"), manifest.to_json())
    return manifest


def _reencode_record(job: ShardJob, totals: np.ndarray) -> dict | None:
    """The manifest's record of ``--max-side`` re-encoding (None without it).
    ``images``, ``bytes_before`` and ``bytes_after`` count examples (each
    re-encoded once, whatever its copies)."""
    if job.reencode is None:
        return None
    max_side, quality = job.reencode
    return {"max_side": max_side, "quality": quality, "format": "JPEG baseline, 4:2:0, optimised Huffman",
            "resample": "DCT scaling to >= 2x the target, then Lanczos", "encoder": encoder_version(),
            "images": int(totals[0]), "bytes_before": int(totals[1]), "bytes_after": int(totals[2])}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spark_jobs.write_shards",
                                description="Write WebDataset shards from a resampler selection.")
    p.add_argument("--selection", required=True, help="resampler output dir or its selection/ dir")
    p.add_argument("--index", required=True, help="the source index the resampler read")
    p.add_argument("--output", required=True)
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--seed", type=int, default=0, help="placement of copies across shards")
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    p.add_argument("--max-bad-fraction", type=float, default=0.001,
                   help="fail when more selected examples than this have no usable image")
    p.add_argument("--spill-dir", help="where fetch tasks leave the selected images for the shard writers (as "
                   "many bytes as the shards, deleted at the end); every executor must reach it. Default: in "
                   f"local mode, memory ({MEMORY_SPILL_DIR}) when the index's files fit in "
                   f"{MEMORY_SPILL_SHARE:.0%} of the memory available, else OUTPUT/_temporary; on a cluster, "
                   "OUTPUT/_temporary, refused on an object store past "
                   f"{OBJECT_STORE_SPILL_LIMIT >> 30} GiB (give the cluster's filesystem, e.g. hdfs:///tmp/spill)")
    p.add_argument("--run-bytes", type=parse_size, default=SPILL_FILE_BYTES,
                   help="a fetch task starts a new spill file past this many image bytes (default 1 GiB; "
                        "memory does not depend on it: images are appended as they are read)")
    p.add_argument("--read-bytes", type=parse_size, default=READ_BYTES,
                   help="image bytes a shard writer reads from the spill at a time (default 64 MiB): with its "
                        "copies' rows, a writer's memory, whatever the shard size or the total")
    p.add_argument("--fetch-tasks", type=int, metavar="N",
                   help=f"fetch tasks (default {FETCH_TASKS_PER_CORE} per core, at most one per index file); "
                        "each reads a contiguous range of the index's files")
    p.add_argument("--decode-check", action="store_true",
                   help="decode every image whole in the fetch pass (a bad example when it does not "
                        "decode); by default each image's structure is checked (JPEG SOI..EOI, PNG chunks "
                        "to IEND, WebP RIFF size, GIF trailer, BMP size), which catches truncated files")
    p.add_argument("--allow-uri-prefix", action="append", metavar="PREFIX",
                   help="repeatable: read a uri index's images only under these directories or URL "
                        "prefixes (a local path, file://, s3://bucket/..., gs://, hdfs://host/..., "
                        "http(s)://host/...; matched on path components after normalising; '..' is "
                        "refused). Given, it replaces the default: the index's own storage (its "
                        "scheme and bucket, or for a local index the directory containing the index "
                        "path). Any other uri is a bad example (see --max-bad-fraction)")
    p.add_argument("--max-side", type=int, metavar="N",
                   help="re-encode every image whose longer side exceeds N pixels (scaled to N, aspect "
                        "kept) as a JPEG (--quality; no metadata kept), as img2dataset does at download "
                        "time: smaller shards, faster decoding; images of at most N are kept byte for byte. "
                        "Every image's header is read: one whose size cannot be read, or that cannot be "
                        "decoded when it must be re-encoded, is a bad example (see --max-bad-fraction). "
                        "Default: images as the index holds them")
    p.add_argument("--quality", type=int, metavar="Q",
                   help=f"JPEG quality of images re-encoded for --max-side (1-100, default {REENCODE_QUALITY})")
    add_spark_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("write_shards", args,
                   lambda: ShardJob(selection=args.selection, index=args.index, output=args.output,
                                    samples_per_shard=args.samples_per_shard, prefix=args.prefix,
                                    seed=args.seed, overwrite=args.overwrite,
                                    max_bad_fraction=args.max_bad_fraction, spill_dir=args.spill_dir,
                                    run_bytes=args.run_bytes, allow_uri_prefixes=args.allow_uri_prefix,
                                    fetch_tasks=args.fetch_tasks, decode_check=args.decode_check,
                                    read_bytes=args.read_bytes,
                                    max_side=args.max_side, quality=args.quality,
                                    shared_output=args.shared_output),
                   run, lambda job, m: f"{m.total_samples} samples ({m.unique_examples} unique) in "
                                       f"{len(m.shards)} shards -> {job.output}")

