"""A real Spark standalone cluster on loopback whose workers share nothing
with the driver but the object store: a master and two workers from the
pyspark package's spark-class, each worker in its own mount namespace with a
private /tmp (its work and local directories) and the driver's repository,
virtualenv and temporary directories hidden. Executors run the packed
environment of ``make spark-env`` (shipped with ``--archives``) and this
project's code from ``--py-files``; every output goes to an S3 endpoint
(moto on 127.0.0.1); only the inputs Spark itself reads sit on a path all
workers see. resample and write_shards submitted with spark-submit give the
same selection and byte-identical shards as local mode.

The packed environment is built once per setup.py (and Makefile, Python)
and kept in ``~/.cache/adaptive-transfer/spark-env/<hash>/``
(``ADAPTIVE_TRANSFER_CACHE`` moves it): the first build (about a minute)
starts in the background when this module is collected, so it overlaps the
other tests. Needs root and ``unshare`` (skipped, with the reason, elsewhere).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile

import pytest

from schemas import io as sio
from spark_jobs import resample as R
from spark_jobs import write_shards as W
from spark_jobs.session import output_refusal
from tests.helpers import free_ports, ROOT, reference_weights, write_weights

#: Extras of the executors' environment here (docs/scale.md's recipe adds gcs).
ENV_EXTRAS = "spark,s3"
CACHE = os.environ.get("ADAPTIVE_TRANSFER_CACHE", os.path.expanduser("~/.cache/adaptive-transfer"))
#: The heavy tests (this cluster, DeepSpeed nodes, Beam SDK workers: minutes on
#: 2 cores) run in ``make test-cluster``, which sets this; ``make test`` runs the rest.
CLUSTER = os.environ.get("ADAPTIVE_TRANSFER_CLUSTER_TESTS") == "1"
cluster_only = pytest.mark.skipif(not CLUSTER, reason="a cluster test: `make test-cluster` runs it "
                                                      "(ADAPTIVE_TRANSFER_CLUSTER_TESTS=1)")


# -- the refusal, as a pure function ---------------------------------------------------------

@pytest.mark.parametrize("master, outputs, shared, named", [
    ("local[2]", {"--output": "/data/out"}, False, None),
    ("local-cluster[2,1,1024]", {"--output": "/data/out"}, False, None),  # one machine
    ("spark://h:7077", {"--output": "s3://b/out", "--spill-dir": None}, False, None),
    ("yarn", {"--output": "gs://b/out", "--label-sets": "hdfs://nn/sets.parquet"}, False, None),
    ("spark://h:7077", {"--output": "/data/out"}, False, "--output /data/out"),
    ("k8s://https://h:443", {"--output": "s3://b/out", "--spill-dir": "file:///scratch/x"}, False,
     "--spill-dir file:///scratch/x"),
    ("yarn", {"--output": "gs://b/out", "--label-sets": "sets.parquet"}, False, "--label-sets sets.parquet"),
    ("spark://h:7077", {"--output": "/nfs/out"}, True, None),  # declared shared
])
def test_a_driver_local_output_is_refused_on_a_cluster(master, outputs, shared, named):
    reason = output_refusal(master, outputs, shared)
    if named is None:
        assert reason is None
    else:
        assert reason.startswith(f"{named}: a path on this machine's disk, but master {master}")
        assert "object-store URL" in reason and "--shared-output" in reason
        assert "--output" in named or "--output" not in reason  # only the local ones are named


def test_shards_from_a_selection_on_object_storage(spark, source_data, s3_server, tmp_path):
    """write_shards reads a selection the resampler wrote to an object store
    through fsspec (Spark has no connector for it): the same shards as from
    a local selection, every output on the store."""
    weights = write_weights(str(tmp_path / "weights.parquet"),
                            reference_weights(source_data.index_path, source_data.labels_path, seed=3))
    job = dict(index=source_data.index_path, weights=weights, size=300, draw="systematic", seed=5)
    R.run(spark, R.ResampleJob(**job, output=str(tmp_path / "resample")))
    R.run(spark, R.ResampleJob(**job, output="s3://bucket/resample"))
    W.run(spark, W.ShardJob(selection=str(tmp_path / "resample"), index=source_data.index_path,
                            output=str(tmp_path / "shards"), samples_per_shard=100, seed=5))
    W.run(spark, W.ShardJob(selection="s3://bucket/resample", index=source_data.index_path,
                            output="s3://bucket/shards", samples_per_shard=100, seed=5))
    shards = sorted(f for f in os.listdir(tmp_path / "shards") if f.endswith(".tar"))
    assert len(shards) == 3
    assert sorted(p.rsplit("/", 1)[-1] for p in s3_server.ls("bucket/shards")) == \
        sorted(["_STAGE", "_SUCCESS", "manifest.json", *shards])
    for f in shards:
        assert sio.file_sha256(f"s3://bucket/shards/{f}") == sio.file_sha256(str(tmp_path / "shards" / f))


# -- isolation on this machine ---------------------------------------------------------------

def _isolation_problem() -> str | None:
    """Why workers cannot be isolated here (None: they can)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux: workers run in their own mount namespaces (unshare --mount)"
    if not shutil.which("unshare"):
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, text=True)
    if probe.returncode:
        return f"cannot make a mount namespace with a private tmpfs here: {probe.stderr.strip()[:200]}"
    if not shutil.which("java"):
        return "needs java (Spark)"
    return None


