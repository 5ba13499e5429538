"""``python -m spark_jobs.write_shards``: the command line of :class:`ShardJob`."""

from __future__ import annotations

from typing import Sequence

from schemas import parse_size
from schemas.cli import ArgumentParser

from ..reencode import REENCODE_QUALITY
from ..session import add_spark_arguments, run_cli
from .job import SPILL_FILE_BYTES, ShardJob, run
from .passes import FETCH_TASKS_PER_CORE
from .spill_policy import MEMORY_SPILL_DIR, MEMORY_SPILL_SHARE, OBJECT_STORE_SPILL_LIMIT
from .write import READ_BYTES

__all__ = ["build_parser", "main"]


def _add_spill_arguments(p: ArgumentParser) -> None:
    """The options of the spill and the tasks (performance only: the shards are the same whatever they are)."""
    # Help strings are %-formatted by argparse: a literal percent sign is written %%.
    p.add_argument("--spill-dir", help="where fetch tasks leave the selected images for the shard writers (as "
                   "many bytes as the shards, deleted at the end); every executor must reach it. Default: in "
                   f"local mode, memory ({MEMORY_SPILL_DIR}) when the index's files fit in "
                   f"{MEMORY_SPILL_SHARE * 100:.0f}%% of the memory available, else OUTPUT/_temporary; on a cluster, "
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


def _add_image_arguments(p: ArgumentParser) -> None:
    """The options that decide which images are kept, and how."""
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


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m spark_jobs.write_shards",
                       description="Write WebDataset shards from a resampler selection.")
    p.add_argument("--selection", required=True, help="resampler output dir or its selection/ dir")
    p.add_argument("--output", required=True)
    add_shard_arguments(p, "a complete output", "fail")
    return p


def add_shard_arguments(p: ArgumentParser, redone: str, fails: str) -> None:
    """The options one target's and many targets' shard writers share:
    ``redone`` says what ``--overwrite`` redoes, ``fails`` who fails on bad images."""
    p.add_argument("--index", required=True, help="the source index the resampler read")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--seed", type=int, default=0, help="placement of copies across shards")
    p.add_argument("--overwrite", action="store_true", help=f"redo {redone}")
    p.add_argument("--max-bad-fraction", type=float, default=0.001,
                   help=f"{fails} when more selected examples than this have no usable image")
    _add_spill_arguments(p)
    _add_image_arguments(p)
    add_spark_arguments(p)


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
