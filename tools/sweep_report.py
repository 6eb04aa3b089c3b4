"""One table and plot across points of a coefficient sweep (examples/pretrain/ortho_coeff_sweep.sh).

    python tools/sweep_report.py --output-dir docs/results/ortho_coeff_sweep \
        docs/results/ortho_coeff_sweep/beta_0 docs/results/ortho_coeff_sweep/beta_0.1 ...

Each point is the ``results.json`` of one tools/ablation_report.py call with a single variant;
its coefficient is read from that report's ``coefficients`` ("beta=0.1 ..."; the aux-only
variant a is the beta = 0 point). Writes ``results.md`` (mean +- sample std over seeds per point,
and per-seed differences to the beta = 0 point, paired by seed), ``results.json`` and
``sweep.png`` (each metric against beta, log axis, the beta = 0 point as a band).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ablation_report import LABELS, _nan_to_none, _pyplot, arrow, fmt_ms, mean_std

COLUMNS = ["valid_loss", "valid_ppl", "expert_overlap", "silhouette", "output_similarity_mean",
           "routed_output_rms", "domain_nmi", "routing_overlap_same_domain", "routing_overlap_cross_domain",
           "routing_entropy", "max_vio", "tokens_per_s"]
PAIRED = ["valid_loss", "expert_overlap", "silhouette", "domain_nmi"]


def read_point(directory: Path) -> dict:
    """The coefficient, variant and per-seed numbers of one sweep point."""
    path = directory / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the sweep point first "
                                f"(examples/pretrain/ortho_coeff_sweep.sh)")
    results = json.loads(path.read_text())
    coefficients = dict(item.split("=", 1) for item in results["coefficients"].split())
    (variant,) = results["summary"]
    beta = 0.0 if variant == "a" else float(coefficients["beta"])
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
        stats = {key: mean_std([run.get(key) for run in point["per_seed"].values()]) for key in COLUMNS}
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


def plot(rows: list[dict], out: Path) -> Optional[str]:
    plt = _pyplot()
    swept = [r for r in rows if r["beta"] > 0]
    baseline = next((r for r in rows if r["beta"] == 0), None)
    shown = ["valid_loss", "expert_overlap", "silhouette", "domain_nmi", "routed_output_rms",
             "max_vio"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, key in zip(axes.flat, shown):
        xs = [r["beta"] for r in swept]
        means = [r["stats"][key][0] for r in swept]
        stds = [0.0 if math.isnan(r["stats"][key][1]) else r["stats"][key][1] for r in swept]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label="+ L_o (span)")
        if baseline is not None:
            m, s, _ = baseline["stats"][key]
            ax.axhline(m, color="gray", linestyle="--", label="aux loss only (beta = 0)")
            if not math.isnan(s):
                ax.axhspan(m - s, m + s, color="gray", alpha=0.15)
        ax.set_xscale("log")
        if key == "expert_overlap" and all(m > 0 for m in means):
            ax.set_yscale("log")  # it falls by orders of magnitude
        ax.set_xlabel("beta (L_o coefficient)")
        ax.set_title(LABELS[key] + arrow(key))
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
    out.mkdir(parents=True, exist_ok=True)
    image = plot(rows, out) if plots else None
    first = points[0]
    model = first["model"]
    lines = [
        "# L_o coefficient sweep", "",
        f"Generated by `tools/sweep_report.py` on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.",
        "",
        f"Model: {model['num_layers']} layers, hidden {model['hidden_size']}, {model['num_experts']} "
        f"experts, top-{model['topk']}; {', '.join(map(str, first['iterations']))} training steps; "
        f"preset `{first['preset']}`. beta = 0 is variant a (aux loss only); every other point is "
        "variant b (+ L_o, span form, and any pretraining flags after `--` in the command "
        "below) with that beta. Machine: "
        f"{first['machine'].get('cpu')}, {first['machine'].get('cpu_count')} cores, torch "
        f"{first['machine'].get('torch')}.",
        "", "Command:", "", "```bash", command, "```", "",
        "## Mean ± sample std over seeds", "",
        "| beta | seeds | " + " | ".join(LABELS[k] + arrow(k) for k in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [fmt_ms(*row["stats"][k]) for k in COLUMNS]
        lines.append(f"| {row['beta']:g} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Change against beta = 0, paired by seed (mean ± std of the differences)", "",
              "| beta | " + " | ".join("Δ " + LABELS[k] for k in PAIRED) + " |",
              "|---|" + "---|" * len(PAIRED)]
    for row in rows:
        if row["deltas"]:
            cells = [fmt_ms(*row["deltas"][k]) for k in PAIRED]
            lines.append(f"| {row['beta']:g} | " + " | ".join(cells) + " |")
    if image:
        lines += ["", f"![sweep]({image})"]
    markdown = out / "results.md"
    markdown.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(_nan_to_none(
        {"command": command, "points": points, "summary": rows}), indent=1))
    return markdown


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="sweep_report", description=__doc__.split("\n")[0])
    p.add_argument("points", nargs="+", help="directories holding one ablation results.json each")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--command", default=" ".join(sys.argv))
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    try:
        points = [read_point(Path(d)) for d in args.points]
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = summarize(points)
    path = write_report(points, rows, Path(args.output_dir), args.command, plots=not args.no_plots)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
