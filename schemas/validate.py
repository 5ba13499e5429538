"""Validators for the contracts (docs/design.md, "Contracts").

Each raises :class:`~schemas.errors.SchemaError` (a ``ValueError``) whose
message names the file, the first offending row or label, and what is wrong.
Index checks are vectorised over Arrow arrays so they can run on every record
batch of a 300M-row index.
"""

from __future__ import annotations

import math
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import SchemaError

__all__ = [
    "check_index_schema",
    "validate_index_batch",
    "validate_vocabulary",
    "validate_weights", "MAX_WEIGHT", "MIN_TOP_WEIGHT",
    "validate_histogram",
]

HISTOGRAM_SUM_TOLERANCE = 1e-6


def _first_true(mask: pa.Array | np.ndarray) -> int | None:
    arr = mask.to_numpy(zero_copy_only=False) if isinstance(mask, (pa.Array, pa.ChunkedArray)) else mask
    hits = np.flatnonzero(arr)
    return int(hits[0]) if hits.size else None


def _key_at(batch: pa.RecordBatch | pa.Table, i: int) -> str | None:
    if "key" not in batch.schema.names:
        return None
    return batch.column("key")[i].as_py()


def check_index_schema(schema: pa.Schema, file: str | None = None) -> str:
    """Check the columns of a source index; return the image column in use.

    Returns ``"image"`` when bytes are inline, else ``"uri"``.
    """
    names = set(schema.names)
    for required in ("key", "labels"):
        if required not in names:
            raise SchemaError(f"source index has no '{required}' column "
                              f"(columns: {sorted(names)})", file=file)
    if not pa.types.is_string(schema.field("key").type) and not pa.types.is_large_string(schema.field("key").type):
        raise SchemaError(f"column 'key' must be string, got {schema.field('key').type}", file=file)
    labels_type = schema.field("labels").type
    if not (pa.types.is_list(labels_type) or pa.types.is_large_list(labels_type)) \
            or not pa.types.is_integer(labels_type.value_type):
        raise SchemaError(f"column 'labels' must be list<int32>, got {labels_type}", file=file)
    if "image" in names:
        t = schema.field("image").type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            raise SchemaError(f"column 'image' must be binary, got {t}", file=file)
        return "image"
    if "uri" in names:
        return "uri"
    raise SchemaError("source index has neither an 'image' nor a 'uri' column", file=file)


def validate_index_batch(batch: pa.RecordBatch | pa.Table, *, num_labels: int | None = None,
                         label_ids: np.ndarray | None = None, file: str | None = None,
                         row_offset: int = 0) -> None:
    """Validate one batch of a source index.

    ``label_ids`` (sorted or not) is the vocabulary; alternatively
    ``num_labels`` when ids are ``0..num_labels-1``. ``row_offset`` is the
    batch's first row within ``file`` so errors name the row in the file.
    """
    image_col = check_index_schema(batch.schema, file)
    keys = batch.column("key")
    bad = _first_true(pc.is_null(keys))
    if bad is not None:
        raise SchemaError("key is null", file=file, row=row_offset + bad)
    bad = _first_true(pc.equal(pc.utf8_length(keys), 0))
    if bad is not None:
        raise SchemaError("key is empty", file=file, row=row_offset + bad)

    labels = batch.column("labels")
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    bad = _first_true(pc.is_null(labels))
    if bad is not None:
        raise SchemaError("labels is null", file=file, row=row_offset + bad, key=_key_at(batch, bad))
    lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False)
    bad = _first_true(lengths == 0)
    if bad is not None:
        raise SchemaError("labels is empty", file=file, row=row_offset + bad, key=_key_at(batch, bad))
    flat = labels.flatten()
    if flat.null_count:
        parents = pc.list_parent_indices(labels).to_numpy()
        bad = int(parents[_first_true(pc.is_null(flat))])
        raise SchemaError("labels contains a null id", file=file, row=row_offset + bad, key=_key_at(batch, bad))
    values = flat.to_numpy()
    if label_ids is not None:
        vocab = np.unique(np.asarray(label_ids))
        pos = np.searchsorted(vocab, values)
        pos = np.minimum(pos, len(vocab) - 1)
        outside = vocab[pos] != values if len(vocab) else np.ones(len(values), bool)
    elif num_labels is not None:
        outside = (values < 0) | (values >= num_labels)
    else:
        outside = np.zeros(len(values), bool)
    j = _first_true(outside)
    if j is not None:
        parents = pc.list_parent_indices(labels).to_numpy()
        bad = int(parents[j])
        raise SchemaError(f"label {int(values[j])} is not in the label vocabulary",
                          file=file, row=row_offset + bad, key=_key_at(batch, bad))

    if image_col == "image":
        image = batch.column("image")
        missing = pc.is_null(image)
        if "uri" in batch.schema.names:
            missing = pc.and_(missing, pc.is_null(batch.column("uri")))
        bad = _first_true(missing)
        if bad is not None:
            raise SchemaError("neither image nor uri is set", file=file, row=row_offset + bad,
                              key=_key_at(batch, bad))
    else:
        bad = _first_true(pc.fill_null(pc.or_(pc.is_null(batch.column("uri")),
                                              pc.equal(pc.utf8_length(batch.column("uri")), 0)), True))
        if bad is not None:
            raise SchemaError("uri is null or empty and there is no image column", file=file,
                              row=row_offset + bad, key=_key_at(batch, bad))


