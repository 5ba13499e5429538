"""Shards for several targets over one index in one fetch pass
(:class:`ManyShardJob`, :func:`run`; docs/design.md, "Shards").

::

    python -m spark_jobs.write_shards.many --index PATH --output ROOT \\
      --target food101 --selection DIR1 --target cars --selection DIR2 [...]
      # or one --selection ROOT holding ROOT/<target>/ for every --target
      [the options of spark_jobs.write_shards, shared by every target]

Each target's shards go to ``ROOT/<target>`` and are byte-identical to those
a single-target ``spark_jobs.write_shards`` run with the same options writes
there (its fingerprint is the same, so either reuses the other's result).
One fetch pass reads and checks each selected image once, however many
targets selected it, and spills it once (copy rows carry their ``target``;
each target's copies are placed by its own tallies); then each target's
writers write its shards from the shared spill. Each target follows the
output protocol on its own: a finished one is reused (and left out of the
fetch), one whose inputs or checks fail is reported and the others go on,
each is committed as soon as its shards are written.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

from schemas import Manifest
from schemas import io as sio
from schemas.cli import ArgumentParser
from schemas.stage_output import StageOutput

from ..session import StageTimer, require_reachable_outputs, run_cli
from .cli import add_shard_arguments
from .context import ShardContext
from .job import STAGE, ShardJob, check_inputs
from .manifest import write_manifest
from .passes import fetch_pass, fetch_tasks_of, pass_confs, write_target
from .spill import no_space
from .spill_policy import choose_spill, no_space_message, spill_directory
from .write import TEMPORARY

__all__ = ["ManyShardJob", "ManyShards", "build_many", "run", "main", "build_parser", "WRITE_THREADS"]

#: Targets whose write passes run at once (threads submitting Spark jobs).
WRITE_THREADS = 4

#: ``ShardJob`` fields every target shares (all but the target's own selection and output).
_SHARED = [f.name for f in dataclasses.fields(ShardJob) if f.name not in ("selection", "output")]


@dataclass
class ManyShardJob:
    """Shards of several targets over one ``index``: ``targets`` are
    ``(name, selection)`` pairs (a selection: a resampler output or its
    ``selection/``); target ``name`` is written to ``outputs[name]`` where
    given (``make resample``'s layout), else to ``output/name``.
    ``overwrite``: every target's finished output is redone (True) or only
    those of the names given (a collection of names). Every other field is
    :class:`ShardJob`'s, the same for every target."""

    targets: Sequence[tuple[str, str]]
    index: str
    output: str = ""
    samples_per_shard: int = 10000
    prefix: str = "shard"
    seed: int = 0
    overwrite: bool | Collection[str] = False
    max_bad_fraction: float = 0.001
    spill_dir: str | None = None
    run_bytes: int = ShardJob.run_bytes
    writer_bytes: int = ShardJob.writer_bytes
    fetch_tasks: int | None = None
    decode_check: bool = False
    read_bytes: int = ShardJob.read_bytes
    allow_uri_prefixes: Sequence[str] | None = None
    max_side: int | None = None
    quality: int | None = None
    shared_output: bool = False
    outputs: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        self.targets = tuple((str(n), str(s)) for n, s in self.targets)
        names = [n for n, _ in self.targets]
        if not names:
            raise ValueError("give at least one --target")
        for n in names:
            if not n or "/" in n or n.startswith("."):
                raise ValueError(f"--target must be a plain directory name, got {n!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"--target names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
        own = dict(self.outputs or {})
        if not self.output and set(own) != set(names):
            raise ValueError("give --output (each target under it) or every target's own output")
        if len(set(own.values())) != len(own):
            raise ValueError("two targets would write one output; give each target its own")
        self.jobs()  # every option checked once, as ShardJob checks it

    def jobs(self) -> list[ShardJob]:
        """Each target's single-target job (its output ``output/name``)."""
        shared = {name: getattr(self, name) for name in _SHARED if name != "overwrite"}
        own = self.outputs or {}
        return [ShardJob(selection=sel, output=own.get(name) or sio.join(self.output, name), **shared,
                         overwrite=self.overwrite if isinstance(self.overwrite, bool) else name in self.overwrite)
                for name, sel in self.targets]

    def fingerprint(self) -> dict:
        """Each target's :meth:`ShardJob.fingerprint`, by name."""
        return {name: job.fingerprint() for (name, _), job in zip(self.targets, self.jobs())}


@dataclass
class ManyShards:
    """What a run of several targets gave: each finished target's manifest
    (reused or built) and each failed one's one-line reason, by name."""

    manifests: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)


@dataclass
class _Pending:
    """A target to build: its name, context, output and work directory."""

    name: str
    ctx: ShardContext
    out: StageOutput
    work: str
    written: tuple | None = None  # (plan, facts, tally, written) once its shards are written


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500] if not isinstance(e, ValueError) else str(e)


