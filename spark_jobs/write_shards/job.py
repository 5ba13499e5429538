"""The job: what it is (:class:`ShardJob`), its inputs checked, and
:func:`run` through the output protocol.

inputs checked (this module; footers, ``footers.py``; where the spill goes,
``spill_policy.py``) -> reused when finished from the same fingerprint, else
built aside (``passes.build_shards``: fetch, write, manifest) and committed
whole, ``_SUCCESS`` last (``schemas.stage_output``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

from schemas import Manifest, SchemaError, check_index_schema
from schemas import io as sio
from schemas.fingerprint import code_digest
from schemas.stage_output import StageOutput, fingerprint_of, require_complete, require_finished_input

from ..progress import spark_progress
from ..reencode import REENCODE_QUALITY
from ..session import StageTimer, read_parquet_columns, read_parquet_through_fsspec, require_reachable_outputs
from .context import ShardContext, ShardInputs
from .footers import index_rows, selection_facts
from .passes import BROADCAST_INDEX_FILES, build_shards
from .spill import no_space
from .spill_policy import choose_spill, no_space_message
from .write import READ_BYTES

__all__ = ["ShardJob", "STAGE", "run", "resolve_selection", "check_inputs", "SPILL_FILE_BYTES", "WRITER_BYTES"]

#: The output protocol's name for this stage (``schemas.stage_output``).
STAGE = "write_shards"

#: A fetch task starts a new spill file past this many image bytes.
SPILL_FILE_BYTES = 1 << 30
#: Bytes of images one shard-writing task writes (it takes whole shards).
WRITER_BYTES = 1 << 30


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

    def fingerprint(self) -> dict:
        """What determines the shards (the one reuse rule,
        ``schemas.stage_output``): the selection (the resampler output's
        recorded fingerprint where it has one, else its files' listing), the
        index's listing, the settings that shape the shards and decide
        success, and the code. Not the performance knobs (fetch tasks, read,
        run and writer bytes, the spill's place, the master): the shards are
        byte-identical whatever they are."""
        selection_path, resample_dir = resolve_selection(self.selection)
        recorded = fingerprint_of(resample_dir) if resample_dir else None
        selection = ({"resample": recorded["digest"]} if recorded
                     else {"listing": sio.listing_fingerprint(selection_path)})
        return {"selection": selection, "index": sio.listing_fingerprint(self.index),
                "samples_per_shard": self.samples_per_shard, "seed": self.seed, "prefix": self.prefix,
                "max_side": self.max_side, "quality": self.reencode[1] if self.reencode else None,
                "decode_check": self.decode_check, "allowed_uri_prefixes": list(self.uri_prefixes),
                "max_bad_fraction": self.max_bad_fraction, "code": code_digest("spark_jobs.write_shards")}


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


def _resample_stats(resample_dir: str | None) -> dict | None:
    """The resampler's stats.json beside the selection, if there is one."""
    if resample_dir and sio.exists(sio.join(resample_dir, "stats.json")):
        return json.loads(sio.read_bytes(sio.join(resample_dir, "stats.json")))
    return None


def _read_selection(spark, selection_path: str):
    """The selection as ``key string, copies int, weight double`` (a missing
    weight is 0); raises ``SchemaError`` without ``key`` or ``copies``."""
    from pyspark.sql import functions as F

    # The resampler writes its selection through fsspec: on an object store, read it that way too
    # (Spark's reader would need the cluster's connector for the scheme).
    selection = (read_parquet_columns if sio.is_local(selection_path) else read_parquet_through_fsspec)(
        spark, selection_path, ["key", "copies", "weight"])
    for col in ("key", "copies"):
        if col not in selection.columns:
            raise SchemaError(f"selection has no '{col}' column", file=selection_path)
    if "weight" not in selection.columns:
        selection = selection.withColumn("weight", F.lit(0.0))
    return selection.select(F.col("key").cast("string"), F.col("copies").cast("int"), F.col("weight").cast("double"))


def _read_index(spark, index_path: str):
    """``(located, column, files)``: the index as ``key, labels, file, row,
    uri`` (where each example is), ``"image"`` or ``"uri"`` (its schema
    checked), its files (sorted)."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import to_arrow_schema

    index = read_parquet_columns(spark, index_path, ["key", "labels", "image", "uri"])
    column = check_index_schema(to_arrow_schema(index.schema), file=index_path)  # "image" or "uri"
    located = index.select(
        F.col("key").cast("string").alias("key"), F.col("labels").cast("array<int>").alias("labels"),
        F.col("_metadata.file_path").alias("file"), F.col("_metadata.row_index").alias("row"),
        (F.col("uri") if column == "uri" else F.lit(None).cast("string")).alias("uri"))
    return located, column, sorted(index.inputFiles())


def check_inputs(spark, job: ShardJob) -> ShardInputs:
    """Every input checked before the output is touched: the resampler's
    output finished, the index finished and of the index schema, the
    selection's columns, and its footers' rows and copies."""
    selection_path, resample_dir = resolve_selection(job.selection)
    if resample_dir:
        require_complete(resample_dir, "the resampler")
    require_finished_input(job.index, "--index")
    sio.require_readable(job.index, "--index")
    sio.require_readable(selection_path, "--selection")
    selection = _read_selection(spark, selection_path)
    located, column, files = _read_index(spark, job.index)
    stats = _resample_stats(resample_dir)
    facts = selection_facts(selection_path, stats)
    if facts is not None and facts.rows == 0:
        raise SchemaError("selection is empty", file=selection_path)
    if facts is not None and facts.min_copies is not None and facts.min_copies < 1:
        raise SchemaError(f"copies must be > 0 (found {facts.min_copies})", file=selection_path)
    return ShardInputs(selection=selection, selection_path=selection_path, resample_dir=resample_dir,
                       resample_stats=stats, located=located, column=column, files=files,
                       index_rows=index_rows(files, BROADCAST_INDEX_FILES),  # a small index's rows (read once)
                       selected=facts)


def run(spark, job: ShardJob) -> Manifest:
    """Write the shards; return the manifest (also at ``output/manifest.json``).

    Every input is checked before the output is touched; a finished output
    made from the same :meth:`ShardJob.fingerprint` is reused (its manifest
    returned); else the shards are built aside and committed whole
    (``schemas.stage_output``). A write that finds no room is a one-line
    ``ValueError`` naming the place."""
    started, stages = time.time(), StageTimer()
    require_reachable_outputs(spark, {"--output": job.output, "--spill-dir": job.spill_dir}, job.shared_output)
    inputs = check_inputs(spark, job)
    spill = choose_spill(job, inputs, spark.sparkContext.master.startswith("local"))
    ctx = ShardContext(spark=spark, job=job, inputs=inputs, spill=spill, started=started, stages=stages)
    built: list[Manifest] = []
    try:
        with spark_progress(spark, STAGE):
            reused = StageOutput(job.output, STAGE).run(lambda work: built.append(build_shards(ctx, work)),
                                                        fingerprint=job.fingerprint(), overwrite=job.overwrite)
    except OSError as e:
        report = no_space(e, job.output)
        if report is None:
            raise
        raise ValueError(no_space_message(report, job, "output")) from e
    if reused:
        manifest_path = sio.join(job.output, "manifest.json")
        return Manifest.from_json(sio.read_bytes(manifest_path).decode(), manifest_path)
    return built[0]
