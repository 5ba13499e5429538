"""The project's layout and entry points are where users and CI expect them."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_packages_import_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", "import schemas, beam_pipelines, spark_jobs, trainer; print('ok')"],
                         capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "ok"


def test_layout_matches_design():
    for path in ("README.md", "setup.py", "Makefile", ".ci/run", "schemas", "beam_pipelines",
                 "spark_jobs", "trainer", "configs", "tests", "benchmarks"):
        assert os.path.exists(os.path.join(ROOT, path)), path
    assert os.access(os.path.join(ROOT, ".ci/run"), os.X_OK)
    assert "make test" in open(os.path.join(ROOT, ".ci/run")).read()


def test_synthetic_command_line(tmp_path):
    subprocess.run([sys.executable, "-m", "schemas.synthetic", "source", "--out", str(tmp_path / "s"),
                    "--examples", "200", "--files", "1"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "schemas.synthetic", "target", "--out", str(tmp_path / "t"),
                    "--classes", "4", "--train-per-class", "2", "--test-per-class", "1"],
                   check=True, capture_output=True)
    assert (tmp_path / "s" / "index" / "part-00000.parquet").exists()
    assert (tmp_path / "t" / "meta" / "classes.txt").read_text().count("\n") == 4