ISOLATION = _isolation_problem()


# -- the packed environment, built once per setup.py -------------------------------------------

def _env_key() -> str:
    """What the archive depends on: setup.py, the Makefile's spark-env recipe,
    the extras, the Python, and the versions installed in this virtualenv (its
    constraints)."""
    import sysconfig

    h = hashlib.sha256()
    with open(os.path.join(ROOT, "setup.py"), "rb") as fh:
        h.update(fh.read())
    with open(os.path.join(ROOT, "Makefile")) as fh:
        h.update("".join(line for line in fh if "SPARK_ENV" in line).encode())
    h.update("\0".join(sorted(os.listdir(sysconfig.get_paths()["purelib"]))).encode())
    h.update(f"{ENV_EXTRAS}\0{sys.version}\0{os.path.realpath(sys.executable)}".encode())
    return h.hexdigest()[:16]


class PackedEnv:
    """``make spark-env``'s files in the cache (``dir``): env.tar.gz, built
    in a background thread on first use; code.zip, brought up to date by make
    on every :meth:`wait`. Returns the build's log and seconds."""

    def __init__(self) -> None:
        self.dir = os.path.join(CACHE, "spark-env", _env_key())
        self.archive = os.path.join(self.dir, "env.tar.gz")
        self.code = os.path.join(self.dir, "code.zip")
        self.error: str | None = None
        self.thread: threading.Thread | None = None

    def _make(self, *targets: str) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(self.dir + ".lock", "w") as lock:  # another session on this machine may be building it
            fcntl.flock(lock, fcntl.LOCK_EX)
            t0 = time.perf_counter()
            proc = subprocess.run(["make", "--no-print-directory", *targets, f"SPARK_ENV_DIR={self.dir}",
                                   f"SPARK_ENV_EXTRAS={ENV_EXTRAS}", f"VENV={sys.prefix}"],
                                  cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                self.error = f"make {' '.join(targets)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            elif self.archive in targets:
                with open(os.path.join(self.dir, "build.json"), "w") as fh:
                    json.dump({"seconds": round(time.perf_counter() - t0, 1),
                               "bytes": os.path.getsize(self.archive)}, fh)

    def start(self) -> None:
        """Build the archive in the background unless it is cached."""
        if not os.path.exists(self.archive):
            self.thread = threading.Thread(target=self._make, args=(self.archive,), daemon=True)
            self.thread.start()

    def wait(self) -> dict:
        if self.thread is not None:
            self.thread.join()
        elif not os.path.exists(self.archive):
            self._make(self.archive)
        if self.error is None:
            self._make(self.code)
        if self.error:
            raise RuntimeError(self.error)
        with open(os.path.join(self.dir, "build.json")) as fh:
            return json.load(fh)


PACKED = PackedEnv()
if CLUSTER and ISOLATION is None:
    PACKED.start()  # off the critical path: the other tests run meanwhile


@pytest.fixture(scope="session")
def spark_env():
    if ISOLATION:
        pytest.skip(ISOLATION)
    build = PACKED.wait()
    print(f"\nspark-env: {PACKED.archive}: {build['bytes'] / 2**20:.0f} MiB, built in {build['seconds']} s")
    return PACKED


# -- the cluster ----------------------------------------------------------------------------

def _hidden_from_workers() -> list[str]:
    """The driver's directories a worker must not see: this repository, the
    virtualenv, and the temporary directory when it is not under /tmp."""
    dirs = [os.path.realpath(d) for d in (ROOT, sys.prefix, tempfile.gettempdir())]
    dirs = [d for d in dirs if d != "/" and not (d + "/").startswith("/tmp/")]
    return sorted(d for d in set(dirs) if not any(d.startswith(o + "/") for o in dirs))


#: A worker's start: its own /tmp (work and local dirs), Spark's files bound
#: under it (through /mnt first: they may live under the driver's /tmp, which
#: the new /tmp hides), then the driver's directories hidden under empty tmpfs
#: mounts.
WORKER_SCRIPT = """set -e
mount -t tmpfs -o size=1m tmpfs /mnt
mkdir /mnt/spark-home
mount --bind "$SPARK_FILES" /mnt/spark-home
mount -t tmpfs -o size=4g tmpfs /tmp
mkdir -p /tmp/spark-home /tmp/work /tmp/local
mount --bind /mnt/spark-home /tmp/spark-home
for d in $HIDE; do mount -t tmpfs -o size=1m,mode=0755 tmpfs "$d"; done
cd /
exec /tmp/spark-home/bin/spark-class org.apache.spark.deploy.worker.Worker --host 127.0.0.1 \\
  --cores 1 --memory 2g --work-dir /tmp/work --webui-port "$UI_PORT" "$MASTER_URL"
"""


def _worker_env(spark_files: str, url: str) -> dict:
    """A worker's environment: nothing of the driver's Python, credentials or storage options."""
    keep = ("PATH", "JAVA_HOME", "LANG", "LC_ALL", "HOME")
    venv_bin = os.path.join(sys.prefix, "bin")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if os.path.realpath(p) != os.path.realpath(venv_bin))
    env.update({"SPARK_HOME": "/tmp/spark-home", "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOCAL_DIRS": "/tmp/local",
                "SPARK_WORKER_DIR": "/tmp/work", "SPARK_LOG_DIR": "/tmp/logs", "SPARK_FILES": spark_files,
                "HIDE": " ".join(_hidden_from_workers()), "MASTER_URL": url})
    return env


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    """``(master url, SPARK_HOME)`` of a master and two isolated workers."""
    if ISOLATION:
        pytest.skip(ISOLATION)
    import pyspark

    logs = tmp_path_factory.mktemp("cluster-logs")
    home = os.path.dirname(pyspark.__file__)
    port, ui, *worker_ui = free_ports(4)
    url = f"spark://127.0.0.1:{port}"
    master_env = {**os.environ, "SPARK_HOME": home, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(logs)}
    procs = [subprocess.Popen([os.path.join(home, "bin", "spark-class"), "org.apache.spark.deploy.master.Master",
                               "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui)],
                              env=master_env, stdout=open(logs / "master.log", "w"), stderr=subprocess.STDOUT)]
    for i in range(2):
        env = {**_worker_env(home, url), "UI_PORT": str(worker_ui[i])}
        procs.append(subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", WORKER_SCRIPT],
                                      env=env, stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 120
        while True:
            try:
                state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2).read())
                if sum(w.get("state") == "ALIVE" for w in state.get("workers", [])) == 2:
                    break
            except (OSError, ValueError):  # not up yet, or still serving its HTML start page
                pass
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the standalone cluster did not come up:\n" + "\n".join(
                    (logs / f).read_text()[-1500:] for f in ("master.log", "worker0.log", "worker1.log")))
            time.sleep(1)
        yield url, home
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def shared_inputs(source_data, tmp_path):
    """The index and weights where every worker sees them (as HDFS or a
    bucket would be): outside /tmp and the repository."""
    root = tempfile.mkdtemp(prefix="adaptive-transfer-inputs-", dir="/var/tmp")
    try:
        index = shutil.copytree(source_data.index_path, os.path.join(root, "index"))
        weights = write_weights(os.path.join(root, "weights.parquet"),
                                reference_weights(source_data.index_path, source_data.labels_path, seed=6))
        yield index, weights
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _submit(home, url, env_files, storage_env, *args, check=True):
    """spark-submit as docs/scale.md's recipe: the packed env, the code, Python's
    memory, few shuffle partitions. Two settings are this loopback's own: the
    workers share a host name but not their disks, so no executor may read
    another's shuffle files from "its host's" disk; and the driver's scratch
    directory (where client mode unpacks --archives too) is on tmpfs."""
    cmd = [os.path.join(home, "bin", "spark-submit"), "--master", url,
           "--archives", f"{env_files.archive}#env", "--py-files", env_files.code,
           "--conf", "spark.pyspark.python=./env/bin/python",
           "--conf", f"spark.pyspark.driver.python={sys.executable}",
           "--conf", "spark.executor.pyspark.memory=1g", "--conf", "spark.executor.memory=1g",
           "--conf", "spark.driver.memory=1g", "--conf", "spark.sql.shuffle.partitions=4",
           "--conf", "spark.ui.enabled=false", "--conf", "spark.shuffle.readHostLocalDisk=false",
           os.path.join(ROOT, "spark_jobs", "submit.py"), *args]
    scratch = tempfile.mkdtemp(prefix="adaptive-transfer-driver-",
                               dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    env = {**os.environ, "SPARK_HOME": home, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOCAL_DIRS": scratch,
           **storage_env}
    env.pop("PYSPARK_PYTHON", None)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if check:
        assert proc.returncode == 0, _failure(proc)
    return proc


def _failure(proc) -> str:
    """What went wrong, out of a Spark log: the error lines (Python's among the JVM's), then the end."""
    lines = proc.stderr.splitlines()
    errors = [ln for ln in lines if "Error" in ln and not ln.lstrip().startswith("at ")]
    return "\n".join(dict.fromkeys(errors[:40])) + "\n...\n" + proc.stdout[-1500:] + "\n".join(lines[-15:])


@cluster_only
@pytest.mark.slow
def test_cluster_without_shared_disk_matches_local_mode(spark, standalone_cluster, spark_env, shared_inputs,
                                                        s3_server, tmp_path):
    url, home = standalone_cluster
    index, weights = shared_inputs
    # Only the driver has the endpoint and the credentials (as fsspec options): they travel to the tasks.
    storage = {"FSSPEC_S3_ENDPOINT_URL": os.environ["FSSPEC_S3_ENDPOINT_URL"], "FSSPEC_S3_KEY": "testing",
               "FSSPEC_S3_SECRET": "testing"}

    # The executors run the packed environment, not the driver's virtualenv, and no torch.
    proc = _submit(home, url, spark_env, storage, "check-env")
    facts = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    prefixes = {f["prefix"] for f in facts}
    assert len(prefixes) == 2, facts  # one executor per worker, each with its own unpacked copy
    for f in facts:
        assert f["prefix"].startswith("/tmp/work/app-") and f["prefix"].endswith("/env"), f
        assert f["executable"].startswith(f["prefix"] + "/bin/python"), f
        assert not f["prefix"].startswith(os.path.realpath(sys.prefix))
        assert f["packages"]["torch"] is None and f["packages"]["pyarrow"] and f["packages"]["s3fs"], f
        assert "code.zip" in f["spark_jobs"], f
    # code.zip ships the contracts and the jobs, never the data generator (nor its deprecated spelling).
    shipped = zipfile.ZipFile(spark_env.code).namelist()
    assert "schemas/io.py" in shipped and any(n.startswith("spark_jobs/") for n in shipped), shipped
    assert not [n for n in shipped if n.endswith("synthetic.py")], shipped

    # Local mode, in this process, to local directories.
    local = tmp_path / "local"
    R.run(spark, R.ResampleJob(index=index, weights=weights, size=1500, matcher="same", draw="systematic",
                               seed=2, output=str(local / "resample")))
    W.run(spark, W.ShardJob(selection=str(local / "resample"), index=index, output=str(local / "shards"),
                            samples_per_shard=400, seed=2))

    # The same jobs on the cluster, every output on the object store.
    remote = "s3://bucket/cluster"
    proc = _submit(home, url, spark_env, storage, "resample", "--index", index, "--weights", weights,
                   "--size", "1500", "--matcher", "same", "--draw", "systematic", "--seed", "2",
                   "--output", f"{remote}/resample", "--label-sets", f"{remote}/label-sets.parquet")
    assert "resample: 1500 samples" in proc.stdout
    _submit(home, url, spark_env, storage, "write_shards", "--selection", f"{remote}/resample", "--index", index,
            "--output", f"{remote}/shards", "--samples-per-shard", "400", "--seed", "2")

    def selection(path):
        t = sio.read_parquet(path + "/selection")
        return sorted(zip(t.column("key").to_pylist(), t.column("copies").to_pylist()))

    assert selection(f"{remote}/resample") == selection(str(local / "resample"))
    assert json.loads(sio.read_bytes(f"{remote}/resample/stats.json"))["total_copies"] == 1500
    assert not s3_server.exists("bucket/cluster/resample/selection/_attempts")
    shards = sorted(f for f in os.listdir(local / "shards") if f.endswith(".tar"))
    listed = sorted(p.rsplit("/", 1)[-1] for p in s3_server.ls("bucket/cluster/shards"))
    assert listed == sorted(["_STAGE", "_SUCCESS", "manifest.json", *shards])  # no run files or temporaries left
    for f in shards:
        assert sio.file_sha256(f"{remote}/shards/{f}") == sio.file_sha256(str(local / "shards" / f))

    # A driver-local output on the cluster is refused before any work, and says why.
    out = os.path.join(os.path.dirname(index), "driver-local")
    proc = _submit(home, url, spark_env, storage, "resample", "--index", index, "--weights", weights,
                   "--size", "10", "--output", out, check=False)
    said = proc.stdout + proc.stderr  # spark-submit passes the driver's stderr on as its stdout
    assert proc.returncode == 1, _failure(proc)
    assert f"resample: error: --output {out}: a path on this machine's disk, but master {url}" in said
    assert "--shared-output" in said and not os.path.exists(out)
