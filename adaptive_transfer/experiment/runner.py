"""Runs the plan through the project's real stages, in this process.

Generated source and targets (``adaptive_transfer.synthetic``), the generalist
(the entire source, each example once, through the chain every pre-training
set goes through), importance weights per target, then per seed each
pre-training set and each fine-tuning run: all through
``adaptive_transfer.stages``, so every stage output is reused by the one
reuse rule (complete, and its fingerprint: settings, seed, inputs, code)
and rebuilt when anything it was made from changed. An interrupted run
continues where it stopped (a pre-training run from its last checkpoint).

Each stage's own printing goes to a log beside its output; the console
keeps one line per stage.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict

import numpy as np
import pyarrow.compute as pc

from schemas import io as sio
from adaptive_transfer.synthetic import generate_source, generate_target

from .. import stages
from ..demo_data import GeneralistTraining, generalist_set
from .plan import ExperimentConfig, FinetuneRun, PretrainSet, TargetPlan, finetune_runs, unique_sets

__all__ = ["Experiment"]


@contextlib.contextmanager
def _logged_to(path: str):
    """The stages' own printing goes to ``path`` (the console keeps one line per stage)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


class Experiment:
    """The engines and paths of one run of the plan under ``out``."""

    def __init__(self, config: ExperimentConfig, out: str, engines: stages.Engines):
        self.config, self.out, self.engines = config, os.path.abspath(out), engines
        self.data = os.path.join(self.out, "data")
        self._index_labels = None

    @property
    def built(self) -> int:
        return self.engines.built

    @property
    def reused(self) -> int:
        return self.engines.reused

    # -- shared data ---------------------------------------------------------------
    @property
    def source(self) -> str:
        return os.path.join(self.data, "source")

    @property
    def index(self) -> str:
        return os.path.join(self.source, "index")

    @property
    def labels(self) -> str:
        return os.path.join(self.source, "labels.parquet")

    def target_root(self, target: TargetPlan) -> str:
        return os.path.join(self.data, "targets", target.name)

    def weights_dir(self, target: str) -> str:
        return os.path.join(self.data, "weights", target)

    @property
    def generalist(self) -> str:
        return os.path.join(self.data, "generalist", "pretrain", "generalist.pt")

    def prepare_data(self) -> None:
        """Source, targets, the generalist and each target's importance weights."""
        from beam_pipelines.importance_weights import WeightsJob

        c, e = self.config, self.engines
        stages.generated(self.source, "experiment_source", {"source": asdict(c.source)},
                         lambda p: generate_source(p, c.source), "adaptive_transfer.synthetic", "data: source", e)
        for t in c.targets:
            spec = c.target_spec(t)
            stages.generated(self.target_root(t), "experiment_target", {"target": asdict(spec)},
                             lambda p, spec=spec: generate_target(p, spec), "adaptive_transfer.synthetic",
                             f"data: target {t.name}", e)
        training = GeneralistTraining(c.generalist_steps, seed=c.generalist_seed, batch_size=c.pretrain_batch,
                                      lr=c.pretrain_lr, samples_per_shard=c.samples_per_shard, num_workers=1)
        generalist = generalist_set(os.path.join(self.data, "generalist"), self.index, self.labels,
                                    c.source.num_examples, training)
        with _logged_to(os.path.join(self.data, "generalist", "log.txt")):
            stages.build_set(generalist, e)
        for t in c.targets:
            job = WeightsJob(index=self.index, labels=self.labels, target_root=self.target_root(t),
                             target_layout=t.layout, target=t.name, checkpoint=self.generalist,
                             output=self.weights_dir(t.name))
            with _logged_to(self.weights_dir(t.name) + ".log"):
                stages.weights(job, e)

    # -- per seed ------------------------------------------------------------------
    def set_dir(self, s: PretrainSet) -> str:
        return os.path.join(self.out, f"seed-{s.seed}", "pretrain", s.slug)

    def set_plan(self, s: PretrainSet) -> stages.SetPlan:
        """The resample -> shards -> verify -> pretrain jobs of ``s``."""
        from spark_jobs.resample import ResampleJob

        c = self.config
        weights = os.path.join(self.weights_dir(s.weights_of), "weights.parquet") if s.weights_of else None
        job = ResampleJob(index=self.index, output="", weights=weights, labels=self.labels,
                          target=s.weights_of or s.name, label_sets=os.path.join(self.data, "label-sets.parquet"),
                          **s.resample_options())
        return stages.plan_set(self.set_dir(s), job, samples_per_shard=c.samples_per_shard,
                               pretrain={"arch": "small", "steps": c.pretrain_steps, "batch_size": c.pretrain_batch,
                                         "lr": c.pretrain_lr, "num_workers": 1,
                                         "log_every": max(1, c.pretrain_steps // 4),
                                         "save_every": c.pretrain_steps, "keep_checkpoints": 1})

    def build_set(self, s: PretrainSet) -> stages.BuiltSet:
        """Resample, shards, verify and pre-training of one set (each reused while unchanged)."""
        self.engines.log(f"seed {s.seed}: pre-training set {s.slug}")
        with _logged_to(os.path.join(self.set_dir(s), "log.txt")):
            return stages.build_set(self.set_plan(s), self.engines)

    def finetune(self, run: FinetuneRun) -> dict:
        """Fine-tune and evaluate one run; its metrics (reused while unchanged)."""
        from trainer.finetune import FinetuneJob

        c = self.config
        target = next(t for t in c.targets if t.name == run.target)
        path = os.path.join(self.out, f"seed-{run.seed}", "finetune", run.target, run.slug)
        init = os.path.join(self.set_dir(run.init), "pretrain", "generalist.pt") if run.init else "none"
        job = FinetuneJob(target_layout=target.layout, target_root=self.target_root(target), init=init, output=path,
                          arch="small", steps=c.finetune_steps, batch_size=c.finetune_batch, lr=c.finetune_lr,
                          seed=run.seed, num_workers=1, log_every=c.finetune_steps)
        self.engines.log(f"seed {run.seed}: fine-tune {run.target} from {run.slug}")
        with _logged_to(path + ".log"):
            stages.finetune(job, self.engines)
        with open(os.path.join(path, "metrics.json")) as fh:
            return json.load(fh)

    # -- facts for the report -----------------------------------------------------
    def target_leaves(self, target: str) -> list[int]:
        with open(os.path.join(self.data, "targets", target, "generated.json")) as fh:
            return sorted(set(json.load(fh)["class_to_leaf"].values()))

    def generalist_facts(self, target: str) -> dict:
        """How concentrated the generalist's P_t is: entropy (bits, and the
        uniform's), the mass on the target's true source leaves, the top labels."""
        from .stats import entropy_bits

        table = sio.read_parquet(os.path.join(self.weights_dir(target), "weights.parquet"))
        vocab = sio.read_parquet(os.path.join(self.source, "labels.parquet"))
        names = dict(zip(vocab.column("label_id").to_pylist(), vocab.column("name").to_pylist()))
        ids = table.column("label_id").to_numpy()
        p = table.column("p_target").to_numpy()
        leaves = self.target_leaves(target)
        top = np.argsort(-p, kind="stable")[:5]
        return {"entropy_bits": entropy_bits(p), "uniform_entropy_bits": float(np.log2(len(p))),
                "mass_on_target_leaves": float(p[np.isin(ids, leaves)].sum()), "target_leaves": len(leaves),
                "labels": int(len(p)), "top_labels": [[names.get(int(ids[i]), str(ids[i])), float(p[i])] for i in top]}

    def selection_facts(self, s: PretrainSet, target: str) -> dict:
        """Unique examples, samples, and the share of draws whose example
        carries one of the target's true source leaves."""
        path = os.path.join(self.set_dir(s), "resample")
        with open(os.path.join(path, "stats.json")) as fh:
            stats = json.load(fh)
        if self._index_labels is None:
            index = sio.read_parquet(os.path.join(self.source, "index"), columns=["key", "labels"])
            self._index_labels = index
        index = self._index_labels
        sel = sio.read_parquet(os.path.join(path, "selection"), columns=["key", "copies"])
        rows = pc.index_in(sel.column("key"), value_set=index.column("key")).to_numpy(zero_copy_only=False)
        labels = index.column("labels").combine_chunks()
        flat = labels.flatten().to_numpy()
        parents = pc.list_parent_indices(labels).to_numpy()
        hit = np.zeros(len(index), bool)
        hit[parents[np.isin(flat, self.target_leaves(target))]] = True
        copies = sel.column("copies").to_numpy().astype(np.int64)
        return {"unique_examples": int(stats["unique_examples"]), "samples": int(stats["total_copies"]),
                "share_on_target_leaves": float(copies[hit[rows]].sum() / max(1, copies.sum()))}

    # -- the whole plan --------------------------------------------------------------
    def run(self) -> list[dict]:
        """Every seed's sets and runs; one record per fine-tuning run."""
        self.prepare_data()
        records = []
        for seed in self.config.seeds:
            runs = finetune_runs(self.config, seed)
            for s in unique_sets(runs):
                self.build_set(s)
            for r in runs:
                metrics = self.finetune(r)
                record = {"seed": seed, "target": r.target, "arm": r.arm, "figure3": r.figure3,
                          "set": r.init.slug if r.init else None, "size": r.init.size if r.init else 0,
                          "top1": metrics["top1"], "mean_per_class": metrics["mean_per_class_accuracy"],
                          "test_images": int(metrics["examples"])}
                record.update(self.selection_facts(r.init, r.target) if r.init else
                              {"unique_examples": 0, "samples": 0, "share_on_target_leaves": None})
                records.append(record)
        return records
