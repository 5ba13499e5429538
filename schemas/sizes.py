"""Parse dataset sizes such as ``80M``, ``1.5B``, ``500K`` or ``80000000``."""

from __future__ import annotations

import re

__all__ = ["parse_size", "format_size"]

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBG]?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Return the number of examples that ``text`` names.

    Accepts a plain integer (``80000000``, ``80_000_000``) or a decimal number
    with a suffix ``K`` (1e3), ``M`` (1e6), ``B``/``G`` (1e9), case-insensitive.
    The result must be a positive whole number: ``1.5B`` is fine, ``1.5`` or
    ``0.5K5`` or ``0`` are rejected with ``ValueError``.
    """
    if isinstance(text, bool):
        raise ValueError(f"size must be a count such as 80M, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        raw = str(text)
        match = _SIZE_RE.match(raw.replace("_", ""))
        if match is None:
            raise ValueError(
                f"cannot parse size {raw!r}: expected a whole number (80000000) "
                "or a number with a suffix K, M or B (500K, 80M, 1.5B)"
            )
        number, suffix = match.groups()
        scale = _SUFFIX[suffix.upper()]
        if "." in number:
            whole, frac = number.split(".")
            # Exact decimal arithmetic: 1.5B must be 1500000000, not 1499999999.
            numerator = int(whole + frac) * scale
            denominator = 10 ** len(frac)
            if numerator % denominator:
                raise ValueError(
                    f"size {raw!r} is not a whole number of examples"
                )
            value = numerator // denominator
        else:
            value = int(number) * scale
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(n: int) -> str:
    """Render ``n`` the short way when exact: 80000000 -> ``80M``."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)
