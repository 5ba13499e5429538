"""Figures of the weights pipeline: the paper's Figure 2 for one target."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from schemas import io as sio

__all__ = ["plot_top_weights"]


def plot_top_weights(weights: pa.Table, names: dict[int, str], path: str, top: int = 100,
                     title: str | None = None) -> None:
    """Bar chart of the ``top`` labels by importance weight, with their names
    (Figure 2 of the paper), written as PNG to ``path`` (any filesystem)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = weights.column("label_id").to_numpy()
    w = weights.column("weight").to_numpy()
    order = np.lexsort((ids, -w))[:top]
    order = order[w[order] > 0]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(order) + 2), 4.5))
    ax.bar(np.arange(len(order)), w[order], color="#4c72b0")
    ax.set_xticks(np.arange(len(order)), [names.get(int(i), str(int(i))) for i in ids[order]],
                  rotation=90, fontsize=6)
    ax.set_xlim(-0.6, max(len(order), 1) - 0.4)
    ax.set_ylabel("importance weight  P_t(y) / P_s(y)")
    ax.set_title(title or f"Top {len(order)} source labels by importance weight")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    sio.write_bytes_atomic(path, buf.getvalue())
