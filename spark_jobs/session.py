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
           "read_parquet_columns", "task_attempt_number"]

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
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    # Python workers must run the interpreter that has this project's
    # dependencies (on a cluster, spark-submit's environment decides).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
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
    """The jobs' shared ``--master`` and ``--driver-memory`` options."""
    parser.add_argument("--master", help="Spark master (default: local[*] unless run by spark-submit)")
    parser.add_argument("--driver-memory", help="local mode heap (default: half the machine's memory)")


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
