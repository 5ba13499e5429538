"""Bad input and faults around a run, from the command line (issue 25's
table): each is refused before the output is touched, in one line naming
what is wrong, and no JSON the project writes holds a number JSON lacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from schemas import io as sio
from tests.helpers import ROOT, reference_weights, run_module, write_weights


def _one_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The single error line of a refused command (no traceback)."""
    assert proc.returncode in (1, 2), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Py4JJavaError" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _weights_with(source_data, tmp_path, values: dict[int, float], name: str) -> str:
    table = reference_weights(source_data.index_path, source_data.labels_path, seed=3)
    weight = table.column("weight").to_numpy().copy()
    if "others" in values:
        weight[:] = values["others"]  # every label not named below
    for label, value in values.items():
        if label != "others":
            weight[label] = value
    table = table.set_column(table.schema.get_field_index("weight"), "weight", [weight])
    return write_weights(str(tmp_path / name), table)


@pytest.mark.parametrize("values,message", [
    ({3: 1e308}, "too large to sum"),                           # overflowed to inf in the selection before
    ({"others": 0.0, 5: 5e-324}, "too small to keep the weights' ratios"),
])
def test_resample_refuses_weights_outside_a_summable_range(source_data, tmp_path, values, message):
    weights = _weights_with(source_data, tmp_path, values, "weights.parquet")
    out = tmp_path / "out"
    proc = run_module("spark_jobs.resample", "--index", source_data.index_path, "--weights", weights,
                      "--size", "500", "--output", str(out), "--master", "local[1]", "--driver-memory", "1g",
                      check=False)
    line = _one_line(proc, "resample")
    assert weights in line and message in line and "divide them all by the largest" in line
    assert not out.exists()


@pytest.mark.parametrize("size", ["abc", "0", "-3", "1.5"])
def test_make_resample_checks_every_argument_before_any_work(tmp_path, size):
    out = tmp_path / "out"
    proc = run_module("adaptive_transfer.resample", "--target", "demo", "--size", size, "--output", str(out),
                      check=False, timeout=120)
    assert proc.returncode == 2 and "argument --size" in proc.stderr.splitlines()[-1], proc.stderr
    assert not out.exists()  # no demo data generated
    assert "Spark" not in proc.stderr and "Beam" not in proc.stderr  # no engine started


def test_unreadable_index_file_is_one_line(source_data, tmp_path):
    """A chmod-000 index file: named in one line (not Spark's Java traceback).
    Root reads any file, so the command runs without the capabilities that
    bypass permissions (setpriv)."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root reads a chmod-000 file: needs setpriv to drop CAP_DAC_OVERRIDE")
    index = tmp_path / "index"
    shutil.copytree(source_data.index_path, index)
    files = sorted(str(index / f) for f in os.listdir(index) if f.endswith(".parquet"))
    os.chmod(files[1], 0)
    weights = write_weights(str(tmp_path / "w.parquet"),
                            reference_weights(source_data.index_path, source_data.labels_path, seed=3))
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"] if os.geteuid() == 0 else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "spark_jobs.resample", "--index", str(index),
                           "--weights", weights, "--size", "100", "--output", str(tmp_path / "out"),
                           "--master", "local[1]", "--driver-memory", "1g"],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    os.chmod(files[1], 0o644)
    line = _one_line(proc, "resample")
    assert line == f"resample: error: --index {index}: {files[1]} cannot be read (permission denied)"


_HOLD_LOCK = """
import sys
from schemas.output_lock import OutputLock
with OutputLock(sys.argv[1], "resample"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_an_overwrite_run_while_another_run_holds_the_output_is_refused_in_one_line(source_data, tmp_path):
    """Another process (another run, perhaps in another PID namespace) holds
    the output's lock: ``--overwrite`` is refused before anything is touched,
    and runs once the lock is released."""
    weights = write_weights(str(tmp_path / "w.parquet"),
                            reference_weights(source_data.index_path, source_data.labels_path, seed=3))
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ("spark_jobs.resample", "--index", source_data.index_path, "--weights", weights, "--size", "800",
                "--output", str(out), "--master", "local[1]", "--driver-memory", "1g", "--overwrite")
        line = _one_line(run_module(*args, check=False), "resample")
        assert f"{out} is being written by another run (stage resample" in line and "nothing was touched" in line
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "w.parquet"]
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not (tmp_path / ".out.lock").exists()
    run_module(*args)
    assert json.loads((out / "stats.json").read_text())["total_copies"] == 800


def test_json_the_project_writes_is_always_valid():
    text = sio.json_text({"loss": float("nan"), "w": [1.5, float("inf"), -float("inf")], "n": np.int64(3).item()})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}")) == \
        {"loss": None, "w": [1.5, None, None], "n": 3}
