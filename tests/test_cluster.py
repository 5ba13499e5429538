"""A real Spark standalone cluster on loopback (a master and two workers from
the pyspark package's spark-class): resample and write_shards submitted with
spark-submit give the same output as local mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from schemas import io as sio
from spark_jobs import resample as R
from spark_jobs import write_shards as W
from tests.helpers import free_port, ROOT, reference_weights, write_weights


@pytest.fixture
def standalone_cluster(tmp_path):
    import pyspark

    home = os.path.dirname(pyspark.__file__)
    spark_class = os.path.join(home, "bin", "spark-class")
    env = {**os.environ, "SPARK_HOME": home, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "SPARK_WORKER_DIR": str(tmp_path / "work"), "SPARK_LOG_DIR": str(tmp_path / "logs")}
    port, ui = free_port(), free_port()
    procs = [subprocess.Popen([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)], env=env,
                              stdout=open(tmp_path / "master.log", "w"), stderr=subprocess.STDOUT)]
    url = f"spark://127.0.0.1:{port}"
    for i in range(2):
        procs.append(subprocess.Popen([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                       "--cores", "1", "--memory", "1g", "--webui-port", str(free_port()), url],
                                      env=env, stdout=open(tmp_path / f"worker{i}.log", "w"),
                                      stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 120
        while True:
            try:
                state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2).read())
                if sum(w.get("state") == "ALIVE" for w in state.get("workers", [])) == 2:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the standalone cluster did not come up:\n"
                                   + (tmp_path / "master.log").read_text()[-2000:])
            time.sleep(1)
        yield url, home, env
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _submit(home, env, url, *args):
    cmd = [os.path.join(home, "bin", "spark-submit"), "--master", url, "--conf", "spark.executor.memory=1g",
           "--conf", "spark.driver.memory=1g", "--conf", "spark.ui.enabled=false",
           os.path.join(ROOT, "spark_jobs", "submit.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_standalone_cluster_matches_local_mode(spark, source_data, standalone_cluster, tmp_path):
    url, home, env = standalone_cluster
    weights = write_weights(str(tmp_path / "weights.parquet"),
                            reference_weights(source_data.index_path, source_data.labels_path, seed=6))
    # Local mode, in this process.
    local = tmp_path / "local"
    R.run(spark, R.ResampleJob(index=source_data.index_path, weights=weights, size=1500, matcher="same",
                               draw="systematic", seed=2, output=str(local / "resample")))
    W.run(spark, W.ShardJob(selection=str(local / "resample"), index=source_data.index_path,
                            output=str(local / "shards"), samples_per_shard=400, seed=2))
    # The same jobs submitted to the cluster.
    remote = tmp_path / "cluster"
    proc = _submit(home, env, url, "resample", "--index", source_data.index_path, "--weights", weights,
                   "--size", "1500", "--matcher", "same", "--draw", "systematic", "--seed", "2",
                   "--output", str(remote / "resample"))
    assert "resample: 1500 samples" in proc.stdout
    _submit(home, env, url, "write_shards", "--selection", str(remote / "resample"), "--index",
            source_data.index_path, "--output", str(remote / "shards"), "--samples-per-shard", "400", "--seed", "2")
    stats = json.loads((remote / "resample" / "stats.json").read_text())
    assert stats["total_copies"] == 1500

    def selection(d):
        t = sio.read_parquet(str(d / "resample" / "selection"))
        return sorted(zip(t.column("key").to_pylist(), t.column("copies").to_pylist()))

    assert selection(remote) == selection(local)
    shards = sorted(f for f in os.listdir(local / "shards") if f.endswith(".tar"))
    assert shards == sorted(f for f in os.listdir(remote / "shards") if f.endswith(".tar"))
    for f in shards:
        assert sio.file_sha256(str(local / "shards" / f)) == sio.file_sha256(str(remote / "shards" / f))
