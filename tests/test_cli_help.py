"""Every command of the project answers ``--help`` (exit 0, its usage on
stdout): users find the flags there, so a help text that crashes (e.g. a
literal ``%`` in an argparse help string) is a broken command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

#: ``python -m`` entry points a user runs.
COMMANDS = ("beam_pipelines.importance_weights", "beam_pipelines.near_duplicates", "spark_jobs.resample",
            "spark_jobs.write_shards", "spark_jobs.verify", "spark_jobs.build_index", "trainer.pretrain",
            "trainer.finetune", "trainer.evaluate", "adaptive_transfer.resample", "adaptive_transfer.demo",
            "adaptive_transfer.experiment")


@pytest.mark.slow
def test_every_command_answers_help():
    # All at once (each is mostly the interpreter importing torch, Beam or pyspark).
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, env=dict(os.environ),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in COMMANDS}
    failed = {}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0 or "usage:" not in out:
            failed[module] = f"exit {proc.returncode}: {err.strip().splitlines()[-1:] or out[-200:]}"
    assert not failed, failed
