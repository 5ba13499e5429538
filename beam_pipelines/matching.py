"""The near-duplicates stage's comparison step: each batch of source
embeddings against every target embedding, and what is kept of it.

:class:`BestMatch` gives each source example its most similar target image
(:func:`beam_pipelines.similarity.best_matches`, one matrix product per
batch); :func:`exclusion_table` keeps those at or above the threshold, as
``exclude.parquet``'s rows; :func:`candidates` the few pairs nearest the
threshold on one side (the contact sheet and summary.json).
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from .embeddings import EmbeddedRows, TargetEmbeddings
from .similarity import best_matches, near_threshold, row_norms, unit_rows

__all__ = ["NEAR_PAIRS", "EXCLUDE_SCHEMA", "Matches", "BestMatch", "exclusion_table", "candidates"]

#: Pairs shown on each side of the threshold (contact sheet, summary.json).
NEAR_PAIRS = 8
#: ``exclude.parquet``: what ``spark_jobs.resample --exclude`` reads (its ``key``).
EXCLUDE_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False),
                            pa.field("target_file", pa.string(), nullable=False),
                            pa.field("target_split", pa.string(), nullable=False),
                            pa.field("similarity", pa.float32(), nullable=False)])


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
        self.compared = Metrics.counter("near_duplicates", "source_examples_compared")
        self._target: tuple[str, np.ndarray, np.ndarray] | None = None

    def _prepared(self, target: TargetEmbeddings) -> tuple[str, np.ndarray, np.ndarray]:
        if self._target is None or self._target[0] != target.token:
            self._target = (target.token, unit_rows(target.vectors), row_norms(target.vectors))
        return self._target

    def process(self, rows: EmbeddedRows, target: TargetEmbeddings):
        if len(target) and len(rows):  # no readable target image: the last step reports it
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


def candidates(m: Matches, threshold: float, side: str):
    """(similarity, key, file, row, target) of the few pairs of ``m`` nearest
    the threshold on ``side`` ("above": at or above it; "below")."""
    above, below = near_threshold(m.similarity, threshold, NEAR_PAIRS)
    for i in above if side == "above" else below:
        yield float(m.similarity[i]), m.keys[i], m.files[i], int(m.rows[i]), int(m.target[i])
