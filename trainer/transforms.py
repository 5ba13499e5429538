"""Image preprocessing shared by the trainer and the Beam pipeline (PIL + numpy).

``eval_transform`` is exactly what the generalist sees when the Beam pipeline
computes P_t, and what evaluation uses: decode, RGB, resize the shorter side
to ``resize``, centre crop ``input_size``, scale to [0, 1], normalise.
``train_transform`` adds the paper's augmentation (random resized crop and
horizontal flip), driven by an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["PreprocessSpec", "HashRNG", "decode_image", "eval_transform", "train_transform",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """Model input: ``input_size`` square pixels, after resizing the shorter
    side to ``resize`` (default ``round(input_size / 0.875)``); normalised
    with ``mean``/``std`` on [0, 1] RGB."""

    input_size: int
    resize: int | None = None
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resize is None:
            object.__setattr__(self, "resize", int(round(self.input_size / 0.875)))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        return asdict(self)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class HashRNG:
    """Counter-based random numbers keyed by integers (SplitMix64).

    A handful of draws per sample (crop, flip) keyed by the sample's position
    in the stream: reproducible after a restart with no state to save, and
    ~20x cheaper to create than a seeded ``numpy.random.Generator``.
    Implements the ``random``, ``uniform`` and ``integers`` calls that
    :func:`train_transform` makes.
    """

    __slots__ = ("_state",)

    def __init__(self, *key: int):
        state = 0
        for k in key:
            state = _splitmix64(state ^ (int(k) & _MASK64))
        self._state = state

    def _next(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        return _splitmix64(self._state)

    def random(self) -> float:
        """Uniform in [0, 1) with 53 random bits."""
        return (self._next() >> 11) * (1.0 / (1 << 53))

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * self.random()

    def integers(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        span = int(high) - int(low)
        if span <= 0:
            raise ValueError(f"empty range [{low}, {high})")
        return int(low) + (self._next() % span)


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image; raises on corrupt data."""
    img = Image.open(io.BytesIO(data))
    img.load()  # force decoding now: truncated files fail here, not later
    return img.convert("RGB")


def _normalise(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def eval_transform(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize shorter side to ``spec.resize``, centre crop, normalise: float32 CHW."""
    w, h = img.size
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.input_size, round(w * scale)), max(spec.input_size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - spec.input_size) // 2, (nh - spec.input_size) // 2
    img = img.crop((left, top, left + spec.input_size, top + spec.input_size))
    return _normalise(img, spec)


def train_transform(img: Image.Image, spec: PreprocessSpec, rng: "np.random.Generator | HashRNG",
                    scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Random resized crop (area ``scale``, aspect ``ratio``) + horizontal flip."""
    w, h = img.size
    area = w * h
    box = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (left, top, left + cw, top + ch)
            break
    if box is None:  # fall back to a centre crop of the whole image
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    img = img.resize((spec.input_size, spec.input_size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _normalise(img, spec)
