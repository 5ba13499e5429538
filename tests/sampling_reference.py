"""The single-process reference sampler the tests compare the Spark job with.

It takes :mod:`spark_jobs.sampling`'s plan and copies by rank, and orders
and fills each class in plain Python loops: an oracle written independently
of the job's vectorised draw (``sampling.canonical_order`` and
``sampling.assign_copies``, over many classes at once).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from spark_jobs.sampling import ClassPlan, make_class_plan, rank_copies

__all__ = ["sample_in_memory"]


def sample_in_memory(keys: Sequence[str], classes: np.ndarray, order: np.ndarray, q: np.ndarray,
                     size: int, matcher: str = "same", draw: str = "multinomial", seed: int = 0
                     ) -> tuple[np.ndarray, ClassPlan]:
    """Single-process reference of the whole sampler: copies per input record.

    ``classes`` groups the records (the job uses the label-list hash); ``q``
    must be equal within a class. Same results as the Spark job for the same
    arrays; used by the tests as an oracle.
    """
    classes = np.asarray(classes, np.int64)
    order = np.asarray(order, np.int64)
    q = np.asarray(q, np.int64)
    keys = list(keys)
    ids, first, inv, counts = np.unique(classes, return_index=True, return_inverse=True, return_counts=True)
    class_q = q[first]
    if np.any(q != class_q[inv]):
        raise ValueError("records of one class have different weights")
    plan = make_class_plan(matcher, draw, size, seed, ids, counts, class_q)
    copies = np.zeros(len(keys), np.int64)
    for k, cid in enumerate(plan.class_ids.tolist()):
        members = np.flatnonzero(classes == cid)
        ranked = np.array(sorted(members.tolist(), key=lambda i: (int(order[i]), keys[i])), np.int64)
        for a, b in zip(ranked.tolist(), ranked[1:].tolist()):
            if keys[a] == keys[b]:
                raise ValueError(f"duplicate key {keys[a]!r} in the source index")
        by_rank = rank_copies(plan.draw, int(plan.counts[k]), members.size, seed, cid)
        copies[ranked[:by_rank.size]] = by_rank
    return copies, plan
