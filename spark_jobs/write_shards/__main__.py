"""``python -m spark_jobs.write_shards``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
