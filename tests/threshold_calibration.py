"""How the near-duplicates stage's default threshold is measured (test-only
code): on planted copies and hard negatives, the lowest threshold that lets
few negatives through, and the rates at a threshold.

Used by tests/test_near_duplicates.py (the measurement of
``beam_pipelines.near_duplicates.DEFAULT_THRESHOLD``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["choose_threshold", "detection_rates"]


def choose_threshold(negatives: Sequence[float], max_false_positive_rate: float = 0.01) -> float:
    """The lowest threshold that removes at most ``max_false_positive_rate``
    of the ``negatives`` (best similarities of examples that are *not*
    duplicates): conservative, removing as much as that allows. It is the
    smallest float32 above the (k+1)-th largest negative, k = floor(rate * n);
    -1.0 when k >= n."""
    neg = np.sort(np.asarray(negatives, np.float32))[::-1]
    if neg.size == 0:
        raise ValueError("no negatives to choose a threshold from")
    if not 0 <= max_false_positive_rate <= 1:
        raise ValueError(f"max_false_positive_rate must be in [0, 1], got {max_false_positive_rate}")
    allowed = int(np.floor(max_false_positive_rate * neg.size))
    if allowed >= neg.size:
        return -1.0
    return float(np.nextafter(neg[allowed], np.float32(np.inf)))


def detection_rates(duplicates: Sequence[float], negatives: Sequence[float], threshold: float
                    ) -> tuple[float, float]:
    """``(recall, false_positive_rate)`` at ``threshold``: the fractions of
    ``duplicates`` and of ``negatives`` whose best similarity is at least it."""
    dup = np.asarray(duplicates, np.float64)
    neg = np.asarray(negatives, np.float64)
    if dup.size == 0 or neg.size == 0:
        raise ValueError("need duplicates and negatives to measure rates")
    return float((dup >= threshold).mean()), float((neg >= threshold).mean())
