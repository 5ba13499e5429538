"""What the experiment runs: its settings (full and quick, generated and
real data), its targets, and the plan of pre-training sets and fine-tuning
runs derived from them.

Pure: no engine is touched here. Pre-training runs that do not depend on the
target are shared across targets (the entire source, the class-balanced
control, and each branch subset, which is one target's hand-picked arm and
another's wrong-domain arm); every run is per seed (and per data draw: the
runner keeps each draw's runs apart).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from adaptive_transfer.real_data.split import RealSpec
from adaptive_transfer.synthetic import SourceSpec

from .worlds import GeneratedWorld, RealWorld, TargetPlan, World

__all__ = ["TargetPlan", "ExperimentConfig", "FULL", "QUICK", "REAL", "REAL_QUICK", "configs", "WeightsSpec",
           "PretrainSet", "FinetuneRun", "ARMS", "TEMPERATURE", "pretrain_sets", "figure3_sets", "finetune_runs",
           "unique_sets", "PRIORITY", "by_priority", "HYPOTHESES", "hypothesis_runs"]

#: The softmax temperature of P_t (the paper's 2.0).
TEMPERATURE = 2.0

#: Three targets from different branches, shaped like Table 3's columns; each
#: branch subset is one target's hand-picked and another's wrong-domain arm
#: (vehicle -> animal is the paper's "JFT-Car -> Birdsnap").
TARGETS = (
    TargetPlan("food", "food", "animal", "food101", "Food-101"),
    TargetPlan("animal", "animal", "vehicle", "imagefolder", "Birdsnap / Oxford-IIIT Pets"),
    TargetPlan("vehicle", "vehicle", "food", "imagefolder", "Stanford Cars / FGVC Aircraft"),
)

#: The real targets (adaptive_transfer.real_data.split.DEFAULT_TARGETS), one per root. Hand-picked:
#: the target's root (for fashion-footwear it also holds tops, trousers: 6 leaves the target does not
#: use, as JFT - Animal holds more than pets); wrong domain: another root, each root once.
REAL_TARGETS = (
    TargetPlan("fashion-footwear", "clothing", "animal", "imagefolder",
               "Stanford Cars: a fine-grained corner of a large branch"),
    TargetPlan("animal", "animal", "digit", "imagefolder", "Oxford-IIIT Pets / Birdsnap"),
    TargetPlan("digit", "digit", "clothing", "imagefolder", "FGVC Aircraft: a thin branch of the source"),
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

    ``world``: where the data come from (:mod:`.worlds`); ``draws``: its data
    draws (each with its own generalist); ``dedup``: near-duplicates of every
    target's train and test images are removed from every pre-training set.
    Sizes are samples per pre-training set; steps and batches are the
    trainer's (the same for every arm); ``top_k`` is Table 6's number of
    selected labels."""

    seeds: tuple[int, ...]
    world: World
    targets: tuple[TargetPlan, ...] = TARGETS
    draws: tuple[int, ...] = (0,)
    dedup: bool = False
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

    def __post_init__(self) -> None:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be unique: {names}")
        if self.figure3_target not in names:
            raise ValueError(f"figure3_target {self.figure3_target!r} is not a target ({names})")
        if not self.seeds:
            raise ValueError("at least one seed")
        self.world.check(self.targets, self.draws)

    def target(self, name: str) -> TargetPlan:
        return next(t for t in self.targets if t.name == name)

    def to_json(self) -> dict:
        return asdict(self)


#: ``make experiment``: 5 seeds, ~1 hour on 2 cores.
FULL = ExperimentConfig(
    seeds=(0, 1, 2, 3, 4),
    world=GeneratedWorld(SourceSpec(num_examples=12000, leaves_per_group=6, image_size=32, num_files=4, seed=0)),
)

#: ``--quick``: one seed, tiny sizes and steps; keeps the whole path working (make test).
QUICK = replace(
    FULL, seeds=(0,),
    world=GeneratedWorld(SourceSpec(num_examples=1500, leaves_per_group=6, image_size=32, num_files=2, seed=0),
                         num_classes=8, train_per_class=4, test_per_class=6),
    size=300, figure3_sizes=(150, 300, 600), top_k=8, generalist_steps=20, pretrain_steps=8, pretrain_batch=32,
    finetune_steps=6, finetune_batch=16, samples_per_shard=100)

#: ``make experiment DATA=real``: the real images (make real-data), two data draws of 5 seeds each,
#: near-duplicates removed; pre-registered in docs/experiments/2026-12-06-real-plan.md. Sized for a
#: shared 2-core machine under a load of about 20 (plan amendment 2): 200 generalist steps, 100
#: pre-training and 60 fine-tuning steps, no Figure 3 size sweep (its one size is the main table's).
REAL = ExperimentConfig(seeds=(0, 1, 2, 3, 4), world=RealWorld(), targets=REAL_TARGETS, draws=(0, 1), dedup=True,
                        figure3_target="animal", figure3_sizes=(4000,), top_k=15, generalist_steps=200,
                        pretrain_steps=100, finetune_steps=60)

