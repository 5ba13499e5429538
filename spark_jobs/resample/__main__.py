"""``python -m spark_jobs.resample``: see :mod:`spark_jobs.resample.cli`."""

from .cli import main

raise SystemExit(main())
