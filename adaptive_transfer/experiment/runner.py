"""Runs the plan through the project's real stages, in this process.

Generated source and targets (``adaptive_transfer.synthetic``), the generalist (resample
'entire' -> shards -> ``trainer.pretrain``), importance weights per target
(``beam_pipelines.importance_weights``, DirectRunner), then per seed each
pre-training set (``spark_jobs.resample`` -> ``spark_jobs.write_shards`` ->
``trainer.pretrain``) and each fine-tuning run (``trainer.finetune``).

Every stage output lives under ``OUT`` per seed and per arm, beside a
``<dir>.fingerprint.json`` holding the digest of everything it was made from
(settings, seed, and its inputs' digests). A finished output is reused only
when its digest matches; otherwise it is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np
import pyarrow.compute as pc

from schemas import io as sio
from adaptive_transfer.synthetic import generate_source, generate_target

from .plan import ExperimentConfig, FinetuneRun, PretrainSet, TargetPlan, finetune_runs, unique_sets

__all__ = ["digest", "reuse_or_build", "Experiment"]


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (16 hex digits)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reuse_or_build(path: str, fingerprint: dict, build: Callable[[str], None], log=print) -> tuple[str, bool]:
    """Reuse the output at ``path`` if it was finished from ``fingerprint``;
    otherwise (re)build it with ``build(path)``. Returns ``(digest, reused)``.

    ``<path>.fingerprint.json`` is written before the build (state
    'building') and marked 'done' after it, by rename: a killed build is never
    taken for a finished one. Only an output this experiment made (one with
    that file) is ever removed; anything else at ``path`` is refused."""
    fp_file = path + ".fingerprint.json"
    want = digest(fingerprint)
    record = None
    if os.path.exists(fp_file):
        with open(fp_file) as fh:
            record = json.load(fh)
    if record and record.get("digest") == want and record.get("state") == "done" and os.path.exists(path):
        return want, True
    if os.path.exists(path):
        if record is None:
            raise ValueError(f"{path} exists and was not made by this experiment; move it or choose another --out")
        log(f"    {os.path.basename(path)}: made from other settings or unfinished; rebuilding")
        shutil.rmtree(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def mark(state: str) -> None:
        tmp = fp_file + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"digest": want, "state": state, "fingerprint": fingerprint}, fh, indent=1, sort_keys=True,
                      default=str)
        os.replace(tmp, fp_file)

    mark("building")
    build(path)
    mark("done")
    return want, False


@contextlib.contextmanager
def _logged_to(path: str):
    """The stage's own printing goes to ``path`` (the console keeps one line per stage)."""
    with open(path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def _run_job(run, job, prog: str) -> int:
    """``run(job)`` in this process; a bad input or unreadable file is one
    line in the (redirected) log and exit status 1, as the stage's CLI says it."""
    try:
        run(job)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _check(rc: int, what: str, log_path: str) -> None:
    if rc:
        tail = open(log_path).read()[-2000:] if os.path.exists(log_path) else ""
        raise RuntimeError(f"{what} failed (exit {rc}); its log {log_path} ends:\n{tail}")


class Experiment:
    """The engines and paths of one run of the plan under ``out``."""

    def __init__(self, config: ExperimentConfig, out: str, spark, log=print):
        self.config, self.out, self.spark, self.log = config, os.path.abspath(out), spark, log
        self.data = os.path.join(self.out, "data")
        self.digests: dict[str, str] = {}
        self.built, self.reused = 0, 0
        self._index_labels = None

    # -- shared data ---------------------------------------------------------------
    @property
    def source(self) -> str:
        return os.path.join(self.data, "source")

    def target_root(self, target: TargetPlan) -> str:
        return os.path.join(self.data, "targets", target.name)

    def weights_dir(self, target: str) -> str:
        return os.path.join(self.data, "weights", target)

    @property
    def generalist(self) -> str:
        return os.path.join(self.data, "generalist", "pretrain", "generalist.pt")

    def prepare_data(self) -> None:
        """Source, targets, the generalist and each target's importance weights."""
        c = self.config
        self.digests["source"] = self._stage("data: source", self.source, {"source": asdict(c.source)},
                                             lambda p: generate_source(p, c.source))
        for t in c.targets:
            spec = c.target_spec(t)
            self.digests[f"target:{t.name}"] = self._stage(
                f"data: target {t.name}", self.target_root(t), {"target": asdict(spec)},
                lambda p, spec=spec: generate_target(p, spec))
        gen = {"source": self.digests["source"], "steps": c.generalist_steps, "batch": c.pretrain_batch,
               "lr": c.pretrain_lr, "seed": c.generalist_seed}
        self.digests["generalist"] = self._stage("data: generalist (entire source)",
                                                 os.path.dirname(os.path.dirname(self.generalist)), gen,
                                                 self._train_generalist)
        for t in c.targets:
            fp = {"generalist": self.digests["generalist"], "target": self.digests[f"target:{t.name}"]}
            self.digests[f"weights:{t.name}"] = self._stage(
                f"data: importance weights for {t.name} (Beam)", self.weights_dir(t.name), fp,
                lambda p, t=t: self._weights(t, p))

    def _stage(self, what: str, path: str, fingerprint: dict, build: Callable[[str], None]) -> str:
        t0 = time.time()
        d, reused = reuse_or_build(path, fingerprint, build, self.log)
        self.reused += reused
        self.built += not reused
        self.log(f"{what}: {'reused' if reused else f'{time.time() - t0:.0f} s'}")
        return d

    def _train_generalist(self, path: str) -> None:
        """The entire source, each example once (the paper's generalist)."""
        c = self.config
        entire = PretrainSet("generalist", c.generalist_seed, c.source.num_examples, "entire", draw="systematic")
        self._build_set(entire, path, c.generalist_steps)

    def _weights(self, target: TargetPlan, path: str) -> None:
        from beam_pipelines import importance_weights as IW

        with _logged_to(path + ".log"):
            IW.run(IW.WeightsJob(index=os.path.join(self.source, "index"),
                                 labels=os.path.join(self.source, "labels.parquet"),
                                 target_root=self.target_root(target), target_layout=target.layout,
                                 target=target.name, checkpoint=self.generalist, output=path))

    def _pretrain(self, shards: str, out: str, steps: int, seed: int, log_path: str) -> None:
        from trainer import pretrain

        c = self.config
        job = pretrain.PretrainJob(shards=os.path.join(shards, "manifest.json"),
                                   labels=os.path.join(self.source, "labels.parquet"), output=out, arch="small",
                                   steps=steps, batch_size=c.pretrain_batch, lr=c.pretrain_lr, seed=seed,
                                   num_workers=1, log_every=max(1, steps // 4), save_every=steps,
                                   keep_checkpoints=1)
        with _logged_to(log_path):
            rc = _run_job(pretrain.run, job, "pretrain")
        _check(rc, f"pretrain {out}", log_path)

    # -- per seed ------------------------------------------------------------------
    def set_dir(self, s: PretrainSet) -> str:
        return os.path.join(self.out, f"seed-{s.seed}", "pretrain", s.slug)

    def build_set(self, s: PretrainSet) -> str:
        """Resample, shards and pre-training of one set (reused when unchanged)."""
        c = self.config
        fp = {"set": asdict(s), "source": self.digests["source"],
              "weights": self.digests[f"weights:{s.weights_of}"] if s.weights_of else None,
              "steps": c.pretrain_steps, "batch": c.pretrain_batch, "lr": c.pretrain_lr,
              "samples_per_shard": c.samples_per_shard}
        d = self._stage(f"seed {s.seed}: pre-training set {s.slug}", self.set_dir(s), fp,
                        lambda p: self._build_set(s, p, c.pretrain_steps))
        self.digests[f"set:{s.seed}:{s.slug}"] = d
        return d

    def _build_set(self, s: PretrainSet, path: str, steps: int) -> None:
        """resample -> write_shards -> pretrain of ``s`` under ``path``."""
        from spark_jobs import resample as R
        from spark_jobs import write_shards as W

        c = self.config
        index, labels = os.path.join(self.source, "index"), os.path.join(self.source, "labels.parquet")
        weights = os.path.join(self.weights_dir(s.weights_of), "weights.parquet") if s.weights_of else None
        os.makedirs(path)
        log_path = os.path.join(path, "log.txt")
        with _logged_to(log_path):
            R.run(self.spark, R.ResampleJob(index=index, weights=weights, labels=labels,
                                            target=s.weights_of or s.name, output=os.path.join(path, "resample"),
                                            label_sets=os.path.join(self.data, "label-sets.parquet"),
                                            **s.resample_options()))
            W.run(self.spark, W.ShardJob(selection=os.path.join(path, "resample"), index=index,
                                         output=os.path.join(path, "shards"), samples_per_shard=c.samples_per_shard,
                                         seed=s.seed))
        self._pretrain(os.path.join(path, "shards"), os.path.join(path, "pretrain"), steps, s.seed, log_path)

    def finetune(self, run: FinetuneRun) -> dict:
        """Fine-tune and evaluate one run; its metrics (reused when unchanged)."""
        from trainer import finetune

        c = self.config
        target = next(t for t in c.targets if t.name == run.target)
        path = os.path.join(self.out, f"seed-{run.seed}", "finetune", run.target, run.slug)
        init = os.path.join(self.set_dir(run.init), "pretrain", "generalist.pt") if run.init else "none"
        fp = {"target": self.digests[f"target:{run.target}"], "seed": run.seed, "steps": c.finetune_steps,
              "batch": c.finetune_batch, "lr": c.finetune_lr,
              "init": self.digests[f"set:{run.seed}:{run.init.slug}"] if run.init else None}

        def build(p: str) -> None:
            log_path = p + ".log"
            job = finetune.FinetuneJob(target_layout=target.layout, target_root=self.target_root(target),
                                       init=init, output=p, arch="small", steps=c.finetune_steps,
                                       batch_size=c.finetune_batch, lr=c.finetune_lr, seed=run.seed,
                                       num_workers=1, log_every=c.finetune_steps)
            with _logged_to(log_path):
                rc = _run_job(finetune.run, job, "finetune")
            _check(rc, f"finetune {p}", log_path)

        self._stage(f"seed {run.seed}: fine-tune {run.target} from {run.slug}", path, fp, build)
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