#: ``--data real --quick``: one draw, one seed, a small source (60 per leaf), tiny steps.
REAL_QUICK = replace(
    REAL, seeds=(0,), draws=(0,),
    world=RealWorld(RealSpec(train_per_class=4, test_per_class=6, source_per_class=60, num_files=2)),
    size=300, figure3_sizes=(150, 300, 600), top_k=8, generalist_steps=20, pretrain_steps=8, pretrain_batch=32,
    finetune_steps=6, finetune_batch=16, samples_per_shard=100)


def configs(data: str, quick: bool, cache: str | None = None) -> ExperimentConfig:
    """The configuration for ``--data`` (generated or real) and ``--quick``;
    ``cache``: where the real images are (default the world's)."""
    if data == "generated":
        return QUICK if quick else FULL
    if data == "real":
        config = REAL_QUICK if quick else REAL
        return replace(config, world=replace(config.world, cache=cache)) if cache else config
    raise ValueError(f"--data must be generated or real, got {data!r}")


@dataclass(frozen=True)
class WeightsSpec:
    """Importance weights of one target: from the generalist (``temperature``,
    ``generalist_steps``; ``None``: the config's) or, with ``oracle``, from
    the truth (P_t uniform over the target's true source leaves)."""

    target: str
    temperature: float = TEMPERATURE
    generalist_steps: int | None = None
    oracle: bool = False

    @property
    def key(self) -> str:
        """The weights' directory name (the target's name for the default weights)."""
        if self.oracle:
            return f"{self.target}-oracle"
        key = self.target
        if self.temperature != TEMPERATURE:
            key += f"-T{self.temperature:g}"
        if self.generalist_steps is not None:
            key += f"-g{self.generalist_steps}"
        return key


