"""Source label counts P_s as a Beam composite transform.

Vectorised over Arrow: the index's Parquet files are split into row groups
(the unit of parallelism), each row group's ``labels`` column is read as
one Arrow array, and ``numpy.bincount`` counts it. Per-row-group count
vectors are summed exactly (int64) by a ``CombineFn``. There is no Beam
element per record or per label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import SchemaError

__all__ = ["RowGroup", "LabelCounts", "match_files", "split_row_groups", "count_row_group",
           "SumLabelCounts", "CountSourceLabels"]


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: file, index, and its first row within the file."""

    path: str
    index: int
    first_row: int
    num_rows: int


@dataclass
class LabelCounts:
    """Occurrences of each vocabulary label (in ``label_ids`` order) and the
    number of source examples."""

    counts: np.ndarray
    num_examples: int


def match_files(pattern: str) -> list[str]:
    """Parquet files of a file, directory or glob, through Beam's filesystems."""
    if FileSystems.exists(pattern) and not any(c in pattern for c in "*?["):
        # A directory: every Parquet file below it (not _SUCCESS, .crc, ...).
        found = FileSystems.match([pattern.rstrip("/") + "/**"])[0].metadata_list
        files = [m.path for m in found if m.path.endswith(".parquet")
                 and not any(part.startswith(("_", ".")) for part in m.path[len(pattern):].split("/"))]
        if not files and pattern.endswith(".parquet"):
            files = [pattern]
    else:
        files = [m.path for m in FileSystems.match([pattern])[0].metadata_list
                 if not m.path.rsplit("/", 1)[-1].startswith(("_", "."))]
    if not files:
        raise FileNotFoundError(f"no Parquet files found at {pattern}")
    return sorted(files)


def split_row_groups(path: str) -> Iterator[RowGroup]:
    """The row groups of one Parquet file (reads only its footer)."""
    with FileSystems.open(path) as fh:
        meta = pq.ParquetFile(fh).metadata
    first = 0
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        yield RowGroup(path, i, first, n)
        first += n


def count_row_group(rg: RowGroup, label_ids: np.ndarray) -> LabelCounts:
    """Count the labels of one row group; a label outside the vocabulary, a
    null or an empty list is a :class:`SchemaError` naming file, row and key."""
    with FileSystems.open(rg.path) as fh:
        pf = pq.ParquetFile(fh)
        table = pf.read_row_group(rg.index, columns=["labels"])
    labels = table.column("labels").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(labels), 0).to_numpy()
    bad_rows = np.flatnonzero(lengths == 0)
    values = labels.flatten()
    if bad_rows.size == 0 and values.null_count == 0:
        flat = values.to_numpy()
        pos = np.searchsorted(label_ids, flat)
        ok = (pos < label_ids.size) & (label_ids[np.minimum(pos, label_ids.size - 1)] == flat)
        if ok.all():
            return LabelCounts(np.bincount(pos, minlength=label_ids.size).astype(np.int64), table.num_rows)
        j = int(np.flatnonzero(~ok)[0])
        row = int(pc.list_parent_indices(labels).to_numpy()[j])
        raise _error(rg, row, f"label {int(flat[j])} is not in the label vocabulary")
    if bad_rows.size:
        raise _error(rg, int(bad_rows[0]), "labels is empty or null")
    row = int(pc.list_parent_indices(labels).to_numpy()[np.flatnonzero(values.is_null().to_numpy(
        zero_copy_only=False))[0]])
    raise _error(rg, row, "labels contains a null id")


def _error(rg: RowGroup, row_in_group: int, message: str) -> SchemaError:
    with FileSystems.open(rg.path) as fh:
        keys = pq.ParquetFile(fh).read_row_group(rg.index, columns=["key"]).column("key")
    return SchemaError(message, file=rg.path, row=rg.first_row + row_in_group,
                       key=keys[row_in_group].as_py())


class SumLabelCounts(beam.CombineFn):
    """Exact element-wise sum of :class:`LabelCounts` (int64 vectors)."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels

    def create_accumulator(self):
        return LabelCounts(np.zeros(self.num_labels, np.int64), 0)

    def add_input(self, acc, element):
        acc.counts += element.counts
        acc.num_examples += element.num_examples
        return acc

    def merge_accumulators(self, accumulators: Iterable[LabelCounts]):
        out = self.create_accumulator()
        for acc in accumulators:
            out.counts += acc.counts
            out.num_examples += acc.num_examples
        return out

    def extract_output(self, acc):
        return acc


class _CountRowGroup(beam.DoFn):
    def __init__(self, label_ids: np.ndarray):
        self.label_ids = np.asarray(label_ids)
        self.examples = Metrics.counter("label_counts", "source_examples")
        self.row_groups = Metrics.counter("label_counts", "row_groups")

    def process(self, rg: RowGroup):
        result = count_row_group(rg, self.label_ids)
        self.examples.inc(result.num_examples)
        self.row_groups.inc()
        yield result


class CountSourceLabels(beam.PTransform):
    """PCollection of Parquet paths -> one :class:`LabelCounts` over ``label_ids``.

    ``label_ids`` (sorted ascending) is the vocabulary; counts come back in that
    order.
    """

    def __init__(self, label_ids: np.ndarray):
        super().__init__()
        self.label_ids = np.sort(np.asarray(label_ids, np.int64))

    def expand(self, files):
        return (files
                | "SplitRowGroups" >> beam.FlatMap(split_row_groups)
                | "SpreadRowGroups" >> beam.Reshuffle()
                | "CountRowGroup" >> beam.ParDo(_CountRowGroup(self.label_ids))
                | "SumCounts" >> beam.CombineGlobally(SumLabelCounts(self.label_ids.size)))