def validate_vocabulary(table: pa.Table, file: str | None = None) -> None:
    """Check ids are set and unique, parents exist, and the hierarchy has no cycle."""
    for col in ("label_id", "name", "parent_id"):
        if col not in table.schema.names:
            raise SchemaError(f"label vocabulary has no '{col}' column", file=file)
    if table.num_rows == 0:
        raise SchemaError("label vocabulary is empty", file=file)
    ids = table.column("label_id").to_pylist()
    names = table.column("name").to_pylist()
    parents = table.column("parent_id").to_pylist()
    seen: dict[int, int] = {}
    for row, (lid, name) in enumerate(zip(ids, names)):
        if lid is None:
            raise SchemaError("label_id is null", file=file, row=row)
        if lid in seen:
            raise SchemaError(f"duplicate label_id {lid} (also at row {seen[lid]})", file=file, row=row)
        seen[lid] = row
        if name is None or name == "":
            raise SchemaError(f"label {lid} has no name", file=file, row=row)
    parent_of = dict(zip(ids, parents))
    for row, (lid, parent) in enumerate(zip(ids, parents)):
        if parent is not None and parent not in seen:
            raise SchemaError(f"label {lid} ({names[row]!r}) has parent_id {parent}, "
                              "which is not in the vocabulary", file=file, row=row)
    state: dict[int, int] = {}  # 1 = on the current path, 2 = known to reach a root
    for start in ids:
        path = []
        node = start
        while node is not None and state.get(node) != 2:
            if state.get(node) == 1:
                cycle = path[path.index(node):] + [node]
                raise SchemaError("label hierarchy has a cycle: "
                                  + " -> ".join(str(c) for c in cycle), file=file, row=seen[node])
            state[node] = 1
            path.append(node)
            node = parent_of[node]
        for p in path:
            state[p] = 2


def _check_finite_nonnegative(table: pa.Table, column: str, file: str | None, what: str) -> np.ndarray:
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    label_ids = table.column("label_id").to_numpy(zero_copy_only=False) if "label_id" in table.schema.names else None
    for mask, problem in ((np.isnan(values), "is NaN"), (np.isinf(values), "is infinite"),
                          (values < 0, "is negative")):
        j = _first_true(mask)
        if j is not None:
            label = f"label {int(label_ids[j])}" if label_ids is not None else f"entry {j}"
            raise SchemaError(f"{what} of {label} {problem} ({float(values[j])!r})", file=file, row=j)
    return values


#: The largest label weight accepted: an example's weight sums up to 1,024 of
#: them (``aggregate=sum``) and must stay a finite float64.
MAX_WEIGHT = float(np.finfo(np.float64).max) / 2 ** 11
#: The smallest largest weight accepted: the resampler's fixed point maps the
#: largest weight to 2**52, and smaller ones in proportion (a float64 normal
#: number keeps their ratios exact to 2**-52).
MIN_TOP_WEIGHT = float(np.finfo(np.float64).tiny) * 2.0 ** 53


def validate_weights(table: pa.Table, file: str | None = None) -> None:
    """Weights table: required columns, unique label ids, weights finite and
    >= 0, the largest at most :data:`MAX_WEIGHT` and at least
    :data:`MIN_TOP_WEIGHT` (only the weights' ratios matter: a table outside
    that range is refused, saying so)."""
    for col in ("label_id", "weight"):
        if col not in table.schema.names:
            raise SchemaError(f"weights table has no '{col}' column", file=file)
    _check_unique_label_ids(table, file)
    for col in ("weight", "p_source", "p_target"):
        if col in table.schema.names:
            _check_finite_nonnegative(table, col, file, col)
    weights = table.column("weight").to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    if weights.size == 0:
        return
    j = int(np.argmax(weights))
    top, label = float(weights[j]), int(table.column("label_id")[j].as_py())
    if top > MAX_WEIGHT:
        raise SchemaError(f"weight of label {label} is {top!r}, too large to sum (at most {MAX_WEIGHT:.3g}); only "
                          "the weights' ratios matter: divide them all by the largest", file=file, row=j)
    if 0 < top < MIN_TOP_WEIGHT:
        raise SchemaError(f"the largest weight (label {label}) is {top!r}, too small to keep the weights' ratios "
                          f"(at least {MIN_TOP_WEIGHT:.3g}); only their ratios matter: divide them all by the largest",
                          file=file, row=j)


def validate_histogram(table: pa.Table, file: str | None = None,
                       tolerance: float = HISTOGRAM_SUM_TOLERANCE) -> None:
    """Target histogram: p_target finite, >= 0 and summing to 1 (± ``tolerance``)."""
    for col in ("label_id", "p_target"):
        if col not in table.schema.names:
            raise SchemaError(f"target histogram has no '{col}' column", file=file)
    _check_unique_label_ids(table, file)
    values = _check_finite_nonnegative(table, "p_target", file, "p_target")
    total = math.fsum(values.tolist())
    if abs(total - 1.0) > tolerance:
        raise SchemaError(f"p_target sums to {total:.9g}, not 1 (tolerance {tolerance:g})", file=file)


def _check_unique_label_ids(table: pa.Table, file: str | None) -> None:
    ids = table.column("label_id").to_numpy(zero_copy_only=False)
    if table.column("label_id").null_count:
        raise SchemaError("label_id is null", file=file,
                          row=_first_true(pc.is_null(table.column("label_id"))))
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        rows = np.flatnonzero(ids == dup)
        raise SchemaError(f"label {int(dup)} appears more than once (rows {rows.tolist()[:5]})",
                          file=file, row=int(rows[1]))
