"""The generalist checkpoint format shared by the trainer and the Beam pipeline.

One file (``generalist.pt``), written with ``torch.save`` and read with
``torch.load(weights_only=True)``: a dict of plain types and tensors only,

=========================  ===================================================
``format``                 ``"adaptive-transfer/generalist"``
``format_version``         ``GENERALIST_FORMAT_VERSION``
``architecture``           registry name (``small``, ``resnet50``, ...)
``num_classes``            outputs of the classifier = vocabulary size
``label_ids``              label id of each output, in output order
``input_size``             side of the square model input, pixels
``resize``                 shorter side before the centre crop, pixels
``mean``, ``std``          per-channel normalisation of [0, 1] RGB
``vocabulary_fingerprint`` :func:`vocabulary_fingerprint` of the labels
``state_dict``             the model's parameters and buffers
``extra``                  free-form (training step, source, ...)
=========================  ===================================================
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import pyarrow as pa

from .errors import SchemaError

__all__ = [
    "GENERALIST_FORMAT",
    "GENERALIST_FORMAT_VERSION",
    "REQUIRED_KEYS",
    "vocabulary_fingerprint",
    "validate_generalist",
    "FINETUNED_FORMAT",
    "validate_finetuned",
]

GENERALIST_FORMAT = "adaptive-transfer/generalist"
GENERALIST_FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "architecture", "num_classes", "label_ids",
                 "input_size", "resize", "mean", "std", "vocabulary_fingerprint", "state_dict")


def vocabulary_fingerprint(vocabulary: pa.Table) -> str:
    """sha256 of the vocabulary's (label_id, name, parent_id) rows, sorted by id."""
    rows = sorted(zip(vocabulary.column("label_id").to_pylist(), vocabulary.column("name").to_pylist(),
                      vocabulary.column("parent_id").to_pylist()))
    h = hashlib.sha256()
    for lid, name, parent in rows:
        h.update(f"{lid}\t{name}\t{'' if parent is None else parent}\n".encode())
    return h.hexdigest()


def _check_header(ckpt: Any, file: str | None, fmt: str, what: str, required: tuple[str, ...]) -> None:
    """Format, version and required keys of a checkpoint dict."""
    if not isinstance(ckpt, Mapping):
        raise SchemaError(f"not a {what} checkpoint (expected a dict)", file=file)
    if ckpt.get("format") != fmt:
        raise SchemaError(f"not a {what} checkpoint (format {ckpt.get('format')!r})", file=file)
    if ckpt.get("format_version") != GENERALIST_FORMAT_VERSION:
        raise SchemaError(f"{what} checkpoint format_version is {ckpt.get('format_version')!r}; "
                          f"this reader understands {GENERALIST_FORMAT_VERSION}", file=file)
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise SchemaError(f"{what} checkpoint lacks {missing}", file=file)


def validate_generalist(ckpt: Mapping[str, Any], file: str | None = None,
                        vocabulary: pa.Table | None = None) -> None:
    """Check a loaded checkpoint dict; with ``vocabulary``, check it matches."""
    _check_header(ckpt, file, GENERALIST_FORMAT, "generalist", REQUIRED_KEYS)
    if len(ckpt["label_ids"]) != ckpt["num_classes"]:
        raise SchemaError(f"checkpoint has {len(ckpt['label_ids'])} label ids for "
                          f"{ckpt['num_classes']} classes", file=file)
    if vocabulary is not None:
        if vocabulary.num_rows != ckpt["num_classes"]:
            raise SchemaError(f"the model has {ckpt['num_classes']} classes but the label vocabulary "
                              f"has {vocabulary.num_rows} labels: it was trained on another label space",
                              file=file)
        fingerprint = vocabulary_fingerprint(vocabulary)
        if fingerprint != ckpt["vocabulary_fingerprint"]:
            raise SchemaError("the model was trained on a different label vocabulary (fingerprint "
                              f"{ckpt['vocabulary_fingerprint'][:12]} != {fingerprint[:12]})", file=file)


FINETUNED_FORMAT = "adaptive-transfer/finetuned"
FINETUNED_REQUIRED_KEYS = ("format", "format_version", "architecture", "classes", "input_size", "resize",
                           "mean", "std", "state_dict")


def validate_finetuned(ckpt: Mapping[str, Any], file: str | None = None,
                       classes: list[str] | None = None) -> None:
    """Check a fine-tuned checkpoint dict; with ``classes``, that they match."""
    _check_header(ckpt, file, FINETUNED_FORMAT, "fine-tuned", FINETUNED_REQUIRED_KEYS)
    if classes is not None and list(ckpt["classes"]) != list(classes):
        raise SchemaError(f"the checkpoint was fine-tuned on {len(ckpt['classes'])} classes "
                          f"({ckpt['classes'][:3]}...), the dataset has {len(classes)} ({classes[:3]}...)",
                          file=file)
