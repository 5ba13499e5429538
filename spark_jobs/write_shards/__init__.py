"""Write WebDataset tar shards from a resampler selection (docs/design.md, "Shards").

::

    python -m spark_jobs.write_shards --selection DIR --index PATH --output DIR \\
      [--samples-per-shard 10000] [--prefix shard] [--seed 0] [--overwrite] \\
      [--max-bad-fraction 0.001] [--spill-dir DIR] [--run-bytes 1G] [--fetch-tasks N] \\
      [--decode-check] [--read-bytes 64M] [--max-side N [--quality 90]] [--master local[*]]

Where a copy goes (``placement.py``, pure numpy): copies are ordered by
``h = xxhash64(key, copy, seed)`` read as unsigned (ties, practically never,
by key then copy); a good copy's position is its rank in that order among the
good copies (exactly as if the bad examples had never been selected);
position // samples-per-shard is its shard. Nothing sorts the images:

1. **fetch** (``fetch.py``, one :class:`FetchTask`): each copy meets its
   example's source location (file, row) in the index (a small index is
   broadcast, a large one joined by a shuffle); each fetch task
   reads a contiguous range of the index's files, each image once, in
   source order (``CHUNK_ROWS`` copy rows at a time, cut where an example
   ends), checks its structure (or decodes it, ``--decode-check``;
   with ``--max-side`` re-encodes it) and appends the good ones to its
   spill files (``spill.py``: plain bytes), each 64 MiB it gathers in the
   order of their first copy's placement hash (so where the job is small a
   writer's images lie together: fewer reads, whole ranges to release);
   its copies' rows (where each image is) go to a rows file, and it
   returns a row (that file, its bad examples with the reasons, its
   figures) and its tally of good copies per bucket as dense blocks
   (``tallies.py``: summed in Spark where tasks x buckets are many, so the
   driver's memory does not grow with the tasks);
2. **plan** (``placement.py``): the exact tallies give every bucket its
   first position; writer ``w`` takes whole shards, positions ``[w *
   per_writer, (w + 1) * per_writer)``;
3. **write** (``write.py``, one :class:`RouteTask`, one :class:`WriteTask`):
   the rows files are read and Spark's shuffle sends each writer the rows,
   not the images, of the buckets its shards span; it ranks them, reads
   exactly its own images from the spill (ranged reads, coalesced where
   they touch, ``--read-bytes`` at a time) and streams each tar to its
   final name (local files: written aside and renamed by the task, so the
   commit renames nothing). In local mode, with a local spill and no
   speculation, the images whose every copy a writer has written are
   punched out of the spill (``fallocate``) as it goes, so the tars reuse
   their pages, and a retried writer keeps the shards already there; the
   driver writes ``manifest.json`` and ``_SUCCESS``.

A writer's reads and memory depend on the shards it writes, never on the
total: it reads the bytes of its own images (plus nothing), in as many ranged
reads as it has images (fewer where they touch), and holds its copy rows plus
``read_bytes`` of images.

The modules: ``job.py`` (:class:`ShardJob`, the input checks, :func:`run`
through the output protocol), ``cli.py`` (the command line), ``footers.py``
(facts from Parquet footers), ``spill_policy.py`` (where the spill goes, and
why), ``context.py`` (what a run carries to its passes), ``passes.py`` (the
Spark plan: fetch, checks, write), ``manifest.py``; the tasks ``fetch.py``
and ``write.py``, ``source.py`` (reading the selected images out of the
index, counted), ``tallies.py`` (the fetch tasks' tallies, summed in Spark
where they are many), ``spill.py`` (spill files, ranged reads) and
``placement.py`` (pure numpy). ``many.py`` (:class:`many.ManyShardJob`,
``python -m spark_jobs.write_shards.many``): several targets' shards from
one fetch pass, each byte-identical to its single-target run's.
"""

from .cli import build_parser, main
from .fetch import DUPLICATE, FETCHED_SCHEMA, NOT_IN_INDEX, FetchTask, fetch_partition
from .job import SPILL_FILE_BYTES, STAGE, WRITER_BYTES, ShardJob, resolve_selection, run
from .passes import FETCH_TASKS_PER_CORE, WRITERS_PER_CORE
from .placement import (BUCKETS_PER_SHARD, MAX_BUCKET_BITS, bucket_bits, bucket_of, bucket_starts, bucket_writers,
                        coalesce_ranges, contiguous_groups, hash_order, partition_keys, shards_per_writer,
                        spark_hash_int, writer_span)
from .spill import SpillWriter, read_ranges, with_retries
from .write import READ_BYTES, WRITTEN_SCHEMA, WriteTask, write_partition

__all__ = ["ShardJob", "STAGE", "run", "main", "build_parser", "resolve_selection",
           # the tasks and their schemas
           "FetchTask", "fetch_partition", "FETCHED_SCHEMA", "DUPLICATE", "NOT_IN_INDEX", "WriteTask",
           "write_partition", "WRITTEN_SCHEMA", "READ_BYTES", "SpillWriter", "read_ranges", "with_retries",
           # the job's constants
           "FETCH_TASKS_PER_CORE", "SPILL_FILE_BYTES", "WRITER_BYTES", "WRITERS_PER_CORE",
           # placement (pure numpy)
           "BUCKETS_PER_SHARD", "MAX_BUCKET_BITS", "bucket_bits", "bucket_of", "bucket_starts", "bucket_writers",
           "coalesce_ranges", "contiguous_groups", "hash_order", "partition_keys", "shards_per_writer",
           "spark_hash_int", "writer_span"]
