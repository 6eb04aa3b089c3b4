"""The scaling plot of the loss benchmark: losses / expert GEMMs and layer overhead vs T, k, H."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from megatron_patch.benchmarks.sizes import LayerSize
from megatron_patch.benchmarks.timing import log


def along(rows: list[dict], base: LayerSize, attr: str,
          value: Callable[[dict], float]) -> list[tuple[int, float]]:
    """(size.<attr>, value(row)) for the rows whose size differs from ``base`` only in attr."""
    return sorted((getattr(r["size"], attr), value(r)) for r in rows
                  if replace(r["size"], **{attr: getattr(base, attr)}) == base)


def write_plot(path: Path, loss_rows: list[dict], layer_results: list[dict],
               title: str) -> tuple[Optional[str], str]:
    """Overhead vs T, k and H as PNG; returns (file name, note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note = "Plot skipped: matplotlib is not installed."
        log(note)
        return None, note
    loss_base, layer_base = loss_rows[0]["size"], layer_results[0]["size"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, attr, xlabel in zip(axes, ("tokens", "topk", "hidden"), ("T", "k", "H")):
        ratio = along(loss_rows, loss_base, attr, lambda r: 100 * r["loss_s"] / r["expert_s"])
        ax.plot(*zip(*ratio), "o-", label="losses / expert GEMMs")
        overhead = along(layer_results, layer_base, attr, lambda r: 100 * r["overhead"]["torch"])
        if len(overhead) > 1:
            ax.plot(*zip(*overhead), "s--", label="layer overhead")
        ax.set_xscale("log", base=2)
        ticks = sorted({x for x, _ in ratio + overhead})
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name, ""
