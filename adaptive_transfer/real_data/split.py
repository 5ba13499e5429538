"""Which real image goes where: the source, or a target's train or test split.

Pure: arrays in, row indices out, everything a function of the spec's seed.

1. The data sets are pooled (:func:`make_pool`) and exact duplicates (the
   same 784 bytes) are dropped, the first in pool order kept, so that no
   image is both in a target and in the source (Animal-MNIST holds 284
   duplicated pairs; the pipeline's near-duplicate removal runs later).
2. One seeded permutation orders the images of each leaf. Each target class
   (a leaf) gives its first ``train_per_class`` images to the target's train
   split and the next ``test_per_class`` to its test split; the source takes
   the rest of every leaf, at most ``source_per_class`` each.
3. Each source example carries its leaf; with ``ancestor_fraction`` > 0
   that fraction of them (a separate seeded draw, so the split is unchanged)
   also carries its group or its root (half each). The default is 0, leaf
   only: the paper's source has ~1.26 labels per image from its annotators,
   and which of these images would have had a second label is not known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .datasets import ImageSet

__all__ = ["RealTarget", "RealSpec", "DEFAULT_TARGETS", "Pool", "make_pool", "Split", "plan_split"]


@dataclass(frozen=True)
class RealTarget:
    """A target: its name (the directory under ``targets/``) and its classes
    (leaf names of :mod:`.taxonomy`, also its class directory names)."""

    name: str
    classes: tuple[str, ...]


#: Three targets from the three roots: Fashion-MNIST's footwear and
#: accessories, the 10 animals, the 10 digits.
DEFAULT_TARGETS = (
    RealTarget("fashion-footwear", ("sandal", "sneaker", "ankle_boot", "bag")),
    RealTarget("animal", ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")),
    RealTarget("digit", ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")),
)


@dataclass(frozen=True)
class RealSpec:
    """Sizes and seed of one data draw (another ``seed``: another source /
    target split, the issue's replication over data draws). Defaults: 10
    training and 300 test images per target class, at most 1,000 source
    images per leaf (about 18,800 in all), 4 index files."""

    seed: int = 0
    targets: tuple[RealTarget, ...] = DEFAULT_TARGETS
    train_per_class: int = 10
    test_per_class: int = 300
    #: At most this many source images per leaf; None: every image left.
    source_per_class: int | None = 1000
    ancestor_fraction: float = 0.0
    num_files: int = 4
    row_group_size: int = 1024

    def __post_init__(self) -> None:
        if self.train_per_class < 1 or self.test_per_class < 1:
            raise ValueError("train_per_class and test_per_class must be at least 1")
        if self.source_per_class is not None and self.source_per_class < 1:
            raise ValueError("source_per_class must be at least 1 (or None: all)")
        if not 0.0 <= self.ancestor_fraction <= 1.0:
            raise ValueError(f"ancestor_fraction must be in [0, 1], got {self.ancestor_fraction}")
        if self.num_files < 1 or self.row_group_size < 1:
            raise ValueError("num_files and row_group_size must be at least 1")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"target names must be unique and non-empty: {names}")
        classes = [c for t in self.targets for c in t.classes]
        shared = sorted({c for c in classes if classes.count(c) > 1})
        if shared:
            raise ValueError(f"classes {shared} are in more than one target (or twice in one)")


@dataclass(frozen=True)
class Pool:
    """Every image of the data sets, in a fixed order: ``images`` uint8
    (N, 28, 28), ``leaf`` int32 (N,) label ids, ``origin`` the
    ``<dataset>/<part>/<row>`` name of each, ``source_file`` the data file
    (``<dataset>/<file name>``) and ``row`` int64 (N,) the row in it."""

    images: np.ndarray
    leaf: np.ndarray
    origin: np.ndarray
    source_file: np.ndarray
    row: np.ndarray


def make_pool(sets: tuple[ImageSet, ...], leaf_id: dict[str, int]) -> Pool:
    """Pool ``sets`` in their order, each class mapped to its leaf id by name."""
    missing = sorted({c for s in sets for c in s.classes} - set(leaf_id))
    if missing:
        raise ValueError(f"classes {missing} are not leaves of the vocabulary")
    leaf = np.concatenate([np.asarray([leaf_id[c] for c in s.classes], np.int32)[s.labels] for s in sets])
    origin = np.concatenate([np.asarray(s.origins(), dtype=object) for s in sets])
    source_file = np.concatenate([np.asarray([f"{s.dataset}/{f}" for f in s.part_files], dtype=object)[s.part]
                                  for s in sets])
    return Pool(np.concatenate([s.images for s in sets]), leaf, origin, source_file,
                np.concatenate([s.row for s in sets]).astype(np.int64))


@dataclass
class Split:
    """Rows of the pool: ``source`` (in index order), ``targets[name][split]``
    (``train`` / ``test``, by class, then in the seeded order), the
    duplicates dropped, and the labels of each source row
    (``source_labels``, list<int32>, leaf first)."""

    source: np.ndarray
    source_labels: pa.ListArray
    targets: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    duplicates: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _first_of_each_content(images: np.ndarray) -> np.ndarray:
    """Mask of the rows that are the first with their exact pixels."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    _, first = np.unique(flat.view(np.dtype((np.void, flat.shape[1]))).ravel(), return_index=True)
    keep = np.zeros(len(images), bool)
    keep[first] = True
    return keep


def _rank_within_leaf(leaf: np.ndarray, order: np.ndarray) -> np.ndarray:
    """rank[row]: the position of ``row`` among the rows of its leaf in ``order`` (-1: not in it)."""
    by_leaf = order[np.argsort(leaf[order], kind="stable")]
    sorted_leaf = leaf[by_leaf]
    starts = np.searchsorted(sorted_leaf, sorted_leaf, side="left")
    rank = np.full(len(leaf), -1, np.int64)
    rank[by_leaf] = np.arange(len(by_leaf)) - starts
    return rank


def plan_split(pool: Pool, spec: RealSpec, leaf_id: dict[str, int], parent_of: dict[int, int | None]) -> Split:
    """The split of ``pool`` for ``spec`` (see the module's docstring). Raises
    ``ValueError`` when a target names an unknown leaf, a target class has
    too few images, or a leaf would have none left for the source."""
    for t in spec.targets:
        unknown = [c for c in t.classes if c not in leaf_id]
        if unknown:
            raise ValueError(f"target {t.name!r}: classes {unknown} are not leaves of the vocabulary")
    keep = _first_of_each_content(pool.images)
    order = np.random.default_rng([spec.seed, 0x5E11]).permutation(len(pool.leaf))
    order = order[keep[order]]
    rank = _rank_within_leaf(pool.leaf, order)
    available = np.bincount(pool.leaf[keep], minlength=max(leaf_id.values()) + 1)
    taken = np.zeros(len(available), np.int64)
    split = Split(np.zeros(0, np.int64), pa.array([], pa.list_(pa.int32())), duplicates=np.flatnonzero(~keep))
    need = spec.train_per_class + spec.test_per_class
    for t in spec.targets:
        ids = np.asarray([leaf_id[c] for c in t.classes], np.int32)
        short = [(c, int(available[i])) for c, i in zip(t.classes, ids) if available[i] <= need]
        if short:
            raise ValueError(f"target {t.name!r}: {short} (class, distinct images) cannot give {need} target "
                             "images and leave the source at least one")
        taken[ids] = need
        position = {int(i): k for k, i in enumerate(ids)}
        members = np.flatnonzero(np.isin(pool.leaf, ids) & (rank >= 0) & (rank < need))
        members = members[np.lexsort((rank[members], [position[int(i)] for i in pool.leaf[members]]))]
        is_train = rank[members] < spec.train_per_class
        split.targets[t.name] = {"train": members[is_train], "test": members[~is_train]}
    empty = sorted(name for name, i in leaf_id.items() if available[i] - taken[i] < 1)
    if empty:
        raise ValueError(f"leaves {empty} have no image left for the source")
    offset = rank - taken[pool.leaf]
    cap = spec.source_per_class if spec.source_per_class is not None else len(pool.leaf)
    source = np.flatnonzero((rank >= 0) & (offset >= 0) & (offset < cap))
    split.source = np.random.default_rng([spec.seed, 0x50C]).permutation(source)
    split.source_labels = _source_labels(pool.leaf[split.source], spec, parent_of)
    return split


def _source_labels(leaves: np.ndarray, spec: RealSpec, parent_of: dict[int, int | None]) -> pa.ListArray:
    """Each source row's labels: its leaf, and for ``ancestor_fraction`` of
    them its group or root (half each), from a draw of its own."""
    parent = np.full(max(parent_of) + 1, -1, np.int64)
    for child, par in parent_of.items():
        parent[child] = -1 if par is None else par
    rng = np.random.default_rng([spec.seed, 0xA7])
    extra = rng.random(len(leaves)) < spec.ancestor_fraction
    to_root = rng.random(len(leaves)) < 0.5
    group = parent[leaves]
    root = np.where(group >= 0, parent[np.maximum(group, 0)], -1)
    ancestor = np.where(to_root & (root >= 0), root, group)
    extra &= ancestor >= 0
    offsets = np.concatenate([[0], np.cumsum(1 + extra)]).astype(np.int32)
    values = np.empty(offsets[-1], np.int32)
    values[offsets[:-1]] = leaves
    values[offsets[:-1][extra] + 1] = ancestor[extra]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))
