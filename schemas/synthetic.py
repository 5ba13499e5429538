"""Deprecated: the data generator is :mod:`adaptive_transfer.synthetic`.

``python -m schemas.synthetic source|target --out DIR`` still works: it prints
one deprecation line on standard error and runs
``python -m adaptive_transfer.synthetic`` with ``--out`` spelled ``--output``.
Importing a name from here gives the generator's, with a
``DeprecationWarning``. Not shipped to the Spark executors (``code.zip``).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Sequence

NEW = "adaptive_transfer.synthetic"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    warnings.warn(f"schemas.synthetic is deprecated; import {name} from {NEW}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(NEW), name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--output" + a[len("--out"):] if a == "--out" or a.startswith("--out=") else a for a in argv]
    print(f"python -m schemas.synthetic is deprecated; use python -m {NEW} (--out is now --output)",
          file=sys.stderr)
    return importlib.import_module(NEW).main(argv, prog="python -m schemas.synthetic")


if __name__ == "__main__":
    raise SystemExit(main())
