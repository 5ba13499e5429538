"""Entry point for ``spark-submit`` (which runs a file, not ``python -m``)::

    PYSPARK_PYTHON=.venv/bin/python spark-submit --master spark://HOST:7077 \
      spark_jobs/submit.py resample --index ... --weights ... --size 80M --output ...
    ... spark_jobs/submit.py write_shards --selection ... --index ... --output ...
    ... spark_jobs/submit.py build_index --imagenet-train ... --output ...

The cluster's Python must have this project installed (pip install . on the
image, or ``--py-files`` with a zip of the packages and their dependencies).
"""

import sys

from spark_jobs import build_index, resample, write_shards

JOBS = {"resample": resample.main, "write_shards": write_shards.main, "build_index": build_index.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in JOBS:
        print(f"usage: spark-submit spark_jobs/submit.py {{{','.join(JOBS)}}} ARGS...", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(JOBS[sys.argv[1]](sys.argv[2:]))
