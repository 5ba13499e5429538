"""The Beam stages' command lines (importance_weights, near_duplicates): the
flags' earlier spellings, a typed job per command line, one line naming the
file when target images cannot be read, and nothing left in the temp
directory by a run (each run as a user runs it: ``python -m``, in a fresh
interpreter with its own TMPDIR)."""

from __future__ import annotations

import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_pipelines import importance_weights as IW
from beam_pipelines import near_duplicates as ND
from beam_pipelines.execution import error_line, in_process_runner, pipeline_options
from schemas import io as sio
from schemas.targets import list_target
from tests.helpers import random_generalist, run_module

STAGES = {"importance_weights": IW, "near_duplicates": ND}


@pytest.fixture(scope="module")
def generalist(tmp_path_factory, source_data):
    """A randomly initialised small generalist over the source vocabulary."""
    return random_generalist(str(tmp_path_factory.mktemp("model") / "generalist.pt"), source_data.labels_path)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, source_data):
    """60 examples of the generated source in one file."""
    path = str(tmp_path_factory.mktemp("small") / "index.parquet")
    first = sorted(os.listdir(source_data.index_path))[0]
    pq.write_table(pq.read_table(os.path.join(source_data.index_path, first)).slice(0, 60), path)
    return path


def new_and_old(stage: str, source_data, root: str, model: str, out: str) -> tuple[list[str], list[str]]:
    """The same command line with the flags' new and old spellings."""
    new = ["--index", source_data.index_path, "--labels", source_data.labels_path, "--target-root", root,
           "--checkpoint", model, "--output", out]
    old = ["--source-index", source_data.index_path, "--labels", source_data.labels_path, "--target-images", root,
           "--model", model, "--output", out]
    if stage == "importance_weights":
        new, old = new + ["--target", "food"], old + ["--target-name", "food"]
    return new, old


# -- flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", sorted(STAGES))
def test_old_spellings_give_the_same_job_say_so_and_are_not_in_help(stage, capsys):
    module = STAGES[stage]
    new, old = new_and_old(stage, SimpleNamespace(index_path="idx", labels_path="v.parquet"), "root", "gen.pt",
                           "out")
    job_new, rest_new = module.job_from_args([*new, "--runner", "DirectRunner"])
    assert capsys.readouterr().err == ""
    job_old, rest_old = module.job_from_args([*old, "--runner", "DirectRunner"])
    assert job_old == job_new and rest_old == rest_new == ["--runner", "DirectRunner"]
    assert job_new.index == "idx" and job_new.target_root == "root" and job_new.checkpoint == "gen.pt"
    err = capsys.readouterr().err.splitlines()
    prog = f"python -m beam_pipelines.{stage}"
    assert sorted(err) == sorted(f"{prog}: {o} is deprecated; use {n}" for o, n in module.RENAMED_FLAGS.items())
    shown = module.build_parser().format_help()
    for o, n in module.RENAMED_FLAGS.items():
        assert re.search(rf"{re.escape(o)}(?![\w-])", shown) is None, o
        assert re.search(rf"{re.escape(n)}(?![\w-])", shown), n
    # A required flag is satisfied by either spelling, and missing under both is refused.
    with pytest.raises(SystemExit):
        module.job_from_args([a for a in old if a not in ("--source-index", "idx")])
    assert "the following arguments are required: --index" in capsys.readouterr().err


def test_near_duplicates_job_of_a_command_line():
    job, rest = ND.job_from_args(["--index", "i", "--labels", "l", "--target-root", "r", "--checkpoint", "c",
                                  "--output", "o", "--splits", "test, train", "--allow-uri-prefix", "s3://b/x",
                                  "--allow-uri-prefix", "s3://b/y", "--threshold", "0.9", "--direct_num_workers", "2"])
    assert job == ND.NearDuplicatesJob(index="i", labels="l", target_root="r", checkpoint="c", output="o",
                                       splits=("test", "train"), allow_uri_prefixes=("s3://b/x", "s3://b/y"),
                                       threshold=0.9)
    assert rest == ["--direct_num_workers", "2"]
    with pytest.raises(ValueError, match="--splits must name distinct splits, got 'a,a'"):
        ND.NearDuplicatesJob(index="i", labels="l", target_root="r", checkpoint="c", output="o",
                             splits=("a", "a")).check()


def test_old_spellings_run_the_same_job(source_data, tmp_path, capsys):
    """A finished output made with the new spellings is the same job's under the
    old ones: the rerun does nothing (same fingerprint)."""
    vocab = sio.read_parquet(source_data.labels_path)
    p = np.random.default_rng(5).dirichlet(np.ones(vocab.num_rows))
    pq.write_table(pa.table({"label_id": vocab.column("label_id"), "p_target": p}), tmp_path / "pt.parquet")
    common = ["--labels", source_data.labels_path, "--target-histogram", str(tmp_path / "pt.parquet"),
              "--output", str(tmp_path / "w")]
    assert IW.main(["--index", source_data.index_path, *common]) == 0
    capsys.readouterr()
    assert IW.main(["--source-index", source_data.index_path, *common]) == 0
    err = capsys.readouterr().err
    assert "--source-index is deprecated; use --index" in err and "nothing to do" in err


