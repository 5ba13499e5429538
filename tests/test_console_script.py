"""The ``adaptive-transfer`` console script (``adaptive_transfer/cli.py``,
setup.py's entry point) runs every stage: each subcommand is the stage's own
parser under the name ``adaptive-transfer STAGE``, real stages run end to end
through it, ``python -m MODULE`` keeps working, and an unknown command is a
usage error that lists the commands."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive_transfer.cli import COMMANDS, main
from schemas.cli import PROG_ENV
from tests.helpers import ROOT, reference_weights, run_module, write_weights

#: Where ``pip install -e .`` puts the console script: beside this interpreter.
SCRIPT = Path(sys.executable).parent / "adaptive-transfer"


def _entry_point() -> str | None:
    """``module:function`` of the installed ``adaptive-transfer`` script, or
    ``None`` where the project is not installed in this interpreter."""
    for ep in importlib.metadata.entry_points(group="console_scripts"):
        if ep.name == "adaptive-transfer":
            return ep.value
    return None


def _command(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``adaptive-transfer ARGS``: the installed script where the project is
    installed, else the module's ``main`` in a fresh interpreter."""
    argv = [str(SCRIPT)] if _entry_point() else [sys.executable, "-m", "adaptive_transfer.cli"]
    proc = subprocess.run([*argv, *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"adaptive-transfer {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def test_the_installed_script_is_the_cli():
    # Installed (make install, pip install -e .): the entry point names cli.main and the script is there.
    value = _entry_point()
    if value is None:
        pytest.skip("adaptive-transfer is not installed in this interpreter (pip install -e . --no-deps)")
    assert value == "adaptive_transfer.cli:main"
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)
    proc = _command("--help")
    assert proc.stdout.startswith("usage: adaptive-transfer COMMAND")
    assert all(f"  {name} " in proc.stdout for name in COMMANDS)


def test_every_subcommand_answers_help_under_its_name(capsys):
    # In process (the imports are shared): the stage's own parser, named after the subcommand.
    assert set(COMMANDS) >= {"weights", "dedup", "resample", "shards", "verify", "pretrain", "finetune",
                             "evaluate", "build-index"}  # issue 29's list
    failed = {}
    for name in COMMANDS:
        try:
            status = main([name, "--help"])
        except SystemExit as e:  # argparse's --help
            status = e.code
        out = capsys.readouterr().out
        if status != 0 or not out.startswith(f"usage: adaptive-transfer {name} "):
            failed[name] = f"exit {status}: {out[:120]!r}"
    assert not failed, failed
    assert PROG_ENV not in os.environ  # the subcommand's name does not leak into later parsers


def test_unknown_and_missing_commands_are_usage_errors():
    proc = _command("resampel", check=False)
    assert proc.returncode == 2
    assert "unknown command 'resampel'" in proc.stderr
    assert all(f"  {name} " in proc.stderr for name in COMMANDS)  # the list of commands
    proc = _command(check=False)
    assert proc.returncode == 2 and "commands:" in proc.stdout


@pytest.mark.slow
def test_stages_run_end_to_end_through_the_command(source_data, tmp_path):
    # resample -> shards -> verify, each through `adaptive-transfer STAGE`; then the
    # same verification through `python -m spark_jobs.verify` (which keeps working).
    weights = write_weights(str(tmp_path / "weights.parquet"),
                            reference_weights(source_data.index_path, source_data.labels_path, seed=3))
    selection, shards = str(tmp_path / "resampled"), str(tmp_path / "shards")
    proc = _command("resample", "--index", source_data.index_path, "--weights", weights, "--size", "600",
                    "--seed", "4", "--output", selection, "--master", "local[2]", "--driver-memory", "1g")
    assert "resample: " in proc.stdout
    stats = json.loads((tmp_path / "resampled" / "stats.json").read_text())
    assert stats["total_copies"] == 600
    proc = _command("shards", "--selection", os.path.join(selection, "selection"), "--index",
                    source_data.index_path, "--output", shards, "--samples-per-shard", "250",
                    "--master", "local[2]", "--driver-memory", "1g")
    assert "600 samples" in proc.stdout and "3 shards" in proc.stdout
    via_command = _command("verify", shards, "--quiet")
    assert via_command.stdout.strip() == f"verify: ok: 3 shards, 600 samples in {shards}"
    via_module = run_module("spark_jobs.verify", shards, "--quiet")
    assert via_module.stdout == via_command.stdout
    # A stage's bad-option error names the subcommand, exit 2 as with python -m.
    proc = _command("resample", "--index", source_data.index_path, "--output", selection, check=False)
    assert proc.returncode == 2 and "usage: adaptive-transfer resample" in proc.stderr
