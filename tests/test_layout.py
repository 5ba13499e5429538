"""The project's layout and entry points are where users and CI expect them,
and the repository keeps the rules of its own layout (docs/design.md,
"Stages and engines"): every module imports, ``schemas/`` is contracts only,
the executors' ``code.zip`` holds what they import and not the data
generator, the documentation stands on its own."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("schemas", "beam_pipelines", "spark_jobs", "trainer", "adaptive_transfer")
#: What ``schemas/`` must never load: the engines, and the packages built on the contracts.
NOT_IN_CONTRACTS = ("torch", "pyspark", "apache_beam", "deepspeed", "beam_pipelines", "spark_jobs", "trainer",
                    "adaptive_transfer")
#: The deprecated spelling of the data generator's command (a shim, not a contract).
SHIM = "schemas/synthetic.py"


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [f for f in out.decode().split("\0") if f]


def _text(path: str) -> str | None:
    try:
        with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
            return fh.read()
    except (UnicodeDecodeError, FileNotFoundError):
        return None  # binary (plots, ...) or deleted in the working tree


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env)


def test_packages_import_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", "import schemas, beam_pipelines, spark_jobs, trainer; print('ok')"],
                         capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "ok"


def test_every_module_of_every_package_imports():
    """A module left importing a moved or deleted name fails here, not in a user's run."""
    proc = _run(
        "import importlib, pkgutil\n"
        "failed = []\n"
        f"for top in {PACKAGES!r}:\n"
        "    for m in pkgutil.walk_packages(importlib.import_module(top).__path__, top + '.'):\n"
        "        if m.name.endswith('.__main__'):\n"
        "            continue\n"
        "        try:\n"
        "            importlib.import_module(m.name)\n"
        "        except Exception as e:\n"
        "            failed.append(f'{m.name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed) or 'ok')\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok", proc.stdout


def test_layout_matches_design():
    for path in ("README.md", "setup.py", "Makefile", ".ci/run", "schemas", "beam_pipelines",
                 "spark_jobs", "trainer", "configs", "tests", "benchmarks", "docs/design.md"):
        assert os.path.exists(os.path.join(ROOT, path)), path
    assert os.access(os.path.join(ROOT, ".ci/run"), os.X_OK)
    assert "make test" in open(os.path.join(ROOT, ".ci/run")).read()


# -- schemas/ holds contracts only --------------------------------------------------------------


def test_schemas_loads_no_engine_and_no_stage():
    """Importing every module of schemas/ loads neither torch, Spark, Beam nor
    DeepSpeed, nor any package built on the contracts (the data generator included)."""
    proc = _run(
        "import importlib, pkgutil, sys, schemas\n"
        "for m in pkgutil.iter_modules(schemas.__path__):\n"
        "    importlib.import_module('schemas.' + m.name)\n"
        f"print(sorted({{k.split('.')[0] for k in sys.modules}} & set({NOT_IN_CONTRACTS!r})))\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_schemas_imports_no_engine_and_no_stage_anywhere_in_its_code():
    """Also imports inside functions, which importing the modules does not run."""
    found = []
    for name in sorted(os.listdir(os.path.join(ROOT, "schemas"))):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ROOT, "schemas", name), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"schemas/{name}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in NOT_IN_CONTRACTS]
    assert found == []


def test_nothing_imports_the_generator_by_its_deprecated_name():
    """schemas.synthetic is the old spelling of adaptive_transfer.synthetic,
    kept for users' commands; the project's own code uses the new one."""
    pattern = re.compile(r"^\s*(from\s+schemas\.synthetic\s+import|from\s+schemas\s+import\s+.*\bsynthetic\b"
                         r"|import\s+schemas\.synthetic)", re.M)
    stale = [f for f in _tracked_files() if f.endswith(".py") and f != SHIM and pattern.search(_text(f) or "")]
    assert stale == []


def test_spark_code_zip_ships_what_executors_import_and_not_the_generator(tmp_path):
    """``make spark-env``'s code.zip: every project module the Spark jobs
    reach by imports, and neither the data generator nor its deprecated shim."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    from schemas.fingerprint import project_modules

    out = tmp_path / "spark-env"
    subprocess.run(["make", "--no-print-directory", f"{out}/code.zip", f"SPARK_ENV_DIR={out}", f"VENV={sys.prefix}"],
                   cwd=ROOT, check=True, capture_output=True)
    shipped = set(zipfile.ZipFile(out / "code.zip").namelist())
    assert not [n for n in shipped if n.endswith("synthetic.py")], sorted(shipped)
    jobs = [f"spark_jobs.{n[:-3]}" for n in os.listdir(os.path.join(ROOT, "spark_jobs")) if n.endswith(".py")]
    jobs += [f"spark_jobs.{n}" for n in os.listdir(os.path.join(ROOT, "spark_jobs"))
             if os.path.isfile(os.path.join(ROOT, "spark_jobs", n, "__init__.py"))]
    needed = project_modules(*jobs)
    missing = []
    for module in needed:
        path = module.replace(".", "/")
        if f"{path}.py" not in shipped and f"{path}/__init__.py" not in shipped:
            missing.append(module)
    assert missing == [], f"executors would fail to import {missing}"
    assert {"schemas/io.py", "spark_jobs/sampling.py"} <= shipped


def test_generator_command_line_and_its_deprecated_spelling(tmp_path):
    """``python -m adaptive_transfer.synthetic ... --output`` writes the data;
    ``python -m schemas.synthetic ... --out``, the old spelling, writes the
    same bytes and says, in one line, that it is deprecated."""
    source = ["source", "--examples", "200", "--files", "1"]
    target = ["target", "--classes", "4", "--train-per-class", "2", "--test-per-class", "1"]
    new = [subprocess.run([sys.executable, "-m", "adaptive_transfer.synthetic", *args, "--output", str(tmp_path / d)],
                          check=True, capture_output=True, text=True) for args, d in ((source, "s"), (target, "t"))]
    assert all(p.stderr == "" for p in new), [p.stderr for p in new]
    old = [subprocess.run([sys.executable, "-m", "schemas.synthetic", *args, "--out", str(tmp_path / d)],
                          check=True, capture_output=True, text=True)
           for args, d in ((source, "s-old"), (target, "t-old"))]
    for proc in old:
        assert proc.stderr.strip().splitlines() == [
            "python -m schemas.synthetic is deprecated; use python -m adaptive_transfer.synthetic "
            "(--out is now --output)"], proc.stderr
    assert (tmp_path / "t" / "meta" / "classes.txt").read_text().count("\n") == 4
    part = "index/part-00000.parquet"
    assert (tmp_path / "s" / part).read_bytes() == (tmp_path / "s-old" / part).read_bytes()
    train = "meta/train.txt"
    assert (tmp_path / "t" / train).read_text() == (tmp_path / "t-old" / train).read_text()
    aliased = subprocess.run([sys.executable, "-m", "adaptive_transfer.synthetic", *source, "--out",
                              str(tmp_path / "s-alias")], check=True, capture_output=True, text=True)
    assert aliased.stderr.strip().splitlines() == [
        "python -m adaptive_transfer.synthetic source: --out is deprecated; use --output"], aliased.stderr
    helped = subprocess.run([sys.executable, "-m", "adaptive_transfer.synthetic", "source", "--help"],
                            check=True, capture_output=True, text=True).stdout
    assert "--output" in helped and "--out " not in helped and "--out\n" not in helped


# -- the repository stands on its own -----------------------------------------------------------

#: Material outside the repository that it must not send readers to (spelled
#: in pieces so that this file does not name them itself).
OUTSIDE = ("../" + "shared", "DESIGN" + ".md", "paper" + ".md")
#: Tracked files that still cite it, each waiting for its owner's rewrite
#: (issue 24): this list only shrinks. A file not on it that cites it fails.
STILL_CITING_OUTSIDE: set[str] = set()  # every file now cites docs/design.md


def test_no_tracked_file_sends_readers_outside_the_repository():
    citing = {f for f in _tracked_files() if any(o in (_text(f) or "") for o in OUTSIDE)}
    assert citing - STILL_CITING_OUTSIDE == set(), "cite docs/design.md (a section heading) instead"


def test_design_citations_name_sections_that_exist():
    """Every citation of a section of docs/design.md (the file's name, a comma,
    the heading in double quotes) in code and docs names one of its headings."""
    with open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8") as fh:
        headings = {m.group(1).strip() for m in re.finditer(r"^#{1,4}\s+(.+)$", fh.read(), re.M)}
    cite = re.compile(r"docs/design\.md,\s+\"([^\"]+)\"")
    cited = {(f, " ".join(m.group(1).split())) for f in _tracked_files() for m in cite.finditer(_text(f) or "")}
    assert cited, "nothing cites docs/design.md"
    assert sorted((f, s) for f, s in cited if s not in headings) == []
