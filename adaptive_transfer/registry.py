"""Target and source registry: ``configs/targets/*.yaml``, ``configs/sources/*.yaml``.

A name (``food101``) resolves to ``configs/targets/food101.yaml`` in the
directory given by ``$ADAPTIVE_TRANSFER_CONFIGS`` (default: the repository's
``configs/``); a path to a YAML file works too. ``${VAR:-default}`` in values
expands from the environment. Paths may be local or URLs (``gs://``, ``s3://``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from schemas.targets import LAYOUTS

__all__ = ["TargetConfig", "SourceConfig", "configs_dir", "load_target", "load_source", "list_names"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def configs_dir() -> str:
    return os.environ.get("ADAPTIVE_TRANSFER_CONFIGS",
                          os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _load(kind: str, name: str) -> tuple[dict, str]:
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(configs_dir(), kind, f"{name}.yaml")
    if not os.path.isfile(path):
        known = ", ".join(list_names(kind))
        raise ValueError(f"no {kind[:-1]} named {name!r} (looked for {path}); known: {known}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return _expand(data), path


def list_names(kind: str) -> list[str]:
    folder = os.path.join(configs_dir(), kind)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []


@dataclass
class TargetConfig:
    """A target dataset: where it lives, its layout, which splits train and test."""

    name: str
    layout: str
    root: str
    train_split: str = "train"
    test_split: str = "test"
    metric: str = "top1"
    description: str = ""
    download: str | None = None
    path: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class SourceConfig:
    """A labelled source: index, vocabulary and the generalist trained on it."""

    name: str
    index: str
    labels: str
    generalist: str | None = None
    description: str = ""
    path: str = ""
    extra: dict = field(default_factory=dict)


def load_target(name: str, root: str | None = None) -> TargetConfig:
    """The target ``name``; ``root`` overrides where its data lives."""
    d, path = _load("targets", name)
    for key in ("layout", "root"):
        if key not in d:
            raise ValueError(f"{path}: missing '{key}'")
    if d["layout"] not in LAYOUTS:
        raise ValueError(f"{path}: unknown layout {d['layout']!r}; known: {', '.join(sorted(LAYOUTS))}")
    splits = d.get("splits") or {}
    metric = d.get("metric", "top1")
    if metric not in ("top1", "mean_per_class"):
        raise ValueError(f"{path}: metric must be top1 or mean_per_class, got {metric!r}")
    known = {"name", "layout", "root", "splits", "metric", "description", "download"}
    return TargetConfig(name=d.get("name", name), layout=d["layout"], root=root or d["root"],
                        train_split=splits.get("train", "train"), test_split=splits.get("test", "test"),
                        metric=metric, description=d.get("description", ""), download=d.get("download"),
                        path=path, extra={k: v for k, v in d.items() if k not in known})


def load_source(name: str) -> SourceConfig:
    d, path = _load("sources", name)
    for key in ("index", "labels"):
        if key not in d:
            raise ValueError(f"{path}: missing '{key}'")
    known = {"name", "index", "labels", "generalist", "description"}
    return SourceConfig(name=d.get("name", name), index=d["index"], labels=d["labels"],
                        generalist=d.get("generalist"), description=d.get("description", ""), path=path,
                        extra={k: v for k, v in d.items() if k not in known})
