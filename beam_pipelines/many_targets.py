"""Several targets in one Beam run: each target's output under the output
protocol on its own, and the command line's groups of per-target flags.

A stage that serves K targets from one source (``importance_weights``,
``near_duplicates``) reads the source once for all of them; what stays per
target is its output directory. :func:`run_outputs` applies the output
protocol (``schemas.stage_output``) to K outputs around one build:

* each output's lock is held from its check to its commit (another live run
  into it fails that target, not the others);
* an output already finished from the same fingerprint is reused (it drops
  out of the build: the skip line is printed); one that may not be written
  (someone else's files, a result made otherwise without ``--overwrite``)
  fails that target with its one-line reason;
* the rest are begun (each its own build directory), built together by one
  call, then each committed on its own, or aborted when its build left a
  failure note (:func:`failure_note`: one target's bad input, found inside
  the pipeline). A failure of the build as a whole aborts every build begun
  and is raised; finished results of earlier runs are never touched.

:func:`target_groups` splits a command line's per-target flags into one
group per ``--target NAME``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from schemas import io as sio
from schemas.stage_output import StageOutput

from .execution import DATA_ERRORS, error_line

__all__ = ["FAILURE_NOTE", "TargetOutcome", "TargetsRun", "OutputSpec", "failure_note", "read_failure",
           "run_outputs", "report", "PerTargetFlag", "target_groups"]

#: Written into a target's build directory, instead of its outputs, when its
#: own input is bad (the one-line reason); its build is then aborted.
FAILURE_NOTE = "_FAILED"


@dataclass
class TargetOutcome:
    """What became of one target: its ``name`` and ``output``; the
    ``summary`` (its summary.json) where it is finished, ``reused`` where it
    was finished before and left as it was; ``error``: why it failed (one
    line; ``None``: it did not)."""

    name: str
    output: str
    summary: dict | None = None
    reused: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class TargetsRun:
    """The outcome of a K-target run, one :class:`TargetOutcome` per target in
    the order given, and the Beam ``counters`` of its pipeline
    (``"namespace/name" -> value``; empty when no pipeline ran, or where the
    runner reports none)."""

    outcomes: list[TargetOutcome]
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[TargetOutcome]:
        return [o for o in self.outcomes if not o.ok]

    def check(self) -> "TargetsRun":
        """Raise ``ValueError`` naming every failed target and why (one line
        each); returns ``self`` when none failed."""
        if self.failed:
            raise ValueError("; ".join(f"target {o.name} ({o.output}): {o.error}" for o in self.failed))
        return self


@dataclass
class OutputSpec:
    """One target's output as :func:`run_outputs` handles it: its ``name``,
    its :class:`StageOutput`, the ``fingerprint`` it is made from and whether
    to ``overwrite`` a finished result made otherwise; ``error``: why the
    target already failed (its own input, found at its check: its output is
    not touched)."""

    name: str
    output: StageOutput
    fingerprint: Mapping[str, Any] | None = None
    overwrite: bool = False
    error: str | None = None


@contextlib.contextmanager
def failure_note(work: str) -> Iterator[None]:
    """``with failure_note(work): write the outputs`` — a bad-data error
    (:data:`~beam_pipelines.execution.DATA_ERRORS`) raised inside is written
    to ``work/_FAILED`` (its first line) instead of failing the pipeline, so
    that only this target fails."""
    try:
        yield
    except DATA_ERRORS as e:
        sio.write_bytes_atomic(sio.join(work, FAILURE_NOTE), error_line(e) + "\n")


def read_failure(work: str) -> str | None:
    """The failure note of build ``work`` (``None``: none; a build without its
    summary.json is reported as such)."""
    note = sio.join(work, FAILURE_NOTE)
    if sio.exists(note):
        return sio.read_bytes(note).decode().strip() or "failed"
    if not sio.exists(sio.join(work, "summary.json")):
        return "the pipeline wrote no output for this target"
    return None


def _summary(path: str) -> dict:
    return json.loads(sio.read_bytes(sio.join(path, "summary.json")))


def _held(stack: contextlib.ExitStack, spec: OutputSpec, catch: tuple) -> tuple[bool | None, str | None]:
    """Take ``spec``'s lock (kept in ``stack``) and check it: (reused?, error)."""
    try:
        stack.enter_context(spec.output.lock())
        return spec.output.check(spec.overwrite, spec.fingerprint), None
    except catch as e:
        return None, error_line(e)


