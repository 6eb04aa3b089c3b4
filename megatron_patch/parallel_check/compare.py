"""Compare a layout's `Result` with the single-device baseline: per-quantity diffs and verdicts."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import torch

from megatron_patch.moe.names import ORTHO_LOSS, VAR_LOSS
from megatron_patch.parallel_check.runner import Result


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A quantity passes if max_abs <= atol + rtol * max|ref| (allclose, per tensor)."""

    rtol: float
    atol: float


@dataclasses.dataclass(frozen=True)
class Diff:
    """Difference of one quantity (a scalar or a tensor) between a result and the baseline.

    max_abs: max |x - ref| over elements; max_rel: max_abs / max|ref| (inf if ref is all zero and
    x is not); ref_scale: max|ref|. A quantity missing on one side has max_abs = inf.
    """

    name: str
    max_abs: float
    max_rel: float
    ref_scale: float
    passed: bool


def diff_tensor(name: str, value: torch.Tensor, ref: torch.Tensor, tolerance: Tolerance) -> Diff:
    """Diff of `value` against `ref` (same shape), in float64."""
    if value.shape != ref.shape:
        return Diff(f"{name} (shape {tuple(value.shape)} != {tuple(ref.shape)})",
                    math.inf, math.inf, math.nan, False)
    value, ref = value.double(), ref.double()
    max_abs = (value - ref).abs().max().item() if ref.numel() else 0.0
    ref_scale = ref.abs().max().item() if ref.numel() else 0.0
    if ref_scale > 0:
        max_rel = max_abs / ref_scale
    else:
        max_rel = 0.0 if max_abs == 0 else math.inf
    passed = max_abs <= tolerance.atol + tolerance.rtol * ref_scale
    return Diff(name, max_abs, max_rel, ref_scale, passed)


def compare(result: Result, baseline: Result, tolerance: Tolerance) -> list[Diff]:
    """Diffs of the LM loss, each MoE loss (per-layer vector), the routing statistics and each
    full gradient, and the coefficients."""
    diffs = [diff_tensor("lm_loss", torch.tensor(result.lm_loss), torch.tensor(baseline.lm_loss),
                         tolerance)]
    pairs = [(f"tracker/{k}", result.trackers, baseline.trackers, k)
             for k in sorted(set(result.trackers) | set(baseline.trackers))]
    pairs += [(f"routing/{k}", result.routing, baseline.routing, k)
              for k in sorted(set(result.routing) | set(baseline.routing))]
    pairs += [(f"grad/{k}", result.grads, baseline.grads, k)
              for k in sorted(set(result.grads) | set(baseline.grads))]
    for name, values, refs, key in pairs:
        if key not in values or key not in refs:
            side = "result" if key not in values else "baseline"
            diffs.append(Diff(f"{name} (missing in {side})", math.inf, math.inf, math.nan, False))
        else:
            diffs.append(diff_tensor(name, values[key], refs[key], tolerance))
    diffs += _coefficient_diffs(result, baseline)
    return diffs


def _coefficient_diffs(result: Result, baseline: Result) -> list[Diff]:
    """L_o / L_v coefficients: every rank of the layout holds the baseline's value, exactly
    (calibration rounds to a power of ten from globally reduced values)."""
    diffs = []
    for name in (ORTHO_LOSS, VAR_LOSS):
        ref = {v for rank in baseline.coefficients for v in rank.get(name, [])}
        got = {v for rank in result.coefficients for v in rank.get(name, [])}
        if not ref and not got:
            continue
        passed = len(ref) == 1 and got == ref
        diffs.append(Diff(f"coefficient/{name} on all ranks: {sorted(got)} vs {sorted(ref)}",
                          0.0 if passed else math.inf, 0.0 if passed else math.inf, 0.0, passed))
    return diffs


def summarize(diffs: Sequence[Diff]) -> list[Diff]:
    """Loss and tracker rows as they are, plus one row for the gradients: the tensor closest to
    (or furthest past) its tolerance, i.e. with the largest max_abs / max|ref|, which passes
    only if every gradient passes."""
    grads = [d for d in diffs if d.name.startswith("grad/")]
    rows = [d for d in diffs if not d.name.startswith("grad/")]
    if grads:
        worst = max(grads, key=lambda d: (not d.passed, d.max_rel))
        rows.append(dataclasses.replace(
            worst,
            name=f"grads ({len(grads)}), worst: {worst.name[len('grad/'):]}",
            passed=all(d.passed for d in grads),
        ))
    return rows


def format_table(rows_by_layout: Mapping[str, Sequence[Diff]]) -> str:
    """Plain-text table: layout, quantity, max abs diff, max rel diff, max|ref|, verdict."""
    header = ("layout", "quantity", "max abs diff", "max rel diff", "max |ref|", "")
    lines = [header]
    for layout, rows in rows_by_layout.items():
        for row in rows:
            lines.append((layout, row.name, f"{row.max_abs:.3e}", f"{row.max_rel:.3e}",
                          f"{row.ref_scale:.3e}", "ok" if row.passed else "MISMATCH"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in lines)
