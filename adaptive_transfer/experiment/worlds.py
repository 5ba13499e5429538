"""Where an experiment's data come from: a *world* makes the source index,
its vocabulary and the targets, and knows the truth the report needs (each
target's true source leaves).

* :class:`GeneratedWorld`: ``adaptive_transfer.synthetic`` (a JFT-like
  generated hierarchy and generated targets; ``make experiment``);
* :class:`RealWorld`: the real 28x28 images of ``make real-data``
  (Fashion-MNIST, Animal-MNIST, MNIST digits; ``adaptive_transfer.real_data``):
  ``--data real``. A *draw* is another source / target split of the same
  images (``RealSpec.seed``), the replication over data draws.

Each world's data are made through ``adaptive_transfer.stages.generated``
(one stage output, reused while its settings and code are unchanged).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence, Union

from adaptive_transfer.real_data.fetch import DEFAULT_CACHE
from adaptive_transfer.real_data.split import RealSpec
from adaptive_transfer.synthetic import SourceSpec, TargetSpec

from .. import stages

__all__ = ["TargetPlan", "WorldData", "GeneratedWorld", "RealWorld", "World", "MissingData"]


class MissingData(ValueError):
    """The real images are not in the cache (the message names ``make real-data``)."""


@dataclass(frozen=True)
class TargetPlan:
    """One target: its name, its hand-picked subset and its wrong-domain
    subset (each a vocabulary node name: the examples of its descendants),
    its on-disk layout and the paper dataset it stands for."""

    name: str
    branch: str
    wrong_branch: str
    layout: str
    analogue: str


@dataclass(frozen=True)
class WorldData:
    """What a world made for one draw: the source index (directory), the
    vocabulary, each target's root, each target's true source leaves (label
    ids, sorted) and facts for the report (sizes, duplicates dropped)."""

    index: str
    labels: str
    targets: dict[str, str]
    leaves: dict[str, tuple[int, ...]]
    facts: dict


@dataclass(frozen=True)
class GeneratedWorld:
    """Generated source and targets: the source's spec; each target has
    ``num_classes`` classes, ``branch_fraction`` of them from its branch,
    ``train_per_class`` / ``test_per_class`` images per class and a
    ``domain_shift``. The data are the same for every seed (and only draw 0
    exists: another draw would be another ``source.seed``)."""

    source: SourceSpec
    num_classes: int = 16
    branch_fraction: float = 0.75
    train_per_class: int = 10
    test_per_class: int = 400
    domain_shift: float = 0.25
    data_seed: int = 0
    kind: str = field(default="generated", init=False)

    def target_spec(self, target: TargetPlan, position: int) -> TargetSpec:
        """The generated target's spec (its seed fixed by its position)."""
        return TargetSpec(name=target.name, layout=target.layout, branch=target.branch,
                          num_classes=self.num_classes, branch_fraction=self.branch_fraction,
                          train_per_class=self.train_per_class, test_per_class=self.test_per_class,
                          image_size=self.source.image_size, domain_shift=self.domain_shift,
                          leaves_per_group=self.source.leaves_per_group, seed=self.data_seed + 101 + position)

    def check(self, targets: Sequence[TargetPlan], draws: Sequence[int]) -> None:
        if tuple(draws) != (0,):
            raise ValueError(f"generated data have one draw (0), not {list(draws)}")

    def prepare(self, data: str, targets: Sequence[TargetPlan], draw: int, engines: stages.Engines) -> WorldData:
        """Generate (or reuse) the source and each target under ``data``."""
        from adaptive_transfer.synthetic import generate_source, generate_target

        source = os.path.join(data, "source")
        stages.generated(source, "experiment_source", {"source": asdict(self.source)},
                         lambda p: generate_source(p, self.source), "adaptive_transfer.synthetic", "data: source",
                         engines)
        roots, leaves = {}, {}
        for position, t in enumerate(targets):
            spec = self.target_spec(t, position)
            roots[t.name] = os.path.join(data, "targets", t.name)
            stages.generated(roots[t.name], "experiment_target", {"target": asdict(spec)},
                             lambda p, spec=spec: generate_target(p, spec), "adaptive_transfer.synthetic",
                             f"data: target {t.name}", engines)
            with open(os.path.join(roots[t.name], "generated.json")) as fh:
                leaves[t.name] = tuple(sorted(set(json.load(fh)["class_to_leaf"].values())))
        facts = {"source_examples": self.source.num_examples, "duplicates_dropped": 0}
        return WorldData(os.path.join(source, "index"), os.path.join(source, "labels.parquet"), roots, leaves, facts)

    def describe(self) -> list[str]:
        """Setup lines for the report."""
        s = self.source
        return [f"Source: {s.num_examples:,} generated {s.image_size}-px examples (a 3-level hierarchy, Zipf class "
                f"sizes, {s.ancestor_fraction:.0%} of the examples also carry an ancestor label).",
                f"Targets: {self.num_classes} classes each ({round(self.num_classes * self.branch_fraction)} from "
                f"the branch), {self.train_per_class} training and {self.test_per_class} test images per class, "
                f"domain shift {self.domain_shift}."]


