"""Byte counts as every hf_zero message prints them (``1.50 GiB``).

One formatter below every layer: the estimator's table, the doctor's checks and the engine's
NVMe room errors all print sizes through it, so the same number reads the same everywhere; and
the engine, the lowest layer, needs nothing from the commands above it to word an error.
"""

from __future__ import annotations


def fmt_bytes(n: float | None) -> str:
    """``n`` bytes in the largest binary unit it reaches, two decimals (``n/a`` for None)."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
