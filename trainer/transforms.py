"""Image preprocessing shared by the trainer and the Beam pipeline (PIL + numpy).

``eval_transform`` is exactly what the generalist sees when the Beam pipeline
computes P_t, and what evaluation uses: decode, RGB, resize the shorter side
to ``resize``, centre crop ``input_size``, scale to [0, 1], normalise.
``train_transform`` adds the paper's augmentation (random resized crop and
horizontal flip), driven by an explicit ``numpy.random.Generator``.

``train_sample`` is what the trainer's loaders run on a sample's bytes: the
crop box is drawn from the image's size (read from its header) *before*
decoding, so that with ``decode_scaling="draft"`` a JPEG can be decoded at
1/2, 1/4 or 1/8 of its size in the DCT domain (PIL ``Image.draft``,
libjpeg-turbo's scaled IDCT) whenever the box, at that scale, still has at
least ``input_size`` pixels on each side (:func:`draft_factor`): the final
resize never enlarges what the full decode would have shrunk. The pixels
differ from a full decode (a different resampling path: the scaled IDCT
drops the block's high frequencies, then the bilinear resize shrinks by the
remaining factor) and the random draws do not: the same box and flip, in
the same order, as :func:`train_transform`. ``decode_scaling="none"`` gives
exactly :func:`train_transform` of :func:`decode_image`.

One decoding for every image the project reads (the trainer's loaders, and
the Beam stages through the generalist's preprocessing): the picture as it
is meant to be seen, in 8-bit RGB. EXIF orientation is applied (a phone's
portrait photo stands upright; the crop box is drawn in the upright
picture), 16-bit greyscale (PNG, TIFF) is scaled to 8 bits (not clipped to
white), CMYK (Adobe's inverted JPEGs included), palette, greyscale and alpha
images are converted by Pillow. With
``normalise=False`` it returns the uint8 CHW crop instead, a quarter of the
bytes to move between processes and to the device, where
:func:`normalise_batch` gives exactly the float32 values the CPU path would
(the pre-training loader does this: the normalisation runs on the GPU).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["PreprocessSpec", "HashRNG", "decode_image", "eval_transform", "train_transform", "train_sample",
           "decode_for_crop", "normalise_batch", "crop_box", "draft_factor", "DECODE_SCALINGS",
           "DEFAULT_DECODE_SCALING", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``decode_scaling`` values: decode every image whole, or let a JPEG decode
#: at 1/2, 1/4 or 1/8 scale when the crop allows it (:func:`train_sample`).
DECODE_SCALINGS = ("none", "draft")
#: The trainer's default (benchmarks/README.md: the loader's throughput with
#: each, measured on ImageNet-like JPEGs).
DEFAULT_DECODE_SCALING = "draft"
#: The DCT-domain scale denominators PIL's JPEG draft mode offers, largest first.
DRAFT_FACTORS = (8, 4, 2)


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
    """Decode encoded image bytes to an upright RGB PIL image (module
    docstring: EXIF orientation, 16-bit greyscale); raises on corrupt data."""
    img = Image.open(io.BytesIO(data))
    orientation = _orientation(img)
    img.load()  # force decoding now: truncated files fail here, not later
    return _rgb(_upright(img, orientation))


#: 16-bit greyscale modes (Pillow: PNG and TIFF open as ``I;16``; older Pillow gave ``I``).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: EXIF orientations that swap width and height.
_TRANSPOSED = (5, 6, 7, 8)
_ORIENT = {2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
           4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,),
           6: (Image.Transpose.ROTATE_270,), 7: (Image.Transpose.TRANSVERSE,), 8: (Image.Transpose.ROTATE_90,)}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image (1: as stored)."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the picture as stored
        return 1
    return value if value in _ORIENT else 1


def _upright(img: Image.Image, orientation: int) -> Image.Image:
    """``img`` turned as its EXIF ``orientation`` says (as ``ImageOps.exif_transpose``)."""
    for method in _ORIENT.get(orientation, ()):
        img = img.transpose(method)
    return img


def _rgb(img: Image.Image) -> Image.Image:
    """``img`` in 8-bit RGB (``convert`` copies even an RGB image: skipped
    then). 16-bit greyscale is scaled to 8 bits, rounded (Pillow's
    ``convert`` would clip it: nearly every pixel white)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    return img.convert("RGB")


@lru_cache(maxsize=16)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: ``(v / 255 - mean[c]) / std[c]`` for every byte value
    ``v``, computed in float32 exactly as the formula on a float32 image."""
    values = np.arange(256, dtype=np.float32) / 255.0
    return (values[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


def _normalise(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> float32 CHW ``(x / 255 - mean) / std``: one table lookup
    per channel (bit-identical to the formula, several times faster than
    broadcasting over the channels' last axis)."""
    arr = np.asarray(img)
    table = _normalise_table(spec.mean, spec.std)
    out = np.empty((3,) + arr.shape[:2], np.float32)
    for c in range(3):
        np.take(table[c], arr[:, :, c], out=out[c])
    return out


def _chw(img: Image.Image) -> np.ndarray:
    """RGB image -> uint8 CHW array."""
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))


