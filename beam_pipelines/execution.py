"""How a Beam stage runs: its pipeline options, the in-process runner, and a
bad-data error as one line.

* :func:`pipeline_options`: Beam's options from a list of strings (Beam's
  own flags: ``--runner``, ``--direct_num_workers``, Dataflow's, the
  inference options of :mod:`beam_pipelines.target_histogram`) or a
  ``PipelineOptions``.
* :func:`new_pipeline` / :func:`run_pipeline`: a pipeline; one built and
  run. ``--runner DirectRunner``, and no ``--runner`` at all, run in this process on Beam's
  ``FnApiRunner``: what Beam's DirectRunner runs a batch pipeline on once
  its first choice, the Prism runner, is not there. Left to itself, that
  DirectRunner downloads Prism's binary from GitHub at run time and leaves
  ``beam-temp*`` and empty ``tmp*`` directories in the temp directory on
  every run, whether or not the download works; nothing is downloaded here
  and a run leaves nothing in the temp directory. Any other runner is Beam's.
* :func:`counters`: the Beam counters of a finished pipeline, as a dict.
* :func:`error_line`: a bad-data error raised inside a pipeline as the one
  line a command prints (Beam appends ``[while running 'STEP']``); while a
  pipeline runs, Beam's logging of such an error with its traceback is held
  back (the error itself still propagates, traceback included).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from typing import Callable, Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

__all__ = ["DATA_ERRORS", "pipeline_options", "in_process_runner", "new_pipeline", "run_pipeline", "counters",
           "error_line"]

#: Errors that report bad input (a ``SchemaError`` is a ``ValueError``): one line, no traceback.
DATA_ERRORS = (ValueError, FileNotFoundError)
#: Beam's names of the DirectRunner (``--runner`` is matched without case).
_DIRECT = {"directrunner", "direct", "switchingdirectrunner", "apache_beam.runners.direct.direct_runner.directrunner",
           "apache_beam.runners.direct.direct_runner.switchingdirectrunner"}
#: The logger through which Beam reports an exception raised by a step (with its traceback).
_STEP_LOGGER = "apache_beam.runners.common"
_STEP_NOTE = re.compile(r"\s*\[while running '[^']*'\]")


def pipeline_options(args: Sequence[str] | PipelineOptions = ()) -> PipelineOptions:
    """``args`` as ``PipelineOptions`` (a ``PipelineOptions`` is returned as is)."""
    if isinstance(args, PipelineOptions):
        return args
    if isinstance(args, str):
        raise ValueError(f"pipeline options are a list of strings, got the string {args!r}")
    return PipelineOptions(list(args))


def in_process_runner(options: PipelineOptions):
    """The runner for ``options``: Beam's ``FnApiRunner`` in this process
    where ``--runner`` is unset or the DirectRunner (a batch pipeline),
    configured as Beam's DirectRunner configures it; ``None`` otherwise
    (Beam creates the runner ``--runner`` names)."""
    std = options.view_as(StandardOptions)
    if (std.runner and std.runner.lower() not in _DIRECT) or std.streaming:
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


class _HoldBackDataErrors(logging.Filter):
    """Drops Beam's log record of a step's bad-data error (it propagates anyway)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DATA_ERRORS))


@contextlib.contextmanager
def _quiet_data_errors() -> Iterator[None]:
    logger, held = logging.getLogger(_STEP_LOGGER), _HoldBackDataErrors()
    logger.addFilter(held)
    try:
        yield
    finally:
        logger.removeFilter(held)


def new_pipeline(args: Sequence[str] | PipelineOptions = ()) -> beam.Pipeline:
    """A pipeline with Beam's options ``args``, on :func:`in_process_runner`
    where it applies (``with new_pipeline(args) as p:`` runs it at the end)."""
    options = pipeline_options(args)
    return beam.Pipeline(runner=in_process_runner(options), options=options)


def run_pipeline(options: PipelineOptions, build: Callable[[beam.Pipeline], None], label: str | None = None):
    """``build(p)`` adds the transforms to a :func:`new_pipeline`, which then
    runs to the end; Beam's log of a step's bad-data error is held back.
    ``label`` (a stage's name): say on stderr that the pipeline runs, and
    its counts per step at the end (:mod:`beam_pipelines.progress`).
    Returns the pipeline's result (its metrics: :func:`counters`)."""
    from schemas.progress import progress_interval

    from .progress import report_counts

    says = label is not None and progress_interval() > 0
    if says:
        runner = options.view_as(StandardOptions).runner or "DirectRunner"
        print(f"{label}: running the Beam pipeline ({runner})", file=sys.stderr, flush=True)
    started = time.monotonic()
    with _quiet_data_errors(), new_pipeline(options) as p:
        build(p)
    if says:
        report_counts(label, p.result, time.monotonic() - started)
    return p.result


def counters(result) -> dict[str, int]:
    """The counters of a finished pipeline ``result``: ``"namespace/name" ->``
    the committed value (the attempted one where the runner commits none),
    summed over steps; ``{}`` where the runner reports no metrics."""
    try:
        found = result.metrics().query()["counters"]
    except Exception:  # noqa: BLE001 - metrics are a report, never a reason to fail
        return {}
    out: dict[str, int] = {}
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        name = f"{c.key.metric.namespace}/{c.key.metric.name}"
        out[name] = out.get(name, 0) + int(value or 0)
    return out


def error_line(error: BaseException) -> str:
    """The first line of ``error``'s message, without Beam's step notes."""
    text = _STEP_NOTE.sub("", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__
