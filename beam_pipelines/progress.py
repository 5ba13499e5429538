"""What a Beam stage did, step by step, from the pipeline's metrics.

After a pipeline finishes, :func:`report_counts` prints one line per counter
the steps incremented (images read, examples counted, ...) with its rate over
the pipeline's run, to stderr::

    weights: step 'CountLabels/Count': label_counts/source_examples 2.00k (1.35k/s)

The in-process runner (``--runner DirectRunner``) delivers metrics only when
the pipeline ends, so there is no periodic line there; Dataflow shows the same
counters live in its console. Silent with ``ADAPTIVE_TRANSFER_PROGRESS=0``.
"""

from __future__ import annotations

import sys
from typing import TextIO

from schemas.progress import format_count, format_duration, format_rate, progress_interval

__all__ = ["step_counts", "count_lines", "report_counts"]


def step_counts(result) -> list[tuple[str, str, int]]:
    """``(step, namespace/name, value)`` of every counter in a finished
    pipeline's result, summed per step and counter, sorted; ``[]`` where
    the runner reports no metrics."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = result.metrics().query(MetricsFilter())["counters"]
    except (AttributeError, NotImplementedError, KeyError):
        return []
    totals: dict[tuple[str, str], int] = {}
    for c in counters:
        value = c.committed if c.committed is not None else c.attempted
        key = (c.key.step, f"{c.key.metric.namespace}/{c.key.metric.name}")
        totals[key] = totals.get(key, 0) + int(value or 0)
    return [(step, name, value) for (step, name), value in sorted(totals.items())]


def count_lines(label: str, counts: list[tuple[str, str, int]], seconds: float) -> list[str]:
    """One line per ``(step, counter, value)`` with its rate over ``seconds``,
    then a closing line with the run's duration."""
    lines = [f"{label}: step {step!r}: {name} {format_count(value)} ({format_rate(value, seconds, '')})"
             for step, name, value in counts]
    return lines + [f"{label}: Beam pipeline finished in {format_duration(seconds)}"]


def report_counts(label: str, result, seconds: float, stream: TextIO | None = None) -> None:
    """Print :func:`count_lines` of ``result`` (nothing when progress is off)."""
    if progress_interval() <= 0:
        return
    out = sys.stderr if stream is None else stream
    for line in count_lines(label, step_counts(result), seconds):
        print(line, file=out, flush=True)
