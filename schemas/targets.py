"""Target datasets in their real on-disk layouts: list a split's images.

A layout turns ``(root, split)`` into the class names and the list of
``(image path, class index)``. Paths are local paths or URLs (``gs://``,
``s3://``) under ``root``, read through fsspec. The Beam pipeline uses only
the paths (target labels are never used to compute P_t); the trainer uses
both.

Layouts: ``imagefolder`` (``<root>/<split>/<class>/<file>``) and
``food101`` (``images/<class>/<id>.jpg`` listed by ``meta/<split>.txt``,
classes in ``meta/classes.txt``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import io as sio
from .errors import SchemaError

__all__ = ["TargetSplit", "LAYOUTS", "list_target", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class TargetSplit:
    """One split of a target dataset: class names and (image path, class index)."""

    layout: str
    root: str
    split: str
    classes: list[str]
    items: list[tuple[str, int]] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.items]

    @property
    def labels(self) -> list[int]:
        return [c for _, c in self.items]


def _read_lines(path: str) -> list[str]:
    try:
        text = sio.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (is the dataset root right?)") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _imagefolder(root: str, split: str) -> TargetSplit:
    base = sio.join(root, split)
    fs, p = sio.filesystem(base)
    if not fs.isdir(p):
        raise FileNotFoundError(f"{base}: no such split directory (imagefolder layout is "
                                "<root>/<split>/<class>/<image>)")
    classes = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(p, detail=False)
                     if fs.isdir(entry))
    if not classes:
        raise SchemaError("no class directories", file=base)
    items = []
    for index, cls in enumerate(classes):
        files = sorted(f for f in fs.find(f"{p}/{cls}") if f.lower().endswith(IMAGE_EXTENSIONS))
        items += [(sio.join(base, f[len(p):]) if "://" in base else f, index) for f in files]
    return TargetSplit("imagefolder", root, split, classes, items)


def _food101(root: str, split: str) -> TargetSplit:
    classes = _read_lines(sio.join(root, "meta", "classes.txt"))
    index = {c: i for i, c in enumerate(classes)}
    items = []
    split_file = sio.join(root, "meta", f"{split}.txt")
    for n, line in enumerate(_read_lines(split_file)):
        cls = line.split("/", 1)[0]
        if cls not in index:
            raise SchemaError(f"class {cls!r} of {line!r} is not in meta/classes.txt",
                              file=split_file, row=n)
        items.append((sio.join(root, "images", f"{line}.jpg"), index[cls]))
    return TargetSplit("food101", root, split, classes, items)


LAYOUTS: dict[str, Callable[[str, str], TargetSplit]] = {
    "imagefolder": _imagefolder,
    "food101": _food101,
}


def list_target(root: str, layout: str, split: str = "train") -> TargetSplit:
    """List ``split`` of the dataset at ``root`` in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown target layout {layout!r}; known: {', '.join(sorted(LAYOUTS))}")
    result = LAYOUTS[layout](root.rstrip("/"), split)
    if not result.items:
        raise SchemaError(f"split {split!r} lists no images", file=root)
    return result
