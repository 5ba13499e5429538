"""Beam workers with only the documented worker requirements: the importance
weights pipeline with its SDK worker in a separate process (the portable
runner's embedded job service, environment ``beam:env:harness_subprocess_python:v1``)
that runs a second virtualenv built from setup.py's ``beam`` and ``s3``
extras alone (no pyspark, no DeepSpeed, not this project: its code comes as
a zip, as the Dockerfile's image carries it), reading the source index,
the model and the target images from an S3 endpoint (moto on 127.0.0.1) and
writing its outputs there; the weights equal a DirectRunner run on local
copies. The worker environment is built once per setup.py and the
driver's versions (about 40 s, 1.6 GB with torch) and kept in
``~/.cache/adaptive-transfer/beam-worker/<hash>/``; the test is in
``make test-cluster``."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import importance_weights as IW
from beam_pipelines.target_histogram import GeneralistModelHandler, inference_settings
from schemas import io as sio
from tests.helpers import ROOT
from tests.test_cluster import CACHE, CLUSTER, cluster_only
from trainer.models import build_model, save_generalist
from trainer.transforms import PreprocessSpec

#: The Beam worker's extras: what the Dockerfile installs, with s3 in place of gcs.
WORKER_EXTRAS = "beam,s3"
#: What the SDK worker process runs: it records which Python it is, then becomes
#: Beam's SDK harness (what a container's boot starts).
WORKER_MAIN = """import importlib.util, json, os, runpy, sys
with open(os.path.join(os.environ["ADAPTIVE_TRANSFER_FACTS"], "worker-%d.json" % os.getpid()), "w") as fh:
    json.dump({"executable": sys.executable, "prefix": sys.prefix,
               "importable": {m: importlib.util.find_spec(m) is not None
                              for m in ("apache_beam", "torch", "s3fs", "boto3", "pyspark", "deepspeed")}}, fh)
