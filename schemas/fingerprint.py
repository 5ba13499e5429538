"""Fingerprints: what a stage's result was made from, for the one reuse rule.

A finished stage output is reused only when it is complete (the output
protocol, :mod:`schemas.stage_output`) *and* its fingerprint matches: the
stage's settings, seed, inputs and the code that builds it
(docs/design.md, "Reuse"). :func:`digest` hashes such a description;
:func:`code_digest` hashes the project's code a stage runs.

The code digest covers every module of this project that the stage's
entry module imports, directly or through other project modules, each
hashed by its syntax tree without docstrings: a changed line of code makes
a new digest, a reworded comment or docstring does not.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
from typing import Any

__all__ = ["digest", "code_digest", "project_modules", "PROJECT_PACKAGES"]

#: The top-level packages whose code counts (third-party code is pinned by the environment).
PROJECT_PACKAGES = ("schemas", "beam_pipelines", "spark_jobs", "trainer", "adaptive_transfer")


def digest(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``obj`` (keys sorted; values
    JSON cannot hold are written with ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _package_dir(top: str) -> str | None:
    """Where top-level package ``top`` lives (found without importing it)."""
    spec = importlib.util.find_spec(top)
    locations = spec.submodule_search_locations if spec else None
    return list(locations)[0] if locations else None


def _source(module: str) -> tuple[str, bool] | None:
    """(source text, is a package) of a project module, read from its file
    (nothing is imported); ``None`` when ``module`` names no module."""
    top, *rest = module.split(".")
    base = _package_dir(top)
    if base is None:
        return None
    path = os.path.join(base, *rest)
    for candidate, is_package in ((os.path.join(path, "__init__.py"), True), (path + ".py", False)):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as fh:
                return fh.read(), is_package
    return _zipped_source(path)


def _zipped_source(path: str) -> tuple[str, bool] | None:
    """(source text, is a package) of the module at ``path`` (no ``.py``)
    inside a zip archive on ``sys.path``, e.g. ``spark-submit --py-files
    code.zip`` (read from the archive, nothing imported); ``None`` when there
    is no such module there."""
    import zipimport

    parent, name = os.path.split(path)
    try:
        importer = zipimport.zipimporter(parent)
        source = importer.get_source(name)
        return (source, importer.is_package(name)) if source is not None else None
    except (zipimport.ZipImportError, OSError):
        return None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Project modules ``module`` imports (``from a import b`` counts ``a.b``
    too, where ``b`` is a module)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in PROJECT_PACKAGES}


@functools.lru_cache(maxsize=None)
def _module_facts(module: str) -> tuple[str, frozenset[str]] | None:
    """(hash of the module's code, the project modules it imports); cached per process."""
    found = _source(module)
    if found is None:
        return None
    text, is_package = found
    tree = _strip_docstrings(ast.parse(text))
    code = hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()
    parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}  # their __init__ runs too
    return code, frozenset(_imports(tree, module, is_package) | parents)


def project_modules(*entries: str) -> dict[str, str]:
    """Every project module reachable by imports from ``entries``, with the
    hash of its code (names that are not modules, e.g. a class imported by
    ``from a import B``, are skipped)."""
    seen: dict[str, str] = {}
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        facts = _module_facts(module)
        if facts is None:
            continue
        seen[module] = facts[0]
        todo.extend(facts[1] - seen.keys())
    return dict(sorted(seen.items()))


def code_digest(*entries: str) -> str:
    """sha256 over the code of every project module reachable from ``entries``
    (module names, e.g. ``"spark_jobs.resample"``); docstrings and comments
    do not count."""
    modules = project_modules(*entries)
    if not modules:
        raise ValueError(f"code_digest: none of {entries} is a module of this project")
    return digest(modules)
