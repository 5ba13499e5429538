"""The one place that composes stages (docs/design.md, "Stages and engines").

A typed call per stage, and the chain every pre-training set goes through:
resample -> shards -> verify -> pretrain (:func:`build_set`). ``make
resample`` (``adaptive_transfer.resample``), ``make demo`` and ``make
experiment`` call these; none of them repeats the chain or runs a stage by
building its command line.

"Already built?" is decided by each stage itself, by the one reuse rule
(``schemas.stage_output``): a finished output is reused when its
fingerprint (settings, seed, inputs, code) matches. What the composed
commands add is their policy for a finished output made from something
else: they own the directories they plan, so they rebuild it (the old
result stays until the new one is complete), where a stage's own command
line refuses it without ``--overwrite``. An unfinished pre-training run made
from the same fingerprint is resumed from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from schemas import io as sio
from schemas.fingerprint import code_digest
from schemas.stage_output import StageOutput, fingerprint_of

__all__ = ["Engines", "SetPlan", "BuiltSet", "plan_set", "build_set", "build_sets", "weights", "near_duplicates",
           "weights_many", "near_duplicates_many", "resample", "resample_many", "shards", "shards_many", "verify",
           "pretrain", "finetune", "evaluate", "generated", "refreshed"]


@dataclass
class Engines:
    """How the stages run: Spark's master (a ``local[*]`` session is started
    on first use and stopped by :meth:`stop`), Beam's pipeline options (e.g.
    ``("--runner", "DataflowRunner", ...)``; default: the in-process runner),
    and where progress lines go."""

    master: str | None = None
    beam_args: tuple[str, ...] = ()
    log: Callable[[str], None] = print
    built: int = field(default=0, init=False)  # stage outputs built (or rebuilt) through this object
    reused: int = field(default=0, init=False)  # stage outputs found finished and reused
    _spark: Any = field(default=None, init=False, repr=False)
    _started: bool = field(default=False, init=False, repr=False)

    def spark(self):
        """The Spark session: one already active in this process (a caller's),
        or one started here on first use."""
        if self._spark is None:
            from pyspark.sql import SparkSession

            from spark_jobs.session import get_session

            self._started = SparkSession.getActiveSession() is None
            self._spark = get_session("adaptive-transfer", self.master)
        return self._spark

    def stop(self) -> None:
        """Stop the Spark session this object started (a caller's is left running)."""
        if self._spark is not None and self._started:
            self._spark.stop()
        self._spark, self._started = None, False


# -- the composed commands' policy for finished outputs -------------------------------

def refreshed(job, stage: str, what: str, engines: Engines):
    """``job`` as the composed commands run it: unchanged where its output is
    missing, unfinished, or finished from the same fingerprint (the stage then
    reuses it: said in one line); with ``overwrite`` where it is finished from
    another fingerprint (rebuilt, saying why)."""
    output = StageOutput(job.output, stage)
    if output.is_complete() and output.matches(job.fingerprint()):
        engines.log(f"{what}: reusing {job.output}")
        engines.reused += 1
        return job
    engines.built += 1
    if not output.is_complete():
        engines.log(f"{what} -> {job.output}")
        return job
    engines.log(f"{what}: {job.output} was made from other settings, inputs or code; rebuilding it")
    return dataclasses.replace(job, overwrite=True)


def generated(path: str, stage: str, settings: Mapping[str, Any], build: Callable[[str], None], code: str,
              what: str, engines: Engines) -> bool:
    """A stage with no job of its own (generated data, built data): ``build``
    into ``path`` under the output protocol, reused while ``settings`` and
    the code of module ``code`` are unchanged, rebuilt when they change.
    Returns whether it was reused."""
    fingerprint = {**settings, "code": code_digest(code)}
    output = StageOutput(path, stage)
    reused = output.matches(fingerprint)
    engines.log(f"{what}: reusing {path}" if reused else f"{what} -> {path}")
    setattr(engines, "reused" if reused else "built", getattr(engines, "reused" if reused else "built") + 1)
    output.run(build, fingerprint=fingerprint, overwrite=output.is_complete() and not reused, quiet=True)
    return reused


# -- one typed call per stage -----------------------------------------------------------

def weights(job, engines: Engines) -> dict:
    """Importance weights (Beam): ``beam_pipelines.importance_weights.WeightsJob`` -> its summary."""
    from beam_pipelines import importance_weights

    job = refreshed(job, importance_weights.STAGE, "importance weights (Beam)", engines)
    return importance_weights.run(job, engines.beam_args)


def near_duplicates(job, engines: Engines) -> dict:
    """Near-duplicates of the target's images (Beam): ``NearDuplicatesJob`` -> its summary."""
    from beam_pipelines import near_duplicates as nd

    job = refreshed(job, nd.STAGE, "near-duplicates (Beam)", engines)
    return nd.run(job, engines.beam_args)


def weights_many(jobs: Sequence, engines: Engines) -> list[dict]:
    """Importance weights of several targets in one Beam run (the source's
    labels counted once, every target's images through the generalist once):
    ``WeightsJob``s that share the source, vocabulary, generalist and
    settings -> each target's summary, in order. Each output follows the
    composed commands' policy on its own (:func:`refreshed`: which reads
    every target's inputs first, so a bad one raises before anything is
    built); a target whose images prove unreadable fails alone (the others
    are committed), then ``ValueError`` names every one that failed."""
    from beam_pipelines import importance_weights

    jobs = [refreshed(j, importance_weights.STAGE, f"importance weights of {j.target_name} (Beam)", engines)
            for j in jobs]
    done = importance_weights.run_targets(importance_weights.MultiWeightsJob.of(jobs), engines.beam_args)
    return _summaries(done.check())


def near_duplicates_many(jobs: Sequence, engines: Engines) -> list[dict]:
    """Near-duplicates of several targets in one Beam run (the source's
    embeddings read or made once, compared with every target's):
    ``NearDuplicatesJob``s that share the source, store, generalist and
    settings -> each target's summary, in order (failures as :func:`weights_many`)."""
    from beam_pipelines import near_duplicates as nd

    jobs = [refreshed(j, nd.STAGE, f"near-duplicates of {j.target_name} (Beam)", engines) for j in jobs]
    return _summaries(nd.run_targets(nd.MultiNearDuplicatesJob.of(jobs), engines.beam_args).check())


def _summaries(done) -> list[dict]:
    return [{**o.summary, "reused": True} if o.reused else o.summary for o in done.outcomes]


def resample(job, engines: Engines) -> dict:
    """The pre-training set's selection (Spark): ``ResampleJob`` -> its statistics."""
    from spark_jobs import resample as R

    job = refreshed(job, R.STAGE, f"resample {job.size:,} ({job.scheme}, {job.matcher})", engines)
    return R.run(engines.spark(), job)


def resample_many(jobs, engines: Engines) -> list:
    """Many targets' selections from one pass over their shared index
    (Spark): ``ResampleJob`` per target -> a ``TargetResult`` per target, in
    order. Each target's output is reused, built or rebuilt on its own by the
    composed commands' policy (:func:`refreshed`); a target whose input is
    bad fails alone: raises ``ValueError`` naming every failed target once
    the others are finished."""
    from spark_jobs import resample as R

    jobs = [refreshed(job, R.STAGE, f"resample {job.target or job.output} {job.size:,} ({job.scheme}, "
                                     f"{job.matcher})", engines) for job in jobs]
    results = R.run(engines.spark(), R.ManyResampleJob(tuple(jobs)))
    failed = [f"{r.job.target or r.job.output}: {r.error}" for r in results if not r.ok]
    if failed:
        raise ValueError(f"resample: {len(failed)} of {len(results)} targets failed: " + "; ".join(failed))
    return results


def shards(job, engines: Engines):
    """WebDataset shards of a selection (Spark): ``ShardJob`` -> its ``Manifest``."""
    from spark_jobs import write_shards as W

    job = refreshed(job, W.STAGE, "shards", engines)
    return W.run(engines.spark(), job)


def shards_many(job, engines: Engines) -> dict:
    """Every target's shards in one fetch pass (Spark): ``ManyShardJob`` ->
    each target's ``Manifest`` by name (raises ``ValueError`` naming the
    targets that failed, after the others are committed). A target finished
    from another fingerprint is rebuilt (saying why); one finished from the
    same is reused."""
    from spark_jobs.write_shards import many as M

    redo = set() if job.overwrite is True else set(job.overwrite or ())
    for (name, _), single in zip(job.targets, job.jobs()):
        if refreshed(single, M.STAGE, f"shards {name}", engines).overwrite:
            redo.add(name)
    if job.overwrite is not True:
        job = dataclasses.replace(job, overwrite=frozenset(redo))
    return M.run(engines.spark(), job)


def verify(directory: str, engines: Engines):
    """Every shard against its manifest; raises ``ValueError`` naming the
    first problems. Returns the report."""
    from spark_jobs.verify import verify as check

    report = check(directory)
    if not report.ok:
        raise ValueError(f"verify {directory} failed: " + "; ".join(report.problems[:5]))
    engines.log(f"verify: {report.shards} shards, {report.samples:,} samples match their manifest")
    return report


def pretrain(job, engines: Engines) -> dict:
    """Pre-training (DeepSpeed, in this process): ``PretrainJob`` -> its
    metrics. An unfinished run made from the same fingerprint is resumed."""
    from trainer import pretrain as P

    output = StageOutput(job.output, P.STAGE, in_place=True)
    started = os.path.isdir(job.output) and fingerprint_of(job.output) is not None and not output.is_complete()
    if started and not (job.resume or job.overwrite):
        engines.built += 1
        if output.made_from(job.fingerprint()):
            engines.log(f"pretrain: resuming {job.output} from its last checkpoint")
            return P.run(dataclasses.replace(job, resume=True))
        engines.log(f"pretrain: {job.output} was started from other settings, inputs or code; starting again")
        return P.run(dataclasses.replace(job, overwrite=True))
    return P.run(refreshed(job, P.STAGE, f"pretrain {job.steps} steps ({job.arch})", engines))


def finetune(job, engines: Engines) -> dict:
    """Fine-tuning and evaluation on the target (DeepSpeed, in this process):
    ``FinetuneJob`` -> its metrics."""
    from trainer import finetune as F

    return F.run(refreshed(job, F.STAGE, f"finetune {job.steps} steps from {job.init}", engines))


def evaluate(job, engines: Engines) -> dict:
    """A fine-tuned model on the target: ``EvaluateJob`` -> its metrics."""
    from trainer import evaluate as E

    return E.run(refreshed(job, E.STAGE, "evaluate", engines))


# -- the chain of one pre-training set ---------------------------------------------------

@dataclass(frozen=True)
class SetPlan:
    """One pre-training set under ``root``: ``resample/`` (the selection),
    ``shards/`` (its WebDataset shards, verified) and, where ``pretrain`` is
    given, ``pretrain/`` (a model pre-trained on them)."""

    root: str
    resample: Any  # spark_jobs.resample.ResampleJob, output root/resample
    shards: Any  # spark_jobs.write_shards.ShardJob, selection root/resample, output root/shards
    pretrain: Any = None  # trainer.pretrain.PretrainJob, shards root/shards, output root/pretrain


@dataclass(frozen=True)
class BuiltSet:
    """What :func:`build_set` made: the selection's statistics, the shards'
    manifest, and the pre-training metrics (``None`` without pre-training)."""

    plan: SetPlan
    stats: dict
    manifest: Any
    pretrain: dict | None = None

    @property
    def manifest_path(self) -> str:
        return sio.join(self.plan.shards.output, "manifest.json")

    @property
    def model(self) -> str | None:
        """The pre-trained model (``generalist.pt``), where there is one."""
        return sio.join(self.plan.pretrain.output, "generalist.pt") if self.plan.pretrain else None


def plan_set(root: str, resample_job, *, samples_per_shard: int = 10000, allow_uri_prefixes=None,
             max_side: int | None = None, quality: int | None = None,
             pretrain: Mapping[str, Any] | None = None) -> SetPlan:
    """The jobs of one set under ``root``: ``resample_job`` writing
    ``root/resample``; shards of it (the same index and seed); and, with
    ``pretrain`` (``PretrainJob`` settings: steps, batch_size, labels, ...;
    the seed defaults to the selection's), pre-training on them."""
    from spark_jobs import write_shards as W

    selection = dataclasses.replace(resample_job, output=sio.join(root, "resample"))
    shard_job = W.ShardJob(selection=selection.output, index=selection.index, output=sio.join(root, "shards"),
                           samples_per_shard=samples_per_shard, seed=selection.seed,
                           allow_uri_prefixes=allow_uri_prefixes, max_side=max_side, quality=quality)
    pretrain_job = None
    if pretrain is not None:
        from trainer.pretrain import PretrainJob

        settings = {"seed": selection.seed, "labels": selection.labels, **pretrain}
        pretrain_job = PretrainJob(shards=sio.join(shard_job.output, "manifest.json"),
                                   output=sio.join(root, "pretrain"), **settings)
    return SetPlan(root, selection, shard_job, pretrain_job)


def build_set(plan: SetPlan, engines: Engines) -> BuiltSet:
    """resample -> shards -> verify -> pretrain, each reused while its
    fingerprint holds (the chain of every pre-training set)."""
    stats = resample(plan.resample, engines)
    manifest = shards(plan.shards, engines)
    verify(plan.shards.output, engines)
    metrics = pretrain(plan.pretrain, engines) if plan.pretrain is not None else None
    return BuiltSet(plan, stats, manifest, metrics)


def build_sets(plans: Sequence[SetPlan], engines: Engines) -> list[BuiltSet]:
    """The chain of :func:`build_set` for several sets over one index, each
    stage once for all of them: one scan of the index draws every selection
    (:func:`resample_many`), one fetch pass writes every set's shards
    (:func:`shards_many`), then each is verified and pre-trained. Each
    set's outputs are those its own :func:`build_set` makes."""
    from spark_jobs.write_shards.many import ManyShardJob

    plans = list(plans)
    if len(plans) == 1:
        return [build_set(plans[0], engines)]
    names = [f"set{i}" for i in range(len(plans))]
    drawn = resample_many([p.resample for p in plans], engines)
    first = plans[0].shards
    common = {f.name: getattr(first, f.name) for f in dataclasses.fields(ManyShardJob)
              if f.name not in ("targets", "index", "output", "outputs", "overwrite") and hasattr(first, f.name)}
    for p in plans[1:]:
        differs = sorted(k for k, v in common.items() if getattr(p.shards, k) != v)
        if differs or p.shards.index != first.index:
            raise ValueError(f"sets built together share their shard settings; {p.root} differs in "
                             f"{differs or ['index']}")
    job = ManyShardJob(targets=[(n, p.resample.output) for n, p in zip(names, plans)], index=first.index,
                       outputs={n: p.shards.output for n, p in zip(names, plans)}, **common)
    manifests = shards_many(job, engines)
    built = []
    for name, p, d in zip(names, plans, drawn):
        verify(p.shards.output, engines)
        metrics = pretrain(p.pretrain, engines) if p.pretrain is not None else None
        built.append(BuiltSet(p, d.stats, manifests[name], metrics))
    return built
