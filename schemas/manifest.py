"""Run configuration and shard manifest types, with a versioned JSON form.

``manifest.json`` sits beside the WebDataset shards (docs/design.md,
"Shards and manifest"). It is the only thing a training run needs to find
and check its data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import io as sio
from .errors import SchemaError
from .sizes import parse_size

__all__ = [
    "FORMAT_VERSION",
    "MATCHERS",
    "DRAWS",
    "AGGREGATIONS",
    "SCHEMES",
    "ResampleConfig",
    "ShardInfo",
    "Manifest",
    "check_shard_name",
]

#: Bump when a reader of an older manifest would misread a newer one.
FORMAT_VERSION = 1

MATCHERS = ("same", "elastic")
DRAWS = ("multinomial", "systematic")
AGGREGATIONS = ("mean", "max", "sum")
SCHEMES = ("adaptive", "entire", "subset", "topk-uniform", "reversed", "balanced")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class ResampleConfig:
    """Everything that decides which examples a resampled set holds.

    ``size`` is the number of samples N (copies included); ``temperature`` the
    softmax temperature used for P_t (default ``2.0``, the paper's).
    """

    target: str
    size: int
    matcher: str = "same"
    draw: str = "multinomial"
    seed: int = 0
    temperature: float = 2.0
    aggregation: str = "mean"
    scheme: str = "adaptive"
    subset_labels: tuple[str, ...] = ()
    top_k: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", parse_size(self.size))
        object.__setattr__(self, "subset_labels", tuple(self.subset_labels))
        _choice("matcher", self.matcher, MATCHERS)
        _choice("draw", self.draw, DRAWS)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("scheme", self.scheme, SCHEMES)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")
        if self.scheme == "subset" and not self.subset_labels:
            raise ValueError("scheme 'subset' needs at least one subset label name")
        if self.scheme in ("topk-uniform", "reversed") and (self.top_k is None or self.top_k < 1):
            raise ValueError(f"scheme {self.scheme!r} needs top_k >= 1, got {self.top_k!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["subset_labels"] = list(self.subset_labels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ResampleConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown configuration fields: {sorted(unknown)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: equal configs, equal fingerprints."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def check_shard_name(name: object) -> None:
    """A shard name must be a plain file name in the manifest's folder: a
    non-empty string with no ``/``, ``\\`` or NUL, not starting with ``.``
    (so not ``.`` or ``..`` either). Anything else could make a reader open a
    file outside the folder; raises ``ValueError``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"shard name {name!r} is not a file name (must be a non-empty string)")
    if "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise ValueError(f"shard name {name!r} is not a plain file name in the manifest's folder "
                         "(no '/', '\\' or NUL, not starting with '.')")


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: file name (relative to the manifest), samples, bytes, sha256.

    ``name`` is checked by :func:`check_shard_name`: a plain file name in the
    manifest's folder, never a path.
    """

    name: str
    samples: int
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        check_shard_name(self.name)


@dataclass
class Manifest:
    """Description of a finished set of shards (docs/design.md, "Shards and manifest")."""

    config: ResampleConfig
    inputs: dict[str, str]
    shards: list[ShardInfo]
    total_samples: int
    unique_examples: int
    label_distribution: dict[int, int]
    bad_records: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        counted = sum(s.samples for s in self.shards)
        if counted != self.total_samples:
            raise ValueError(f"manifest shards hold {counted} samples but total_samples is "
                             f"{self.total_samples}")
        if self.unique_examples > self.total_samples:
            raise ValueError(f"unique_examples {self.unique_examples} exceeds total_samples "
                             f"{self.total_samples}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "config": self.config.to_dict(),
            "inputs": dict(sorted(self.inputs.items())),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "total_samples": self.total_samples,
            "unique_examples": self.unique_examples,
            "label_distribution": {str(k): v for k, v in sorted(self.label_distribution.items())},
            "bad_records": list(self.bad_records),
            "extra": dict(self.extra),
        }

    def to_json(self) -> str:
        return sio.json_text(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, file: str | None = None) -> "Manifest":
        """Parse and check a manifest; errors name ``file`` and the field."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"manifest is not valid JSON: {e}", file=file) from None
        if not isinstance(d, dict):
            raise SchemaError("manifest must be a JSON object", file=file)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise SchemaError(f"manifest format_version is {version!r}; this reader "
                              f"understands {FORMAT_VERSION}", file=file)
        required = ("config", "inputs", "shards", "total_samples", "unique_examples",
                    "label_distribution")
        for key in required:
            if key not in d:
                raise SchemaError(f"manifest has no {key!r} field", file=file)
        if not isinstance(d["shards"], list):
            raise SchemaError("manifest 'shards' must be a list", file=file)
        shards = []
        for i, s in enumerate(d["shards"]):
            try:
                shards.append(ShardInfo(**s))
            except (TypeError, ValueError) as e:
                raise SchemaError(f"shard {i}: {e}", file=file) from None
        try:
            return cls(
                config=ResampleConfig.from_dict(d["config"]),
                inputs=dict(d["inputs"]),
                shards=shards,
                total_samples=int(d["total_samples"]),
                unique_examples=int(d["unique_examples"]),
                label_distribution={int(k): int(v) for k, v in d["label_distribution"].items()},
                bad_records=list(d.get("bad_records", [])),
                extra=dict(d.get("extra", {})),
                format_version=version,
            )
        except (TypeError, ValueError) as e:
            raise SchemaError(f"manifest is malformed: {e}", file=file) from None