def run_outputs(specs: Sequence[OutputSpec], build: Callable[[dict[int, str]], dict[str, int] | None], *,
                catch: tuple = DATA_ERRORS, quiet: bool = False) -> TargetsRun:
    """The output protocol for K outputs around one ``build(works)`` (``works``:
    position in ``specs`` -> build directory, for the targets to build; it
    returns the run's counters). ``catch``: the errors that fail one target
    at its check (the default) rather than the whole run (``()``: raised, as a
    single-target run raises them). Returns the outcomes in ``specs`` order."""
    outcomes = [TargetOutcome(s.name, s.output.path, error=s.error) for s in specs]
    counters: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        pending = []
        for i, spec in enumerate(specs):
            if spec.error is not None:
                continue
            reused, outcomes[i].error = _held(stack, spec, catch)
            if reused:
                if not quiet:
                    print(spec.output.skip_line(), file=sys.stderr)
                outcomes[i].reused, outcomes[i].summary = True, _summary(spec.output.path)
            elif reused is False:
                pending.append(i)
        if pending:
            counters = _build(specs, pending, build, outcomes)
    return TargetsRun(outcomes, counters)


def _build(specs: Sequence[OutputSpec], pending: list[int], build, outcomes: list[TargetOutcome]) -> dict:
    works: dict[int, str] = {}
    try:
        for i in pending:
            works[i] = specs[i].output.begin(specs[i].fingerprint)
        counters = build(dict(works)) or {}
    except BaseException:
        for i, work in works.items():
            specs[i].output.abort(work)
        raise
    for i, work in works.items():
        error = read_failure(work)
        if error is None:
            specs[i].output.commit(work)
            outcomes[i].summary = _summary(specs[i].output.path)
        else:
            specs[i].output.abort(work)
            outcomes[i].error = error
    return counters


def report(stage: str, run: TargetsRun, describe: Callable[[dict], str]) -> int:
    """Print a K-target run as its command line does: a line per finished
    target on standard output (``describe`` of its summary, the target named),
    a line per failed one on standard error; returns the exit status (1
    where a target failed)."""
    for o in run.outcomes:
        if o.ok:
            print(describe(o.summary).replace(f"{stage}: ", f"{stage}: {o.name}: ", 1))
        else:
            print(f"{stage}: error: target {o.name} ({o.output}): {o.error}", file=sys.stderr)
    return 1 if run.failed else 0


# -- the command line: one group of flags per target -------------------------------------------

class PerTargetFlag(argparse.Action):
    """A per-target flag: stored as usual (the single-target command line) and
    also recorded, in command-line order, for :func:`target_groups`."""

    def __call__(self, parser, namespace, values, option_string=None):
        order = list(getattr(namespace, "per_target_order", None) or [])
        order.append((self.dest, values, option_string))
        namespace.per_target_order = order
        setattr(namespace, self.dest, values)


def target_groups(flags: dict, group_dest: str = "target", group_flag: str = "--target") -> list[dict] | None:
    """The per-target groups of a parsed command line (``flags``: its
    ``vars``), or ``None`` where it names at most one target (``group_flag``
    given once or not at all: the single-target command line, flags in any
    order). With several, each ``--target NAME`` (dest ``group_dest``) opens
    a group holding the per-target flags up to the next one; a per-target
    flag before the first ``--target``, or twice in one group, is a
    ``ValueError``. Pops the order :class:`PerTargetFlag` recorded."""
    order = flags.pop("per_target_order", None) or []
    if sum(dest == group_dest for dest, _, _ in order) < 2:
        return None
    groups: list[dict] = []
    for dest, value, option in order:
        if dest == group_dest:
            groups.append({dest: value})
        elif not groups:
            raise ValueError(f"{option} {value} comes before the first {group_flag}: with several targets, give "
                             f"each target's flags after its {group_flag} NAME")
        elif dest in groups[-1]:
            raise ValueError(f"{option} is given twice for target {groups[-1][group_dest]}; each "
                             f"{group_flag} NAME starts the flags of the next target")
        else:
            groups[-1][dest] = value
    return groups
