"""Images re-encoded for shards (``write_shards --max-side N --quality Q``).

:func:`reencode_image` shrinks an image whose longer side exceeds a bound to
a JPEG with fixed encoder settings and no metadata, so equal inputs give
byte-identical images (docs/design.md, "Shards").
"""

from __future__ import annotations

import io

__all__ = ["fit_within", "reencode_image", "encoder_version", "REENCODE_QUALITY"]


#: ``write_shards --quality``'s default: ImageNet's JPEGs are mostly about this.
REENCODE_QUALITY = 90


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size of a ``width`` x ``height`` image scaled so that its longer
    side is ``max_side`` (aspect ratio kept, the shorter side rounded half up,
    at least 1); the size itself when the longer side is at most ``max_side``."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    # round(v * max_side / longer) in integers (half up); the longer side gives max_side exactly.
    return tuple(max(1, (2 * v * max_side + longer) // (2 * longer)) for v in (width, height))


def reencode_image(data, max_side: int, quality: int = REENCODE_QUALITY) -> bytes | None:
    """``None`` when the image's longer side is at most ``max_side`` (keep its
    bytes); else the image scaled to :func:`fit_within` and encoded as a
    baseline JPEG at ``quality`` (4:2:0 chroma, optimised Huffman tables; no
    EXIF, ICC profile, DPI or comment: what the trainer decodes, as RGB or
    grayscale, and nothing else). A JPEG is first decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that keeps at least twice the target size, as
    ``Image.thumbnail`` does, then resized with Lanczos. Deterministic: the
    same bytes, settings and Pillow/libjpeg-turbo give the same output bytes.
    Raises when the image cannot be read or decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names the buffer's address: not reproducible
        raise UnidentifiedImageError("cannot identify image file") from None
    width, height = img.size
    if max(width, height) <= max_side:
        return None
    size = fit_within(width, height, max_side)
    img.draft("RGB", (2 * size[0], 2 * size[1]))  # JPEG only; never below twice the target
    img.load()
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # as the trainer's decode does (alpha, palette, CMYK, 16-bit)
    out = io.BytesIO()
    img.resize(size, Image.LANCZOS).save(out, "JPEG", quality=quality, subsampling="4:2:0", optimize=True,
                                         progressive=False)
    return out.getvalue()


def encoder_version() -> str:
    """The encoder behind :func:`reencode_image` (its output bytes depend on it)."""
    import PIL
    from PIL import features

    turbo = features.version("libjpeg_turbo")
    return f"Pillow {PIL.__version__}, " + (f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {features.version('jpg')}")
