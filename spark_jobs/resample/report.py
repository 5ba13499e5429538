"""What a run reports: the desired and realised label distributions, their
total variation, ``stats.json``, ``label_stats.parquet`` and the
``label_stats.png`` plot (docs/design.md, "Sampling")."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from schemas import io as sio

from .. import sampling as S

if TYPE_CHECKING:
    from .draw import Drawing
    from .job import ResampleJob
    from .weights import Weighting

__all__ = ["LabelSets", "label_distributions", "total_variation", "plot_label_stats", "Outcome", "statistics",
           "write_report"]


@dataclass
class LabelSets:
    """The distinct label lists of the index: ``lsid -> (labels, records, q)``.

    q is a function of the label list, so this one small table gives the
    histogram of distinct weights (elastic water-filling) and the desired
    label distribution, exactly.
    """

    sets: dict[int, tuple[tuple[int, ...], int, int]]

    @classmethod
    def from_table(cls, weighted_sets: pa.Table) -> "LabelSets":
        d = weighted_sets.to_pydict()
        return cls({lsid: (tuple(labels or ()), n, q)
                    for lsid, labels, n, q in zip(d["lsid"], d["labels"], d["n"], d["q"])})

    def desired_label_mass(self) -> dict[int, int]:
        """label id -> exact Σq over the examples carrying it."""
        mass: dict[int, int] = {}
        for labels, n, q in self.sets.values():
            if q > 0:
                for label in labels:
                    mass[label] = mass.get(label, 0) + n * q
        return mass

    def per_label(self, per_set: dict[int, int]) -> dict[int, int]:
        """Spread a per-label-set count over the labels of each set."""
        out: dict[int, int] = {}
        for lsid, n in per_set.items():
            for label in self.sets[lsid][0]:
                out[label] = out.get(label, 0) + n
        return out


def label_distributions(desired: dict[int, int], realised: dict[int, int]) -> pa.Table:
    """label_id, desired (share of Σq over examples carrying it), realised (share of copies)."""
    d, r = desired, realised
    ids = sorted(set(d) | set(r))
    d_total = sum(d.values()) or 1
    r_total = sum(r.values()) or 1
    return pa.table({
        "label_id": pa.array(ids, pa.int32()),
        "desired": pa.array([float(Fraction(d.get(i, 0), d_total)) for i in ids], pa.float64()),
        "realised": pa.array([r.get(i, 0) / r_total for i in ids], pa.float64()),
        "realised_copies": pa.array([r.get(i, 0) for i in ids], pa.int64()),
    })


def total_variation(stats: pa.Table) -> float:
    """Half the L1 distance between the desired and realised label shares."""
    d = stats.column("desired").to_numpy()
    r = stats.column("realised").to_numpy()
    return 0.5 * math.fsum(np.abs(d - r).tolist())


def plot_label_stats(stats: pa.Table, path: str, names: dict[int, str] | None = None,
                     top: int = 40) -> None:
    """Bar chart of realised against desired shares for the top labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = stats.column("label_id").to_numpy()
    d = stats.column("desired").to_numpy()
    r = stats.column("realised").to_numpy()
    order = np.argsort(-d, kind="stable")[:top]
    labels = [(names or {}).get(int(i), str(int(i))) for i in ids[order]]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(order) + 2), 4))
    x = np.arange(len(order))
    ax.bar(x - 0.2, d[order], width=0.4, label="desired")
    ax.bar(x + 0.2, r[order], width=0.4, label="realised")
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.set_ylabel("share of sampled labels")
    ax.set_title(f"Realised vs desired label distribution (top {len(order)} labels)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    sio.write_bytes_atomic(path, buf.getvalue())


@dataclass
class Outcome:
    """What the count and the draws found: the weighted label-set table,
    whether it was counted in this run (else read from ``--label-sets``),
    the records and those with a non-zero weight, and the drawing."""

    weighted_sets: pa.Table
    counted: bool
    records: int
    positive: int
    drawing: "Drawing"


def statistics(job: "ResampleJob", weighting: "Weighting", outcome: Outcome,
               inputs: dict[str, str]) -> tuple[dict[str, Any], pa.Table]:
    """stats.json's content (less the timings) and the label distributions."""
    drawing, weighted_sets = outcome.drawing, outcome.weighted_sets
    sets = LabelSets.from_table(weighted_sets)
    label_stats = label_distributions(sets.desired_label_mass(), sets.per_label(drawing.drawn.per_set))
    copies_hist = {str(k): v for k, v in drawing.drawn.histogram.items()}
    stats: dict[str, Any] = {
        "config": job.config().to_dict(),
        "job": {"index": job.index, "weights": job.weights, "labels": job.labels,
                "exclude": job.exclude, "partitions": drawing.partitions,
                "weight_bits": S.WEIGHT_BITS, "label_sets": int(weighted_sets.num_rows),
                "label_set_table": job.label_sets,
                "label_sets_counted": outcome.counted,
                "drawing_label_sets": int((drawing.plan.counts > 0).sum()),
                "expected_candidates": drawing.expected_candidates,
                "candidate_sigmas": job.candidate_sigmas, "redrawn_label_sets": drawing.redrawn},
        "inputs": inputs,
        "source_examples": outcome.records,
        "examples_with_weight": outcome.positive,
        "total_copies": drawing.drawn.total,
        "unique_examples": drawing.drawn.unique,
        "copies_histogram": copies_hist,
        "max_copies": max((int(k) for k in copies_hist), default=0),
        "total_variation": total_variation(label_stats),
        "labels_realised": int((label_stats.column("realised_copies").to_numpy() > 0).sum()),
    }
    if job.matcher == "elastic":
        stats["elastic"] = _elastic_facts(drawing.plan, weighting.label_weights)
    if "weights_metadata" in weighting.info:
        stats["weights_metadata"] = weighting.info["weights_metadata"]
    return stats, label_stats


def _elastic_facts(plan: S.ClassPlan, lw: S.LabelWeights | None) -> dict[str, Any]:
    """The water-filling's rate and saturation, in the weights table's units."""
    scale = lw.scale if lw else 1 << S.WEIGHT_BITS
    saturated_labels = 0
    if lw is not None and plan.threshold is not None:
        saturated_labels = int((lw.q >= plan.threshold).sum())
    return {
        # π(x) = min(1, c·w(x)): c in the weights table's units (q = w·scale).
        "c": float(plan.c * Fraction(scale)) if plan.c is not None else None,
        "c_fixed_point": str(plan.c) if plan.c is not None else None,
        "saturated_examples": plan.saturated,
        "saturated_labels": saturated_labels,
        "threshold_weight": plan.threshold / scale if plan.threshold is not None else None,
    }


def write_report(work: str, stats: dict[str, Any], label_stats: pa.Table, labels: str | None) -> None:
    """Write ``label_stats.parquet``, ``label_stats.png`` (label names from the
    vocabulary ``labels``, where given) and ``stats.json`` into ``work``."""
    vocab_names = {}
    if labels:
        vocab = sio.read_parquet(labels)
        vocab_names = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
    sio.write_parquet_atomic(label_stats.drop(["realised_copies"]), sio.join(work, "label_stats.parquet"))
    plot_label_stats(label_stats, sio.join(work, "label_stats.png"), vocab_names)
    sio.write_bytes_atomic(sio.join(work, "stats.json"), sio.json_text(stats, indent=2) + "\n")
