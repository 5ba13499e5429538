"""Near-duplicates of a target's images in the source: the keys to exclude.

::

    python -m beam_pipelines.near_duplicates --source-index IDX --labels vocab.parquet \\
      --target-images ROOT --target-layout food101 [--splits train,test] --model generalist.pt \\
      [--threshold 0.965] [--grid 2] [--embeddings DIR] [--allow-uri-prefix P ...] \\
      [--max-bad-fraction 0.01] [--batch-size 64] --output DIR [--overwrite] \\
      [any Beam pipeline option: --runner, --direct_num_workers, Dataflow options]

The paper removes every near-duplicate of the target's training *and test*
images from the source before pre-training (a CNN-based detector with a
conservative threshold). Here the generalist embeds every image
(:mod:`beam_pipelines.embeddings`: its last feature map pooled over a
``--grid`` x ``--grid`` grid, square-rooted, L2-normalised), every source embedding is
compared with every target embedding (the target is a side input; the
source streams in batches, one matrix product per batch) and each source
example keeps its most similar target image. Those at or above
``--threshold`` are near-duplicates.

Writes to DIR: ``exclude.parquet`` (``key``, ``target_file``,
``target_split``, ``similarity``: what ``spark_jobs.resample --exclude``
reads), ``summary.json`` (counts per target split, threshold, model
fingerprint, the pairs nearest the threshold, unreadable images),
``similarity_histogram.png`` (best similarities, threshold marked),
``contact_sheet.png`` (the pairs nearest above and below the threshold) and,
last, ``_SUCCESS``.

``--embeddings DIR`` keeps the source embeddings (the expensive part: one
forward pass per source image) for every later target: written by the
first run (stage ``source_embeddings``), read by the next ones when they
were made with the same model, grid, index listing and uri prefixes; a
store made otherwise is refused.

Default threshold and grid: measured on planted near-duplicates
(tests/test_near_duplicates.py; README "Near-duplicates"), conservative:
it errs on the side of removing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from schemas import check_index_schema, validate_vocabulary
from schemas import io as sio
from schemas.stage_output import MARKER, SUCCESS, StageOutput
from schemas.targets import list_target, read_item_bytes

from .embeddings import (STORE_FORMAT_VERSION, STORE_META, EmbeddedRows, EmbedSource, EmbedTarget,
                         ReadStore, TargetEmbeddings, WriteStore, concat_rows, open_store)
from .importance_weights import _pin_runner
from .label_counts import LabelCounts, SumLabelCounts, match_files
from .near_duplicates_report import Pair, plot_contact_sheet, plot_similarity_histogram
from .similarity import (HISTOGRAM_BINS, best_matches, histogram_edges, near_threshold, row_norms,
                         similarity_histogram, unit_rows)

__all__ = ["STAGE", "DEFAULT_THRESHOLD", "DEFAULT_GRID", "COMPARE_ROWS", "OUTPUT_FILES", "EXCLUDE_SCHEMA", "Matches",
           "BestMatch", "build_parser", "check_inputs", "build_pipeline", "write_outputs", "run", "describe", "main"]

STAGE = "near_duplicates"
#: Cosine similarity at or above which a source example is a near-duplicate
#: (measured on planted copies: README "Near-duplicates").
DEFAULT_THRESHOLD = 0.965
#: Cells per side of the pooling grid over the last feature map (1: the penultimate layer).
DEFAULT_GRID = 2
#: Pairs shown on each side of the threshold (contact sheet, summary.json).
NEAR_PAIRS = 8
#: Source rows per matrix product against the target (a float32 product of
#: 1,024 rows runs about 5x as many pairs a second as one of 64 on this VM);
#: stored embeddings are read this many at a time, fresh ones regrouped.
COMPARE_ROWS = 1024
OUTPUT_FILES = ("exclude.parquet", "summary.json", "similarity_histogram.png", "contact_sheet.png", SUCCESS,
                MARKER)
EXCLUDE_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False),
                            pa.field("target_file", pa.string(), nullable=False),
                            pa.field("target_split", pa.string(), nullable=False),
                            pa.field("similarity", pa.float32(), nullable=False)])
_EXCLUDE_PARTS = "_exclude_parts"


@dataclass
class Matches:
    """Per source example of a batch: ``keys``, index ``files`` and ``rows``,
    the position of its most similar target image (``target``) and that
    cosine similarity (float32)."""

    keys: list[str]
    files: list[str]
    rows: np.ndarray
    target: np.ndarray
    similarity: np.ndarray


class BestMatch(beam.DoFn):
    """EmbeddedRows -> :class:`Matches` against the target side input (one
    matrix product per batch; the target's float32 copy is made once per worker)."""

    def __init__(self):
        self.compared = Metrics.counter(STAGE, "source_examples_compared")
        self._target: tuple[str, np.ndarray, np.ndarray] | None = None

    def _prepared(self, target: TargetEmbeddings) -> tuple[str, np.ndarray, np.ndarray]:
        if self._target is None or self._target[0] != target.token:
            self._target = (target.token, unit_rows(target.vectors), row_norms(target.vectors))
        return self._target

    def process(self, rows: EmbeddedRows, target: TargetEmbeddings):
        if len(target) and len(rows):  # no readable target image: write_outputs reports it
            _, unit, norms = self._prepared(target)
            index, similarity = best_matches(rows.vectors, target.vectors, unit, norms)
            self.compared.inc(len(rows))
            yield Matches(rows.keys, rows.files, rows.rows, index, similarity)


def exclusion_table(m: Matches, threshold: float, target: TargetEmbeddings) -> pa.Table:
    """The rows of ``m`` at or above ``threshold`` (compared in float64), as
    :data:`EXCLUDE_SCHEMA`."""
    hit = np.flatnonzero(m.similarity.astype(np.float64) >= threshold)
    return pa.Table.from_arrays(
        [pa.array([m.keys[i] for i in hit], pa.string()),
         pa.array([target.paths[m.target[i]] for i in hit], pa.string()),
         pa.array([target.splits[m.target[i]] for i in hit], pa.string()),
         pa.array(m.similarity[hit], pa.float32())], schema=EXCLUDE_SCHEMA)


def _candidates(m: Matches, threshold: float, side: str):
    """(similarity, key, file, row, target) of the few pairs of ``m`` nearest
    the threshold on ``side`` ("above": at or above it; "below")."""
    above, below = near_threshold(m.similarity, threshold, NEAR_PAIRS)
    for i in above if side == "above" else below:
        yield float(m.similarity[i]), m.keys[i], m.files[i], int(m.rows[i]), int(m.target[i])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m beam_pipelines.near_duplicates",
                                description="Source examples that are near-duplicates of target images.")
    p.add_argument("--source-index", required=True, help="Parquet file, directory or glob")
    p.add_argument("--labels", required=True, help="label vocabulary Parquet (checks the model's label space)")
    p.add_argument("--target-images", required=True, help="root of the target dataset")
    p.add_argument("--target-layout", default="imagefolder", help="imagefolder, food101, ...")
    p.add_argument("--splits", default="train,test",
                   help="comma-separated target splits to protect (default train,test)")
    p.add_argument("--model", required=True, help="generalist checkpoint (trainer.pretrain's generalist.pt)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"cosine similarity at or above which a source example is a near-duplicate "
                        f"(default {DEFAULT_THRESHOLD}: measured, see README)")
    p.add_argument("--grid", type=int, default=DEFAULT_GRID,
                   help=f"pool the last feature map over GRID x GRID cells (default {DEFAULT_GRID}; "
                        "1: the penultimate layer)")
    p.add_argument("--embeddings", help="store of source embeddings, reused by later runs with the same model "
                                        "and source (written when empty)")
    p.add_argument("--allow-uri-prefix", action="append", metavar="PREFIX",
                   help="repeatable: read a uri index's images only under these prefixes (default: the index's "
                        "own storage; schemas.uri_policy)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more target images than this are unreadable (default 0.01)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="redo a complete output")
    return p


def _uri_prefixes(args: argparse.Namespace) -> tuple[str, ...]:
    from schemas.uri_policy import canonical_prefix, default_prefixes

    if args.allow_uri_prefix:
        return tuple(dict.fromkeys(canonical_prefix(p) for p in args.allow_uri_prefix))
    return default_prefixes(args.source_index)


def check_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Read and check every input (options, vocabulary, generalist and its
    label space, index schema, target listing, embeddings store) before any
    output is touched; return the run's configuration."""
    from trainer.models import build_model, checkpoint_fingerprint, embedding_dim, preprocess_spec, read_generalist

    if not -1.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine similarity in [-1, 1], got {args.threshold}")
    if args.grid < 1:
        raise ValueError(f"--grid must be >= 1, got {args.grid}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"--splits must name distinct splits, got {args.splits!r}")
    vocab = sio.read_parquet(args.labels)
    validate_vocabulary(vocab, args.labels)
    ckpt = read_generalist(args.model, vocab)  # another label space: SchemaError naming both sizes
    dim = embedding_dim(build_model(ckpt["architecture"], ckpt["num_classes"]), args.grid)
    files = match_files(args.source_index)
    with FileSystems.open(files[0]) as fh:
        column = check_index_schema(pq.ParquetFile(fh).schema_arrow, files[0])
    prefixes = _uri_prefixes(args) if column == "uri" else ()
    items = []
    for split in splits:
        items += [(split, path) for path in list_target(args.target_images, args.target_layout, split).paths]
    model_fp = checkpoint_fingerprint(args.model)
    config: dict[str, Any] = {
        "threshold": float(args.threshold), "grid": args.grid, "dim": dim, "batch_size": args.batch_size,
        "column": column, "uri_prefixes": list(prefixes), "source_files": files, "splits": splits,
        "target_items": items, "max_bad_fraction": args.max_bad_fraction, "model": args.model,
        "model_fingerprint": model_fp, "preprocess": preprocess_spec(ckpt).to_dict(),
        "inputs": {"source_index": args.source_index, "source_index_files": len(files),
                   "labels": sio.fingerprint_paths(args.labels), "model": model_fp,
                   "target_images": args.target_images, "target_layout": args.target_layout, "splits": splits},
        "store": None, "store_meta": None,
    }
    if args.embeddings:
        fingerprint = {"format": STORE_FORMAT_VERSION, "model": model_fp, "grid": args.grid, "dim": dim,
                       "index": sio.listing_fingerprint(args.source_index, versions=True),
                       "uri_prefixes": list(prefixes)}
        config["store"], config["store_meta"] = open_store(args.embeddings, fingerprint)
        config["store_fingerprint"] = fingerprint
    return config


def build_pipeline(p: beam.Pipeline, config: dict[str, Any], work: str, store_work: str | None = None) -> None:
    """Add the transforms to ``p``: embed the target (side input) and the
    source (or read it from the store; write the store when ``store_work``),
    best matches, then :func:`write_outputs` once into ``work``."""
    threshold, batch = config["threshold"], config["batch_size"]
    items = [(i, split, path) for i, (split, path) in enumerate(config["target_items"])]
    target = (p | "TargetImages" >> beam.Create(items)
                | "EmbedTarget" >> EmbedTarget(config["model"], config["preprocess"], config["grid"], batch))
    side: dict[str, Any] = {"target": beam.pvalue.AsSingleton(target["target"])}
    side.update(_bad(target["bad"], "Target"))
    if config["store_meta"] is not None:
        embedded = (p | "StoreFiles" >> beam.Create(match_files(config["store"].path))
                      | "ReadStore" >> ReadStore(config["dim"], COMPARE_ROWS))
    else:
        source = (p | "SourceFiles" >> beam.Create(config["source_files"])
                    | "EmbedSource" >> EmbedSource(config["model"], config["preprocess"], config["column"],
                                                   config["grid"], batch, config["uri_prefixes"]))
        embedded = source["embeddings"]
        side.update(_bad(source["bad"], "Source"))
        if store_work is not None:
            written = embedded | "WriteStore" >> WriteStore(sio.join(store_work, "part"), config["dim"], batch)
            side["store_files"] = beam.pvalue.AsList(written)
        per_product = max(1, COMPARE_ROWS // batch)
        embedded = (embedded
                    | "GroupForCompare" >> beam.BatchElements(min_batch_size=per_product, max_batch_size=per_product)
                    | "ConcatRows" >> beam.Map(concat_rows))
    matches = embedded | "BestMatch" >> beam.ParDo(BestMatch(), beam.pvalue.AsSingleton(target["target"]))
    side["exclude_files"] = beam.pvalue.AsList(
        matches
        | "Exclusions" >> beam.Map(exclusion_table, threshold, beam.pvalue.AsSingleton(target["target"]))
        | "NonEmpty" >> beam.Filter(lambda t: t.num_rows > 0)
        | "WriteExclusions" >> beam.io.WriteToParquetBatched(sio.join(work, _EXCLUDE_PARTS, "part"),
                                                             EXCLUDE_SCHEMA, file_name_suffix=".parquet"))
    # A histogram is counts per bin: the label counts' exact int64 sum serves.
    side["histogram"] = beam.pvalue.AsSingleton(
        matches | "BinSimilarities" >> beam.Map(lambda m: LabelCounts(similarity_histogram(m.similarity),
                                                                      len(m.keys)))
        | "SumHistogram" >> beam.CombineGlobally(SumLabelCounts(HISTOGRAM_BINS)))
    side["above"] = beam.pvalue.AsSingleton(
        matches | "CandidatesAbove" >> beam.FlatMap(_candidates, threshold, "above")
        | "NearestAbove" >> beam.combiners.Top.Smallest(NEAR_PAIRS))
    side["below"] = beam.pvalue.AsSingleton(
        matches | "CandidatesBelow" >> beam.FlatMap(_candidates, threshold, "below")
        | "NearestBelow" >> beam.combiners.Top.Largest(NEAR_PAIRS))
    written = {k: v for k, v in config.items() if k not in ("source_files", "target_items", "store")}
    _ = (p | "Once" >> beam.Create([None])
           | "WriteOutputs" >> beam.Map(write_outputs, config=written, work=work, store_work=store_work, **side))


def _bad(bad, label: str) -> dict[str, Any]:
    """Side inputs counting and naming (the first 100 by name) the bad images."""
    lower = label.lower()
    return {f"{lower}_bad_count": beam.pvalue.AsSingleton(bad | f"Count{label}Bad" >> beam.combiners.Count.Globally()),
            f"{lower}_bad_names": beam.pvalue.AsSingleton(
                bad | f"{label}BadNames" >> beam.Map(lambda kr: kr[0])
                | f"First100{label}Bad" >> beam.combiners.Top.Smallest(100))}


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


def _source_image(file: str, row: int, column: str, prefixes: Sequence[str]) -> bytes | None:
    """The encoded image of row ``row`` of index file ``file`` (``None`` where
    it cannot be had): reads the one row group that holds it."""
    try:
        with FileSystems.open(file) as fh:
            pf = pq.ParquetFile(fh)
            start = 0
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if row < start + n:
                    value = pf.read_row_group(i, columns=[column]).column(0)[row - start].as_py()
                    break
                start += n
            else:
                return None
        if column == "image":
            return value
        from schemas.uri_policy import check_uris, read_target

        verdict = check_uris(prefixes, [value])[0]
        return read_target(verdict.target) if verdict.target else None
    except Exception:  # noqa: BLE001 - the contact sheet shows what it can
        return None


def _target_image(path: str) -> bytes | None:
    try:
        return read_item_bytes(path, opener=FileSystems.open)
    except Exception:  # noqa: BLE001 - the contact sheet shows what it can
        return None


def _pairs(candidates, target: TargetEmbeddings, config: dict, fetch: bool) -> tuple[list[dict], list[Pair]]:
    listed, pairs = [], []
    for sim, key, file, row, t in candidates:
        entry = {"similarity": sim, "key": key, "target_file": target.paths[t], "target_split": target.splits[t]}
        listed.append(entry)
        if fetch:
            pairs.append(Pair(sim, _source_image(file, row, config["column"], config["uri_prefixes"]),
                              _target_image(target.paths[t]), key, f"{target.splits[t]}: {target.paths[t]}"))
    return listed, pairs


def write_outputs(_, *, config: dict, work: str, store_work: str | None, target: TargetEmbeddings,
                  target_bad_count: int, target_bad_names, histogram: LabelCounts, above, below,
                  exclude_files: Sequence[str], source_bad_count: int | None = None, source_bad_names=(),
                  store_files: Sequence[str] | None = None) -> dict:
    """Check the target's unreadable fraction, merge the exclusions, draw the
    figures and write ``summary.json`` into ``work`` (and the store's
    description into ``store_work``); runs once."""
    total = len(target) + target_bad_count
    if total == 0:
        raise ValueError(f"{config['inputs']['target_images']}: the splits {config['splits']} list no images")
    fraction = target_bad_count / total
    if fraction > config["max_bad_fraction"] or not len(target):
        raise ValueError(f"{target_bad_count} of {total} target images are unreadable ({fraction:.2%} > "
                         f"--max-bad-fraction {config['max_bad_fraction']:.2%}); first: {list(target_bad_names)[:5]}")
    threshold = config["threshold"]
    counts = _merge_exclusions(exclude_files, sio.join(work, "exclude.parquet"), target)
    sio.remove_tree(sio.join(work, _EXCLUDE_PARTS))
    listed_above, pairs_above = _pairs(above, target, config, fetch=True)
    listed_below, pairs_below = _pairs(below, target, config, fetch=True)
    edges = histogram_edges()
    name = config["inputs"]["target_images"].rstrip("/").rsplit("/", 1)[-1]
    plot_similarity_histogram(histogram.counts, edges, threshold, sio.join(work, "similarity_histogram.png"),
                              f"{name}: best similarity of {histogram.num_examples:,} source examples "
                              f"to {len(target):,} target images")
    plot_contact_sheet(pairs_above, pairs_below, threshold, sio.join(work, "contact_sheet.png"),
                       f"{name}: source/target pairs nearest the threshold")
    stored = config["store_meta"]
    if stored is not None:
        source_bad_count, source_bad_names = stored["unreadable_images"], stored["unreadable_image_names"]
    per_split = {s: 0 for s in config["splits"]}
    for s in target.splits:
        per_split[s] += 1
    summary = {
        "threshold": threshold, "grid": config["grid"], "embedding_dim": config["dim"],
        "model_fingerprint": config["model_fingerprint"],
        "source_examples_compared": int(histogram.num_examples),
        "excluded": int(sum(counts["excluded_by_split"].values())),
        "excluded_by_split": {s: counts["excluded_by_split"].get(s, 0) for s in config["splits"]},
        "target_images": per_split,
        "target_images_with_duplicates": {s: counts["target_images_with_duplicates"].get(s, 0)
                                          for s in config["splits"]},
        "nearest_above_threshold": listed_above, "nearest_below_threshold": listed_below,
        "similarity_histogram": {"edges_from": -1.0, "bin_width": 2.0 / HISTOGRAM_BINS,
                                 "counts": [int(c) for c in histogram.counts]},
        "target_unreadable_images": int(target_bad_count),
        "target_unreadable_image_names": sorted(target_bad_names)[:100],
        "source_unreadable_images": int(source_bad_count or 0),
        "source_unreadable_image_names": sorted(source_bad_names)[:100],
        "embeddings": None if config.get("store_fingerprint") is None else {
            "fingerprint": config["store_fingerprint"], "reused": stored is not None,
            "bytes_per_example": 2 * config["dim"]},
        "inputs": config["inputs"],
    }
    sio.write_bytes_atomic(sio.join(work, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if store_work is not None:
        _describe_store(store_work, config, store_files or [], histogram.num_examples, source_bad_count or 0,
                        source_bad_names)
    return summary


def _describe_store(store_work: str, config: dict, files: Sequence[str], examples: int, bad: int, bad_names) -> None:
    """Write the store's ``embeddings.json`` (its fingerprint, size, unreadable
    images) and remove what Beam's file sink may have left behind."""
    fs, p = sio.filesystem(store_work)
    for entry in fs.ls(p, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1].startswith("beam-temp-"):
            fs.rm(entry, recursive=True)
    meta = {"fingerprint": config["store_fingerprint"], "examples": int(examples), "dim": config["dim"],
            "dtype": "float16", "bytes_per_example": 2 * config["dim"], "files": len(files),
            "unreadable_images": int(bad), "unreadable_image_names": sorted(bad_names)[:100],
            "inputs": {"source_index": config["inputs"]["source_index"], "model": config["model"]}}
    sio.write_bytes_atomic(sio.join(store_work, STORE_META), json.dumps(meta, indent=2) + "\n")


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (own flags + Beam options), run the pipeline, return the
    summary (``"reused": True`` where a finished output was there: no work
    done). Every input, the embeddings store included, is checked before an
    output is touched; both outputs are built aside and committed whole."""
    args, beam_args = build_parser().parse_known_args(argv)
    output = StageOutput(args.output, STAGE)
    options = _pin_runner(PipelineOptions(beam_args))
    config = check_inputs(args)
    if output.check(args.overwrite):
        print(output.skip_line(), file=sys.stderr)
        return {**json.loads(sio.read_bytes(sio.join(args.output, "summary.json"))), "reused": True}
    store = config["store"] if config["store_meta"] is None else None  # None: read, or no store
    # Inner commits first: the store (good on its own), then the output; a failure aborts both.
    with output.build() as work, (store.build() if store else contextlib.nullcontext()) as store_work:
        with beam.Pipeline(options=options) as p:
            build_pipeline(p, config, work, store_work)
    return json.loads(sio.read_bytes(sio.join(args.output, "summary.json")))


def describe(summary: dict) -> str:
    """The one line ``main`` prints on success."""
    splits = ", ".join(f"{s} {n:,}" for s, n in summary["excluded_by_split"].items())
    return (f"{STAGE}: {summary['excluded']:,} of {summary['source_examples_compared']:,} source examples are "
            f"near-duplicates of target images (similarity >= {summary['threshold']}; by split: {splits})")


def main(argv: Sequence[str] | None = None) -> int:
    """``run``; bad input is a one-line error and exit status 1."""
    try:
        print(describe(run(argv)))
    except (ValueError, FileNotFoundError) as e:
        print(f"{STAGE}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
