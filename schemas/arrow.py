"""Arrow schemas of every contract between stages (docs/design.md, "Contracts").

Tables that carry run metadata (number of examples, temperature, model
fingerprint, ...) keep it as JSON in the Arrow schema metadata under
``METADATA_KEY``, so that it survives a Parquet round trip with the data.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import pyarrow as pa

__all__ = [
    "METADATA_KEY",
    "INDEX_KEY_FIELD",
    "INDEX_LABELS_FIELD",
    "INDEX_IMAGE_FIELD",
    "INDEX_URI_FIELD",
    "INDEX_SCHEMA_INLINE",
    "INDEX_SCHEMA_URI",
    "VOCABULARY_SCHEMA",
    "LABEL_COUNTS_SCHEMA",
    "TARGET_HISTOGRAM_SCHEMA",
    "WEIGHTS_SCHEMA",
    "SELECTION_SCHEMA",
    "LABEL_SETS_SCHEMA",
    "with_metadata",
    "read_metadata",
]

METADATA_KEY = b"adaptive_transfer"

INDEX_KEY_FIELD = pa.field("key", pa.string(), nullable=False)
INDEX_LABELS_FIELD = pa.field("labels", pa.list_(pa.int32()), nullable=False)
INDEX_IMAGE_FIELD = pa.field("image", pa.binary())
INDEX_URI_FIELD = pa.field("uri", pa.string())

#: Source index with the encoded image bytes inline.
INDEX_SCHEMA_INLINE = pa.schema([INDEX_KEY_FIELD, INDEX_LABELS_FIELD, INDEX_IMAGE_FIELD])
#: Source index whose images live elsewhere (local path, gs://, s3://, ...).
INDEX_SCHEMA_URI = pa.schema([INDEX_KEY_FIELD, INDEX_LABELS_FIELD, INDEX_URI_FIELD])

#: Label vocabulary; ``parent_id`` is null at the roots of the hierarchy.
VOCABULARY_SCHEMA = pa.schema([
    pa.field("label_id", pa.int32(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("parent_id", pa.int32()),
])

#: Source label counts; metadata: ``num_examples`` (int).
LABEL_COUNTS_SCHEMA = pa.schema([
    pa.field("label_id", pa.int32(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),
])

#: Target soft-label histogram P_t(y) over the source label space; metadata:
#: ``num_images``, ``temperature``, ``model_fingerprint``.
TARGET_HISTOGRAM_SCHEMA = pa.schema([
    pa.field("label_id", pa.int32(), nullable=False),
    pa.field("p_target", pa.float64(), nullable=False),
])

#: Importance weights w(y) = P_t(y) / P_s(y), one row per vocabulary label.
WEIGHTS_SCHEMA = pa.schema([
    pa.field("label_id", pa.int32(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),
    pa.field("p_source", pa.float64(), nullable=False),
    pa.field("p_target", pa.float64(), nullable=False),
    pa.field("weight", pa.float64(), nullable=False),
])

#: Resampler output: one row per selected example, ``copies`` > 0.
SELECTION_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("copies", pa.int32(), nullable=False),
    pa.field("weight", pa.float64(), nullable=False),
])

#: An index's distinct label lists (resample ``--label-sets``): ``lsid`` =
#: Spark's ``xxhash64(labels)``, ``n`` records carry exactly that list;
#: metadata: ``fingerprint`` (the inputs it was counted over), ``records``.
LABEL_SETS_SCHEMA = pa.schema([
    pa.field("lsid", pa.int64(), nullable=False),
    pa.field("labels", pa.list_(pa.int32())),
    pa.field("n", pa.int64(), nullable=False),
])


def with_metadata(table: pa.Table, metadata: Mapping[str, Any]) -> pa.Table:
    """Return ``table`` with ``metadata`` (JSON-able) attached to its schema."""
    existing = dict(table.schema.metadata or {})
    existing[METADATA_KEY] = json.dumps(dict(metadata), sort_keys=True).encode()
    return table.replace_schema_metadata(existing)


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """Return the JSON metadata that :func:`with_metadata` attached, or ``{}``."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}
