"""One table and plot across the points of a coefficient sweep (ortho_coeff_sweep.sh).

Each point is the ``results.json`` of one ablation report with a single variant; its coefficient
is read from that report's ``coefficients`` ("beta=0.1 ..."; the aux-only variant a is the
beta = 0 point). ``write_report`` writes ``results.md`` (mean ± sample std over seeds per point,
and per-seed differences to the beta = 0 point, paired by seed), ``results.json`` and
``sweep.png`` (each metric against beta, log axis, the beta = 0 point as a band).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from megatron_patch.analysis.labels import LABELS, heading
from megatron_patch.analysis.reporting import (
    ReportError,
    finite_or_none,
    fmt_mean_std,
    mean_std,
    pyplot,
)
from megatron_patch.analysis.variants import VARIANTS

COLUMNS = ("valid_loss", "valid_ppl", "expert_overlap", "silhouette", "output_similarity_mean",
           "routed_output_rms", "domain_nmi", "routing_overlap_same_domain",
           "routing_overlap_cross_domain", "routing_entropy", "max_vio", "tokens_per_s")
PAIRED = ("valid_loss", "expert_overlap", "silhouette", "domain_nmi")
PLOTTED = ("valid_loss", "expert_overlap", "silhouette", "domain_nmi", "routed_output_rms",
           "max_vio")
BASELINE, SWEPT = "a", "b"  # the beta = 0 variant, and the variant swept over beta


def read_point(directory: Path) -> dict:
    """The coefficient, variant and per-seed numbers of one sweep point.

    Raises:
        ReportError: no results.json, or one that is not a single-variant ablation report.
    """
    path = directory / "results.json"
    if not path.is_file():
        raise ReportError(f"{path} is missing: run the sweep point first "
                          f"(examples/pretrain/ortho_coeff_sweep.sh)")
    try:
        return _point(json.loads(path.read_text()), path)
    except (KeyError, json.JSONDecodeError) as error:
        raise ReportError(f"{path} is not the results.json of an ablation report ({error!r}): "
                          "point at a directory tools/ablation_report.py wrote") from None


def _point(results: dict, path: Path) -> dict:
    if len(results["summary"]) != 1:
        raise ReportError(f"{path} reports variants {', '.join(results['summary'])}; a sweep "
                          "point is one variant (specialization_ablation.sh --variants b)")
    (variant,) = results["summary"]
    coefficients = dict(item.split("=", 1) for item in results["coefficients"].split())
    beta = 0.0
    if variant != BASELINE:
        try:
            beta = float(coefficients["beta"])
        except (KeyError, ValueError):
            raise ReportError(f"{path} records no numeric beta in its coefficients "
                              f"{results['coefficients']!r}: rerun the point with --beta X"
                              ) from None
    per_seed = {run.rsplit("_seed", 1)[1]: numbers for run, numbers in results["per_run"].items()
                if run.startswith(f"{variant}_seed")}
    return {"beta": beta, "variant": variant, "label": results["variants"][variant],
            "per_seed": per_seed, "preset": results["preset"], "machine": results["machine"],
            "model": results["model"], "iterations": sorted(set(results["iterations"].values()))}


def summarize(points: list[dict]) -> list[dict]:
    """Mean/std per metric and, against the beta = 0 point, paired per-seed differences."""
    baseline = next((p for p in points if p["beta"] == 0), None)
    rows = []
    for point in sorted(points, key=lambda p: p["beta"]):
        stats = {key: mean_std([run.get(key) for run in point["per_seed"].values()])
                 for key in COLUMNS}
        deltas = {}
        if baseline is not None and point is not baseline:
            for key in PAIRED:
                deltas[key] = mean_std([run.get(key) - baseline["per_seed"][seed][key]
                                        for seed, run in point["per_seed"].items()
                                        if seed in baseline["per_seed"]
                                        and run.get(key) is not None
                                        and baseline["per_seed"][seed].get(key) is not None])
        rows.append({"beta": point["beta"], "variant": point["variant"],
                     "seeds": sorted(point["per_seed"]), "stats": stats, "deltas": deltas})
    return rows


def plot(rows: list[dict], out: Path) -> str:
    """``sweep.png``: the PLOTTED metrics against beta; returns its file name."""
    plt = pyplot()
    swept = [r for r in rows if r["beta"] > 0]
    baseline = next((r for r in rows if r["beta"] == 0), None)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, key in zip(axes.flat, PLOTTED):
        xs = [r["beta"] for r in swept]
        means = [r["stats"][key][0] for r in swept]
        stds = [0.0 if math.isnan(r["stats"][key][1]) else r["stats"][key][1] for r in swept]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                    label=f"{VARIANTS[SWEPT].description} (span)")
        if baseline is not None:
            m, s, _ = baseline["stats"][key]
            ax.axhline(m, color="gray", linestyle="--",
                       label=f"{VARIANTS[BASELINE].description} (beta = 0)")
            if not math.isnan(s):
                ax.axhspan(m - s, m + s, color="gray", alpha=0.15)
        ax.set_xscale("log")
        if key == "expert_overlap" and all(m > 0 for m in means):
            ax.set_yscale("log")  # it falls by orders of magnitude
        ax.set_xlabel("beta (L_o coefficient)")
        ax.set_title(heading(key))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("L_o coefficient sweep (mean ± std over seeds)")
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_report(points: list[dict], rows: list[dict], out: Path, command: str,
                 plots: bool) -> Path:
    """Write ``results.md``, ``results.json`` and (with ``plots``) ``sweep.png`` into ``out``;
    returns the Markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    image = plot(rows, out) if plots else None
    first = points[0]
    model = first["model"]
    lines = [
        "# L_o coefficient sweep", "",
        f"Generated by `tools/sweep_report.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.",
        "",
        f"Model: {model['num_layers']} layers, hidden {model['hidden_size']}, "
        f"{model['num_experts']} experts, top-{model['topk']}; "
        f"{', '.join(map(str, first['iterations']))} training steps; preset `{first['preset']}`. "
        f"beta = 0 is variant {BASELINE} "
        f"({VARIANTS[BASELINE].description}); every other point is variant {SWEPT} "
        f"({VARIANTS[SWEPT].description}, span form, and any pretraining flags after `--` in the "
        "command below) with that beta. Machine: "
        f"{first['machine'].get('cpu')}, {first['machine'].get('cpu_count')} cores, torch "
        f"{first['machine'].get('torch')}.",
        "", "Command:", "", "```bash", command, "```", "",
        "## Mean ± sample std over seeds", "",
        "| beta | seeds | " + " | ".join(heading(k) for k in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [fmt_mean_std(*row["stats"][k]) for k in COLUMNS]
        lines.append(f"| {row['beta']:g} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Change against beta = 0, paired by seed (mean ± std of the differences)", "",
              "| beta | " + " | ".join("Δ " + LABELS[k] for k in PAIRED) + " |",
              "|---|" + "---|" * len(PAIRED)]
    for row in rows:
        if row["deltas"]:
            cells = [fmt_mean_std(*row["deltas"][k]) for k in PAIRED]
            lines.append(f"| {row['beta']:g} | " + " | ".join(cells) + " |")
    if image:
        lines += ["", f"![sweep]({image})"]
    markdown = out / "results.md"
    markdown.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(finite_or_none(
        {"command": command, "points": points, "summary": rows}), indent=1))
    return markdown