def normalise_batch(x: "torch.Tensor", spec: PreprocessSpec) -> "torch.Tensor":
    """uint8 images ``(..., 3, H, W)`` (on any device) -> float32
    ``(x / 255 - mean) / std``, the same float32 operations as the CPU path,
    so the values are bit-identical to :func:`train_sample`'s normalised
    output (IEEE division on CPU and CUDA)."""
    import torch

    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)  # in place: one new tensor


def eval_transform(img: Image.Image, spec: PreprocessSpec, normalise: bool = True) -> np.ndarray:
    """Resize shorter side to ``spec.resize``, centre crop, normalise: float32
    CHW (``normalise=False``: the uint8 CHW crop)."""
    w, h = img.size
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.input_size, round(w * scale)), max(spec.input_size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - spec.input_size) // 2, (nh - spec.input_size) // 2
    img = img.crop((left, top, left + spec.input_size, top + spec.input_size))
    return _normalise(img, spec) if normalise else _chw(img)


def crop_box(width: int, height: int, rng: "np.random.Generator | HashRNG",
             scale: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The random resized crop's box ``(left, top, right, bottom)`` in an image
    of ``width`` x ``height`` pixels: area a fraction in ``scale`` of the
    image's, aspect ratio (width / height) log-uniform in ``ratio``, up to 10
    tries, else the centred largest square. Draws only from ``rng``, so it
    can run before the image is decoded."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            left, top = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
            return left, top, left + cw, top + ch
    side = min(width, height)  # fall back to a centre crop of the whole image
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def draft_factor(box_width: int, box_height: int, output_size: int,
                 factors: Sequence[int] = DRAFT_FACTORS) -> int:
    """The largest scale denominator ``d`` in ``factors`` (else 1) at which a
    crop box of ``box_width`` x ``box_height`` pixels still spans at least
    ``output_size`` pixels each way (``box / d >= output_size``): decoding at
    1/d then never leaves the crop fewer pixels than its output has."""
    for d in sorted(factors, reverse=True):
        if box_width >= d * output_size and box_height >= d * output_size:
            return int(d)
    return 1


def _crop_resize_flip(img: Image.Image, box: Sequence[float], spec: PreprocessSpec,
                      rng: "np.random.Generator | HashRNG") -> Image.Image:
    img = img.resize((spec.input_size, spec.input_size), Image.BILINEAR, box=tuple(box))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def train_transform(img: Image.Image, spec: PreprocessSpec, rng: "np.random.Generator | HashRNG",
                    scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Random resized crop (area ``scale``, aspect ``ratio``) + horizontal flip."""
    w, h = img.size
    return _normalise(_crop_resize_flip(img, crop_box(w, h, rng, scale, ratio), spec, rng), spec)


def decode_for_crop(data: bytes, output_size: int, rng: "np.random.Generator | HashRNG",
                    decode_scaling: str = "none") -> tuple[Image.Image, tuple[float, ...]]:
    """Draw the random resized crop's box from the image's size (its header)
    and decode the image: ``(RGB image, the box in that image's pixels)``.
    With ``decode_scaling="draft"`` a JPEG decodes at 1/d of its size, d from
    :func:`draft_factor` (the box keeps at least ``output_size`` pixels each
    way), and the box is scaled to match (a decoded pixel x is source pixel
    x * d). Raises on corrupt data."""
    if decode_scaling not in DECODE_SCALINGS:
        raise ValueError(f"decode_scaling must be one of {DECODE_SCALINGS}, got {decode_scaling!r}")
    img = Image.open(io.BytesIO(data))
    orientation = _orientation(img)
    w, h = img.size  # as stored
    upright = (h, w) if orientation in _TRANSPOSED else (w, h)
    box: tuple[float, ...] = crop_box(*upright, rng)
    if decode_scaling == "draft" and img.format == "JPEG":
        d = draft_factor(box[2] - box[0], box[3] - box[1], output_size)
        if d > 1:
            # PIL decodes at 1/s for the largest s in (8, 4, 2, 1) that is at most
            # min(w // (w // d), h // (h // d)), which is d; the scale it chose is
            # read back from the box it returns (the same on both sides).
            drafted = img.draft("RGB", (w // d, h // d))
            if drafted is not None:
                s = w / drafted[1][2]
                box = tuple(v / s for v in box)
    img.load()  # truncated data fails here
    return _rgb(_upright(img, orientation)), box


def train_sample(data: bytes, spec: PreprocessSpec, rng: "np.random.Generator | HashRNG",
                 decode_scaling: str = "none", normalise: bool = True) -> np.ndarray:
    """Encoded image bytes -> the augmented, normalised float32 CHW input:
    :func:`decode_for_crop` (the crop box first, then the decode, at a
    reduced scale where ``decode_scaling="draft"`` allows), then
    :func:`train_transform`'s resize, flip and normalisation. The draws are
    :func:`train_transform`'s, in its order; with ``"none"`` the result
    equals ``train_transform(decode_image(data))``. ``normalise=False``: the
    uint8 CHW crop (:func:`normalise_batch` later). Raises on corrupt data."""
    img, box = decode_for_crop(data, spec.input_size, rng, decode_scaling)
    img = _crop_resize_flip(img, box, spec, rng)
    return _normalise(img, spec) if normalise else _chw(img)
