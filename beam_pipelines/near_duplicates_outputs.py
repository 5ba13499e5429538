"""The near-duplicates stage's last step (runs once): the exclusion parts
merged into ``exclude.parquet``, the figures, ``summary.json``, and the
embeddings store's description.

:class:`DedupConfig` is what the step is told (checked on the driver:
:func:`beam_pipelines.near_duplicates.check_inputs`), :class:`DedupMeasured`
what the pipeline found; :func:`write_outputs` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import io as sio
from schemas.targets import read_item_bytes

from .embeddings import STORE_META, TargetEmbeddings
from .label_counts import LabelCounts
from .matching import EXCLUDE_SCHEMA
from .near_duplicates_report import Pair, plot_contact_sheet, plot_similarity_histogram
from .similarity import HISTOGRAM_BINS, histogram_edges
from .unreadable import Unreadable, check_unreadable

__all__ = ["EXCLUDE_PARTS", "DedupConfig", "DedupMeasured", "describe_store", "write_outputs"]

#: Directory of the build where the exclusion parts are written, merged, then removed.
EXCLUDE_PARTS = "_exclude_parts"


@dataclass(frozen=True)
class DedupConfig:
    """The checked settings of one run, as its steps need them.

    ``threshold`` (cosine similarity), ``grid``, ``dim`` (embedding length),
    ``column`` of the index (``image`` or ``uri``, then read under
    ``uri_prefixes``), target ``splits``, ``max_bad_fraction`` of unreadable
    target images, ``checkpoint`` (path) and its ``model_fingerprint``,
    ``inputs`` (recorded in summary.json); the embeddings store's
    ``store_fingerprint`` (``None``: no store) and, where the store is read,
    its description ``stored``.
    """

    threshold: float
    grid: int
    dim: int
    column: str
    uri_prefixes: tuple[str, ...]
    splits: tuple[str, ...]
    max_bad_fraction: float
    checkpoint: str
    model_fingerprint: str
    inputs: dict
    store_fingerprint: dict | None = None
    stored: dict | None = None


@dataclass
class DedupMeasured:
    """What the pipeline found: the ``target`` embeddings and its
    ``target_unreadable`` images; the best-similarity ``histogram`` (counts per
    bin, and the examples compared); the pairs nearest the threshold
    ``above`` and ``below`` it; the ``exclude_files`` (parts) written; the
    source's unreadable images (``None``: read from the store) and the
    ``store_files`` written (``None``: no store written)."""

    target: TargetEmbeddings
    target_unreadable: Unreadable
    histogram: LabelCounts
    above: list = field(default_factory=list)
    below: list = field(default_factory=list)
    exclude_files: Sequence[str] = ()
    source_unreadable: Unreadable | None = None
    store_files: Sequence[str] | None = None


def _merge_exclusions(parts: Sequence[str], path: str, target: TargetEmbeddings) -> dict[str, Any]:
    """Concatenate the exclusion parts into the one file ``path`` (row group by
    row group: memory is one part's row group); return the counts per target
    split (excluded examples, target images matched)."""
    excluded = {split: 0 for split in dict.fromkeys(target.splits)}
    matched: dict[str, set] = {split: set() for split in excluded}
    fs, p = sio.filesystem(path)
    with fs.open(p, "wb") as out, pq.ParquetWriter(out, EXCLUDE_SCHEMA) as writer:
        for part in sorted(parts):
            with FileSystems.open(part) as fh:
                pf = pq.ParquetFile(fh)
                for i in range(pf.metadata.num_row_groups):
                    table = pf.read_row_group(i)
                    writer.write_table(table)
                    for split, file in zip(table.column("target_split").to_pylist(),
                                           table.column("target_file").to_pylist()):
                        excluded[split] = excluded.get(split, 0) + 1
                        matched.setdefault(split, set()).add(file)
    return {"excluded_by_split": excluded,
            "target_images_with_duplicates": {s: len(files) for s, files in matched.items()}}


def _row_value(file: str, row: int, column: str):
    """Column ``column`` of row ``row`` of index file ``file`` (reads the one
    row group that holds it; ``None`` where there is no such row)."""
    with FileSystems.open(file) as fh:
        pf = pq.ParquetFile(fh)
        start = 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if row < start + n:
                return pf.read_row_group(i, columns=[column]).column(0)[row - start].as_py()
            start += n
    return None


def _source_image(file: str, row: int, column: str, prefixes: Sequence[str]) -> bytes | None:
    """The encoded image of row ``row`` of index file ``file`` (``None`` where
    it cannot be had)."""
    try:
        value = _row_value(file, row, column)
        if column == "image" or value is None:
            return value
        from schemas.uri_policy import check_uris, read_target

        verdict = check_uris(prefixes, [value])[0]
        return read_target(verdict.target, prefixes) if verdict.target else None
    except Exception:  # noqa: BLE001 - the contact sheet shows what it can
        return None


def _target_image(path: str) -> bytes | None:
    try:
        return read_item_bytes(path, opener=FileSystems.open)
    except Exception:  # noqa: BLE001 - the contact sheet shows what it can
        return None


def _pairs(candidates, target: TargetEmbeddings, config: DedupConfig) -> tuple[list[dict], list[Pair]]:
    """The pairs nearest the threshold as listed in summary.json, and with their images."""
    listed, pairs = [], []
    for sim, key, file, row, t in candidates:
        listed.append({"similarity": sim, "key": key, "target_file": target.paths[t],
                       "target_split": target.splits[t]})
        pairs.append(Pair(sim, _source_image(file, row, config.column, config.uri_prefixes),
                          _target_image(target.paths[t]), key, f"{target.splits[t]}: {target.paths[t]}"))
    return listed, pairs


def _figures(work: str, config: DedupConfig, measured: DedupMeasured, pairs_above, pairs_below) -> None:
    name = config.inputs["target_images"].rstrip("/").rsplit("/", 1)[-1]
    histogram, target = measured.histogram, measured.target
    plot_similarity_histogram(histogram.counts, histogram_edges(), config.threshold,
                              sio.join(work, "similarity_histogram.png"),
                              f"{name}: best similarity of {histogram.num_examples:,} source examples "
                              f"to {len(target):,} target images")
    plot_contact_sheet(pairs_above, pairs_below, config.threshold, sio.join(work, "contact_sheet.png"),
                       f"{name}: source/target pairs nearest the threshold")


def _source_unreadable(config: DedupConfig, measured: DedupMeasured) -> tuple[int, list[str]]:
    if config.stored is not None:
        return config.stored["unreadable_images"], config.stored["unreadable_image_names"]
    found = measured.source_unreadable or Unreadable()
    return found.count, found.names


def _summary(config: DedupConfig, measured: DedupMeasured, counts: dict, listed_above, listed_below) -> dict:
    splits, histogram = config.splits, measured.histogram
    per_split = {s: 0 for s in splits}
    for s in measured.target.splits:
        per_split[s] += 1
    source_bad, source_bad_names = _source_unreadable(config, measured)
    return {
        "threshold": config.threshold, "grid": config.grid, "embedding_dim": config.dim,
        "model_fingerprint": config.model_fingerprint,
        "source_examples_compared": int(histogram.num_examples),
        "excluded": int(sum(counts["excluded_by_split"].values())),
        "excluded_by_split": {s: counts["excluded_by_split"].get(s, 0) for s in splits},
        "target_images": per_split,
        "target_images_with_duplicates": {s: counts["target_images_with_duplicates"].get(s, 0) for s in splits},
        "nearest_above_threshold": listed_above, "nearest_below_threshold": listed_below,
        "similarity_histogram": {"edges_from": -1.0, "bin_width": 2.0 / HISTOGRAM_BINS,
                                 "counts": [int(c) for c in histogram.counts]},
        "target_unreadable_images": int(measured.target_unreadable.count),
        "target_unreadable_image_names": sorted(measured.target_unreadable.names)[:100],
        "source_unreadable_images": int(source_bad or 0),
        "source_unreadable_image_names": sorted(source_bad_names)[:100],
        "embeddings": None if config.store_fingerprint is None else {
            "fingerprint": config.store_fingerprint, "reused": config.stored is not None,
            "bytes_per_example": 2 * config.dim},
        "inputs": config.inputs,
    }


def describe_store(store_work: str, config: DedupConfig, examples: int, source_unreadable: Unreadable | None,
                   store_files: Sequence[str] | None) -> None:
    """Write the store's ``embeddings.json`` (its fingerprint, ``examples``
    embedded, files, the source's unreadable images) and remove what Beam's
    file sink may have left behind (once per store, whatever the number of
    targets compared with it)."""
    fs, p = sio.filesystem(store_work)
    for entry in fs.ls(p, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1].startswith("beam-temp-"):
            fs.rm(entry, recursive=True)
    bad = source_unreadable or Unreadable()
    meta = {"fingerprint": config.store_fingerprint, "examples": int(examples),
            "dim": config.dim, "dtype": "float16", "bytes_per_example": 2 * config.dim,
            "files": len(store_files or []), "unreadable_images": int(bad.count),
            "unreadable_image_names": sorted(bad.names)[:100],
            "inputs": {"source_index": config.inputs["source_index"], "model": config.checkpoint}}
    sio.write_bytes_atomic(sio.join(store_work, STORE_META), sio.json_text(meta, indent=2) + "\n")


def write_outputs(work: str, store_work: str | None, config: DedupConfig, measured: DedupMeasured) -> dict:
    """Check the target's unreadable fraction, merge the exclusions, draw the
    figures and write ``summary.json`` into ``work`` (and the store's
    description into ``store_work``, where it is written); returns the summary."""
    check_unreadable(measured.target_unreadable, len(measured.target), config.max_bad_fraction, "target images")
    counts = _merge_exclusions(measured.exclude_files, sio.join(work, "exclude.parquet"), measured.target)
    sio.remove_tree(sio.join(work, EXCLUDE_PARTS))
    listed_above, pairs_above = _pairs(measured.above, measured.target, config)
    listed_below, pairs_below = _pairs(measured.below, measured.target, config)
    _figures(work, config, measured, pairs_above, pairs_below)
    summary = _summary(config, measured, counts, listed_above, listed_below)
    sio.write_bytes_atomic(sio.join(work, "summary.json"), sio.json_text(summary, indent=2) + "\n")
    if store_work is not None:
        describe_store(store_work, config, measured.histogram.num_examples, measured.source_unreadable,
                       measured.store_files)
    return summary