@dataclass(frozen=True)
class RealWorld:
    """The real images: ``spec`` (its ``seed`` is replaced by the draw) and
    the ``cache`` that ``make real-data`` filled (where the data are read
    from; not part of what the data are)."""

    spec: RealSpec = field(default_factory=RealSpec)
    cache: str = DEFAULT_CACHE
    kind: str = field(default="real", init=False)

    def check(self, targets: Sequence[TargetPlan], draws: Sequence[int]) -> None:
        names = [t.name for t in self.spec.targets]
        if sorted(t.name for t in targets) != sorted(names):
            raise ValueError(f"the experiment's targets {[t.name for t in targets]} are not the real data's {names}")
        if not draws or len(set(draws)) != len(draws) or min(draws) < 0:
            raise ValueError(f"draws must be distinct non-negative integers, got {list(draws)}")

    def require_data(self) -> None:
        """Raise :class:`MissingData` (one line naming ``make real-data``)
        unless every data file is in the cache with its pinned sha256."""
        from adaptive_transfer.real_data.catalog import PACKAGES
        from adaptive_transfer.real_data.datasets import require_files

        for pkg in PACKAGES:
            try:
                require_files(self.cache, pkg)
            except (OSError, ValueError) as e:
                raise MissingData(f"the real images are not ready ({e}); `make real-data` fetches them, or "
                                  "pass --real-data DIR where they are") from None

    def prepare(self, data: str, targets: Sequence[TargetPlan], draw: int, engines: stages.Engines) -> WorldData:
        """Build (or reuse) draw ``draw`` under ``data/draw`` (the stage of
        ``adaptive_transfer.real_data.build``: the same fingerprint)."""
        from adaptive_transfer.real_data import build as B
        from adaptive_transfer.real_data.datasets import load_all

        self.require_data()
        spec = replace(self.spec, seed=draw)
        root = os.path.join(data, "draw")
        stages.generated(root, B.STAGE, B.draw_settings(spec),
                         lambda work: B.write_draw(work, load_all(self.cache), spec, B.package_inputs()), B.__name__,
                         f"data: real images, draw {draw}", engines)
        with open(os.path.join(root, "split.json")) as fh:
            record = json.load(fh)
        roots = {t.name: os.path.join(root, "targets", t.name) for t in targets}
        leaves = {t.name: tuple(sorted(set(record["targets"][t.name]["class_to_leaf"].values()))) for t in targets}
        facts = {"source_examples": record["source"]["examples"], "per_leaf": record["source"]["per_leaf"],
                 "duplicates_dropped": record["pool"]["duplicates_dropped"], "pool_images": record["pool"]["images"],
                 "targets": {t: {s: sum(c.values()) for s, c in e["counts"].items()}
                             for t, e in record["targets"].items()}}
        return WorldData(os.path.join(root, "source", "index"), os.path.join(root, "source", "labels.parquet"),
                         roots, leaves, facts)

    def describe(self) -> list[str]:
        s = self.spec
        cap = "all" if s.source_per_class is None else f"at most {s.source_per_class:,}"
        return ["Source: real 28x28 greyscale images (Fashion-MNIST, Animal-MNIST, MNIST digits) under a "
                "3-level hierarchy (clothing / animal / digit, groups, the 30 classes as leaves), "
                f"{cap} per leaf, each labelled with its leaf only; exact duplicates dropped.",
                f"Targets: {', '.join(f'{t.name} ({len(t.classes)} classes)' for t in s.targets)}; "
                f"{s.train_per_class} training and {s.test_per_class} test images per class, none of them in the "
                "source. A draw is another seeded split of the same images into source and targets."]


World = Union[GeneratedWorld, RealWorld]