runpy.run_module("apache_beam.runners.worker.sdk_worker_main", run_name="__main__", alter_sys=True)
"""


# -- options: where the model runs ------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    ([], {"device": "CPU", "large_model": False, "model_copies": None}),
    (["--inference_device", "gpu"], {"device": "GPU", "large_model": False, "model_copies": None}),
    (["--large_model"], {"device": "CPU", "large_model": True, "model_copies": None}),
    (["--model_copies", "2"], {"device": "CPU", "large_model": True, "model_copies": 2}),
])
def test_inference_settings_come_from_pipeline_options(argv, expected):
    settings = inference_settings(PipelineOptions(argv))
    assert settings == expected
    handler = GeneralistModelHandler("generalist.pt", **settings)
    assert handler.share_model_across_processes() is expected["large_model"]
    assert handler.model_copies() == (expected["model_copies"] or 1)


def test_bad_model_copies_are_refused_before_the_output_is_touched(tmp_path):
    with pytest.raises(ValueError, match="--model_copies must be >= 1, got 0"):
        IW.run(IW.WeightsJob(index="i", labels="l", output=str(tmp_path / "w")), ["--model_copies", "0"])
    assert not (tmp_path / "w").exists()


# -- the worker's own environment -----------------------------------------------------------

def _worker_key() -> str:
    h = hashlib.sha256()
    with open(os.path.join(ROOT, "setup.py"), "rb") as fh:
        h.update(fh.read())
    h.update("\0".join(sorted(os.listdir(sysconfig.get_paths()["purelib"]))).encode())
    h.update(f"{WORKER_EXTRAS}\0{sys.version}\0{os.path.realpath(sys.executable)}".encode())
    return h.hexdigest()[:16]


class WorkerEnv:
    """A virtualenv of setup.py's worker extras at this venv's versions (as
    constraints: the same torch, from the machine's wheel, and Beam), without
    this project; built in a background thread on first use."""

    def __init__(self) -> None:
        self.dir = os.path.join(CACHE, "beam-worker", _worker_key())
        self.python = os.path.join(self.dir, "venv", "bin", "python")
        self.error: str | None = None
        self.thread: threading.Thread | None = None

    def _build(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(self.dir + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = os.path.join(self.dir, "build.json")
            if os.path.exists(done):
                return
            t0 = time.perf_counter()
            venv = os.path.join(self.dir, "venv")
            freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                                    capture_output=True, text=True, check=True).stdout
            constraints = os.path.join(self.dir, "constraints.txt")
            with open(constraints, "w") as fh:
                fh.write("".join(line + "\n" for line in freeze.splitlines() if " @ " not in line))
            for cmd in (["python3", "-m", "venv", "--clear", venv],
                        [self.python, "-m", "pip", "install", "--quiet", "-c", constraints, f".[{WORKER_EXTRAS}]"],
                        [self.python, "-m", "pip", "uninstall", "--quiet", "--yes", "adaptive-transfer"]):
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    self.error = f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
                    return
            with open(done, "w") as fh:
                json.dump({"seconds": round(time.perf_counter() - t0, 1)}, fh)

    def start(self) -> None:
        if not os.path.exists(os.path.join(self.dir, "build.json")):
            self.thread = threading.Thread(target=self._build, daemon=True)
            self.thread.start()

    def wait(self) -> dict:
        if self.thread is not None:
            self.thread.join()
        self._build()
        if self.error:
            raise RuntimeError(self.error)
        with open(os.path.join(self.dir, "build.json")) as fh:
            return json.load(fh)


WORKER_ENV = WorkerEnv()
if CLUSTER:
    WORKER_ENV.start()  # off the critical path: the other tests run meanwhile


@pytest.fixture(scope="session")
def beam_worker_env():
    build = WORKER_ENV.wait()
    print(f"\nbeam worker env: {WORKER_ENV.dir}: built in {build['seconds']} s")
    return WORKER_ENV


def _code_zip(path: str) -> str:
    """The packages a Beam worker imports from this project (the Dockerfile copies the same)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for package in ("schemas", "beam_pipelines", "trainer"):
            for f in sorted(glob.glob(os.path.join(ROOT, package, "*.py"))):
                z.write(f, os.path.relpath(f, ROOT))
    return path


@pytest.fixture(scope="module")
def generalist(tmp_path_factory, source_data):
    path = str(tmp_path_factory.mktemp("model") / "generalist.pt")
    vocab = sio.read_parquet(source_data.labels_path)
    torch.manual_seed(0)
    save_generalist(path, build_model("small", vocab.num_rows), "small", vocab.column("label_id").to_pylist()[::-1],
                    PreprocessSpec(32), vocab)
    return path


@cluster_only
@pytest.mark.slow
def test_weights_with_workers_in_their_own_environment_and_everything_on_s3(
        source_data, food_target, generalist, beam_worker_env, s3_server, tmp_path):
    fs = s3_server
    fs.put(source_data.index_path, "bucket/src/index", recursive=True)
    fs.put(source_data.labels_path, "bucket/src/labels.parquet")
    fs.put(generalist, "bucket/models/generalist.pt")
    fs.put(food_target.root, "bucket/food", recursive=True)
    common = {"target_layout": "food101", "batch_size": 16, "target": "food"}

    # DirectRunner on the local copies: the reference.
    local = IW.run(IW.WeightsJob(index=source_data.index_path, labels=source_data.labels_path,
                                 target_root=food_target.root, checkpoint=generalist, **common,
                                 output=str(tmp_path / "local")), ["--runner", "DirectRunner"])

    facts = tmp_path / "facts"
    facts.mkdir()
    main = tmp_path / "worker_main.py"
    main.write_text(WORKER_MAIN)
    code = _code_zip(str(tmp_path / "code.zip"))
    worker = (f"ADAPTIVE_TRANSFER_FACTS={facts} PYTHONPATH={code} {beam_worker_env.python} {main}")
    endpoint = os.environ["FSSPEC_S3_ENDPOINT_URL"]
    # A glob: an object store has no directories to list (label_counts.match_files matches names).
    remote = IW.run(IW.WeightsJob(index="s3://bucket/src/index/*.parquet", labels="s3://bucket/src/labels.parquet",
                                  target_root="s3://bucket/food", checkpoint="s3://bucket/models/generalist.pt",
                                  **common, output="s3://bucket/weights/food"),
                    ["--runner", "PortableRunner", "--job_endpoint", "embed",
                     "--environment_type", "beam:env:harness_subprocess_python:v1", "--environment_config", worker,
                     # Beam's S3 filesystem (index files, target images) and the inference options.
                     "--s3_endpoint_url", endpoint, "--s3_access_key_id", "testing",
                     "--s3_secret_access_key", "testing", "--s3_region_name", "us-east-1",
                     "--inference_device", "CPU", "--large_model"])

    # The work ran in the worker's own Python: the worker extras, nothing of the driver's.
    ran = [json.loads(p.read_text()) for p in sorted(facts.glob("worker-*.json"))]
    assert ran, "no SDK worker process started"
    for f in ran:
        assert f["prefix"] == os.path.join(beam_worker_env.dir, "venv") != sys.prefix, f
        assert f["importable"] == {"apache_beam": True, "torch": True, "s3fs": True, "boto3": True,
                                   "pyspark": False, "deepspeed": False}, f

    # The outputs are on the object store, and equal the local run's.
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("bucket/weights/food"))
    assert names == sorted(IW.OUTPUT_FILES)
    for name in ("label_counts.parquet", "target_histogram.parquet", "weights.parquet"):
        a, b = sio.read_parquet(str(tmp_path / "local" / name)), sio.read_parquet(f"s3://bucket/weights/food/{name}")
        assert a.column_names == b.column_names
        for column in a.column_names:
            np.testing.assert_array_equal(a.column(column).to_numpy(), b.column(column).to_numpy(), err_msg=column)
    assert remote["target_images"] == local["target_images"] > 0 and remote["unreadable_images"] == 0
    assert [t["label_id"] for t in remote["top_labels"]] == [t["label_id"] for t in local["top_labels"]]
