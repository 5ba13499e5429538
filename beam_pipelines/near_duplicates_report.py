"""Figures of the near-duplicates stage: the best-similarity histogram with
the threshold marked, and a contact sheet of the pairs nearest the threshold."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from schemas import io as sio

__all__ = ["Pair", "plot_similarity_histogram", "plot_contact_sheet"]

#: Side of each thumbnail on the contact sheet, pixels.
THUMBNAIL = 96


@dataclass
class Pair:
    """A source example and its most similar target image: their encoded
    bytes (``None``: could not be read) and what to print under them."""

    similarity: float
    source: bytes | None
    target: bytes | None
    source_label: str
    target_label: str


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, dpi: int = 110) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    sio.write_bytes_atomic(path, buf.getvalue())


def plot_similarity_histogram(counts: np.ndarray, edges: np.ndarray, threshold: float, path: str,
                              title: str) -> None:
    """Bars of ``counts`` over ``edges`` (log scale) from the lowest non-empty
    bin to 1.0, a line at ``threshold`` and how many fall on each side; PNG to
    ``path`` (any filesystem)."""
    plt = _pyplot()
    counts = np.asarray(counts, np.int64)
    nonzero = np.flatnonzero(counts)
    first = int(nonzero[0]) if nonzero.size else 0
    lo = min(edges[first], threshold - 0.02)
    keep = edges[:-1] >= lo - 1e-12
    fig, ax = plt.subplots(figsize=(8, 4))
    widths = np.diff(edges)[keep]
    ax.bar(edges[:-1][keep], np.maximum(counts[keep], 0), width=widths, align="edge", color="#4c72b0")
    if counts.any():
        ax.set_yscale("log")
    ax.axvline(threshold, color="#c44e52", linestyle="--", linewidth=1.5)
    centres = (edges[:-1] + edges[1:]) / 2
    above = int(counts[centres >= threshold].sum())
    ax.text(threshold, 0.95, f"  threshold {threshold:.4g}\n  {above:,} at or above (approx.)",
            transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="#c44e52")
    ax.set_xlim(lo, 1.0)
    ax.set_xlabel("best cosine similarity of a source example to any target image")
    ax.set_ylabel("source examples")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _thumbnail(data: bytes | None) -> np.ndarray:
    from PIL import Image

    if data is None:
        return np.full((THUMBNAIL, THUMBNAIL, 3), 220, np.uint8)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return np.asarray(img.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR))
    except Exception:  # noqa: BLE001 - a picture we cannot show is shown grey
        return np.full((THUMBNAIL, THUMBNAIL, 3), 220, np.uint8)


def plot_contact_sheet(above: Sequence[Pair], below: Sequence[Pair], threshold: float, path: str,
                       title: str) -> None:
    """Two blocks of columns, each row a (source, target) pair: left, the pairs
    just at or above ``threshold`` (removed), nearest first; right, those just
    below it (kept). PNG to ``path``."""
    plt = _pyplot()
    rows = max(len(above), len(below), 1)
    fig, axes = plt.subplots(rows, 4, figsize=(8.4, 2.15 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for block, pairs in enumerate((above, below)):
            left, right = axes[r][2 * block], axes[r][2 * block + 1]
            for ax in (left, right):
                ax.set_xticks([])
                ax.set_yticks([])
            if r >= len(pairs):
                left.axis("off")
                right.axis("off")
                continue
            pair = pairs[r]
            colour = "#c44e52" if block == 0 else "#4c72b0"
            left.imshow(_thumbnail(pair.source))
            right.imshow(_thumbnail(pair.target))
            left.set_title(f"{pair.similarity:.4f} source", fontsize=7, color=colour)
            right.set_title("target", fontsize=7, color=colour)
            left.set_xlabel(pair.source_label[-28:], fontsize=6)
            right.set_xlabel(pair.target_label[-28:], fontsize=6)
    fig.suptitle(f"{title}\nleft: nearest at or above {threshold:.4g} (removed)   "
                 f"right: nearest below (kept)", fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=80)
