"""The install lock (requirements/constraints.txt, `make lock`): scripts/lock.py
merges one resolution, and the committed lock satisfies setup.py's ranges."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement

from tests.helpers import ROOT

LOCK = Path(ROOT) / "requirements" / "constraints.txt"


def _lock_module():
    return runpy.run_path(str(Path(ROOT) / "scripts" / "lock.py"))


def test_lock_lines_merge_the_freeze_and_the_report():
    lock_lines = _lock_module()["lock_lines"]
    freeze = "Jinja2==3.1.6\ntorch==2.13.0+cpu\nsetuptools==80.0\n-e /src/project\npip==25.0\nfoo @ file:///x\n"
    report = {"install": [{"metadata": {"name": "s3fs", "version": "2026.9.0"}},
                          {"metadata": {"name": "setuptools", "version": "81.0"}},
                          {"metadata": {"name": "adaptive_transfer", "version": "0.1.0"}}]}
    assert lock_lines(report, freeze) == ["jinja2==3.1.6", "s3fs==2026.9.0", "setuptools==81.0"]
    with pytest.raises(ValueError, match="not a name==version line"):
        lock_lines({}, "numpy>=1\n")


def _setup_arguments(monkeypatch) -> dict:
    seen: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(Path(ROOT) / "setup.py"))
    return seen


def test_the_committed_lock_satisfies_setup_py(monkeypatch):
    """Every requirement `make install` asks for (.[test]) has one pinned version
    in its range: the lock is not stale (run `make lock` after changing setup.py)."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert "torch" not in pins and "pytest-xdist" in pins
    kw = _setup_arguments(monkeypatch)
    wanted = [Requirement(r) for r in (*kw["install_requires"], *kw["extras_require"]["test"])]
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name == "torch":
            continue
        assert name in pins, f"{req} is not in {LOCK.name}: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
