"""The mathematics of near-duplicate detection, as pure numpy.

Embeddings are L2-normalised rows, stored as float16 and compared in
float32: the cosine similarity of two images is the dot product of their
rows (1.0: the same image; -1 to 1 in general). Each source row is compared
with every target row in one matrix product and keeps its most similar
target (:func:`best_matches`). A source example is a near-duplicate when
that similarity is at least the threshold.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HISTOGRAM_BINS", "histogram_edges", "unit_rows", "row_norms", "best_matches", "similarity_histogram",
           "near_threshold"]

#: Bins of the best-similarity histogram: equal widths over [-1, 1] (0.005 wide).
HISTOGRAM_BINS = 400


def histogram_edges(bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """The ``bins + 1`` bin edges over [-1, 1]."""
    return np.linspace(-1.0, 1.0, bins + 1)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (n, D) as float32 rows of unit L2 norm (a zero row stays
    zero): undoes the small change of norm that rounding to float16 makes."""
    v = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, np.float32(1))


def row_norms(vectors: np.ndarray) -> np.ndarray:
    """L2 norms of the rows, in float64, summed in numpy's fixed pairwise order
    (the same value for a row whatever else is in the array)."""
    v = np.asarray(vectors, np.float64)
    return np.sqrt((v * v).sum(axis=1))


def best_matches(source: np.ndarray, target: np.ndarray, target_unit: np.ndarray | None = None,
                 target_norms: np.ndarray | None = None, block_bytes: int = 256 << 20
                 ) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``source`` (n, D), the index of its most similar row of
    ``target`` (m, D) and their cosine similarity (float32).

    The most similar row is the argmax of one float32 matrix product of unit
    rows (:func:`unit_rows`; the first on ties), computed in blocks of source
    rows of at most ``block_bytes`` (default 256 MiB) so memory does not grow
    with n. The similarity of that pair is then recomputed in float64 from
    the rows as given (float16 rows are exact in float64) and rounded to
    float32: a pure function of the two rows, whatever the batch around them
    (a BLAS product's rounding depends on its shape). ``target_unit`` and
    ``target_norms`` (:func:`unit_rows`, :func:`row_norms` of ``target``) may
    be passed in to be computed once for many calls.
    """
    source = np.asarray(source)
    target = np.asarray(target)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"embeddings of different shapes: source {source.shape}, target {target.shape}")
    if target.shape[0] == 0:
        raise ValueError("no target embeddings to compare with")
    t_unit = unit_rows(target) if target_unit is None else target_unit
    t_norms = row_norms(target) if target_norms is None else target_norms
    n = source.shape[0]
    index = np.empty(n, np.int64)
    rows = max(1, block_bytes // (4 * t_unit.shape[0]))
    for start in range(0, n, rows):
        index[start:start + rows] = (unit_rows(source[start:start + rows]) @ t_unit.T).argmax(axis=1)
    a = source.astype(np.float64)
    b = target[index].astype(np.float64)
    denominator = row_norms(a) * t_norms[index]
    dots = (a * b).sum(axis=1)
    similarity = np.where(denominator > 0, dots / np.where(denominator > 0, denominator, 1.0), 0.0)
    return index, similarity.astype(np.float32)


def similarity_histogram(similarities: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Counts (int64) of ``similarities`` in the :func:`histogram_edges` bins;
    the last bin includes 1.0, values beyond [-1, 1] (rounding) go to the end bins."""
    s = np.asarray(similarities, np.float64)
    where = np.floor((s + 1.0) * (bins / 2.0)).astype(np.int64)
    return np.bincount(np.clip(where, 0, bins - 1), minlength=bins).astype(np.int64)


def near_threshold(similarities: np.ndarray, threshold: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the (up to) ``k`` similarities nearest the threshold from
    above (``>= threshold``, smallest first) and from below (``< threshold``,
    largest first)."""
    s = np.asarray(similarities, np.float64)  # compared in float64: float32 would round the threshold
    above = np.flatnonzero(s >= threshold)
    below = np.flatnonzero(s < threshold)
    above = above[np.argsort(s[above], kind="stable")[:k]]
    below = below[np.argsort(-s[below], kind="stable")[:k]]
    return above, below
