"""Planted near-duplicates for the near-duplicate tests (test-only data).

:func:`plant_near_duplicates` writes a source index file of near-duplicates of
a generated target's images (:func:`near_duplicate`, one of
:data:`NEAR_DUPLICATE_KINDS`) and hard negatives (other images of the
target's classes, :func:`render_target_class`), with the truth about each.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from adaptive_transfer.synthetic import (TargetData, TargetSpec, add_clutter, encode_image, leaf_style, leaf_table,
                                         make_vocabulary, render_images, wnid)
from schemas.arrow import INDEX_SCHEMA_INLINE

__all__ = ["NEAR_DUPLICATE_KINDS", "near_duplicate", "render_target_class", "PlantedSource",
           "plant_near_duplicates"]

#: Transformations :func:`near_duplicate` applies to make a near-duplicate.
NEAR_DUPLICATE_KINDS = ("jpeg", "resize", "crop", "shift", "colour")


def near_duplicate(data: bytes, kind: str, rng: np.random.Generator, max_shift: float = 0.04) -> bytes:
    """A near-duplicate of the encoded image ``data`` as JPEG bytes.

    ``kind`` (:data:`NEAR_DUPLICATE_KINDS`): ``jpeg`` re-encodes at quality
    40-75; ``resize`` scales by 0.75, 1.5 or 2; ``crop`` cuts 0 to
    ``max_shift`` of the side off each edge independently (at least one pixel
    in all); ``shift`` moves the content by up to ``max_shift`` of the side
    (at least one pixel; the edge repeated); ``colour`` scales brightness and
    contrast by 0.9-1.1 and saturation by 0.85-1.15. All but ``jpeg`` are saved
    at quality 90.
    """
    from PIL import ImageEnhance

    if kind not in NEAR_DUPLICATE_KINDS:
        raise ValueError(f"unknown near-duplicate kind {kind!r}; known: {', '.join(NEAR_DUPLICATE_KINDS)}")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    margin = max(1, int(round(max_shift * min(w, h))))
    quality = 90
    if kind == "jpeg":
        quality = int(rng.integers(40, 76))
    elif kind == "resize":
        scale = float(rng.choice([0.75, 1.5, 2.0]))
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    elif kind == "crop":
        cut = np.zeros(4, int)
        while not cut.any():
            cut = rng.integers(0, margin + 1, 4)
        img = img.crop((int(cut[0]), int(cut[1]), w - int(cut[2]), h - int(cut[3])))
    elif kind == "shift":
        dx = dy = 0
        while dx == 0 and dy == 0:
            dx, dy = (int(v) for v in rng.integers(-margin, margin + 1, 2))
        padded = np.pad(np.asarray(img), ((margin, margin), (margin, margin), (0, 0)), mode="edge")
        img = Image.fromarray(padded[margin + dy:margin + dy + h, margin + dx:margin + dx + w])
    else:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.9, 1.1))
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.85, 1.15))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def render_target_class(spec: TargetSpec, leaf: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` new (N, H, W, 3) uint8 images of the target class rendered like
    source leaf ``leaf`` (:attr:`TargetData.class_to_leaf`), exactly as
    :func:`generate_target` renders that class (domain shift and clutter), from
    ``rng``: other images of the same class, never one of the target's."""
    leaves = {entry["leaf"]: entry for entry in leaf_table(make_vocabulary(spec.leaves_per_group))}
    if leaf not in leaves:
        raise ValueError(f"label {leaf} is not a leaf of the generated hierarchy")
    style = leaf_style(leaves[leaf])
    pixels = render_images(style, count, rng, spec.image_size, shift=spec.domain_shift)
    return add_clutter(pixels, rng, spec.clutter) if spec.clutter else pixels


@dataclass
class PlantedSource:
    """A source index file of planted examples and the truth about them.

    ``copies``: key -> (target image path, target split, kind) of each planted
    near-duplicate; ``negatives``: keys of the other images of the target's
    classes (hard negatives: never duplicates of a target image).
    """

    index_path: str
    copies: dict[str, tuple[str, str, str]]
    negatives: list[str]


def plant_near_duplicates(index_path: str, target: TargetData, spec: TargetSpec, copies_per_kind: int = 40,
                          negatives_per_class: int = 50, kinds: Sequence[str] = NEAR_DUPLICATE_KINDS,
                          seed: int = 0) -> PlantedSource:
    """Write one source index Parquet file (``index_path``, inline JPEGs) of
    planted examples for ``target`` (made by :func:`generate_target` with
    ``spec``): for each of ``kinds``, ``copies_per_kind`` near-duplicates of
    target images drawn from train and test in proportion (each image at most
    once per kind), and ``negatives_per_class`` new images of each target
    class. Each example is labelled with its class's source leaf; keys say
    nothing about what they are (``planted/nNNNNNNNN_<i>.JPEG``, shuffled)."""
    rng = np.random.default_rng([seed, 0xD0])
    items = [(os.path.join(target.root, rel), split, cls) for split in ("train", "test")
             for rel, cls in target.splits[split]]
    examples: list[tuple[str, int, bytes, tuple | None]] = []
    for kind in kinds:
        if copies_per_kind > len(items):
            raise ValueError(f"{copies_per_kind} copies per kind but the target has {len(items)} images")
        for i in rng.choice(len(items), copies_per_kind, replace=False):
            path, split, cls = items[int(i)]
            with open(path, "rb") as fh:
                copy = near_duplicate(fh.read(), kind, rng)
            examples.append(("dup", target.class_to_leaf[cls], copy, (path, split, kind)))
    for cls in target.classes:
        leaf = target.class_to_leaf[cls]
        for pixels in render_target_class(spec, leaf, negatives_per_class, rng):
            examples.append(("neg", leaf, encode_image(pixels, "JPEG"), None))
    order = rng.permutation(len(examples))
    keys, labels, images, copies, negatives = [], [], [], {}, []
    for n, i in enumerate(order):
        what, leaf, data, truth = examples[int(i)]
        key = f"planted/{wnid(leaf)}_{n}.JPEG"
        keys.append(key)
        labels.append([leaf])
        images.append(data)
        if truth is None:
            negatives.append(key)
        else:
            copies[key] = truth
    table = pa.table({"key": pa.array(keys, pa.string()), "labels": pa.array(labels, pa.list_(pa.int32())),
                      "image": pa.array(images, pa.binary())}, schema=INDEX_SCHEMA_INLINE)
    os.makedirs(os.path.dirname(os.path.abspath(index_path)), exist_ok=True)
    pq.write_table(table, index_path, row_group_size=256)
    return PlantedSource(index_path, copies, negatives)
