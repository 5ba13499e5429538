"""The importance-weights stage's last step: the source's label counts and the
target's P_t joined into weights, and every output written (runs once).

:class:`WeightsConfig` is what the step is told (checked on the driver:
:func:`beam_pipelines.importance_weights.check_inputs`), :class:`Measured`
what the pipeline measured; :func:`write_outputs` writes
``label_counts.parquet``, ``target_histogram.parquet``, ``weights.parquet``,
``summary.json`` and ``weights.png`` into the build directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from schemas import io as sio
from schemas import with_metadata

from .label_counts import LabelCounts
from .report import plot_top_weights
from .target_histogram import ProbabilitySums
from .unreadable import Unreadable, check_unreadable
from .weights import counts_table, entropy, histogram_table, importance_weights, mean_from_fixed_point

__all__ = ["TOP_LABELS", "WeightsConfig", "Measured", "target_distribution", "write_outputs"]

#: Labels listed in summary.json, by weight.
TOP_LABELS = 20


@dataclass(frozen=True)
class WeightsConfig:
    """The checked settings of one run, as its last step needs them.

    ``label_ids``: the vocabulary, ascending; ``names``: label id -> name;
    ``target_name``: recorded in the outputs; ``temperature`` (of P_t);
    ``max_bad_fraction``: of unreadable target images; ``model_fingerprint``:
    sha256 of the generalist (or the precomputed histogram's); ``model_label_ids``:
    the generalist's output order; ``precomputed``: P_t given instead, in
    ``label_ids`` order, with its ``num_images``; ``inputs``: recorded in summary.json.
    """

    label_ids: tuple[int, ...]
    names: dict[int, str]
    target_name: str
    temperature: float
    max_bad_fraction: float
    inputs: dict
    model_fingerprint: str | None = None
    model_label_ids: tuple[int, ...] | None = None
    precomputed: tuple[float, ...] | None = None
    num_images: int | None = None


@dataclass
class Measured:
    """What the pipeline measured: the source's label ``counts``, and (unless
    P_t was given) the exact softmax ``sums`` over the readable target images
    (``None``: none was read) and the ``unreadable`` ones."""

    counts: LabelCounts
    sums: ProbabilitySums | None = None
    unreadable: Unreadable = field(default_factory=Unreadable)


def target_distribution(config: WeightsConfig, measured: Measured) -> tuple[np.ndarray, int | None]:
    """P_t in ``config.label_ids`` order and the number of target images it
    covers; fails (one line) when too many target images are unreadable."""
    if config.precomputed is not None:
        return np.asarray(config.precomputed, np.float64), config.num_images
    read = measured.sums.count if measured.sums is not None else 0
    check_unreadable(measured.unreadable, read, config.max_bad_fraction, "target images")
    label_ids = np.asarray(config.label_ids)
    model_ids = np.asarray(config.model_label_ids)
    mean = mean_from_fixed_point(measured.sums.hi, measured.sums.lo, measured.sums.count)
    order = np.argsort(model_ids)
    p_target = np.zeros(label_ids.size)
    p_target[np.searchsorted(label_ids, model_ids[order])] = mean[order]
    return p_target, read


def _summary(config: WeightsConfig, measured: Measured, weights: pa.Table, lost: float, p_target: np.ndarray,
             num_images: int | None) -> dict:
    label_ids, counts = np.asarray(config.label_ids), measured.counts
    w = weights.column("weight").to_numpy()
    top = np.lexsort((label_ids, -w))[:TOP_LABELS]
    h = entropy(p_target)
    return {
        "target": config.target_name,
        "source_examples": int(counts.num_examples),
        "labels_per_example": float(counts.counts.sum() / counts.num_examples),
        "target_images": num_images,
        "temperature": config.temperature,
        "model_fingerprint": config.model_fingerprint,
        "top_labels": [{"label_id": int(label_ids[i]), "name": config.names.get(int(label_ids[i])),
                        "weight": float(w[i]), "p_target": float(p_target[i]),
                        "p_source": float(weights.column("p_source")[int(i)].as_py()),
                        "count": int(counts.counts[i])} for i in top],
        "p_target_entropy_nats": h,
        "p_target_perplexity": math.exp(h),
        "target_mass_without_source_examples": lost,
        "labels_without_source_examples": int((counts.counts == 0).sum()),
        "unreadable_images": int(measured.unreadable.count),
        "unreadable_image_names": sorted(measured.unreadable.names)[:100],
        "inputs": config.inputs,
    }


def write_outputs(work: str, config: WeightsConfig, measured: Measured) -> dict:
    """Join the counts and P_t into weights and write every output into
    ``work``; returns the summary."""
    p_target, num_images = target_distribution(config, measured)
    label_ids, counts = np.asarray(config.label_ids), measured.counts
    weights, lost = importance_weights(label_ids, counts.counts, counts.num_examples, p_target)
    meta = {"target": config.target_name, "temperature": config.temperature,
            "model_fingerprint": config.model_fingerprint, "num_images": num_images,
            "num_examples": counts.num_examples}
    sio.write_parquet_atomic(counts_table(label_ids, counts.counts, counts.num_examples),
                             sio.join(work, "label_counts.parquet"))
    sio.write_parquet_atomic(histogram_table(label_ids, p_target, num_images or 0, config.temperature,
                                             config.model_fingerprint),
                             sio.join(work, "target_histogram.parquet"))
    sio.write_parquet_atomic(with_metadata(weights, meta), sio.join(work, "weights.parquet"))
    summary = _summary(config, measured, weights, lost, p_target, num_images)
    sio.write_bytes_atomic(sio.join(work, "summary.json"), sio.json_text(summary, indent=2) + "\n")
    plot_top_weights(weights, config.names, sio.join(work, "weights.png"),
                     title=f"{config.target_name}: top source labels by importance weight")
    return summary
