"""Write WebDataset tar shards from a resampler selection (DESIGN.md §3).

::

    python -m spark_jobs.write_shards --selection DIR --index PATH --output DIR \\
      [--samples-per-shard 10000] [--prefix shard] [--seed 0] [--overwrite] \\
      [--max-bad-fraction 0.001] [--master local[*]]

Stages (all deterministic for a given selection, index and seed):

1. **locate**: join the selection with the index's keys and source
   locations (file, row), never with its image bytes;
2. **check**: read the selected images in source order (per file, by row,
   only the row groups needed; per ``uri``, sorted) and check their format
   from the bytes; only verdicts leave the tasks. Missing or unrecognisable
   images are counted, listed and skipped;
3. **place**: every copy of every good example gets a global position by
   sorting on ``xxhash64(key, copy, seed)`` (fixed hash ranges, exact counts,
   so no sampling is involved); position // samples-per-shard is its shard;
4. **fetch and write**: read the images again in source order, each with its
   copies' places, so image bytes cross a single shuffle, to their shard;
   one task writes each shard's tar, in position order, with fixed tar
   metadata, under an attempt-specific temporary name; the driver keeps what
   successful attempts reported, renames, writes ``manifest.json`` and then
   ``_SUCCESS``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import Manifest, ResampleConfig, SchemaError, ShardInfo
from schemas import io as sio

from .session import inject_failure, run_job
from .shards import SHARD_NAME_RE, image_extension, sample_json, sample_key, shard_name, write_tar

__all__ = ["ShardJob", "run", "main", "resolve_selection"]

TEMPORARY = "_temporary"
#: Arrow batch size while images travel through Python (bytes, not rows, matter).
IMAGE_BATCH_ROWS = 256


@dataclass
class ShardJob:
    """One shard-writing run (the command line, typed)."""

    selection: str
    index: str
    output: str
    samples_per_shard: int = 10000
    prefix: str = "shard"
    seed: int = 0
    overwrite: bool = False
    max_bad_fraction: float = 0.001

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if not self.prefix or "/" in self.prefix:
            raise ValueError(f"--prefix must be a plain file name prefix, got {self.prefix!r}")


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


# -- stage 2: fetch images in source order ------------------------------------------

CHECKED_SCHEMA = "key string, copies int, ext string, reason string"
PLACED_SCHEMA = ("key string, copy int, shard int, slot int, labels array<int>, weight double, image binary, "
                 "ext string")


def _fetch_partition(column: str, storage: dict, placed: bool):
    """mapInArrow over located rows sorted by (file, row): read each image in
    source order and check its format from the bytes.

    ``placed=False`` (the check pass): one verdict row per example
    (``CHECKED_SCHEMA``); no image leaves the task. ``placed=True`` (the
    fetch pass): the input carries each example's ``places`` (copy, shard,
    slot); one row per copy with the image (``PLACED_SCHEMA``).
    """

    def fetch(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        sio.apply_storage_config(storage)
        inject_failure("fetch")
        pending: list[pa.RecordBatch] = list(batches)
        if not pending:
            return
        table = pa.Table.from_batches(pending)
        emit = _placed_batch if placed else _checked_batch
        if column == "image":
            files = table.column("file").to_pylist()
            rows = table.column("row").to_numpy()
            start = 0
            while start < len(files):
                end = start
                while end < len(files) and files[end] == files[start]:
                    end += 1
                for positions, images in _read_inline(files[start], rows[start:end]):
                    heads = pc.binary_slice(images, 0, 16).to_pylist()
                    yield emit(table, positions + start, heads, images)
                start = end
        else:
            uris = table.column("uri").to_pylist()
            order = sorted(range(len(uris)), key=lambda i: (uris[i] or "", i))
            for s in range(0, len(order), IMAGE_BATCH_ROWS):
                chunk = order[s:s + IMAGE_BATCH_ROWS]
                images = []
                for i in chunk:
                    try:
                        if not uris[i]:
                            raise ValueError("no uri")
                        images.append(sio.read_bytes(uris[i]))
                    except Exception as e:  # noqa: BLE001 - a missing image is counted, not fatal
                        images.append(f"unreadable uri {uris[i]!r}: {type(e).__name__}: {e}"[:300])
                data = pa.array([x if isinstance(x, bytes) else None for x in images], pa.binary())
                yield emit(table, np.asarray(chunk, np.int64), images, data)

    return fetch


def _verdicts(heads: list) -> tuple[list, list]:
    """(extension or None, reason or None) for fetched items: the first bytes
    of an image, ``None`` (no bytes) or a string (why it could not be read)."""
    exts, reasons = [], []
    for item in heads:
        if isinstance(item, str) or item is None:
            exts.append(None)
            reasons.append(item if isinstance(item, str) else "no image bytes")
            continue
        ext = image_extension(item)
        exts.append(ext)
        reasons.append(None if ext else "unrecognised image format")
    return exts, reasons


def _checked_batch(table: pa.Table, positions: np.ndarray, heads: list, images: pa.Array) -> pa.RecordBatch:
    exts, reasons = _verdicts(heads)
    carried = table.select(["key", "copies"]).take(pa.array(positions))
    return pa.RecordBatch.from_arrays(
        [carried.column("key").combine_chunks(), carried.column("copies").combine_chunks(),
         pa.array(exts, pa.string()), pa.array(reasons, pa.string())], names=["key", "copies", "ext", "reason"])


def _placed_batch(table: pa.Table, positions: np.ndarray, heads: list, images: pa.Array) -> pa.RecordBatch:
    exts, reasons = _verdicts(heads)
    bad = [i for i, e in enumerate(exts) if e is None]
    if bad:
        key = table.column("key")[int(positions[bad[0]])].as_py()
        raise ValueError(f"the image of {key!r} changed while the job ran ({reasons[bad[0]]}); rerun it")
    places = table.column("places").take(pa.array(positions)).combine_chunks()
    counts = pc.list_value_length(places).to_numpy()
    flat = places.flatten()
    repeat = np.repeat(np.arange(len(positions)), counts)
    carried = table.select(["key", "labels", "weight"]).take(pa.array(positions[repeat]))
    return pa.RecordBatch.from_arrays(
        [carried.column("key").combine_chunks(), flat.field("copy"), flat.field("shard"), flat.field("slot"),
         carried.column("labels").combine_chunks(), carried.column("weight").combine_chunks(),
         images.take(pa.array(repeat)).cast(pa.binary()), pa.array([exts[i] for i in repeat], pa.string())],
        names=["key", "copy", "shard", "slot", "labels", "weight", "image", "ext"])


def _read_inline(path: str, rows: np.ndarray) -> Iterator[tuple[np.ndarray, pa.Array]]:
    """``(positions into rows, image cells as an Arrow array)`` of one Parquet
    file, row group by row group in file order (sequential reads, only the
    groups needed)."""
    fs, p = sio.filesystem(path)
    with fs.open(p, "rb") as fh:
        pf = pq.ParquetFile(fh)
        bounds = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        group_of = np.searchsorted(bounds, rows, side="right") - 1
        order = np.argsort(rows, kind="stable")
        for g in np.unique(group_of):
            members = order[group_of[order] == g]
            col = pf.read_row_group(int(g), columns=["image"]).column("image")
            images = col.take(pa.array(rows[members] - bounds[g])).combine_chunks()
            for s in range(0, len(members), IMAGE_BATCH_ROWS):
                yield members[s:s + IMAGE_BATCH_ROWS], images.slice(s, IMAGE_BATCH_ROWS)


# -- stage 4: write shards --------------------------------------------------------------

WRITTEN_SCHEMA = "shard int, temp string, samples long, bytes long, sha256 string, labels string"


def binary_views(array: pa.Array) -> list:
    """Zero-copy ``memoryview`` of each value of a non-null binary Arrow array."""
    if array.null_count:
        raise ValueError("internal error: a null image reached the shard writer")
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + len(array) + 1]
    data = memoryview(array.buffers()[2]) if len(array) else memoryview(b"")
    bounds = offsets.tolist()
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _write_partition(output: str, prefix: str, samples_per_shard: int, total: int, storage: dict):
    """mapInArrow: rows sorted by (shard, slot) -> one result row per shard written.

    Each shard is streamed to ``output/_temporary/<name>.<attempt>.<random>``;
    nothing is final until the driver renames what successful attempts reported.
    """

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        sio.apply_storage_config(storage)
        ctx = TaskContext.get()
        attempt = f"{ctx.stageId()}-{ctx.partitionId()}-{ctx.attemptNumber()}" if ctx else "local"

        def rows():
            for batch in batches:
                images = binary_views(batch.column(batch.schema.get_field_index("image")))
                cols = [batch.column(batch.schema.get_field_index(c)).to_pylist()
                        for c in ("shard", "slot", "key", "copy", "ext", "labels", "weight")]
                yield from zip(*cols, images)

        results = []
        for shard, group in itertools.groupby(rows(), key=lambda r: r[0]):
            labels: dict[int, int] = {}

            def samples(group=group, labels=labels, shard=shard):
                for expected, (_, slot, key, copy, ext, row_labels, weight, image) in enumerate(group):
                    if slot != expected:
                        raise ValueError(f"internal error: shard {shard} slot {slot}, expected {expected}")
                    for label in row_labels:
                        labels[label] = labels.get(label, 0) + 1
                    yield sample_key(key, copy), ext, image, sample_json(key, copy, row_labels, weight)
                    if expected == 1:
                        inject_failure("write")  # mid-write: a partial temporary file exists

            temp = sio.join(output, TEMPORARY, f"{shard_name(prefix, shard)}.{attempt}.{uuid.uuid4().hex[:8]}")
            fs, p = sio.filesystem(temp)
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(p, "wb") as fh:
                n, size, digest = write_tar(fh, samples())
            want = min(samples_per_shard, total - shard * samples_per_shard)
            if n != want:
                raise ValueError(f"internal error: shard {shard} has {n} samples, expected {want}")
            results.append((shard, temp, n, size, digest, json.dumps(labels, sort_keys=True)))
        if results:
            cols = list(zip(*results))
            yield pa.RecordBatch.from_arrays(
                [pa.array(cols[0], pa.int32()), pa.array(cols[1], pa.string()), pa.array(cols[2], pa.int64()),
                 pa.array(cols[3], pa.int64()), pa.array(cols[4], pa.string()), pa.array(cols[5], pa.string())],
                names=["shard", "temp", "samples", "bytes", "sha256", "labels"])

    return write


# -- the job --------------------------------------------------------------------------

def _clean(output: str) -> None:
    """Remove an earlier incomplete run's shards, manifest and temporaries
    (and refuse a directory holding anything else)."""
    sio.clear_output(output, lambda name: bool(SHARD_NAME_RE.match(name))
                     or name in ("manifest.json", "_SUCCESS", TEMPORARY))
    fs, p = sio.filesystem(output)
    fs.makedirs(p, exist_ok=True)


def _config_from(resample_dir: str | None, total: int) -> tuple[ResampleConfig, dict]:
    if resample_dir and sio.exists(sio.join(resample_dir, "stats.json")):
        stats = json.loads(sio.read_bytes(sio.join(resample_dir, "stats.json")))
        return ResampleConfig.from_dict(stats["config"]), stats.get("inputs", {})
    return ResampleConfig(target="unknown", size=max(total, 1)), {}


def run(spark, job: ShardJob) -> Manifest:
    """Write the shards; return the manifest (also at ``output/manifest.json``)."""
    from pyspark.sql import functions as F
    from pyspark.sql import Window

    t0 = time.time()
    timings: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(now - tick, 3)
        tick = now

    manifest_path = sio.join(job.output, "manifest.json")
    if sio.exists(sio.join(job.output, "_SUCCESS")) and not job.overwrite:
        print(f"write_shards: {job.output} is complete (_SUCCESS); nothing to do (--overwrite to redo)",
              file=sys.stderr)
        return Manifest.from_json(sio.read_bytes(manifest_path).decode(), manifest_path)
    _clean(job.output)

    selection_path, resample_dir = resolve_selection(job.selection)
    if resample_dir and not sio.exists(sio.join(resample_dir, "_SUCCESS")):
        raise FileNotFoundError(f"{resample_dir}: no _SUCCESS; the resampler did not finish, so this "
                                "selection is not a result")
    selection = spark.read.parquet(selection_path)
    for col in ("key", "copies"):
        if col not in selection.columns:
            raise SchemaError(f"selection has no '{col}' column", file=selection_path)
    if "weight" not in selection.columns:
        selection = selection.withColumn("weight", F.lit(0.0))
    selection = selection.select(F.col("key").cast("string"), F.col("copies").cast("int"),
                                 F.col("weight").cast("double"))
    check = selection.agg(F.count(F.lit(1)).alias("n"), F.countDistinct("key").alias("distinct"),
                          F.min("copies").alias("min_copies"), F.sum("copies").alias("total")).first()
    if check["n"] == 0:
        raise SchemaError("selection is empty", file=selection_path)
    if check["min_copies"] is None or check["min_copies"] < 1:
        raise SchemaError(f"copies must be > 0 (found {check['min_copies']})", file=selection_path)
    if check["distinct"] != check["n"]:
        raise SchemaError(f"{check['n'] - check['distinct']} keys appear in more than one row",
                          file=selection_path)
    requested_total = int(check["total"])
    lap("selection_check")

    index = spark.read.parquet(job.index)
    column = "image" if "image" in index.columns else "uri" if "uri" in index.columns else None
    if column is None or "key" not in index.columns or "labels" not in index.columns:
        raise SchemaError(f"source index needs key, labels and image or uri (has {index.columns})",
                          file=job.index)
    located = index.select(
        F.col("key").cast("string").alias("key"), F.col("labels").cast("array<int>").alias("labels"),
        F.col("_metadata.file_path").alias("file"), F.col("_metadata.row_index").alias("row"),
        (F.col("uri") if column == "uri" else F.lit(None).cast("string")).alias("uri"))
    located = located.join(selection, on="key", how="inner")

    # Stage 2: check every image, in source order; only verdicts leave the tasks.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(IMAGE_BATCH_ROWS))
    n_files = max(1, len(index.inputFiles()))
    fetch_cols = ["key", "file", "row", "uri", "labels", "copies", "weight"]
    tasks = min(n_files, 4 * spark.sparkContext.defaultParallelism)

    def in_source_order(df):
        return df.repartition(tasks, "file").sortWithinPartitions("file", "row")

    storage = sio.storage_config()
    checked = in_source_order(located.select(*fetch_cols)).mapInArrow(
        _fetch_partition(column, storage, placed=False), CHECKED_SCHEMA).persist()
    try:
        found = checked.agg(F.count(F.lit(1)).alias("n"),
                            F.sum(F.when(F.col("ext").isNull(), 1).otherwise(0)).alias("bad")).first()
        n_missing = int(check["n"]) - int(found["n"])  # selected keys the index does not have
        missing_rows = []
        if n_missing:
            missing = selection.join(index.select(F.col("key").cast("string")), on="key", how="left_anti")
            missing_rows = missing.select("key").orderBy("key").limit(1000).collect()
        bad_rows = (checked.where(F.col("ext").isNull()).select("key", "reason").orderBy("key")
                    .limit(1000).collect())
        lap("image_check")
        n_bad = int(found["bad"] or 0) + n_missing
        unique = int(check["n"])
        if n_bad / unique > job.max_bad_fraction:
            first = [r["key"] for r in bad_rows[:3]] + [r["key"] for r in missing_rows[:3]]
            raise ValueError(f"{n_bad} of {unique} selected examples have a missing or unrecognisable "
                             f"image ({n_bad / unique:.3%} > --max-bad-fraction {job.max_bad_fraction:.3%}); "
                             f"first: {first}")
        bad_records = ([{"key": r["key"], "reason": "not in the source index"} for r in missing_rows]
                       + [{"key": r["key"], "reason": r["reason"]} for r in bad_rows])[:1000]

        # Stage 3: place every copy of every good example.
        good = checked.where(F.col("ext").isNotNull())
        samples = good.select("key", F.explode(F.sequence(F.lit(0), F.col("copies") - 1)).alias("copy"))
        samples = samples.withColumn("h", F.xxhash64(F.col("key"), F.col("copy"), F.lit(job.seed).cast("long")))
        total = samples.count()
        if total == 0:
            raise ValueError("no selected example has a usable image")
        range_bits = max(0, min(16, math.ceil(math.log2(max(1, total / 100_000)))))
        samples = samples.withColumn(
            "range", F.shiftrightunsigned(F.col("h"), 64 - range_bits).cast("int") if range_bits else F.lit(0))
        counts = {r["range"]: r["count"] for r in samples.groupBy("range").count().collect()}
        offsets, acc = [], 0
        for r in range(1 << range_bits):
            offsets.append(acc)
            acc += counts.get(r, 0)
        rank = F.row_number().over(Window.partitionBy("range").orderBy("h", "key", "copy"))
        placed = samples.withColumn(
            "position", F.element_at(F.lit(offsets).cast("array<long>"), F.col("range") + 1) + rank - 1)
        num_shards = math.ceil(total / job.samples_per_shard)
        lap("place_counts")
        places = (placed.select("key", F.struct(
            F.col("copy").cast("int").alias("copy"),
            (F.col("position") / job.samples_per_shard).cast("long").cast("int").alias("shard"),
            (F.col("position") % job.samples_per_shard).cast("int").alias("slot")).alias("place"))
            .groupBy("key").agg(F.sort_array(F.collect_list("place")).alias("places")))

        # Stage 4: fetch again in source order, now with each copy's place, so the
        # images cross one shuffle (to their shards); write each shard in order.
        rows = (in_source_order(located.select(*fetch_cols).join(places, on="key"))
                .mapInArrow(_fetch_partition(column, storage, placed=True), PLACED_SCHEMA)
                .repartition(num_shards, "shard").sortWithinPartitions("shard", "slot")
                .mapInArrow(_write_partition(job.output, job.prefix, job.samples_per_shard, total, storage),
                            WRITTEN_SCHEMA)
                .collect())
        lap("fetch_and_write")
    finally:
        checked.unpersist()
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "65536")

    by_shard = {}
    for r in rows:
        by_shard.setdefault(r["shard"], r)  # one successful attempt per shard
    if sorted(by_shard) != list(range(num_shards)):
        raise ValueError(f"internal error: shards written {sorted(by_shard)[:10]}..., expected 0..{num_shards - 1}")
    shards, label_counts = [], {}
    fs, _ = sio.filesystem(job.output)
    for s in range(num_shards):
        r = by_shard[s]
        name = shard_name(job.prefix, s)
        fs.mv(sio.filesystem(r["temp"])[1], sio.filesystem(sio.join(job.output, name))[1])
        shards.append(ShardInfo(name=name, samples=int(r["samples"]), bytes=int(r["bytes"]), sha256=r["sha256"]))
        for label, n in json.loads(r["labels"]).items():
            label_counts[int(label)] = label_counts.get(int(label), 0) + n
    tmp = sio.filesystem(sio.join(job.output, TEMPORARY))
    if tmp[0].exists(tmp[1]):
        tmp[0].rm(tmp[1], recursive=True)

    config, resample_inputs = _config_from(resample_dir, requested_total)
    manifest = Manifest(
        config=config,
        inputs={"selection": sio.listing_fingerprint(selection_path), "index": sio.listing_fingerprint(job.index),
                **{f"resample.{k}": v for k, v in resample_inputs.items()}},
        shards=shards, total_samples=total, unique_examples=unique - n_bad,
        label_distribution=label_counts, bad_records=bad_records,
        extra={"samples_per_shard": job.samples_per_shard, "prefix": job.prefix, "seed": job.seed,
               "requested_samples": requested_total, "bad_examples": n_bad, "image_source": column,
               "seconds": round(time.time() - t0, 2), "timings": timings})
    sio.write_bytes_atomic(manifest_path, manifest.to_json())
    sio.write_bytes_atomic(sio.join(job.output, "_SUCCESS"), "")
    return manifest


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
    p.add_argument("--master", help="Spark master (default: local[*] unless run by spark-submit)")
    p.add_argument("--driver-memory", help="local mode heap (default: half the machine's memory)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        job = ShardJob(selection=args.selection, index=args.index, output=args.output,
                       samples_per_shard=args.samples_per_shard, prefix=args.prefix, seed=args.seed,
                       overwrite=args.overwrite, max_bad_fraction=args.max_bad_fraction)
    except ValueError as e:
        print(f"write_shards: error: {e}", file=sys.stderr)
        return 2
    return run_job("write_shards", args.master, args.driver_memory, lambda spark: run(spark, job),
                   lambda m: f"{m.total_samples} samples ({m.unique_examples} unique) in "
                             f"{len(m.shards)} shards -> {job.output}")


if __name__ == "__main__":
    raise SystemExit(main())