@dataclass(frozen=True)
class PretrainSet:
    """One pre-training set of one seed: the resampler's options and size.
    ``subset``: vocabulary node names (scheme ``subset``); ``leaves_of``: the
    subset is that target's true source leaves (resolved by the runner);
    ``weights``: the importance weights it needs (None: none)."""

    name: str
    seed: int
    size: int
    scheme: str
    matcher: str = "same"
    draw: str = "multinomial"
    subset: tuple[str, ...] = ()
    leaves_of: str | None = None
    top_k: int | None = None
    weights: WeightsSpec | None = None

    @property
    def weights_of(self) -> str | None:
        """The target whose weights the set needs."""
        return self.weights.target if self.weights else None

    @property
    def slug(self) -> str:
        return f"{self.name}-n{self.size}"

    def resample_options(self, subset_labels: tuple[str, ...] = ()) -> dict:
        """The ``ResampleJob`` options; ``subset_labels`` where ``leaves_of`` says."""
        opts = {"scheme": self.scheme, "matcher": self.matcher, "draw": self.draw, "size": self.size,
                "seed": self.seed}
        if self.subset or subset_labels:
            opts["subset_labels"] = tuple(self.subset or subset_labels)
        if self.top_k:
            opts["top_k"] = self.top_k
        return opts


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning run: a target, an arm, a seed, and the pre-training set
    it starts from (None: random initialisation). ``figure3``: a run of the
    size sweep rather than the main table; ``condition``: a variant of the
    arm (the hypotheses' temperature or generalist; '' for none)."""

    target: str
    arm: str
    seed: int
    init: PretrainSet | None
    figure3: bool = False
    condition: str = ""

    @property
    def slug(self) -> str:
        base = self.arm + (f"-{self.condition}" if self.condition else "")
        return f"{base}-n{self.init.size}" if self.figure3 and self.init else base


def adaptive_sets(target: str, seed: int, size: int, weights: WeightsSpec | None = None,
                  suffix: str = "") -> dict[str, PretrainSet]:
    """The same and elastic matchers' sets of ``target`` (default weights unless given)."""
    w = weights or WeightsSpec(target)
    return {
        "adaptive": PretrainSet(f"{target}-adaptive-same{suffix}", seed, size, "adaptive", weights=w),
        "elastic": PretrainSet(f"{target}-adaptive-elastic{suffix}", seed, size, "adaptive", matcher="elastic",
                               draw="systematic", weights=w),
    }


def topk_sets(target: str, seed: int, size: int, k: int) -> dict[str, PretrainSet]:
    """Table 6's three sets of ``target``: adaptive, uniform and reversed weights on the top-k labels."""
    w = WeightsSpec(target)
    return {arm: PretrainSet(f"{target}-topk{k}-{what}", seed, size, scheme, top_k=k, weights=w)
            for arm, what, scheme in (("adaptive-topk", "adaptive", "adaptive"),
                                      ("topk-uniform", "uniform", "topk-uniform"),
                                      ("reversed", "reversed", "reversed"))}


def subset_set(branch: str, seed: int, size: int) -> PretrainSet:
    """The examples under one vocabulary node (a hand-picked or wrong-domain subset)."""
    return PretrainSet(f"subset-{branch}", seed, size, "subset", subset=(branch,))


def pretrain_sets(config: ExperimentConfig, seed: int) -> dict[tuple[str, str], PretrainSet]:
    """Every pre-training set of one seed, keyed by (target, arm)."""
    size, first = config.size, config.targets[0].name
    entire = PretrainSet("entire", seed, size, "entire", draw="systematic")
    # counts only (every target's weights table holds the same source counts)
    balanced = PretrainSet("class-balanced", seed, size, "balanced", weights=WeightsSpec(first))
    sets: dict[tuple[str, str], PretrainSet] = {}
    for t in config.targets:
        sets[(t.name, "entire")] = entire
        sets[(t.name, "hand-picked")] = subset_set(t.branch, seed, size)
        sets[(t.name, "wrong-domain")] = subset_set(t.wrong_branch, seed, size)
        sets.update({(t.name, arm): s for arm, s in adaptive_sets(t.name, seed, size).items()})
        sets.update({(t.name, arm): s for arm, s in topk_sets(t.name, seed, size, config.top_k).items()})
        sets[(t.name, "class-balanced")] = balanced
    return sets


def figure3_sets(config: ExperimentConfig, seed: int) -> list[PretrainSet]:
    """Same and elastic matchers at each Figure 3 size (the main size included)."""
    out = []
    for size in config.figure3_sizes:
        out.extend(adaptive_sets(config.figure3_target, seed, size).values())
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


#: The order in which a seed's pre-training sets are built (by the first arm that uses them): the
#: pre-registered comparisons' arms first (docs/experiments/2026-12-06-real-plan.md).
PRIORITY = ("entire", "adaptive", "hand-picked", "class-balanced", "adaptive-topk", "topk-uniform", "reversed",
            "wrong-domain", "elastic")


def by_priority(runs: list[FinetuneRun]) -> list[PretrainSet]:
    """The distinct pre-training sets of ``runs`` ordered by :data:`PRIORITY`
    of the arms that use them (main-table runs before variants and Figure 3's;
    ties in first-use order)."""
    rank: dict[PretrainSet, tuple] = {}
    for i, r in enumerate(runs):
        if r.init is None:
            continue
        key = (bool(r.condition) or r.figure3, PRIORITY.index(r.arm) if r.arm in PRIORITY else len(PRIORITY), i)
        rank[r.init] = min(rank.get(r.init, key), key)
    return sorted(rank, key=rank.__getitem__)


def unique_sets(runs: list[FinetuneRun]) -> list[PretrainSet]:
    """The distinct pre-training sets the runs need, in first-use order."""
    return list(dict.fromkeys(r.init for r in runs if r.init))


#: The generated result's explanations, each a set of extra runs (``--hypotheses``), per target:
#: ``oracle``: adaptive (same, elastic) with P_t uniform over the target's true source leaves;
#: ``leaves``: the hand-picked subset restricted to those leaves; ``temperature``: adaptive with
#: P_t at temperature 1 and 4; ``generalist``: adaptive with weights from a generalist of a quarter
#: of the steps. The largest number of copies of one example is in every run's record; the source
#: size is the world's (``--source-size``).
HYPOTHESES = ("oracle", "leaves", "temperature", "generalist")


def hypothesis_runs(config: ExperimentConfig, seed: int, which: tuple[str, ...]) -> list[FinetuneRun]:
    """The extra fine-tuning runs of the hypotheses ``which`` (see :data:`HYPOTHESES`) for one seed."""
    unknown = sorted(set(which) - set(HYPOTHESES))
    if unknown:
        raise ValueError(f"unknown hypotheses {unknown}; choose from {list(HYPOTHESES)}")
    size, runs = config.size, []
    variants = {"oracle": [("oracle", None)], "temperature": [("T1", 1.0), ("T4", 4.0)],
                "generalist": [(f"g{max(1, config.generalist_steps // 4)}", max(1, config.generalist_steps // 4))]}
    for t in config.targets:
        for h in which:
            if h == "leaves":
                leaves = PretrainSet(f"leaves-{t.name}", seed, size, "subset", leaves_of=t.name)
                runs.append(FinetuneRun(t.name, "hand-picked", seed, leaves, condition="leaves"))
                continue
            for condition, value in variants[h]:
                w = WeightsSpec(t.name, oracle=h == "oracle",
                                temperature=value if h == "temperature" else TEMPERATURE,
                                generalist_steps=value if h == "generalist" else None)
                for arm, s in adaptive_sets(t.name, seed, size, w, suffix=f"-{condition}").items():
                    runs.append(FinetuneRun(t.name, arm, seed, s, condition=condition))
    return runs
