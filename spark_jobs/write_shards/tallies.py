"""The tallies: good copies per bucket, per target, from the fetch tasks to
the writer plan, without the driver holding one tally per task.

Each target ``t`` of a pass has ``2**bits[t]`` buckets (``placement``). A
fetch task counts its good copies in one flat vector (the targets' buckets
one after another, :class:`TallyLayout`) and emits it as *tally rows*:
``(target, block, counts)``, ``counts`` the dense ``int32`` counts of
``TALLY_BLOCK`` consecutive buckets of that target (a block of zeros is left
out). Rows of the same ``(target, block)`` are summed, in Spark
(:func:`combine_in_spark`: a grouped aggregation, one block per target and
block reaches the driver) or, where all the tasks' tallies are few
(``DRIVER_TALLY_ENTRIES``), on the driver as they are; either way
:func:`per_target` gives each target's counts per bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

__all__ = ["TallyLayout", "tally_batch", "sum_blocks", "combine_in_spark", "per_target", "sums_on_driver",
           "TALLY_BLOCK", "DRIVER_TALLY_ENTRIES", "TASK_ROW"]

#: Buckets per tally row (16 KiB of int32 counts).
TALLY_BLOCK = 1 << 12
#: Where the fetch tasks' tally entries (tasks x buckets, all targets) are at most this many, the driver
#: sums them itself (at most 8 MiB of int32); past it, Spark does (an extra stage, ~0.1 s on 2 cores).
DRIVER_TALLY_ENTRIES = 1 << 21
#: The ``target`` of a fetch task's own row (its rows file, bad examples, figures).
TASK_ROW = -1


@dataclass(frozen=True)
class TallyLayout:
    """The buckets of a pass's targets in one flat vector: target ``t``'s
    ``2**bits[t]`` buckets start at ``offsets[t]``."""

    bits: tuple

    @property
    def sizes(self) -> np.ndarray:
        return np.left_shift(1, np.asarray(self.bits, np.int64))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def size(self) -> int:
        return int(self.sizes.sum())

    def blocks(self) -> int:
        """Tally rows of a task that touched every bucket of every target."""
        return int(sum(math.ceil(s / TALLY_BLOCK) for s in self.sizes.tolist()))

    def flat(self, targets: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Each copy's place in the flat vector: its target's offset plus its
        bucket (the top ``bits[target]`` bits of ``h`` read as unsigned)."""
        targets = np.asarray(targets, np.int64)
        bits = np.asarray(self.bits, np.int64)[targets]
        u = np.asarray(h, np.int64).view(np.uint64)
        shift = np.where(bits > 0, 64 - bits, 0).astype(np.uint64)
        bucket = np.where(bits > 0, u >> shift, 0).astype(np.int64)
        return self.offsets[targets] + bucket


#: A tally row's fields (the rest of a fetch row is null).
_TALLY_FIELDS = ("target", "block", "counts")


def tally_batch(layout: TallyLayout, counts: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    """The tally rows of one task's flat ``counts`` (``layout.size``): a row
    per target and block that holds a copy; the other fields of ``schema``
    null. Raises ``ValueError`` past ``int32`` (2**31 copies of one bucket in
    one task)."""
    if counts.size and int(counts.max()) >= 1 << 31:
        raise ValueError("internal error: a fetch task counted 2**31 copies in one bucket")
    targets, blocks, parts = [], [], []
    for t, (start, size) in enumerate(zip(layout.offsets[:-1].tolist(), layout.sizes.tolist())):
        for b in range(math.ceil(size / TALLY_BLOCK)):
            part = counts[start + b * TALLY_BLOCK:start + min(size, (b + 1) * TALLY_BLOCK)]
            if part.any():
                targets.append(t)
                blocks.append(b)
                parts.append(part.astype(np.int32))
    lengths = np.fromiter((p.size for p in parts), np.int32, len(parts))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.concatenate(parts) if parts else np.zeros(0, np.int32), pa.int32())
    given = {"target": pa.array(targets, pa.int32()), "block": pa.array(blocks, pa.int32()),
             "counts": pa.ListArray.from_arrays(offsets, values)}
    columns = [given[f.name].cast(f.type) if f.name in given else pa.nulls(len(parts), f.type) for f in schema]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def sum_blocks(rows: pa.Table) -> np.ndarray:
    """The element-wise sum (int64) of the ``counts`` of tally rows of one
    ``(target, block)`` (equal lengths)."""
    counts = rows.column("counts").combine_chunks()
    width = len(counts[0]) if len(counts) else 0
    values = counts.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if values.size != width * len(counts):
        raise ValueError("internal error: tally blocks of one target and block differ in length")
    return values.reshape(len(counts), width).sum(axis=0) if width else np.zeros(0, np.int64)


def _combine(schema: pa.Schema):
    """applyInArrow over the rows of one ``(target, block)``: a task row
    (``target == TASK_ROW``, unique block) as it is; tally rows summed into one."""

    def combine(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        total = None
        first = None
        for batch in batches:
            if not batch.num_rows:
                continue
            if batch.column("target")[0].as_py() == TASK_ROW:
                yield pa.Table.from_batches([batch]).cast(schema).to_batches()[0]
                continue
            part = sum_blocks(pa.Table.from_batches([batch]))
            total = part if total is None else total + part
            first = first or batch.slice(0, 1)
        if total is not None:
            given = {"target": first.column("target"), "block": first.column("block"),
                     "counts": pa.array([total], pa.list_(pa.int64()))}
            yield pa.RecordBatch.from_arrays(
                [given[f.name].cast(f.type) if f.name in given else pa.nulls(1, f.type) for f in schema],
                schema=schema)

    return combine


def combine_in_spark(fetched, schema: pa.Schema, ddl: str):
    """The fetch pass's rows (a DataFrame) with the tally rows of each
    ``(target, block)`` summed by a grouped aggregation (``ddl``/``schema``:
    the fetch rows' schema with ``counts`` as ``array<long>``)."""
    return fetched.groupBy("target", "block").applyInArrow(_combine(schema), ddl)


def sums_on_driver(tasks: int, layout: TallyLayout) -> bool:
    """Whether the driver sums the tally rows itself: at most
    ``DRIVER_TALLY_ENTRIES`` counts from all tasks together."""
    return tasks * layout.size <= DRIVER_TALLY_ENTRIES


def per_target(layout: TallyLayout, rows: pa.Table) -> list[np.ndarray]:
    """Each target's good copies per bucket (int64, ``2**bits[t]``), from
    tally rows (summed or not: rows of one target and block add up)."""
    flat = np.zeros(layout.size, np.int64)
    targets = rows.column("target").to_numpy(zero_copy_only=False)
    blocks = rows.column("block").to_numpy(zero_copy_only=False)
    counts = rows.column("counts")
    for i in range(rows.num_rows):
        values = np.asarray(counts[i].values.to_numpy(zero_copy_only=False), np.int64)
        start = int(layout.offsets[targets[i]]) + int(blocks[i]) * TALLY_BLOCK
        flat[start:start + values.size] += values
    return [flat[a:b] for a, b in zip(layout.offsets[:-1].tolist(), layout.offsets[1:].tolist())]
