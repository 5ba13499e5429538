"""SparkSession for the jobs: local mode sized to the machine, or whatever
``spark-submit`` configured on a cluster."""

from __future__ import annotations

import os
import re
import sys
import time
import uuid

__all__ = ["get_session", "local_driver_memory", "local_cores", "inject_failure", "add_spark_arguments",
           "run_job", "run_cli", "StageTimer", "observed_metrics", "task_attempt_id", "set_confs",
           "read_parquet_columns", "task_attempt_number", "output_refusal", "require_reachable_outputs",
           "read_parquet_through_fsspec", "python_facts", "executor_environments", "EXECUTOR_PACKAGES"]

#: Environment variable that makes the first attempt of each task fail (tests
#: of retries): a comma-separated list of stage names, or ``all``.
FAIL_FIRST_ATTEMPT_ENV = "ADAPTIVE_TRANSFER_FAIL_FIRST_ATTEMPT"


def local_driver_memory(fraction: float = 0.5, cap_gb: int = 32) -> str:
    """Driver heap for local mode: ``fraction`` of physical memory, 2..cap GiB.

    In local mode the executors live in the driver JVM, so this is the memory
    the whole job gets (a 100M-record index needs ~8 GiB here).
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    gb = max(2, min(cap_gb, int(total * fraction) >> 30))
    return f"{gb}g"


def local_cores(master: str) -> int | None:
    """Worker threads of a ``local``, ``local[N]``, ``local[*]`` or
    ``local[N,F]`` master; ``None`` for any other master."""
    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master.strip())
    if not m:
        return None
    if m.group(1) in (None, ""):
        return 1
    return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))


def get_session(app_name: str, master: str | None = None, *, driver_memory: str | None = None,
                shuffle_partitions: int | None = None, extra: dict | None = None):
    """Return a SparkSession.

    ``master``: ``local[*]`` by default when not launched by ``spark-submit``
    (which sets ``spark.master`` itself); ``driver_memory`` defaults to
    :func:`local_driver_memory` in local mode only.
    """
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    # Python workers must run the interpreter that has this project's
    # dependencies (on a cluster, spark-submit's environment decides).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        # Run by spark-submit: its JVM holds --master and the --conf settings. A
        # SparkConf made before connecting to it would not see them (and local[*]
        # would replace the cluster's master).
        SparkContext._ensure_initialized()
    conf = SparkConf()
    builder = SparkSession.builder.appName(app_name)
    if master is None and not conf.contains("spark.master"):
        master = "local[*]"
    if master is not None:
        builder = builder.master(master)
    effective = master or conf.get("spark.master", "")
    if effective.startswith("local") and not conf.contains("spark.driver.memory"):
        builder = builder.config("spark.driver.memory", driver_memory or local_driver_memory())
    elif driver_memory:
        builder = builder.config("spark.driver.memory", driver_memory)
    settings = {
        "spark.sql.execution.arrow.maxRecordsPerBatch": "65536",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
    }
    cores = local_cores(effective)
    if not shuffle_partitions and cores:
        # Spark's default (200) is for clusters; locally a few per core is faster.
        shuffle_partitions = 4 * cores
    if shuffle_partitions:
        settings["spark.sql.shuffle.partitions"] = str(shuffle_partitions)
    settings.update(extra or {})
    for k, v in settings.items():
        if not conf.contains(k):
            builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


class StageTimer:
    """Seconds per job stage: ``lap(name)`` records the time since the last lap
    (or since the timer was made) in ``timings`` (rounded to ms)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._tick = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._tick, 3)
        self._tick = now


def observed_metrics(observation):
    """The metrics row of a ``pyspark.sql.Observation`` after its action, or
    ``None`` where Spark delivered none (e.g. the observed plan was pruned as
    empty)."""
    try:
        return observation.get
    except Exception:  # noqa: BLE001 - Spark raises a JVM assertion error, not a documented one
        return None


def set_confs(spark, settings: dict[str, str]):
    """Set runtime SQL confs; return a function that restores what was there
    before (unsets what was not set)."""
    before = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)

    def restore() -> None:
        for k, v in before.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)
    return restore