def _begin(spark, name: str, job: ShardJob, result: ManyShards) -> _Pending | None:
    """A target's inputs checked, then its output reused (manifest recorded)
    or begun (its lock held); a failure is recorded, None returned."""
    try:
        inputs = check_inputs(spark, job)
        out, fingerprint = StageOutput(job.output, STAGE), job.fingerprint()
        with out.lock():
            if out.check(job.overwrite, fingerprint):
                print(out.skip_line(), file=sys.stderr)
                path = sio.join(job.output, "manifest.json")
                result.manifests[name] = Manifest.from_json(sio.read_bytes(path).decode(), path)
                return None
            work = out.begin(fingerprint)  # the lock is re-entrant: held until commit or abort
    except Exception as e:  # noqa: BLE001 - one target's bad input must not stop the others
        result.failures[name] = _one_line(e)
        return None
    ctx = ShardContext(spark=spark, job=job, inputs=inputs, spill=None, started=time.time(), stages=StageTimer())
    return _Pending(name=name, ctx=ctx, out=out, work=work)


def _finish(p: _Pending, done, t: int, result: ManyShards, spill_in_work: bool) -> None:
    """Target ``t``'s shards written into its work directory, its manifest
    written and the output committed (``spill_in_work``: the spill lies in
    this work directory, removed by the caller first: commit later, with
    :func:`_commit`); a failure aborts this target only. Runs in a thread
    of its own (``result`` takes one key per target)."""
    try:
        tally, written = write_target(p.ctx, done.plans[t], done.facts[t], done.counts[t], p.work)
        p.ctx.stages.lap("write")
        p.written = (done.plans[t], done.facts[t], tally, written)
    except Exception as e:  # noqa: BLE001 - recorded; the other targets go on
        _abort(p, e, result)
        return
    if not spill_in_work:
        _commit(p, result)


def _commit(p: _Pending, result: ManyShards) -> None:
    try:
        sio.remove_tree(sio.join(p.work, TEMPORARY))
        result.manifests[p.name] = write_manifest(p.ctx, p.work, *p.written)
        p.out.commit(p.work)
    except Exception as e:  # noqa: BLE001
        _abort(p, e, result)


def _abort(p: _Pending, e: BaseException, result: ManyShards) -> None:
    if isinstance(e, OSError) and no_space(e, p.ctx.job.output):
        e = ValueError(no_space_message(no_space(e, p.ctx.job.output), p.ctx.job, "output"))
    result.failures[p.name] = _one_line(e)
    p.out.abort(p.work)


