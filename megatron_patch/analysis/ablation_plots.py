"""The ablation report's PNGs: metrics per variant, training curves, sorted expert load.

Each ``plot_*`` takes the ``ablation.aggregate`` result, writes one PNG into ``out`` and returns
its file name (None when there was nothing to draw).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from megatron_patch.analysis.ablation import CURVES, QUALITY_TABLE, SPECIALIZATION_TABLE
from megatron_patch.analysis.labels import heading
from megatron_patch.analysis.reporting import pyplot
from megatron_patch.analysis.variants import named

# Metrics with a bar chart each: those of the report's tables but training time and the
# all-pairs routing overlap.
PLOTTED = tuple(key for key in QUALITY_TABLE[:-1] + SPECIALIZATION_TABLE
                if key != "routing_overlap")


def _finished(agg: dict, v: str, seeds: list[str]) -> list[dict]:
    return [agg["per_run"][(v, s)] for s in seeds if (v, s) in agg["per_run"]]


def _save(fig, plt, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def plot_metrics(agg: dict, variants: list[str], seeds: list[str], out: Path) -> Optional[str]:
    """One bar chart per metric: mean ± std over seeds per variant, the seeds as dots."""
    plt = pyplot()
    cols = 4
    rows = math.ceil(len(PLOTTED) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, PLOTTED):
        for i, v in enumerate(variants):
            st = agg["summary"][v]["stats"][key]
            if st["n"] == 0:
                continue
            err = st["std"] if st["n"] > 1 else 0
            ax.bar(i, st["mean"], yerr=err, color=colors[i % len(colors)], alpha=0.7, capsize=3)
            pts = [run.get(key) for run in _finished(agg, v, seeds)]
            ax.plot([i] * len(pts), pts, "k.", markersize=4)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants)
        ax.set_title(heading(key), fontsize=9)
        ax.tick_params(labelsize=8)
        values = [run.get(key) for v in variants for run in _finished(agg, v, seeds)]
        values = [x for x in values if x is not None and not math.isnan(x)]
        if values and min(values) > 0 and key != "tokens_per_s":
            lo, hi = min(values), max(values)
            ax.set_ylim(max(0.0, lo - 0.6 * (hi - lo + 1e-12) - 0.02 * hi),
                        hi + 0.3 * (hi - lo + 1e-12) + 0.02 * hi)
    for ax in list(axes.flat)[len(PLOTTED):]:
        ax.axis("off")
    legend = ", ".join(named(v) for v in variants)
    fig.suptitle(f"mean ± std over seeds (dots: seeds)   {legend}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, plt, out, "metrics.png")


def plot_curves(agg: dict, variants: list[str], seeds: list[str], out: Path) -> Optional[str]:
    """The training curves, mean over seeds, smoothed over ~3% of the run."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), squeeze=False)
    for ax, (key, label) in zip(axes.flat, CURVES.items()):
        for v in variants:
            curves = [run["curves"].get(key) for run in _finished(agg, v, seeds)]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            its = [curves[0][i][0] for i in range(n)]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
            width = max(1, n // 30)
            windows = [mean[max(0, i - width + 1):i + 1] for i in range(n)]
            smooth = [sum(w) / len(w) for w in windows]
            ax.plot(its, smooth, label=named(v), linewidth=1.2)
        ax.set_title(label + " (mean over seeds, smoothed)", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        if key == "lm_loss":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, out, "curves.png")


def plot_load(agg: dict, variants: list[str], seeds: list[str], out: Path) -> Optional[str]:
    """Sorted per-expert load, averaged over MoE layers and seeds, of every variant."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drew = False
    for v in variants:
        runs = _finished(agg, v, seeds)
        if not runs or not runs[0]["load_per_layer"]:
            continue
        curves = [sorted(load, reverse=True) for run in runs for load in run["load_per_layer"]
                  if load]
        e = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(e)]
        ax.plot(range(1, e + 1), mean, marker=".", label=named(v))
        drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.axhline(1 / e, color="gray", linestyle=":", linewidth=1, label="balanced (1/E)")
    ax.set_xlabel("expert rank by load (per layer, then averaged over layers and seeds)",
                  fontsize=8)
    ax.set_ylabel("share of assignments", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, out, "load_sorted.png")


PLOTS = (plot_metrics, plot_curves, plot_load)