def read_parquet_columns(spark, path: str, columns: list[str]):
    """``spark.read.parquet(path)`` narrowed to those of ``columns`` the data
    has, typed from the first file's footer (read with pyarrow).

    A plain ``spark.read.parquet`` runs a Spark job to infer the schema (about
    50 ms of a short job); this reads one footer instead. Falls back to
    Spark's inference where the path lists no file or a column's type has no
    Spark equivalent, so Spark's own errors and types stand there.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql.pandas.types import from_arrow_schema

    from schemas import io as sio

    try:
        first = sio.expand_paths(path)[0]
        fs, p = sio.filesystem(first)
        with fs.open(p, "rb") as fh:
            footer = pq.read_schema(fh)
        present = [c for c in columns if c in footer.names]
        schema = from_arrow_schema(pa.schema([footer.field(c) for c in present])) if present else None
    except (FileNotFoundError, TypeError, NotImplementedError):
        schema = None
    if schema is None:
        df = spark.read.parquet(path)
        return df.select([c for c in columns if c in df.columns])
    return spark.read.schema(schema).parquet(path)


def _read_parquet_files(columns: list[str], schema_bytes: bytes, storage: dict):
    """mapInArrow over rows of file paths: each file's ``columns``, read
    through fsspec and cast to the schema (serialised Arrow) of the first file."""

    def read(batches):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from schemas import io as sio

        sio.apply_storage_config(storage)
        schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
        for batch in batches:
            for path in batch.column("file").to_pylist():
                fs, p = sio.filesystem(path)
                with fs.open(p, "rb") as fh:
                    for part in pq.ParquetFile(fh).iter_batches(columns=columns):
                        yield from pa.Table.from_batches([part]).cast(schema).to_batches()
    return read


def read_parquet_through_fsspec(spark, path: str, columns: list[str]):
    """The Parquet file, directory or glob ``path`` as a DataFrame of those
    of ``columns`` its first file has, read by Spark tasks through fsspec
    (one task per file), typed from the first file's footer.

    For files the stages wrote through fsspec (a resampler's selection on
    ``s3://``/``gs://``): Spark's own reader would need the cluster's Hadoop
    connector for that scheme; fsspec's options set on the driver
    (``schemas.io.storage_config``) travel to the tasks. Raises
    ``FileNotFoundError`` naming ``path`` where it holds no Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql.pandas.types import from_arrow_schema

    from schemas import io as sio

    files = sio.expand_paths(path)
    fs, first = sio.filesystem(files[0])
    with fs.open(first, "rb") as fh:
        footer = pq.read_schema(fh)
    schema = pa.schema([footer.field(c) for c in columns if c in footer.names])
    listing = spark.createDataFrame(pa.table({"file": pa.array(files, pa.string())})).repartition(len(files))
    return listing.mapInArrow(_read_parquet_files(schema.names, schema.serialize().to_pybytes(),
                                                  sio.storage_config()), from_arrow_schema(schema))


#: Distributions whose versions :func:`python_facts` reports: what executors
#: import (setup.py's ``spark``, ``s3`` and ``gcs`` extras), and torch, which
#: they must not need.
EXECUTOR_PACKAGES = ("numpy", "pyarrow", "pandas", "fsspec", "pillow", "s3fs", "gcsfs", "torch")


def python_facts(_=None) -> dict:
    """Where this Python runs and what it has: host, pid, ``sys.executable``,
    ``sys.prefix``, the Python version, the version of each of
    :data:`EXECUTOR_PACKAGES` (``None``: not installed; nothing is imported)
    and where this project's ``spark_jobs`` package is loaded from."""
    import importlib.metadata
    import platform
    import socket

    versions = {}
    for name in EXECUTOR_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "executable": sys.executable, "prefix": sys.prefix,
            "python": platform.python_version(), "packages": versions,
            "spark_jobs": os.path.dirname(os.path.abspath(__file__))}


def executor_environments(spark, tasks: int | None = None) -> list[dict]:
    """:func:`python_facts` from ``tasks`` Spark tasks (default: two per core
    the cluster offers, so every executor runs some), distinct by (host, pid,
    executable): which interpreter the executors' Python workers run, e.g.
    the packed environment shipped with ``--archives``."""
    n = tasks or 2 * max(1, spark.sparkContext.defaultParallelism)
    facts = spark.sparkContext.parallelize(range(n), n).map(python_facts).collect()
    unique = {(f["host"], f["pid"], f["executable"]): f for f in facts}
    return [unique[k] for k in sorted(unique)]


