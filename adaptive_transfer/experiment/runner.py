"""Runs a plan through the project's real stages, in this process.

One :class:`Experiment` is one world's draw under one directory: its data
(:mod:`.worlds`), the generalist (the entire source, each example once,
through the chain every pre-training set goes through), optionally the
near-duplicates of every target's images (removed from every pre-training
set), importance weights per target (from the generalist, or from the truth
for the oracle), then per seed each pre-training set and each fine-tuning
run: all through ``adaptive_transfer.stages``, so every stage output is
reused by the one reuse rule (complete, and its fingerprint: settings, seed,
inputs, code) and rebuilt when anything it was made from changed. An
interrupted run continues where it stopped (a pre-training run from its last
checkpoint).

Each stage's own printing goes to a log beside its output; the console
keeps one line per stage.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import io as sio

from .. import stages
from ..demo_data import GeneralistTraining, generalist_set
from .plan import ExperimentConfig, FinetuneRun, PretrainSet, WeightsSpec, by_priority, finetune_runs
from .worlds import WorldData

__all__ = ["Experiment"]


@contextlib.contextmanager
def _logged_to(path: str):
    """The stages' own printing goes to ``path`` (the console keeps one line per stage)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


class Experiment:
    """The engines and paths of one draw of the plan under ``out``."""

    def __init__(self, config: ExperimentConfig, out: str, engines: stages.Engines, draw: int = 0):
        self.config, self.out, self.engines, self.draw = config, os.path.abspath(out), engines, draw
        self.data = os.path.join(self.out, "data")
        self.world: WorldData | None = None
        self.dedup: dict[str, dict] = {}
        self._index_labels = None
        self._made: dict[tuple, str] = {}  # generalists and weights made (or found) by this object

    @property
    def built(self) -> int:
        return self.engines.built

    @property
    def reused(self) -> int:
        return self.engines.reused

    # -- shared data ---------------------------------------------------------------
    @property
    def index(self) -> str:
        return self._world().index

    @property
    def labels(self) -> str:
        return self._world().labels

    def _world(self) -> WorldData:
        if self.world is None:
            raise ValueError("prepare_data() first: the world's data are not made yet")
        return self.world

    def target_root(self, target: str) -> str:
        return self._world().targets[target]

    def target_leaves(self, target: str) -> tuple[int, ...]:
        return self._world().leaves[target]

    def generalist_dir(self, steps: int | None = None) -> str:
        steps = steps or self.config.generalist_steps
        name = "generalist" if steps == self.config.generalist_steps else f"generalist-{steps}"
        return os.path.join(self.data, name)

    def generalist(self, steps: int | None = None) -> str:
        """The generalist pre-trained ``steps`` (default the config's) on the entire source, built on first use."""
        c = self.config
        steps = steps or c.generalist_steps
        if ("generalist", steps) not in self._made:
            root = self.generalist_dir(steps)
            training = GeneralistTraining(steps, seed=c.generalist_seed, batch_size=c.pretrain_batch,
                                          lr=c.pretrain_lr, samples_per_shard=c.samples_per_shard, num_workers=1)
            plan = generalist_set(root, self.index, self.labels, self._world().facts["source_examples"], training)
            with _logged_to(os.path.join(root, "log.txt")):
                self._made[("generalist", steps)] = stages.build_set(plan, self.engines).model
        return self._made[("generalist", steps)]

    @property
    def exclude(self) -> str | None:
        """The union of every target's near-duplicates (``None`` without dedup)."""
        return os.path.join(self.data, "exclusions", "exclude.parquet") if self.config.dedup else None

    def prepare_data(self) -> None:
        """The world's data, the generalist, the near-duplicates and each target's default weights."""
        c = self.config
        self.world = c.world.prepare(self.data, c.targets, self.draw, self.engines)
        self.generalist()
        if c.dedup:
            self.remove_near_duplicates()
        for t in c.targets:
            self.weights(WeightsSpec(t.name))

    def finished_data(self) -> None:
        """The data, generalist, near-duplicates and default weights of a run
        that made them, read from their finished outputs (no engine started):
        for ``finished_only``. Raises ``ValueError`` naming what is missing."""
        from schemas.stage_output import is_complete

        c = self.config
        self.world = c.world.prepare(self.data, c.targets, self.draw, self.engines)
        outputs = {("generalist", c.generalist_steps): os.path.join(self.generalist_dir(), "pretrain")}
        outputs.update({("weights", t.name): self.weights_dir(t.name) for t in c.targets})
        dedup = {t.name: os.path.join(self.data, "dedup", t.name) for t in c.targets} if c.dedup else {}
        for path in [*outputs.values(), *dedup.values()]:
            if not is_complete(path):
                raise ValueError(f"{path} is not finished: run without --finished-only first")
        self._made[("generalist", c.generalist_steps)] = os.path.join(outputs[("generalist", c.generalist_steps)],
                                                                       "generalist.pt")
        self._made.update({("weights", t.name): os.path.join(self.weights_dir(t.name), "weights.parquet")
                           for t in c.targets})
        for t, path in dedup.items():
            with open(os.path.join(path, "summary.json")) as fh:
                self.dedup[t] = json.load(fh)

    def remove_near_duplicates(self) -> None:
        """Near-duplicates of each target's train and test images (Beam, the
        generalist's embeddings, stored once for every target), and their union."""
        from beam_pipelines.near_duplicates import NearDuplicatesJob

        parts = {}
        for t in self.config.targets:
            out = os.path.join(self.data, "dedup", t.name)
            job = NearDuplicatesJob(index=self.index, labels=self.labels, target_root=self.target_root(t.name),
                                    target_layout=t.layout, checkpoint=self.generalist(), output=out,
                                    embeddings=os.path.join(self.data, "embeddings"))
            with _logged_to(out + ".log"):
                self.dedup[t.name] = stages.near_duplicates(job, self.engines)
            parts[t.name] = os.path.join(out, "exclude.parquet")
        settings = {"exclude": {t: sio.file_sha256(p) for t, p in parts.items()}}
        stages.generated(os.path.dirname(self.exclude), "experiment_exclusions", settings,
                         lambda work: _union_exclusions(work, parts), "adaptive_transfer.experiment.runner",
                         "near-duplicates: the union over the targets", self.engines)

    # -- weights -------------------------------------------------------------------
    def weights_dir(self, key: str) -> str:
        return os.path.join(self.data, "weights", key)

    def weights(self, spec: WeightsSpec) -> str:
        """The weights table of ``spec`` (Beam), built on first use."""
        from beam_pipelines.importance_weights import WeightsJob

        if ("weights", spec.key) in self._made:
            return self._made[("weights", spec.key)]
        out = self.weights_dir(spec.key)
        target = self.config.target(spec.target)
        if spec.oracle:
            job = WeightsJob(index=self.index, labels=self.labels, target=target.name, output=out,
                             target_histogram=self.oracle_histogram(target.name))
        else:
            job = WeightsJob(index=self.index, labels=self.labels, target_root=self.target_root(target.name),
                             target_layout=target.layout, target=target.name, output=out,
                             checkpoint=self.generalist(spec.generalist_steps), temperature=spec.temperature)
        with _logged_to(out + ".log"):
            stages.weights(job, self.engines)
        self._made[("weights", spec.key)] = os.path.join(out, "weights.parquet")
        return self._made[("weights", spec.key)]

    def oracle_histogram(self, target: str) -> str:
        """P_t uniform over the target's true source leaves, as a target histogram (written from the truth)."""
        leaves = self.target_leaves(target)
        path = os.path.join(self.data, "oracle", target)
        settings = {"leaves": list(leaves), "labels": sio.file_sha256(self.labels)}
        stages.generated(path, "experiment_oracle", settings, lambda work: _oracle_histogram(work, self.labels, leaves),
                         "adaptive_transfer.experiment.runner", f"oracle P_t of {target}", self.engines)
        return os.path.join(path, "target_histogram.parquet")

    # -- per seed ------------------------------------------------------------------
    def set_dir(self, s: PretrainSet) -> str:
        return os.path.join(self.out, f"seed-{s.seed}", "pretrain", s.slug)

    def leaf_names(self, target: str) -> tuple[str, ...]:
        """The names of the target's true source leaves (a subset's labels)."""
        vocab = sio.read_parquet(self.labels, columns=["label_id", "name"])
        names = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
        return tuple(names[i] for i in self.target_leaves(target))

    def set_plan(self, s: PretrainSet) -> stages.SetPlan:
        """The resample -> shards -> verify -> pretrain jobs of ``s``."""
        from spark_jobs.resample import ResampleJob

        c = self.config
        weights = self.weights(s.weights) if s.weights else None
        leaves = self.leaf_names(s.leaves_of) if s.leaves_of else ()
        job = ResampleJob(index=self.index, output="", weights=weights, labels=self.labels,
                          target=s.weights_of or s.name, label_sets=os.path.join(self.data, "label-sets.parquet"),
                          exclude=self.exclude, **s.resample_options(leaves))
        return stages.plan_set(self.set_dir(s), job, samples_per_shard=c.samples_per_shard,
                               pretrain={"arch": "small", "steps": c.pretrain_steps, "batch_size": c.pretrain_batch,
                                         "lr": c.pretrain_lr, "num_workers": 1,
                                         "log_every": max(1, c.pretrain_steps // 4),
                                         "save_every": c.pretrain_steps, "keep_checkpoints": 1})

    def build_set(self, s: PretrainSet) -> stages.BuiltSet:
        """Resample, shards, verify and pre-training of one set (each reused while unchanged)."""
        self.engines.log(f"draw {self.draw}, seed {s.seed}: pre-training set {s.slug}")
        plan = self.set_plan(s)
        with _logged_to(os.path.join(self.set_dir(s), "log.txt")):
            return stages.build_set(plan, self.engines)

    def finetune(self, run: FinetuneRun) -> dict:
        """Fine-tune and evaluate one run; its metrics (reused while unchanged)."""
        from trainer.finetune import FinetuneJob

        c = self.config
        target = c.target(run.target)
        path = self.finetune_dir(run)
        init = os.path.join(self.set_dir(run.init), "pretrain", "generalist.pt") if run.init else "none"
        job = FinetuneJob(target_layout=target.layout, target_root=self.target_root(target.name), init=init,
                          output=path, arch="small", steps=c.finetune_steps, batch_size=c.finetune_batch,
                          lr=c.finetune_lr, seed=run.seed, num_workers=1, log_every=c.finetune_steps)
        self.engines.log(f"draw {self.draw}, seed {run.seed}: fine-tune {run.target} from {run.slug}")
        with _logged_to(path + ".log"):
            stages.finetune(job, self.engines)
        with open(os.path.join(path, "metrics.json")) as fh:
            return json.load(fh)

    # -- facts for the report -----------------------------------------------------
    def generalist_facts(self, target: str, spec: WeightsSpec | None = None) -> dict:
        """How concentrated P_t is: entropy (bits, and the uniform's), the
        mass on the target's true source leaves, the top labels."""
        from .stats import entropy_bits

        table = sio.read_parquet(self.weights(spec or WeightsSpec(target)))
        vocab = sio.read_parquet(self.labels)
        names = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
        ids = table.column("label_id").to_numpy()
        p = table.column("p_target").to_numpy()
        leaves = list(self.target_leaves(target))
        top = np.argsort(-p, kind="stable")[:5]
        return {"entropy_bits": entropy_bits(p), "uniform_entropy_bits": float(np.log2(len(p))),
                "mass_on_target_leaves": float(p[np.isin(ids, leaves)].sum()), "target_leaves": len(leaves),
                "labels": int(len(p)), "top_labels": [[names.get(int(ids[i]), str(ids[i])), float(p[i])] for i in top]}

    def selection_facts(self, s: PretrainSet, target: str) -> dict:
        """Unique examples, samples, the largest number of copies of one
        example, and the share of draws whose example carries one of the
        target's true source leaves."""
        path = os.path.join(self.set_dir(s), "resample")
        with open(os.path.join(path, "stats.json")) as fh:
            stats = json.load(fh)
        if self._index_labels is None:
            self._index_labels = sio.read_parquet(self.index, columns=["key", "labels"])
        index = self._index_labels
        sel = sio.read_parquet(os.path.join(path, "selection"), columns=["key", "copies"])
        rows = pc.index_in(sel.column("key"), value_set=index.column("key")).to_numpy(zero_copy_only=False)
        labels = index.column("labels").combine_chunks()
        flat = labels.flatten().to_numpy()
        parents = pc.list_parent_indices(labels).to_numpy()
        hit = np.zeros(len(index), bool)
        hit[parents[np.isin(flat, list(self.target_leaves(target)))]] = True
        copies = sel.column("copies").to_numpy().astype(np.int64)
        return {"unique_examples": int(stats["unique_examples"]), "samples": int(stats["total_copies"]),
                "max_copies": int(copies.max()) if copies.size else 0,
                "share_on_target_leaves": float(copies[hit[rows]].sum() / max(1, copies.sum()))}

    def dedup_facts(self) -> dict:
        """Per target: what the near-duplicate stage found (and the union's size)."""
        if not self.config.dedup:
            return {}
        keep = ("threshold", "source_examples_compared", "excluded", "excluded_by_split", "target_images",
                "target_images_with_duplicates")
        out = {t: {k: s.get(k) for k in keep} for t, s in self.dedup.items()}
        union = pq.read_metadata(self.exclude).num_rows
        return {"targets": out, "excluded_union": int(union)}

    # -- the whole plan --------------------------------------------------------------
    def run(self, plan: Callable[[int], Sequence[FinetuneRun]] | None = None,
            seeds: Sequence[int] | None = None, finished_only: bool = False) -> list[dict]:
        """Every seed's sets and runs (``plan(seed)``, default the main
        table's); one record per fine-tuning run. Per seed, each set in
        :func:`.plan.by_priority`'s order with its fine-tuning runs right
        after it, random initialisation last (a run stopped part way has
        whole arms, the pre-registered comparisons' first).
        ``finished_only``: build nothing past the data; record the runs
        whose fine-tuning finished (the report of a run stopped part way)."""
        plan = plan or (lambda seed: finetune_runs(self.config, seed))
        self.finished_data() if finished_only else self.prepare_data()
        records = []
        for seed in seeds if seeds is not None else self.config.seeds:
            runs, built = list(plan(seed)), set()
            for s in by_priority(runs) + [None]:
                for r in (r for r in runs if r.init == s):
                    if finished_only:
                        metrics = self.finished_metrics(r)
                        if metrics is not None:
                            records.append(self.record(r, metrics))
                        continue
                    if s is not None and s not in built:
                        self.build_set(s)
                        built.add(s)
                    records.append(self.record(r, self.finetune(r)))
        return records

    def finetune_dir(self, run: FinetuneRun) -> str:
        return os.path.join(self.out, f"seed-{run.seed}", "finetune", run.target, run.slug)

    def finished_metrics(self, run: FinetuneRun) -> dict | None:
        """The metrics of a fine-tuning run that finished (None otherwise)."""
        from schemas.stage_output import StageOutput
        from trainer.finetune import STAGE

        path = self.finetune_dir(run)
        if not StageOutput(path, STAGE).is_complete():
            return None
        with open(os.path.join(path, "metrics.json")) as fh:
            return json.load(fh)

    def record(self, r: FinetuneRun, metrics: dict) -> dict:
        """One run's record: what it was and what it measured."""
        record = {"draw": self.draw, "seed": r.seed, "target": r.target, "arm": r.arm, "condition": r.condition,
                  "figure3": r.figure3, "set": r.init.slug if r.init else None, "size": r.init.size if r.init else 0,
                  "top1": metrics["top1"], "mean_per_class": metrics["mean_per_class_accuracy"],
                  "test_images": int(metrics["examples"])}
        record.update(self.selection_facts(r.init, r.target) if r.init else
                      {"unique_examples": 0, "samples": 0, "max_copies": 0, "share_on_target_leaves": None})
        return record


def _union_exclusions(work: str, parts: dict[str, str]) -> None:
    """``exclude.parquet``: every key any target's near-duplicate stage excluded, once, sorted."""
    keys = [sio.read_parquet(p, columns=["key"]).column("key") for p in parts.values()]
    merged = pa.chunked_array([c for k in keys for c in k.chunks], pa.string()) if keys else pa.array([], pa.string())
    unique = pc.unique(merged).sort() if len(merged) else pa.array([], pa.string())
    pq.write_table(pa.table({"key": unique}), os.path.join(work, "exclude.parquet"))


def _oracle_histogram(work: str, labels: str, leaves: Sequence[int]) -> None:
    """``target_histogram.parquet``: p_target 1/n on each of the n true leaves, 0 on every other label."""
    vocab = sio.read_parquet(labels)
    ids = np.asarray(vocab.column("label_id").to_pylist(), np.int32)
    p = np.where(np.isin(ids, list(leaves)), 1.0 / len(leaves), 0.0)
    pq.write_table(pa.table({"label_id": pa.array(ids, pa.int32()), "p_target": pa.array(p, pa.float64())}),
                   os.path.join(work, "target_histogram.parquet"))
