"""The label hierarchy of a vocabulary table: descendants and names.

Hand-picked subsets (the paper's "JFT - Bird", "JFT - Animal", ...) are every
label at or below a named node.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from typing import Iterable

import numpy as np
import pyarrow as pa

from .validate import validate_vocabulary

__all__ = ["Hierarchy"]


class Hierarchy:
    """Parent/child relations of a validated label vocabulary."""

    def __init__(self, vocabulary: pa.Table, file: str | None = None):
        validate_vocabulary(vocabulary, file)
        ids = vocabulary.column("label_id").to_pylist()
        names = vocabulary.column("name").to_pylist()
        parents = vocabulary.column("parent_id").to_pylist()
        self.label_ids = np.asarray(sorted(ids), dtype=np.int32)
        self.name_of: dict[int, str] = dict(zip(ids, names))
        self.parent_of: dict[int, int | None] = dict(zip(ids, parents))
        self.children_of: dict[int, list[int]] = defaultdict(list)
        for lid, parent in zip(ids, parents):
            if parent is not None:
                self.children_of[parent].append(lid)
        self._ids_by_name: dict[str, list[int]] = defaultdict(list)
        for lid, name in zip(ids, names):
            self._ids_by_name[name].append(lid)

    def descendants(self, label_id: int) -> np.ndarray:
        """All labels at or below ``label_id`` (sorted int32 array)."""
        if label_id not in self.parent_of:
            raise ValueError(f"label {label_id} is not in the vocabulary")
        out, stack = [], [label_id]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(self.children_of.get(node, ()))
        return np.asarray(sorted(out), dtype=np.int32)

    def ids_for_name(self, name: str) -> list[int]:
        """Label ids whose name is ``name``; unknown names get suggestions."""
        if name not in self._ids_by_name:
            close = difflib.get_close_matches(name, list(self._ids_by_name), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"label name {name!r} is not in the vocabulary{hint}")
        return list(self._ids_by_name[name])

    def descendants_of_names(self, names: Iterable[str]) -> np.ndarray:
        """Union of the descendants (inclusive) of every label called one of ``names``."""
        found: set[int] = set()
        for name in names:
            for lid in self.ids_for_name(name):
                found.update(self.descendants(lid).tolist())
        return np.asarray(sorted(found), dtype=np.int32)