def build_many(spark, job: ManyShardJob) -> ManyShards:
    """Every target's shards (module doc); never raises for one target's
    failure (recorded in :class:`ManyShards`), only for what fails all of
    them (the fetch pass), after aborting every target begun."""
    for single in job.jobs():
        require_reachable_outputs(spark, {"--output": single.output, "--spill-dir": job.spill_dir}, job.shared_output)
    result = ManyShards()
    pending = [p for (name, _), j in zip(job.targets, job.jobs()) if (p := _begin(spark, name, j, result))]
    if not pending:
        return result
    holder = pending[0]  # the spill's default place is its work directory: it is committed last
    spill = choose_spill(holder.ctx.job, holder.ctx.inputs, spark.sparkContext.master.startswith("local"))
    for p in pending:
        p.ctx.spill = spill
    if spill.note:
        print(spill.note, file=sys.stderr)
    tasks = fetch_tasks_of(holder.ctx)
    restore_confs = pass_confs(spark, tasks)
    try:
        with spill_directory(spill.location, job.spill_dir, holder.work) as spill_dir:
            try:
                done = fetch_pass([p.ctx for p in pending], spill_dir, tasks)
            except Exception as e:  # noqa: BLE001 - the fetch serves them all
                for p in pending:
                    _abort(p, e, result)
                raise
            # The targets' write passes run side by side (Spark runs the jobs of several threads
            # at once): a target's per-job fixed cost overlaps the others' work.
            with ThreadPoolExecutor(max_workers=min(len(pending), WRITE_THREADS)) as pool:
                list(pool.map(lambda t: _finish(pending[t], done, t, result, spill_in_work=t == 0),
                              range(len(pending))))
    finally:
        restore_confs()
    if holder.written is not None and holder.name not in result.failures:
        _commit(holder, result)
    return result


def run(spark, job: ManyShardJob) -> dict:
    """Every target's shards; returns their manifests by name, or raises
    ``ValueError`` naming each target that failed (after every other
    target's result is committed)."""
    result = build_many(spark, job)
    if result.failures:
        done = ", ".join(sorted(result.manifests)) or "none"
        raise ValueError(f"{len(result.failures)} of {len(job.targets)} targets failed (finished: {done}): "
                         + "; ".join(f"{n}: {m}" for n, m in sorted(result.failures.items())))
    return result.manifests


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m spark_jobs.write_shards.many",
                       description="Write every target's WebDataset shards in one pass over the index.")
    p.add_argument("--target", action="append", required=True, metavar="NAME",
                   help="repeatable: a target's name; its shards go to OUTPUT/NAME")
    p.add_argument("--selection", action="append", required=True,
                   help="one per --target, in the same order (a resampler output dir or its selection/), "
                        "or one directory holding NAME/ for every --target")
    p.add_argument("--output", required=True, help="the root: target NAME's shards go to OUTPUT/NAME")
    add_shard_arguments(p, "complete outputs", "a target fails")
    return p


def _pairs(targets: list, selections: list) -> list[tuple[str, str]]:
    if len(selections) == 1 and len(targets) > 1:
        return [(t, sio.join(selections[0], t)) for t in targets]
    if len(selections) != len(targets):
        raise ValueError(f"give one --selection per --target ({len(targets)}), or one holding every "
                         f"target's directory; got {len(selections)}")
    return list(zip(targets, selections))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(
        "write_shards.many", args,
        lambda: ManyShardJob(targets=_pairs(args.target, args.selection), index=args.index, output=args.output,
                             samples_per_shard=args.samples_per_shard, prefix=args.prefix, seed=args.seed,
                             overwrite=args.overwrite, max_bad_fraction=args.max_bad_fraction,
                             spill_dir=args.spill_dir, run_bytes=args.run_bytes,
                             allow_uri_prefixes=args.allow_uri_prefix, fetch_tasks=args.fetch_tasks,
                             decode_check=args.decode_check, read_bytes=args.read_bytes, max_side=args.max_side,
                             quality=args.quality, shared_output=args.shared_output),
        run, lambda job, ms: "; ".join(f"{n}: {m.total_samples} samples in {len(m.shards)} shards"
                                       for n, m in sorted(ms.items())) + f" -> {job.output}")


if __name__ == "__main__":
    sys.exit(main())
