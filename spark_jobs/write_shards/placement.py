"""Where each copy goes: pure numpy, no Spark (tested on its own).

A copy's placement hash ``h = xxhash64(key, copy, seed)`` (Spark's
``xxhash64``) read as unsigned orders the output; its top ``bits`` bits name
its *bucket*. The exact number of good copies per bucket (the tallies) gives
every bucket its first position; writer ``w`` writes positions
``[w * per_writer, (w + 1) * per_writer)`` and so receives the copies of the
buckets those positions fall in (a bucket at a boundary goes to both writers).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

__all__ = ["hash_order", "bucket_of", "bucket_bits", "bucket_starts", "bucket_writers", "writer_span",
           "shards_per_writer", "spark_hash_int", "partition_keys", "contiguous_groups", "concat_ranges",
           "runs_of", "coalesce_ranges", "BUCKETS_PER_SHARD", "MAX_BUCKET_BITS"]

#: Buckets per shard wanted (an estimate of the copies is enough): the unit the writer plan is cut in.
BUCKETS_PER_SHARD = 2
#: At most 2**MAX_BUCKET_BITS buckets.
MAX_BUCKET_BITS = 20


def hash_order(h: np.ndarray, keys: pa.Array | pa.ChunkedArray, copies: np.ndarray) -> np.ndarray:
    """The permutation that sorts copies by ``h`` read as unsigned, then key
    (as Spark and Python compare strings: by code point), then copy."""
    u = np.asarray(h, np.int64).view(np.uint64)
    perm = np.argsort(u, kind="stable")
    su = u[perm]
    edge = np.diff(np.concatenate([[0], (su[1:] == su[:-1]).astype(np.int8), [0]]))
    for a, b in zip(np.flatnonzero(edge == 1).tolist(), (np.flatnonzero(edge == -1) + 1).tolist()):
        # Equal 64-bit hashes (practically never): by key, then copy.
        members = perm[a:b].tolist()
        perm[a:b] = sorted(members, key=lambda i: (keys[i].as_py(), int(copies[i])))
    return perm


def bucket_of(h: np.ndarray, bits: int) -> np.ndarray:
    """The bucket of each placement hash: its top ``bits`` bits (unsigned)."""
    if bits == 0:
        return np.zeros(len(h), np.int64)
    return (np.asarray(h, np.int64).view(np.uint64) >> np.uint64(64 - bits)).astype(np.int64)


def bucket_bits(copies: int, samples_per_shard: int) -> int:
    """Bits of the placement hash that name its bucket: about
    ``BUCKETS_PER_SHARD`` buckets per shard for ``copies`` (an estimate is
    enough: it only sets how finely the writer plan is cut), at most
    ``MAX_BUCKET_BITS``."""
    wanted = max(1, math.ceil(BUCKETS_PER_SHARD * max(1, copies) / samples_per_shard))
    return min(MAX_BUCKET_BITS, (wanted - 1).bit_length())


def bucket_starts(buckets: np.ndarray, counts: np.ndarray, bits: int) -> np.ndarray:
    """Position of each bucket's first copy, then the total (``2**bits + 1``
    int64), from tallies ``counts`` of ``buckets`` (repeats add up)."""
    per_bucket = np.zeros(1 << bits, np.int64)
    np.add.at(per_bucket, np.asarray(buckets, np.int64), np.asarray(counts, np.int64))
    return np.concatenate([[0], np.cumsum(per_bucket)])


def shards_per_writer(num_shards: int, sample_bytes: float, samples_per_shard: int, writer_bytes: int,
                      min_writers: int) -> int:
    """Whole shards per writer task: about ``writer_bytes`` of images each,
    but at least ``min_writers`` writers where there are shards enough."""
    by_bytes = int(writer_bytes // max(1.0, sample_bytes * samples_per_shard))
    return max(1, min(by_bytes, math.ceil(num_shards / max(1, min_writers))))


def writer_span(writer: int, per_writer: int, total: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` writer ``writer`` writes (``per_writer`` each)."""
    return writer * per_writer, min(total, (writer + 1) * per_writer)


def bucket_writers(starts: np.ndarray, per_writer: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first, last)``: for each bucket the writers that need its copies,
    ``first[b] .. last[b]`` (bucket ``b`` holds positions ``starts[b] ..
    starts[b + 1] - 1``; writer ``w`` writes ``[w * per_writer, (w + 1) *
    per_writer)``); an empty bucket needs none (``last < first``), a bucket
    across a boundary needs both writers."""
    starts = np.asarray(starts, np.int64)
    full = starts[1:] > starts[:-1]
    first = np.where(full, starts[:-1] // per_writer, 0)
    last = np.where(full, (starts[1:] - 1) // per_writer, -1)
    return first, last


def spark_hash_int(value: int, seed: int = 42) -> int:
    """Spark's ``hash()`` of an int (Murmur3 x86_32, seed 42): what places a
    row in ``repartition(n, column)``, partition ``pmod(hash, n)``."""
    mask = 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    k1 = rotl((value & mask) * 0xCC9E2D51 & mask, 15) * 0x1B873593 & mask
    h1 = (rotl(seed ^ k1, 13) * 5 + 0xE6546B64) & mask
    h1 ^= 4
    h1 = ((h1 ^ (h1 >> 16)) * 0x85EBCA6B) & mask
    h1 = ((h1 ^ (h1 >> 13)) * 0xC2B2AE35) & mask
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def partition_keys(n: int) -> list[int]:
    """For each partition p < n, the smallest int k >= 0 that ``repartition(n,
    column)`` sends to partition p: rows keyed k go there, and only there."""
    keys: dict[int, int] = {}
    k = 0
    while len(keys) < n:
        keys.setdefault(spark_hash_int(k) % n, k)
        k += 1
    return [keys[p] for p in range(n)]


def contiguous_groups(items: int, groups: int) -> np.ndarray:
    """Group of each of ``items`` ordered items: ``groups`` contiguous runs
    of sizes differing by at most one."""
    return (np.arange(items) * groups) // max(1, items)


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n in zip(starts, lengths))``, vectorised."""
    lengths = np.asarray(lengths, np.int64)
    return np.repeat(np.asarray(starts, np.int64) - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


def runs_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of equal values in a sorted array."""
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
    return starts, np.append(starts[1:], values.size)


def coalesce_ranges(files: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                    gap: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge byte ranges ``[starts, ends)`` of ``files`` (int codes) into
    reads: ranges of one file at most ``gap`` bytes apart become one read.
    Returns ``(read_file, read_start, read_end, read_of)``: the reads, sorted
    by file then start, and for each input range the read that holds it."""
    files, starts, ends = (np.asarray(a, np.int64) for a in (files, starts, ends))
    if files.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty
    order = np.lexsort((starts, files))
    f, s, e = files[order], starts[order], ends[order]
    # Files ascend, so shifting each file's offsets past the previous file's
    # makes one running maximum of the ends a per-file one.
    shift = (f - f[0]) * (int(e.max()) + gap + 1)
    reach = np.maximum.accumulate(e + shift)
    new = np.ones(f.size, bool)
    new[1:] = (f[1:] != f[:-1]) | (s[1:] + shift[1:] > reach[:-1] + gap)
    read_id = np.cumsum(new) - 1
    heads = np.flatnonzero(new)
    read_end = np.zeros(heads.size, np.int64)
    np.maximum.at(read_end, read_id, e)
    read_of = np.empty(f.size, np.int64)
    read_of[order] = read_id
    return f[heads], s[heads], read_end, read_of
