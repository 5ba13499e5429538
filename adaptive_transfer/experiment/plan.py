"""What the experiment runs: its settings (full and quick), its targets, and
the plan of pre-training sets and fine-tuning runs derived from them.

Pure: no engine is touched here. Pre-training runs that do not depend on the
target are shared across targets (the entire source, the class-balanced
control, and each branch subset, which is one target's hand-picked arm and
another's wrong-domain arm); every run is per seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from adaptive_transfer.synthetic import SourceSpec, TargetSpec

__all__ = ["TargetPlan", "ExperimentConfig", "FULL", "QUICK", "PretrainSet", "FinetuneRun", "ARMS",
           "pretrain_sets", "finetune_runs"]


@dataclass(frozen=True)
class TargetPlan:
    """One generated target: its source branch (the hand-picked subset), the
    branch of its wrong-domain arm, its on-disk layout and the paper dataset it
    stands for."""

    name: str
    branch: str
    wrong_branch: str
    layout: str
    analogue: str


#: Three targets from different branches, shaped like Table 3's columns; each
#: branch subset is one target's hand-picked and another's wrong-domain arm
#: (vehicle -> animal is the paper's "JFT-Car -> Birdsnap").
TARGETS = (
    TargetPlan("food", "food", "animal", "food101", "Food-101"),
    TargetPlan("animal", "animal", "vehicle", "imagefolder", "Birdsnap / Oxford-IIIT Pets"),
    TargetPlan("vehicle", "vehicle", "food", "imagefolder", "Stanford Cars / FGVC Aircraft"),
)

#: The arms of the main table, in the paper's row order: (arm, what it is).
ARMS = (
    ("entire", "Entire source (as many unique examples as the size allows)"),
    ("hand-picked", "Hand-picked subset: the target's branch"),
    ("wrong-domain", "Wrong-domain subset: another target's branch"),
    ("adaptive", "Adaptive transfer, same distribution matcher"),
    ("elastic", "Adaptive transfer, elastic distribution matcher"),
    ("adaptive-topk", "Top-k labels, adaptive weights (Table 6)"),
    ("topk-uniform", "Top-k labels, uniform weights (Table 6)"),
    ("reversed", "Top-k labels, reversed weights (Table 6)"),
    ("class-balanced", "Class-balanced control (uniform over all labels)"),
    ("random-init", "Random initialisation (no pre-training)"),
)


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of a run (all of them enter the stages' fingerprints).

    Sizes are samples per pre-training set; steps and batches are the
    trainer's (the same for every arm); ``top_k`` is Table 6's number of
    selected labels."""

    seeds: tuple[int, ...]
    source: SourceSpec
    targets: tuple[TargetPlan, ...] = TARGETS
    num_classes: int = 16
    branch_fraction: float = 0.75
    train_per_class: int = 10
    test_per_class: int = 400
    domain_shift: float = 0.25
    size: int = 4000
    figure3_sizes: tuple[int, ...] = (1500, 4000, 10000)
    figure3_target: str = "food"
    top_k: int = 16
    generalist_steps: int = 1500
    pretrain_steps: int = 300
    pretrain_batch: int = 64
    pretrain_lr: float = 0.1
    finetune_steps: int = 100
    finetune_batch: int = 32
    finetune_lr: float = 0.05
    samples_per_shard: int = 1000
    generalist_seed: int = 0
    data_seed: int = 0

    def target_spec(self, target: TargetPlan) -> TargetSpec:
        """The generated target's spec (its seed fixed by its position: the
        data is the same for every seed of the experiment)."""
        position = [t.name for t in self.targets].index(target.name)
        return TargetSpec(name=target.name, layout=target.layout, branch=target.branch,
                          num_classes=self.num_classes, branch_fraction=self.branch_fraction,
                          train_per_class=self.train_per_class, test_per_class=self.test_per_class,
                          image_size=self.source.image_size, domain_shift=self.domain_shift,
                          leaves_per_group=self.source.leaves_per_group, seed=self.data_seed + 101 + position)

    def to_json(self) -> dict:
        return asdict(self)


#: ``make experiment``: 5 seeds, ~1 hour on 2 cores.
FULL = ExperimentConfig(
    seeds=(0, 1, 2, 3, 4),
    source=SourceSpec(num_examples=12000, leaves_per_group=6, image_size=32, num_files=4, seed=0),
)

#: ``--quick``: one seed, tiny sizes and steps; keeps the whole path working (make test).
QUICK = replace(
    FULL, seeds=(0,), source=SourceSpec(num_examples=1500, leaves_per_group=6, image_size=32, num_files=2, seed=0),
    num_classes=8, train_per_class=4, test_per_class=6, size=300, figure3_sizes=(150, 300, 600), top_k=8,
    generalist_steps=20, pretrain_steps=8, pretrain_batch=32, finetune_steps=6, finetune_batch=16,
    samples_per_shard=100)


