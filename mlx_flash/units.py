"""Byte counts for people: the one formatter every message and table uses."""

from __future__ import annotations


def format_bytes(n: float, digits: int = 1) -> str:
    """`12.3 MiB` below 1 GiB, `1.23 GiB` above (binary units, as memory is counted)."""
    if abs(n) < 2**30:
        return f"{n / 2**20:.{digits}f} MiB"
    return f"{n / 2**30:.{max(digits, 2)}f} GiB"


def mib(n: float, digits: int = 2) -> str:
    """`12.34 MiB` whatever the size (for lines whose figures are compared by eye)."""
    return f"{n / 2**20:.{digits}f} MiB"
