"""Aggregate a specialization ablation (examples/pretrain/specialization_ablation.sh) into one report.

    python tools/ablation_report.py --runs-dir runs/ablation_cpu --output-dir docs/results/ablation_cpu

reads, for every ``<runs-dir>/<variant>_seed<seed>/`` that finished (has a ``done`` marker):
``checkpoints/metrics.jsonl`` (validation loss, training MaxVio, tokens/s, loss curves),
``analysis/specialization.json`` (tools/analyze_specialization.py) and ``timing.json``, and
writes ``results.json`` (every number, per seed and mean/std over seeds), ``results.md`` (tables:
mean +- sample std over seeds, and differences to variant a paired by seed; the exact command and
the machine) and PNGs (``metrics.png``: one bar chart per metric, ``curves.png``: training
curves). Runs that have not finished are listed as missing; the report says how many seeds each
mean is over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

VARIANTS = {
    "a": "aux loss only",
    "b": "+ L_o",
    "c": "+ L_v",
    "d": "+ L_o + L_v",
    "e": "+ L_o (pairwise) + L_v",
    "f": "+ OMoE (weights)",
    "g": "+ L_o + L_v + OMoE (weights)",
    "h": "+ OMoE (representations)",
    "i": "+ L_o + L_v, auto after warm-up",
}

# key, label, better ("low", "high" or ""), source ("train" = metrics.jsonl, "analysis")
METRICS = [
    ("valid_loss", "valid loss", "low", "train"),
    ("valid_ppl", "valid perplexity", "low", "train"),
    ("expert_overlap", "expert overlap", "low", "analysis"),
    ("silhouette", "silhouette", "high", "analysis"),
    ("output_similarity_mean", "expert output similarity", "low", "analysis"),
    ("weight_similarity_mean", "expert weight similarity", "low", "analysis"),
    ("routed_output_rms", "routed output RMS", "", "analysis"),
    ("routing_variance", "routing variance", "high", "analysis"),
    ("routing_entropy", "routing entropy (nats)", "low", "analysis"),
    ("domain_nmi", "NMI(domain; expert)", "high", "analysis"),
    ("domain_mi_over_domain_entropy", "MI / H(domain)", "high", "analysis"),
    ("routing_overlap_same_domain", "routing overlap, same domain", "high", "analysis"),
    ("routing_overlap_cross_domain", "routing overlap, cross domain", "low", "analysis"),
    ("routing_overlap", "routing overlap, all pairs", "", "analysis"),
    ("max_vio", "MaxVio (valid, analysis)", "low", "analysis"),
    ("train_max_vio", "MaxVio (train, last 10% of steps)", "low", "train"),
    ("tokens_per_s", "throughput (tokens/s, median)", "high", "train"),
    ("train_s", "training time (s)", "", "train"),
    ("analysis_s", "analysis time (s)", "", "train"),
]
LABELS = {key: label for key, label, _, _ in METRICS}
BETTER = {key: better for key, _, better, _ in METRICS}
QUALITY_TABLE = ["valid_loss", "valid_ppl", "max_vio", "train_max_vio", "tokens_per_s", "train_s"]
SPECIALIZATION_TABLE = [
    "expert_overlap", "silhouette", "output_similarity_mean", "weight_similarity_mean",
    "routed_output_rms", "routing_variance", "routing_entropy", "domain_nmi", "domain_mi_over_domain_entropy",
    "routing_overlap_same_domain", "routing_overlap_cross_domain", "routing_overlap",
]
PLOTTED = [key for key in QUALITY_TABLE[:-1] + SPECIALIZATION_TABLE if key != "routing_overlap"]
CURVES = [("lm_loss", "train LM loss"), ("max_vio", "MaxVio (train)"),
          ("routing_entropy", "routing entropy (train)"), ("load_balancing_loss", "L_aux"),
          ("ortho_loss", "L_o"), ("var_loss", "L_v")]


# --- reading -------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def read_run(run: Path) -> dict:
    """Every metric of one finished run, plus its training curves."""
    rows = read_jsonl(run / "checkpoints" / "metrics.jsonl")
    # A resumed run appends: keep the last record of every (split, iteration).
    by_key = {}
    for row in rows:
        by_key[(row["split"], row["iteration"])] = row
    train = [by_key[k] for k in sorted(k for k in by_key if k[0] == "train")]
    valid = [by_key[k] for k in sorted(k for k in by_key if k[0] == "valid")]
    out: dict = {"iterations": train[-1]["iteration"] if train else 0}
    calibration = [by_key[k] for k in by_key if k[0] == "calibration"]
    if calibration:  # "auto" coefficients calibrated after warm-up (--moe-loss-calibration-iters)
        out["calibrated"] = {k: v for k, v in calibration[-1].items() if k != "split"}
    if valid:
        out["valid_loss"] = valid[-1]["lm_loss"]
        out["valid_ppl"] = math.exp(valid[-1]["lm_loss"])
        out["valid_iteration"] = valid[-1]["iteration"]
    if train:
        tail = train[-max(1, len(train) // 10):]
        out["train_max_vio"] = sum(r["max_vio"] for r in tail) / len(tail)
        out["train_loss_last10pct"] = sum(r["lm_loss"] for r in tail) / len(tail)
        # The first steps include warm-up (allocations, first all-to-alls): skip 5%, at least 1.
        steady = train[max(1, len(train) // 20):] or train
        out["tokens_per_s"] = median([r["tokens_per_s"] for r in steady])
    out["curves"] = {
        key: [[r["iteration"], r[key]] for r in train if key in r] for key, _ in CURVES
    }
    timing = run / "timing.json"
    if timing.exists():
        out.update(json.loads(timing.read_text()))
    spec = json.loads((run / "analysis" / "specialization.json").read_text())
    for key, value in spec["mean"].items():
        out[key] = float("nan") if value is None else value
    out["analysis_lm_loss"] = spec.get("lm_loss")
    out["analysis_tokens"] = spec.get("num_tokens")
    out["model"] = spec.get("model")
    out["domains"] = spec.get("domains")
    out["load_per_layer"] = [layer.get("load") for layer in spec.get("layers", [])]
    command = run / "command.txt"
    out["command"] = command.read_text().strip() if command.exists() else None
    return out


def mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return m, s, n


# --- machine -------------------------------------------------------------------------------------

def machine_info() -> dict:
    info = {"hostname_os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "cpu": platform.processor() or "unknown"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu_count"] = os.cpu_count()
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        info["torch"] = "not installed"
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001 - report what is there
        info["megatron_core"] = "unknown"
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    return info


# --- formatting ----------------------------------------------------------------------------------

def fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_ms(m: float, s: float, n: int) -> str:
    if n == 0:
        return "n/a"
    if n == 1 or math.isnan(s):
        return fmt(m)
    return f"{fmt(m)} ± {fmt(s, 2)}"


def arrow(key: str) -> str:
    return {"low": " ↓", "high": " ↑"}.get(BETTER.get(key, ""), "")


# --- report --------------------------------------------------------------------------------------

def aggregate(runs_dir: Path, variants: list[str], seeds: list[str]) -> dict:
    per_run, missing = {}, []
    for v in variants:
        for seed in seeds:
            run = runs_dir / f"{v}_seed{seed}"
            if (run / "done").exists() and (run / "analysis" / "specialization.json").exists():
                per_run[(v, seed)] = read_run(run)
            else:
                missing.append(f"{v}_seed{seed}")
    summary = {}
    for v in variants:
        done = [s for s in seeds if (v, s) in per_run]
        stats = {}
        for key, *_ in METRICS:
            stats[key] = dict(zip(("mean", "std", "n"),
                                  mean_std([per_run[(v, s)].get(key, float("nan")) for s in done])))
        # Paired by seed: variant - a, for the seeds both have.
        paired = {}
        if v != "a" and "a" in variants:
            both = [s for s in done if ("a", s) in per_run]
            for key, *_ in METRICS:
                diffs = [per_run[(v, s)].get(key, float("nan")) - per_run[("a", s)].get(key, float("nan"))
                         for s in both]
                paired[key] = dict(zip(("mean", "std", "n"), mean_std(diffs)))
        summary[v] = {"label": VARIANTS.get(v, v), "seeds_done": done, "stats": stats,
                      "paired_diff_vs_a": paired}
    return {"per_run": per_run, "missing": missing, "summary": summary}


def variant_flags(per_run: dict, v: str) -> str:
    for (variant, _), run in sorted(per_run.items()):
        if variant == v and run.get("command"):
            words = run["command"].split()
            keep = []
            for i, w in enumerate(words):
                if w.startswith(("--moe-ortho", "--moe-var-loss")):
                    value = words[i + 1] if i + 1 < len(words) else "--"
                    keep.append(w if value.startswith("--") else f"{w} {value}")
            return " ".join(keep)
    return ""


def _pyplot():
    """matplotlib.pyplot with the file-only Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(agg: dict, variants: list[str], seeds: list[str], out: Path) -> Optional[str]:
    plt = _pyplot()

    keys = PLOTTED
    cols = 4
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        for i, v in enumerate(variants):
            st = agg["summary"][v]["stats"][key]
            if st["n"] == 0:
                continue
            err = st["std"] if st["n"] > 1 else 0
            ax.bar(i, st["mean"], yerr=err, color=colors[i % len(colors)], alpha=0.7, capsize=3)
            pts = [agg["per_run"][(v, s)].get(key) for s in seeds if (v, s) in agg["per_run"]]
            ax.plot([i] * len(pts), pts, "k.", markersize=4)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants)
        ax.set_title(LABELS[key] + arrow(key), fontsize=9)
        ax.tick_params(labelsize=8)
        values = [agg["per_run"][(v, s)].get(key) for v in variants for s in seeds
                  if (v, s) in agg["per_run"]]
        values = [x for x in values if x is not None and not math.isnan(x)]
        if values and min(values) > 0 and key not in ("tokens_per_s",):
            lo, hi = min(values), max(values)
            ax.set_ylim(max(0.0, lo - 0.6 * (hi - lo + 1e-12) - 0.02 * hi), hi + 0.3 * (hi - lo + 1e-12) + 0.02 * hi)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    legend = ", ".join(f"{v}: {VARIANTS.get(v, v)}" for v in variants)
    fig.suptitle(f"mean ± std over seeds (dots: seeds)   {legend}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    name = "metrics.png"
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def plot_curves(agg: dict, variants: list[str], seeds: list[str], out: Path) -> Optional[str]:
    plt = _pyplot()

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), squeeze=False)
    for ax, (key, label) in zip(axes.flat, CURVES):
        for v in variants:
            curves = [agg["per_run"][(v, s)]["curves"].get(key) for s in seeds
                      if (v, s) in agg["per_run"]]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            its = [curves[0][i][0] for i in range(n)]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
            width = max(1, n // 30)  # moving average over ~3% of the run
            smooth = [sum(mean[max(0, i - width + 1):i + 1]) / len(mean[max(0, i - width + 1):i + 1])
                      for i in range(n)]
            ax.plot(its, smooth, label=f"{v}: {VARIANTS.get(v, v)}", linewidth=1.2)
        ax.set_title(label + " (mean over seeds, smoothed)", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        if key in ("lm_loss",):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    name = "curves.png"
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def plot_load(agg: dict, variants: list[str], seeds: list[str], out: Path) -> Optional[str]:
    """Sorted per-expert load (mean over MoE layers) of the first seed of every variant."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    drew = False
    for v in variants:
        runs = [agg["per_run"][(v, s)] for s in seeds if (v, s) in agg["per_run"]]
        if not runs or not runs[0]["load_per_layer"]:
            continue
        curves = []
        for run in runs:
            for load in run["load_per_layer"]:
                if load:
                    curves.append(sorted(load, reverse=True))
        e = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(e)]
        ax.plot(range(1, e + 1), mean, marker=".", label=f"{v}: {VARIANTS.get(v, v)}")
        drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.axhline(1 / e, color="gray", linestyle=":", linewidth=1, label="balanced (1/E)")
    ax.set_xlabel("expert rank by load (per layer, then averaged over layers and seeds)", fontsize=8)
    ax.set_ylabel("share of assignments", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "load_sorted.png"
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def write_report(agg: dict, args: argparse.Namespace, variants: list[str], seeds: list[str],
                 out: Path, plots: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    per_run = agg["per_run"]
    first = next(iter(per_run.values()), None)
    pngs = []
    if plots and per_run:
        for fn in (plot_metrics, plot_curves, plot_load):
            name = fn(agg, variants, seeds, out)
            if name:
                pngs.append(name)

    runtime_train = sum(r.get("train_s", 0) or 0 for r in per_run.values())
    runtime_analysis = sum(r.get("analysis_s", 0) or 0 for r in per_run.values())
    result = {
        "setting": args.setting,
        "preset": args.preset,
        "command": args.command,
        "coefficients": args.coefficients,
        "omoe_flags": {"f g": args.omoe, "h": args.omoe_repr},
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine,
        "variants": {v: VARIANTS.get(v, v) for v in variants},
        "seeds": seeds,
        "missing_runs": agg["missing"],
        "runtime_s": {"train": runtime_train, "analysis": runtime_analysis},
        "model": first["model"] if first else None,
        "domains": first["domains"] if first else None,
        "iterations": {f"{v}_seed{s}": r["iterations"] for (v, s), r in per_run.items()},
        "summary": agg["summary"],
        "per_run": {f"{v}_seed{s}": {k: x for k, x in r.items() if k not in ("curves",)}
                    for (v, s), r in per_run.items()},
    }
    (out / "results.json").write_text(json.dumps(_nan_to_none(result), indent=1))

    lines = [f"# Specialization ablation: setting `{args.setting}`", ""]
    done_seeds = {v: agg["summary"][v]["seeds_done"] for v in variants}
    counts = sorted({len(s) for s in done_seeds.values()})
    lines += [
        f"Generated by `tools/ablation_report.py` on {result['generated']}.",
        "",
        "Variants: " + "; ".join(f"**{v}** {VARIANTS.get(v, v)}" for v in variants) + ".",
        f"Seeds requested: {', '.join(seeds)}; finished per variant: "
        + ", ".join(f"{v}: {len(done_seeds[v])}" for v in variants) + ".",
    ]
    if agg["missing"]:
        lines.append(f"**Incomplete**: not finished: {', '.join(agg['missing'])}. Means below are "
                     "over the finished seeds only (column n).")
    if counts == [1]:
        lines.append("**One seed only: no standard deviations; differences are not tested.**")
    lines += ["", "## Setup", ""]
    if first and first.get("model"):
        m = first["model"]
        lines.append(f"- model: {m.get('num_layers')} layers, hidden {m.get('hidden_size')}, "
                     f"{m.get('num_experts')} experts, top-{m.get('topk')} "
                     f"({m.get('score_function')} router), MoE layers {m.get('moe_layers')}; "
                     f"{first['iterations']} training steps; preset `{args.preset}`")
    if first and first.get("domains"):
        lines.append(f"- validation domains: {', '.join(first['domains'])}; analysis on "
                     f"{first.get('analysis_tokens')} tokens per run")
    lines.append(f"- coefficients: {args.coefficients}")
    if any(v in variants for v in "fgh"):
        lines.append(f"- OMoE flags: f, g `{args.omoe}`; h `{args.omoe_repr}`")
    for (v, seed), run in sorted(per_run.items()):
        if run.get("calibrated"):
            values = ", ".join(f"{k}={val:g}" for k, val in run["calibrated"].items())
            lines.append(f"- {v} seed {seed}: calibrated {values}")
    for v in variants:
        flags = variant_flags(per_run, v)
        if flags:
            lines.append(f"- {v} ({VARIANTS.get(v, v)}): `{flags}`")
    lines += [
        f"- runtime: {runtime_train / 60:.1f} min training + {runtime_analysis / 60:.1f} min "
        f"analysis over {len(per_run)} runs",
        "",
        "Command:", "", "```bash", args.command, "```", "",
    ]
    if first and first.get("command"):
        lines += ["Each run (here the first one):", "", "```bash", first["command"], "```", ""]
    lines += ["Machine:", ""]
    lines.append(f"- CPU: {machine.get('cpu')}, {machine.get('cpu_affinity', machine.get('cpu_count'))}"
                 f" cores available (os.cpu_count {machine.get('cpu_count')}), "
                 f"OMP_NUM_THREADS={machine.get('OMP_NUM_THREADS')}")
    if machine.get("gpus"):
        lines.append(f"- GPUs: {len(machine['gpus'])} x {machine['gpus'][0]}")
    lines.append(f"- torch {machine.get('torch')}, megatron-core {machine.get('megatron_core')}, "
                 f"python {machine.get('python')}, {machine.get('hostname_os')}")
    lines += ["", "## Results (mean ± sample std over seeds)", "",
              "↓ / ↑: lower / higher is the direction the specialization losses aim for "
              "(definitions: docs/analysis.md). Analysis metrics are averaged over MoE layers.", ""]

    def table(keys: list[str]) -> list[str]:
        header = "| variant | n | " + " | ".join(LABELS[k] + arrow(k) for k in keys) + " |"
        rows = [header, "|" + "---|" * (len(keys) + 2)]
        for v in variants:
            st = agg["summary"][v]["stats"]
            n = len(done_seeds[v])
            rows.append(f"| {v}: {VARIANTS.get(v, v)} | {n} | "
                        + " | ".join(fmt_ms(st[k]["mean"], st[k]["std"], st[k]["n"]) for k in keys)
                        + " |")
        return rows

    lines += ["### Quality, load balance, speed", ""] + table(QUALITY_TABLE) + [""]
    lines += ["### Specialization", ""] + table(SPECIALIZATION_TABLE) + [""]
    if "a" in variants and len(variants) > 1:
        keys = ["valid_loss"] + SPECIALIZATION_TABLE[:-1] + ["max_vio", "tokens_per_s"]
        lines += ["### Difference to (a), paired by seed (mean ± std of the per-seed differences)",
                  "", "`*`: |mean| > 2 std / sqrt(n) (n ≥ 2), a rough sign that the change is "
                  "larger than the seed-to-seed noise; not a formal test.", ""]
        header = "| variant | n | " + " | ".join(LABELS[k] + arrow(k) for k in keys) + " |"
        lines += [header, "|" + "---|" * (len(keys) + 2)]
        for v in variants:
            if v == "a":
                continue
            paired = agg["summary"][v]["paired_diff_vs_a"]
            n = paired["valid_loss"]["n"] if paired else 0
            cells = []
            for k in keys:
                d = paired.get(k, {"mean": float("nan"), "std": float("nan"), "n": 0})
                cell = fmt_ms(d["mean"], d["std"], d["n"])
                if d["n"] >= 2 and not math.isnan(d["std"]) and \
                        abs(d["mean"]) > 2 * d["std"] / math.sqrt(d["n"]):
                    cell += " *"
                cells.append(cell)
            lines.append(f"| {v}: {VARIANTS.get(v, v)} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Per run", "", "| run | steps | valid loss | expert overlap | silhouette | "
              "NMI | MaxVio (valid) | tokens/s | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for (v, s), r in sorted(per_run.items()):
        lines.append(f"| {v}_seed{s} | {r['iterations']} | {fmt(r.get('valid_loss'))} | "
                     f"{fmt(r.get('expert_overlap'))} | {fmt(r.get('silhouette'))} | "
                     f"{fmt(r.get('domain_nmi'))} | {fmt(r.get('max_vio'))} | "
                     f"{fmt(r.get('tokens_per_s'))} | {fmt(r.get('train_s'))} |")
    lines.append("")
    if pngs:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in pngs] + [""]
    lines += [
        "Notes: valid loss is the training run's final evaluation (`--eval-iters` batches of its "
        "validation set); MaxVio (valid) and every specialization metric come from "
        "`tools/analyze_specialization.py` on the final checkpoint; MaxVio (train) is the mean "
        "over the last 10% of training steps; throughput is the median tokens/s of the training "
        "steps after the first 5%. Per-run logs, checkpoints and analysis reports (with per-layer "
        "tables and plots) are in the runs directory.",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    return {"markdown": out / "results.md", "json": out / "results.json", "pngs": pngs}


def _nan_to_none(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ablation_report", description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--setting", default="custom")
    p.add_argument("--variants", default="a b c d e")
    p.add_argument("--seeds", default=None, help="default: every seed found in --runs-dir")
    p.add_argument("--coefficients", default="")
    p.add_argument("--omoe", default="", help="OMoE flags of variants f and g")
    p.add_argument("--omoe-repr", default="", help="OMoE flags of variant h")
    p.add_argument("--command", default=" ".join(sys.argv))
    p.add_argument("--preset", default="")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    variants = args.variants.split()
    if args.seeds:
        seeds = args.seeds.split()
    else:
        found = {m.group(1) for d in runs_dir.glob("*_seed*")
                 if (m := re.match(r".+_seed(\w+)$", d.name))}
        seeds = sorted(found, key=lambda s: (len(s), s))
    agg = aggregate(runs_dir, variants, seeds)
    if not agg["per_run"]:
        print(f"error: no finished run in {runs_dir}", file=sys.stderr)
        return 2
    paths = write_report(agg, args, variants, seeds, Path(args.output_dir), plots=not args.no_plots)
    print(f"report: {paths['markdown']}\njson  : {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