def task_attempt_number() -> int | None:
    """The attempt number of the Spark task this runs in (0 for the first),
    ``None`` outside a task."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return ctx.attemptNumber() if ctx is not None else None


def task_attempt_id() -> str:
    """``stage-partition-attempt-random`` inside a Spark task (``local-random``
    outside one): unique to this task attempt, for its temporary file names."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    base = f"{ctx.stageId()}-{ctx.partitionId()}-{ctx.attemptNumber()}" if ctx else "local"
    return f"{base}-{uuid.uuid4().hex[:8]}"


def inject_failure(stage: str) -> None:
    """Raise in the first attempt of a task when tests ask for it (see module doc)."""
    wanted = os.environ.get(FAIL_FIRST_ATTEMPT_ENV, "")
    if not wanted:
        return
    if wanted != "all" and stage not in wanted.split(","):
        return
    if task_attempt_number() == 0:
        from pyspark import TaskContext

        raise RuntimeError(f"injected failure in stage {stage!r}, partition {TaskContext.get().partitionId()}")


def add_spark_arguments(parser) -> None:
    """The jobs' shared ``--master``, ``--driver-memory`` and ``--shared-output`` options."""
    parser.add_argument("--master", help="Spark master (default: local[*] unless run by spark-submit)")
    parser.add_argument("--driver-memory", help="local mode heap (default: half the machine's memory)")
    parser.add_argument("--shared-output", action="store_true",
                        help="declare that the local paths this job writes (--output and the like) are on a "
                             "filesystem every executor mounts at the same path (NFS, a cluster filesystem); "
                             "without it a master other than local[...] refuses them: give object-store URLs")


def output_refusal(master: str, outputs: dict[str, str | None], shared: bool = False) -> str | None:
    """Why a job on ``master`` may not write ``outputs`` (flag -> path; ``None``
    paths are skipped), or ``None`` where it may.

    On a master other than ``local[...]`` the executors run on other machines
    and write the output's files themselves (selection parts, run files,
    shards): a path without a scheme (or ``file:``) would name each machine's
    own disk, scattering the result over them. It is refused unless
    ``shared`` (``--shared-output``) declares that every node mounts it.
    """
    if shared or master.strip().startswith("local"):
        return None
    from fsspec.core import split_protocol

    local = [(flag, path) for flag, path in outputs.items()
             if path and split_protocol(path)[0] in (None, "file", "local")]
    if not local:
        return None
    named = ", ".join(f"{flag} {path}" for flag, path in local)
    return (f"{named}: a path on this machine's disk, but master {master} runs the tasks on other machines, "
            "which would write their files to their own disks (nothing is shared between the nodes of a "
            "cluster but object storage); give an object-store URL (s3a://, gs://, hdfs://) or, where "
            "every node mounts that path at the same place (NFS), pass --shared-output")


def require_reachable_outputs(spark, outputs: dict[str, str | None], shared: bool = False) -> None:
    """Raise ``ValueError`` (:func:`output_refusal`) where the session's
    master cannot write ``outputs``. Every job calls it before any work."""
    reason = output_refusal(spark.sparkContext.master, outputs, shared)
    if reason:
        raise ValueError(reason)


def run_cli(prog: str, args, make_job, run, describe) -> int:
    """``main`` of a job module: ``make_job()`` (bad options: a one-line error,
    exit status 2), then :func:`run_job` with ``run(spark, job)`` and
    ``describe(job, result)``."""
    try:
        job = make_job()
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return run_job(prog, args.master, args.driver_memory, lambda spark: run(spark, job),
                   lambda result: describe(job, result))


def run_job(prog: str, master: str | None, driver_memory: str | None, work, describe) -> int:
    """The shared ``main`` of the jobs: start Spark, ``work(spark)``, stop it
    (a session that was already active, e.g. a caller's, is used and left running).

    Bad input (``ValueError``, ``FileNotFoundError``) is a one-line error and
    exit status 1; success prints ``describe(result)``.
    """
    from pyspark.sql import SparkSession

    started = SparkSession.getActiveSession() is None  # a caller's session is left running
    spark = get_session(f"adaptive-transfer {prog}", master, driver_memory=driver_memory)
    try:
        result = work(spark)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if started:
            spark.stop()
    print(f"{prog}: {describe(result)}")
    return 0
