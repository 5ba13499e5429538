"""The shards' ``manifest.json`` (``schemas.Manifest``), from the writers'
rows: every shard once (its name, samples, bytes, sha256), the labels'
counts, the resampler's configuration and inputs, the bad examples, and the
run's figures (spill, tasks, timings)."""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from schemas import Manifest, ResampleConfig, ShardInfo
from schemas import io as sio
from schemas.shard_format import shard_name

from ..reencode import encoder_version
from .context import ShardContext

if TYPE_CHECKING:
    from .job import ShardJob
    from .passes import FetchFacts, PassPlan, Tally, Written

__all__ = ["write_manifest", "shards_written", "writer_figures", "config_from", "reencode_record"]


def shards_written(rows: pa.Table, num_shards: int, prefix: str) -> tuple[dict, list[ShardInfo], dict]:
    """``(row per shard, ShardInfo per shard, label counts)`` from the
    writers' ``WRITTEN_SCHEMA`` rows (one successful attempt per shard is
    kept); raises ``ValueError`` unless shards ``0 .. num_shards - 1`` are
    all there."""
    by_shard = {}
    for r in rows.to_pylist():
        by_shard.setdefault(r["shard"], r)  # one successful attempt per shard
    if sorted(by_shard) != list(range(num_shards)):
        raise ValueError(f"internal error: shards written {sorted(by_shard)[:10]}..., expected 0..{num_shards - 1}")
    shards, label_counts = [], {}
    for s in range(num_shards):
        r = by_shard[s]
        shards.append(ShardInfo(name=shard_name(prefix, s), samples=int(r["samples"]), bytes=int(r["bytes"]),
                                sha256=r["sha256"]))
        for label, n in json.loads(r["labels"]).items():
            label_counts[int(label)] = label_counts.get(int(label), 0) + n
    return by_shard, shards, label_counts


def writer_figures(by_shard: dict) -> dict:
    """The writers' figures for the manifest: the largest peak memory, ranged
    reads (largest, mean) and bytes read per byte written (largest)."""
    per_writer_rows = {}
    for r in by_shard.values():
        per_writer_rows.setdefault(r["writer"], r)
    written_by = {}
    for r in by_shard.values():
        written_by[r["writer"]] = written_by.get(r["writer"], 0) + int(r["bytes"])
    ratios = [per_writer_rows[w]["bytes_read"] / max(1, written_by[w]) for w in per_writer_rows]
    return {"writer_peak_rss_max": max(r["task_rss"] for r in per_writer_rows.values()),
            "writer_reads_max": max(r["reads"] for r in per_writer_rows.values()),
            "writer_reads_mean": round(sum(r["reads"] for r in per_writer_rows.values()) / len(per_writer_rows), 1),
            "writer_read_per_written_max": round(max(ratios), 4)}


def config_from(stats: dict | None, total: int) -> tuple[ResampleConfig, dict]:
    """The resampler's configuration and input fingerprints, for the manifest."""
    if stats:
        return ResampleConfig.from_dict(stats["config"]), stats.get("inputs", {})
    return ResampleConfig(target="unknown", size=max(total, 1)), {}


def reencode_record(job: ShardJob, totals: np.ndarray) -> dict | None:
    """The manifest's record of ``--max-side`` re-encoding (None without it).
    ``images``, ``bytes_before`` and ``bytes_after`` count examples (each
    re-encoded once, whatever its copies)."""
    if job.reencode is None:
        return None
    max_side, quality = job.reencode
    return {"max_side": max_side, "quality": quality, "format": "JPEG baseline, 4:2:0, optimised Huffman",
            "resample": "DCT scaling to >= 2x the target, then Lanczos", "encoder": encoder_version(),
            "images": int(totals[0]), "bytes_before": int(totals[1]), "bytes_after": int(totals[2])}


def write_manifest(ctx: ShardContext, work: str, plan: PassPlan, facts: FetchFacts, tally: Tally,
                   written: Written) -> Manifest:
    """Build the manifest of the shards written into ``work`` and write it
    there (``manifest.json``); returns it."""
    job, inputs = ctx.job, ctx.inputs
    by_shard, shards, label_counts = shards_written(written.rows, math.ceil(tally.total / job.samples_per_shard),
                                                    job.prefix)
    config, resample_inputs = config_from(inputs.resample_stats, tally.requested)
    manifest = Manifest(
        config=config,
        inputs={"selection": sio.listing_fingerprint(inputs.selection_path),
                "index": sio.listing_fingerprint(job.index),
                **{f"resample.{k}": v for k, v in resample_inputs.items()}},
        shards=shards, total_samples=tally.total, unique_examples=tally.unique - tally.bad,
        label_distribution=label_counts, bad_records=[{"key": k, "reason": r} for k, r, _ in facts.bad[:1000]],
        extra={"samples_per_shard": job.samples_per_shard, "prefix": job.prefix, "seed": job.seed,
               "requested_samples": tally.requested, "bad_examples": tally.bad, "image_source": inputs.column,
               "allowed_uri_prefixes": list(job.uri_prefixes) if inputs.column == "uri" else None,
               "max_side": job.max_side, "reencoded": reencode_record(job, facts.reencoded),
               "image_check": "decode" if job.decode_check else "structure",
               "spill": {"location": ctx.spill.location, "image_bytes": facts.spilled,
                         "released_while_writing": sum(int(r["released"]) for r in by_shard.values()),
                         "shards_reused_by_retries": sum(bool(r["reused"]) for r in by_shard.values())},
               "tasks": {"fetch": plan.fetch_tasks, "writers": written.writers,
                         "shards_per_writer": written.per_writer // job.samples_per_shard,
                         "fetch_peak_rss_max": max(facts.fetch_rss or [0]), **writer_figures(by_shard)},
               "index_read": facts.index_read,
               "seconds": round(time.time() - ctx.started, 2), "timings": ctx.stages.timings})
    sio.write_bytes_atomic(sio.join(work, "manifest.json"), manifest.to_json())
    return manifest
