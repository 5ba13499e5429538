"""Weights for the job's scheme, on the driver: dense label weights from the
weights table (or the vocabulary, for ``subset``), then one integer weight
per distinct label list (docs/design.md, "Integer weights and aggregation"
and "Schemes"). The arithmetic is :mod:`spark_jobs.sampling`'s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import Hierarchy, read_metadata, validate_weights
from schemas import io as sio

from .. import sampling as S

if TYPE_CHECKING:
    from .job import ResampleJob

__all__ = ["Weighting", "label_weights_for", "weigh_label_sets"]


@dataclass(frozen=True)
class Weighting:
    """The job's label weights (``None`` for scheme ``entire``: every example
    with labels weighs 1) and what the weights table says about itself:
    ``info`` for stats.json (``weights_metadata``, ``subset_label_ids``), and
    the target and temperature it was made for (``None`` where it does not say)."""

    label_weights: S.LabelWeights | None
    info: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    temperature: float | None = None

    def resolve(self, job: "ResampleJob") -> "ResampleJob":
        """``job`` with the target and temperature it leaves open taken from the weights table."""
        return dataclasses.replace(job, target=job.target or self.target,
                                   temperature=job.temperature or self.temperature)


def label_weights_for(job: "ResampleJob") -> Weighting:
    """Read and check the weights table (and the vocabulary for ``subset``);
    dense label weights for the job's scheme."""
    info: dict[str, Any] = {}
    table, target, temperature = None, None, None
    if job.weights:
        table = sio.read_parquet(job.weights)
        validate_weights(table, job.weights)
        meta = read_metadata(table.schema)
        info["weights_metadata"] = meta
        target, temperature = meta.get("target"), meta.get("temperature")
    if job.scheme == "entire":
        return Weighting(None, info, target, temperature)
    if job.scheme == "subset":
        vocab = sio.read_parquet(job.labels)
        hierarchy = Hierarchy(vocab, job.labels)
        subset = hierarchy.descendants_of_names(job.subset_labels)
        ids = hierarchy.label_ids
        w = S.scheme_label_weights("subset", ids, None, subset_ids=subset)
        info["subset_label_ids"] = len(subset)
        return Weighting(S.quantize_label_weights(ids, w), info, target, temperature)
    ids = table.column("label_id").to_numpy()
    weights = table.column("weight").to_numpy(zero_copy_only=False)
    counts = table.column("count").to_numpy() if "count" in table.schema.names else None
    w = S.scheme_label_weights(job.scheme, ids, weights, counts=counts, top_k=job.top_k)
    return Weighting(S.quantize_label_weights(ids, w), info, target, temperature)


def weigh_label_sets(sets: pa.Table, lw: S.LabelWeights | None, aggregate: str) -> pa.Table:
    """Add q, w, bad to the label-set table with :func:`sampling.example_weights`:
    on the driver, once per distinct label list rather than once per example."""
    labels = sets.column("labels").combine_chunks()
    raw = labels.offsets.to_numpy().astype(np.int64)
    values = pc.fill_null(labels.values.slice(raw[0], raw[-1] - raw[0]), -1).to_numpy(zero_copy_only=False)
    offsets = raw - raw[0]
    if lw is None:  # scheme 'entire': every example with labels weighs 1
        bad = np.diff(offsets) == 0
        q = np.where(bad, 0, 1 << S.WEIGHT_BITS).astype(np.int64)
        w = np.where(bad, 0.0, 1.0)
    else:
        w, q, bad = S.example_weights(offsets, values, lw, aggregate)
    return (sets.append_column("q", pa.array(q, pa.int64()))
            .append_column("w", pa.array(w, pa.float64()))
            .append_column("bad", pa.array(bad, pa.bool_())))
