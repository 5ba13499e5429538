"""Contracts shared by every stage: Arrow schemas, manifest types, validation.

See docs/design.md, "Contracts". Importing this package is cheap (pyarrow, numpy, fsspec).
"""

from .arrow import (INDEX_SCHEMA_INLINE, INDEX_SCHEMA_URI, LABEL_COUNTS_SCHEMA, LABEL_SETS_SCHEMA,
                    METADATA_KEY, SELECTION_SCHEMA, TARGET_HISTOGRAM_SCHEMA, VOCABULARY_SCHEMA,
                    WEIGHTS_SCHEMA, read_metadata, with_metadata)
from .errors import SchemaError
from .hierarchy import Hierarchy
from .manifest import (AGGREGATIONS, DRAWS, FORMAT_VERSION, MATCHERS, SCHEMES, Manifest,
                       ResampleConfig, ShardInfo)
from .sizes import format_size, parse_size
from .validate import (check_index_schema, validate_histogram, validate_index_batch, validate_vocabulary,
                       validate_weights)

__all__ = [
    "INDEX_SCHEMA_INLINE", "INDEX_SCHEMA_URI", "LABEL_COUNTS_SCHEMA", "LABEL_SETS_SCHEMA", "METADATA_KEY",
    "SELECTION_SCHEMA", "TARGET_HISTOGRAM_SCHEMA", "VOCABULARY_SCHEMA", "WEIGHTS_SCHEMA",
    "read_metadata", "with_metadata", "SchemaError", "Hierarchy", "AGGREGATIONS", "DRAWS",
    "FORMAT_VERSION", "MATCHERS", "SCHEMES", "Manifest", "ResampleConfig", "ShardInfo",
    "format_size", "parse_size", "check_index_schema",
    "validate_histogram", "validate_index_batch", "validate_vocabulary", "validate_weights",
]