def test_a_finished_output_is_reused_only_when_made_from_the_same_job(source_data, tmp_path, capsys,
                                                                      monkeypatch):
    """The one reuse rule: the same job is a no-op; other settings or other code
    are refused naming what differs, unless --overwrite."""
    vocab = sio.read_parquet(source_data.labels_path)
    p = np.random.default_rng(6).dirichlet(np.ones(vocab.num_rows))
    pq.write_table(pa.table({"label_id": vocab.column("label_id"), "p_target": p}), tmp_path / "pt.parquet")
    out = tmp_path / "w"
    args = ["--index", source_data.index_path, "--labels", source_data.labels_path,
            "--target-histogram", str(tmp_path / "pt.parquet"), "--output", str(out)]
    assert IW.main(args) == 0
    first = (out / "weights.parquet").read_bytes()
    capsys.readouterr()
    assert IW.main([*args, "--batch-size", "7", "--runner", "DirectRunner"]) == 0  # performance knobs: the same job
    assert "nothing to do" in capsys.readouterr().err
    assert IW.main([*args, "--temperature", "3", "--target", "other"]) == 1
    err = capsys.readouterr().err
    assert "holds a finished importance_weights result made from other target, temperature" in err
    assert (out / "weights.parquet").read_bytes() == first
    monkeypatch.setattr(IW, "code_digest", lambda *modules: "0" * 64)  # the stage's code changed
    assert IW.main(args) == 1
    assert "made from other code;" in capsys.readouterr().err
    assert IW.main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert IW.main(args) == 0 and "nothing to do" in capsys.readouterr().err


def test_pipeline_options_and_runner():
    assert pipeline_options(["--runner", "DirectRunner"]).get_all_options()["runner"] == "DirectRunner"
    options = pipeline_options(["--direct_num_workers", "2"])
    assert pipeline_options(options) is options
    with pytest.raises(ValueError, match="a list of strings"):
        pipeline_options("--runner DirectRunner")
    for args in ([], ["--runner", "DirectRunner"], ["--runner", "direct"]):
        assert type(in_process_runner(pipeline_options(args))).__name__ == "FnApiRunner", args
    assert in_process_runner(pipeline_options(["--runner", "PortableRunner"])) is None
    assert error_line(ValueError("3 of 9 images are unreadable [while running 'WriteOutputs']\nTraceback")) \
        == "3 of 9 images are unreadable"


# -- as a user runs them -----------------------------------------------------------------------

def run_stage(stage: str, args: list[str], tmpdir, check: bool = True):
    """``python -m beam_pipelines.STAGE args`` in a fresh interpreter whose temp directory is ``tmpdir``."""
    tmpdir.mkdir(exist_ok=True)
    return run_module(f"beam_pipelines.{stage}", *args, env={"TMPDIR": str(tmpdir)}, check=check)


def stage_args(stage: str, source_data, small_index, generalist, root: str, out, store=None) -> list[str]:
    args = ["--index", small_index, "--labels", source_data.labels_path, "--target-root", root,
            "--target-layout", "food101", "--checkpoint", generalist, "--batch-size", "16", "--output", str(out)]
    if stage == "near_duplicates" and store is not None:
        args += ["--embeddings", str(store)]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_run_leaves_nothing_in_the_temp_directory(stage, source_data, small_index, generalist, food_target,
                                                    tmp_path):
    tmpdir = tmp_path / "tmp"
    proc = run_stage(stage, stage_args(stage, source_data, small_index, generalist, food_target.root,
                                       tmp_path / "out", tmp_path / "store"), tmpdir)
    assert proc.stdout.startswith(f"{stage}: "), proc.stdout
    assert os.listdir(tmpdir) == []
    assert sorted(os.listdir(tmp_path / "out")) == sorted(STAGES[stage].OUTPUT_FILES)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no build left beside the output


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_unreadable_target_images_are_one_line_naming_the_file(stage, source_data, small_index, generalist,
                                                               food_target, tmp_path):
    root = tmp_path / "target"
    shutil.copytree(food_target.root, root)
    listed = sorted(list_target(str(root), "food101", "train").paths)
    empty, text, folder = listed[:3]
    open(empty, "wb").close()  # empty
    with open(text, "w") as fh:  # not an image
        fh.write("hello\n")
    os.remove(folder)
    os.mkdir(folder)  # cannot be read as a file
    tmpdir = tmp_path / "tmp"
    proc = run_stage(stage, [*stage_args(stage, source_data, small_index, generalist, str(root), tmp_path / "out"),
                             "--max-bad-fraction", "0.01"], tmpdir, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    total = len(listed) + (len(list_target(str(root), "food101", "test").paths) if stage == "near_duplicates" else 0)
    assert re.fullmatch(rf"{stage}: error: 3 of {total} target images are unreadable \(\d+\.\d\d% > "
                        rf"--max-bad-fraction 1\.00%\); first: {re.escape(empty)} \(UnidentifiedImageError: .*\); "
                        rf"then \[{re.escape(repr(text))}, {re.escape(repr(folder))}\]", last), last
    assert [line for line in proc.stderr.splitlines() if line.startswith(f"{stage}: ")] == [last]
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmpdir) == []
    # Within --max-bad-fraction the run goes on, the three counted and named.
    run_stage(stage, [*stage_args(stage, source_data, small_index, generalist, str(root), tmp_path / "ok"),
                      "--max-bad-fraction", "0.05"], tmpdir)
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    key = "unreadable_image_names" if stage == "importance_weights" else "target_unreadable_image_names"
    assert summary[key] == sorted([empty, text, folder])
