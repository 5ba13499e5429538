"""The label hierarchy of the real source: roots ``clothing``, ``animal``,
``digit``; groups under them; the data sets' classes as leaves.

Groups (a choice, recorded here and in the vocabulary):

* clothing (Fashion-MNIST): ``tops`` (t-shirt/top, pullover, shirt, coat,
  dress), ``bottoms`` (trouser), ``footwear`` (sandal, sneaker, ankle boot),
  ``accessories`` (bag);
* animal (Animal-MNIST, COCO's 10 animals): ``pets`` (cat, dog),
  ``livestock`` (cow, horse, sheep), ``wildlife`` (bear, elephant, giraffe,
  zebra), ``birds`` (bird);
* digit (MNIST): by the shape of the stroke, so that a group shares visual
  features as a JFT group does: ``looped`` (0, 6, 8, 9: a closed loop),
  ``straight`` (1, 4, 7: straight strokes), ``curved`` (2, 3, 5: open curves).

Label ids: roots first, then groups, then leaves, in the order written here
(as :func:`adaptive_transfer.synthetic.make_vocabulary` numbers them).
"""

from __future__ import annotations

import pyarrow as pa

from schemas.arrow import VOCABULARY_SCHEMA

from .catalog import ANIMAL_CLASSES, DIGIT_CLASSES, FASHION_CLASSES

__all__ = ["TAXONOMY", "DATASET_ROOT", "make_vocabulary", "leaf_ids"]

#: root -> group -> leaves.
TAXONOMY: dict[str, dict[str, tuple[str, ...]]] = {
    "clothing": {
        "tops": ("t_shirt_top", "pullover", "shirt", "coat", "dress"),
        "bottoms": ("trouser",),
        "footwear": ("sandal", "sneaker", "ankle_boot"),
        "accessories": ("bag",),
    },
    "animal": {
        "pets": ("cat", "dog"),
        "livestock": ("cow", "horse", "sheep"),
        "wildlife": ("bear", "elephant", "giraffe", "zebra"),
        "birds": ("bird",),
    },
    "digit": {
        "looped": ("zero", "six", "eight", "nine"),
        "straight": ("one", "four", "seven"),
        "curved": ("two", "three", "five"),
    },
}

#: The root each data set's classes live under.
DATASET_ROOT = {"fashion-mnist": "clothing", "animal-mnist": "animal", "mnist-digits": "digit"}

_CLASSES = {"fashion-mnist": FASHION_CLASSES, "animal-mnist": ANIMAL_CLASSES, "mnist-digits": DIGIT_CLASSES}
for _dataset, _root in DATASET_ROOT.items():  # every class is a leaf of its data set's root, once
    _leaves = sorted(leaf for group in TAXONOMY[_root].values() for leaf in group)
    if _leaves != sorted(_CLASSES[_dataset]):
        raise ImportError(f"taxonomy: the leaves of {_root!r} are not the classes of {_dataset}")


def make_vocabulary() -> pa.Table:
    """The label vocabulary (``label_id``, ``name``, ``parent_id``): roots, then groups, then leaves."""
    ids, names, parents = [], [], []

    def add(name: str, parent: int | None) -> int:
        ids.append(len(ids)); names.append(name); parents.append(parent)
        return ids[-1]

    root_id = {root: add(root, None) for root in TAXONOMY}
    group_id = {group: add(group, root_id[root]) for root, groups in TAXONOMY.items() for group in groups}
    for groups in TAXONOMY.values():
        for group, leaves in groups.items():
            for leaf in leaves:
                add(leaf, group_id[group])
    return pa.table({"label_id": pa.array(ids, pa.int32()), "name": pa.array(names, pa.string()),
                     "parent_id": pa.array(parents, pa.int32())}, schema=VOCABULARY_SCHEMA)


def leaf_ids(vocabulary: pa.Table) -> dict[str, int]:
    """Leaf name -> label id (leaves: labels that are nobody's parent)."""
    parents = set(vocabulary.column("parent_id").drop_null().to_pylist())
    return {name: lid for lid, name in zip(vocabulary.column("label_id").to_pylist(),
                                           vocabulary.column("name").to_pylist()) if lid not in parents}