@dataclass(frozen=True)
class PretrainSet:
    """One pre-training set of one seed: the resampler's options and size.
    ``weights_of``: the target whose importance weights it needs (None: none)."""

    name: str
    seed: int
    size: int
    scheme: str
    matcher: str = "same"
    draw: str = "multinomial"
    subset: str | None = None
    top_k: int | None = None
    weights_of: str | None = None

    @property
    def slug(self) -> str:
        return f"{self.name}-n{self.size}"

    def resample_options(self) -> dict:
        opts = {"scheme": self.scheme, "matcher": self.matcher, "draw": self.draw, "size": self.size,
                "seed": self.seed}
        if self.subset:
            opts["subset_labels"] = (self.subset,)
        if self.top_k:
            opts["top_k"] = self.top_k
        return opts


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning run: a target, an arm, a seed, and the pre-training set
    it starts from (None: random initialisation). ``figure3``: a run of the
    size sweep rather than the main table."""

    target: str
    arm: str
    seed: int
    init: PretrainSet | None
    figure3: bool = False

    @property
    def slug(self) -> str:
        return f"{self.arm}-n{self.init.size}" if self.figure3 and self.init else self.arm


def _target_sets(target: TargetPlan, seed: int, size: int) -> dict[str, PretrainSet]:
    w = target.name
    return {
        "adaptive": PretrainSet(f"{w}-adaptive-same", seed, size, "adaptive", weights_of=w),
        "elastic": PretrainSet(f"{w}-adaptive-elastic", seed, size, "adaptive", matcher="elastic",
                               draw="systematic", weights_of=w),
    }


def pretrain_sets(config: ExperimentConfig, seed: int) -> dict[tuple[str, str], PretrainSet]:
    """Every pre-training set of one seed, keyed by (target or '*', arm)."""
    size, first = config.size, config.targets[0].name
    shared = {
        "entire": PretrainSet("entire", seed, size, "entire", draw="systematic"),
        # counts only (every target's weights table holds the same source counts)
        "class-balanced": PretrainSet("class-balanced", seed, size, "balanced", weights_of=first),
    }
    subsets = {b: PretrainSet(f"subset-{b}", seed, size, "subset", subset=b)
               for b in dict.fromkeys(x for t in config.targets for x in (t.branch, t.wrong_branch))}
    sets: dict[tuple[str, str], PretrainSet] = {}
    for t in config.targets:
        sets[(t.name, "entire")] = shared["entire"]
        sets[(t.name, "hand-picked")] = subsets[t.branch]
        sets[(t.name, "wrong-domain")] = subsets[t.wrong_branch]
        sets.update({(t.name, arm): s for arm, s in _target_sets(t, seed, size).items()})
        sets[(t.name, "adaptive-topk")] = PretrainSet(f"{t.name}-topk{config.top_k}-adaptive", seed, size,
                                                      "adaptive", top_k=config.top_k, weights_of=t.name)
        sets[(t.name, "topk-uniform")] = PretrainSet(f"{t.name}-topk{config.top_k}-uniform", seed, size,
                                                     "topk-uniform", top_k=config.top_k, weights_of=t.name)
        sets[(t.name, "reversed")] = PretrainSet(f"{t.name}-topk{config.top_k}-reversed", seed, size,
                                                 "reversed", top_k=config.top_k, weights_of=t.name)
        sets[(t.name, "class-balanced")] = shared["class-balanced"]
    return sets


def figure3_sets(config: ExperimentConfig, seed: int) -> list[PretrainSet]:
    """Same and elastic matchers at each Figure 3 size (the main size included)."""
    target = next(t for t in config.targets if t.name == config.figure3_target)
    out = []
    for size in config.figure3_sizes:
        out.extend(_target_sets(target, seed, size).values())
    return out


def finetune_runs(config: ExperimentConfig, seed: int) -> list[FinetuneRun]:
    """The main table's runs (every target x arm) and Figure 3's, for one seed."""
    sets = pretrain_sets(config, seed)
    runs = [FinetuneRun(t.name, arm, seed, None if arm == "random-init" else sets[(t.name, arm)])
            for t in config.targets for arm, _ in ARMS]
    main = {(r.init.name, r.init.size) for r in runs if r.init}
    for s in figure3_sets(config, seed):
        if (s.name, s.size) not in main:
            arm = "adaptive" if s.matcher == "same" else "elastic"
            runs.append(FinetuneRun(config.figure3_target, arm, seed, s, figure3=True))
    return runs


def unique_sets(runs: list[FinetuneRun]) -> list[PretrainSet]:
    """The distinct pre-training sets the runs need, in first-use order."""
    return list(dict.fromkeys(r.init for r in runs if r.init))
