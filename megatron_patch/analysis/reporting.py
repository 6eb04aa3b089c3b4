"""Helpers every report shares: strict-JSON cleaning, number formatting, mean/std, pyplot."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional


class ReportError(ValueError):
    """Bad input to a report (missing or malformed runs); the message names the fix."""


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/Inf float (in nested dicts, lists, tuples) -> None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def mean_std(values: Iterable[Optional[float]]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n - 1; NaN for one value) and count of the values that
    are neither None nor NaN; (NaN, NaN, 0) when there are none."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    n = len(kept)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(kept) / n
    s = math.sqrt(sum((v - m) ** 2 for v in kept) / (n - 1)) if n > 1 else float("nan")
    return m, s, n


def fmt(value: Optional[float], digits: int = 4) -> str:
    """``digits`` significant digits, thousands separators from 1000 on, "n/a" for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_mean_std(mean: float, std: float, n: int) -> str:
    """"mean ± std" (std with 2 digits); the mean alone for one value; "n/a" for none."""
    if n == 0:
        return "n/a"
    if n == 1 or math.isnan(std):
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt(std, 2)}"


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
