"""What one run carries from its checks to its passes: the checked inputs
(:class:`ShardInputs`) and the run's context (:class:`ShardContext`), so the
passes take one object instead of a dozen values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..session import StageTimer
from .footers import SelectionFacts
from .spill_policy import SpillChoice

if TYPE_CHECKING:
    from .job import ShardJob

__all__ = ["ShardInputs", "ShardContext"]


@dataclass
class ShardInputs:
    """The inputs, checked before the output is touched.

    ``selection``: a Spark DataFrame ``key string, copies int, weight
    double``, read from ``selection_path``; ``resample_dir`` the resampler's
    output holding it (None: a bare selection) and ``resample_stats`` its
    stats.json; ``located``: the index as ``key, labels, file, row, uri``
    (where each example is); ``column``: ``"image"`` (bytes in the index) or
    ``"uri"``; ``files``: the index's files (sorted); ``index_rows``: its
    rows where it is small (footers), else None; ``selected``: the
    selection's footer facts (None where they cannot be read)."""

    selection: Any
    selection_path: str
    resample_dir: str | None
    resample_stats: dict | None
    located: Any
    column: str
    files: list[str]
    index_rows: int | None
    selected: SelectionFacts | None


@dataclass
class ShardContext:
    """One run: the Spark session, the job, its checked inputs, where the
    spill goes, the stage timer and the start time (``time.time()``)."""

    spark: Any
    job: ShardJob
    inputs: ShardInputs
    spill: SpillChoice
    started: float
    stages: StageTimer = field(default_factory=StageTimer)
