"""The one error type for contract violations, with file / row context."""

from __future__ import annotations

__all__ = ["SchemaError"]


class SchemaError(ValueError):
    """Bad data against a contract (docs/design.md, "Contracts").

    The message always starts with where the problem is: the file, then the
    row (0-based, counted across the whole file) or the label, then what is
    wrong. ``file``, ``row`` and ``key`` are kept as attributes for callers
    that count and skip instead of failing.
    """

    def __init__(self, message: str, *, file: str | None = None,
                 row: int | None = None, key: str | None = None):
        where = []
        if file:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if key is not None:
            where.append(f"key {key!r}")
        text = f"{': '.join([', '.join(where)]) + ': ' if where else ''}{message}"
        super().__init__(text)
        self.file = file
        self.row = row
        self.key = key
        self.detail = message
