"""Entry point for ``spark-submit`` (which runs a file, not ``python -m``)::

    make spark-env      # build/spark-env/env.tar.gz (executors' Python) and code.zip (this project)
    spark-submit --master spark://HOST:7077 \\
      --archives build/spark-env/env.tar.gz#env --py-files build/spark-env/code.zip \\
      --conf spark.pyspark.python=./env/bin/python --conf spark.pyspark.driver.python=python3 \\
      spark_jobs/submit.py resample --index ... --weights ... --size 80M --output gs://...
    ... spark_jobs/submit.py write_shards --selection ... --index ... --output gs://...
    ... spark_jobs/submit.py build_index --imagenet-train ... --output gs://...
    ... spark_jobs/submit.py check-env          # which Python the executors run, and what it has

Executors get their Python from the packed environment (venv-pack, see
docs/scale.md, "Spark cluster") and this project's code from ``--py-files``;
the driver needs this project and pyspark installed (``pip install '.[spark]'
pyspark``). ``check-env`` prints one JSON line per executor Python process
(``session.python_facts``: host, interpreter, ``sys.prefix``, package
versions) and exits 1 where an executor lacks a package the jobs import.
"""

import json
import sys

from spark_jobs import build_index, resample, write_shards
from spark_jobs.session import EXECUTOR_PACKAGES, executor_environments, get_session

#: What the jobs' tasks import (torch, s3fs and gcsfs are not required).
REQUIRED = tuple(p for p in EXECUTOR_PACKAGES if p not in ("torch", "s3fs", "gcsfs"))


def check_env(argv) -> int:
    """Print the executors' Python facts, one JSON line each; 1 where one lacks a package in ``REQUIRED``."""
    if argv:
        print("usage: spark-submit spark_jobs/submit.py check-env", file=sys.stderr)
        return 2
    # Every executor registered before the tasks are handed out, so each runs some.
    spark = get_session("adaptive-transfer check-env", extra={"spark.scheduler.minRegisteredResourcesRatio": "1.0",
                                                            "spark.scheduler.maxRegisteredResourcesWaitingTime": "60s"})
    try:
        facts = executor_environments(spark)
    finally:
        spark.stop()
    missing = sorted({p for f in facts for p in REQUIRED if f["packages"][p] is None})
    for f in facts:
        print(json.dumps(f, sort_keys=True))
    if missing:
        print(f"check-env: error: an executor's Python ({facts[0]['executable']}) lacks {', '.join(missing)}: "
              "ship the packed environment (--archives ...#env, spark.pyspark.python=./env/bin/python)",
              file=sys.stderr)
        return 1
    return 0


JOBS = {"resample": resample.main, "write_shards": write_shards.main, "build_index": build_index.main,
        "check-env": check_env}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in JOBS:
        print(f"usage: spark-submit spark_jobs/submit.py {{{','.join(JOBS)}}} ARGS...", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(JOBS[sys.argv[1]](sys.argv[2:]))
