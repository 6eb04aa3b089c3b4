"""Write an aggregated specialization ablation as ``results.json``, ``results.md`` and PNGs.

``results.json`` holds every number, per seed and mean/std over seeds; ``results.md`` the tables
(mean ± sample std over seeds, and differences to variant a paired by seed), the exact command
and the machine; the PNGs come from ``ablation_plots``. Runs that have not finished are listed
as missing; the report says how many seeds each mean is over.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_patch.analysis.ablation import QUALITY_TABLE, SPECIALIZATION_TABLE, trained_flags
from megatron_patch.analysis.ablation_plots import PLOTS
from megatron_patch.analysis.labels import LABELS, heading
from megatron_patch.machine import machine_info
from megatron_patch.analysis.reporting import finite_or_none, fmt, fmt_mean_std
from megatron_patch.analysis.variants import VARIANTS, named

# Columns of the table of differences to variant a, and of the table of single runs.
PAIRED_TABLE = ("valid_loss", *SPECIALIZATION_TABLE[:-1], "max_vio", "tokens_per_s")
PER_RUN_TABLE = ("valid_loss", "expert_overlap", "silhouette", "domain_nmi", "max_vio",
                 "tokens_per_s", "train_s")

NOTES = (
    "Notes: valid loss is the training run's final evaluation (`--eval-iters` batches of its "
    "validation set); MaxVio and every specialization metric come from "
    "`tools/analyze_specialization.py` on the final checkpoint and the validation set; MaxVio "
    "(train) is the mean over the last 10% of training steps; throughput is the median tokens/s "
    "of the training steps after the first 5%. Per-run logs, checkpoints and analysis reports "
    "(with per-layer tables and plots) are in the runs directory."
)


@dataclass(frozen=True)
class AblationSetup:
    """How the ablation was run, as the report states it (specialization_ablation.sh passes it)."""

    setting: str = "custom"
    preset: str = ""
    command: str = ""
    coefficients: str = ""  # "beta=10 beta_pairwise=10 gamma=0.1"
    omoe: str = ""          # OMoE flags of variants f and g
    omoe_repr: str = ""     # OMoE flags of variant h


def _table_head(first: list[str], keys: tuple[str, ...]) -> list[str]:
    return ["| " + " | ".join([*first, *map(heading, keys)]) + " |",
            "|" + "---|" * (len(first) + len(keys))]


def _setup_lines(agg: dict, setup: AblationSetup, variants: list[str]) -> list[str]:
    per_run = agg["per_run"]
    first = next(iter(per_run.values()))
    lines = []
    if first.get("model"):
        m = first["model"]
        lines.append(f"- model: {m.get('num_layers')} layers, hidden {m.get('hidden_size')}, "
                     f"{m.get('num_experts')} experts, top-{m.get('topk')} "
                     f"({m.get('score_function')} router), MoE layers {m.get('moe_layers')}; "
                     f"{first['iterations']} training steps; preset `{setup.preset}`")
    if first.get("domains"):
        lines.append(f"- validation domains: {', '.join(first['domains'])}; analysis on "
                     f"{first.get('analysis_tokens')} tokens per run")
    lines.append(f"- coefficients: {setup.coefficients}")
    if any(v in variants for v in "fgh"):
        lines.append(f"- OMoE flags: f, g `{setup.omoe}`; h `{setup.omoe_repr}`")
    for (v, seed), run in sorted(per_run.items()):
        if run.get("calibrated"):
            values = ", ".join(f"{k}={val:g}" for k, val in run["calibrated"].items())
            lines.append(f"- {v} seed {seed}: calibrated {values}")
    for v in variants:
        flags = trained_flags(per_run, v)
        if flags:
            lines.append(f"- {v} ({VARIANTS[v].description}): `{flags}`")
    return lines


def machine_lines(machine: dict) -> list[str]:
    lines = [f"- CPU: {machine.get('cpu')}, {machine.get('cpu_affinity', machine.get('cpu_count'))}"
             f" cores available (os.cpu_count {machine.get('cpu_count')}), "
             f"OMP_NUM_THREADS={machine.get('OMP_NUM_THREADS')}"]
    if machine.get("gpus"):
        lines.append(f"- GPUs: {len(machine['gpus'])} x {machine['gpus'][0]}")
    lines.append(f"- torch {machine.get('torch')}, megatron-core {machine.get('megatron_core')}, "
                 f"python {machine.get('python')}, {machine.get('hostname_os')}")
    return lines


def _stats_table(agg: dict, variants: list[str], keys: tuple[str, ...]) -> list[str]:
    rows = _table_head(["variant", "n"], keys)
    for v in variants:
        st = agg["summary"][v]["stats"]
        rows.append(f"| {named(v)} | {len(agg['summary'][v]['seeds_done'])} | "
                    + " | ".join(fmt_mean_std(st[k]["mean"], st[k]["std"], st[k]["n"])
                                 for k in keys) + " |")
    return rows


def _paired_table(agg: dict, variants: list[str]) -> list[str]:
    lines = ["### Difference to (a), paired by seed (mean ± std of the per-seed differences)",
             "", "`*`: |mean| > 2 std / sqrt(n) (n ≥ 2), a rough sign that the change is "
             "larger than the seed-to-seed noise; not a formal test.", ""]
    lines += _table_head(["variant", "n"], PAIRED_TABLE)
    for v in variants:
        if v == "a":
            continue
        paired = agg["summary"][v]["paired_diff_vs_a"]
        n = paired["valid_loss"]["n"] if paired else 0
        cells = []
        for k in PAIRED_TABLE:
            d = paired.get(k, {"mean": float("nan"), "std": float("nan"), "n": 0})
            cell = fmt_mean_std(d["mean"], d["std"], d["n"])
            if d["n"] >= 2 and not math.isnan(d["std"]) and \
                    abs(d["mean"]) > 2 * d["std"] / math.sqrt(d["n"]):
                cell += " *"
            cells.append(cell)
        lines.append(f"| {named(v)} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _per_run_table(per_run: dict) -> list[str]:
    lines = ["### Per run", "", "| run | steps | " + " | ".join(LABELS[k] for k in PER_RUN_TABLE)
             + " |", "|" + "---|" * (len(PER_RUN_TABLE) + 2)]
    for (v, s), r in sorted(per_run.items()):
        lines.append(f"| {v}_seed{s} | {r['iterations']} | "
                     + " | ".join(fmt(r.get(k)) for k in PER_RUN_TABLE) + " |")
    return lines + [""]


def _markdown(agg: dict, result: dict, setup: AblationSetup, variants: list[str],
              seeds: list[str], pngs: list[str]) -> str:
    per_run = agg["per_run"]
    first = next(iter(per_run.values()))
    done_seeds = {v: agg["summary"][v]["seeds_done"] for v in variants}
    lines = [
        f"# Specialization ablation: setting `{setup.setting}`", "",
        f"Generated by `tools/ablation_report.py` on {result['generated']}.", "",
        "Variants: " + "; ".join(f"**{v}** {VARIANTS[v].description}" for v in variants) + ".",
        f"Seeds requested: {', '.join(seeds)}; finished per variant: "
        + ", ".join(f"{v}: {len(done_seeds[v])}" for v in variants) + ".",
    ]
    if agg["missing"]:
        lines.append(f"**Incomplete**: not finished: {', '.join(agg['missing'])}. Means below are "
                     "over the finished seeds only (column n).")
    if sorted({len(s) for s in done_seeds.values()}) == [1]:
        lines.append("**One seed only: no standard deviations; differences are not tested.**")
    runtime = result["runtime_s"]
    lines += ["", "## Setup", "", *_setup_lines(agg, setup, variants),
              f"- runtime: {runtime['train'] / 60:.1f} min training + "
              f"{runtime['analysis'] / 60:.1f} min analysis over {len(per_run)} runs",
              "", "Command:", "", "```bash", setup.command, "```", ""]
    if first.get("command"):
        lines += ["Each run (here the first one):", "", "```bash", first["command"], "```", ""]
    lines += ["Machine:", "", *machine_lines(result["machine"]),
              "", "## Results (mean ± sample std over seeds)", "",
              "↓ / ↑: lower / higher is the direction the specialization losses aim for "
              "(definitions: docs/analysis.md). Analysis metrics are averaged over MoE layers.", "",
              "### Quality, load balance, speed", "", *_stats_table(agg, variants, QUALITY_TABLE),
              "", "### Specialization", "", *_stats_table(agg, variants, SPECIALIZATION_TABLE), ""]
    if "a" in variants and len(variants) > 1:
        lines += _paired_table(agg, variants)
    lines += _per_run_table(per_run)
    if pngs:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in pngs] + [""]
    return "\n".join(lines + [NOTES, ""])


def write_report(agg: dict, setup: AblationSetup, variants: list[str], seeds: list[str],
                 out: Path, plots: bool = True) -> dict:
    """Write ``results.json``, ``results.md`` and (with ``plots``) the PNGs of ``agg``
    (``ablation.aggregate``, at least one finished run) into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    per_run = agg["per_run"]
    first = next(iter(per_run.values()))
    pngs = [name for plot in PLOTS if plots and (name := plot(agg, variants, seeds, out))]
    result = {
        "setting": setup.setting,
        "preset": setup.preset,
        "command": setup.command,
        "coefficients": setup.coefficients,
        "omoe_flags": {"f g": setup.omoe, "h": setup.omoe_repr},
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "variants": {v: VARIANTS[v].description for v in variants},
        "seeds": seeds,
        "missing_runs": agg["missing"],
        "runtime_s": {"train": sum(r.get("train_s", 0) or 0 for r in per_run.values()),
                      "analysis": sum(r.get("analysis_s", 0) or 0 for r in per_run.values())},
        "model": first["model"],
        "domains": first["domains"],
        "iterations": {f"{v}_seed{s}": r["iterations"] for (v, s), r in per_run.items()},
        "summary": agg["summary"],
        "per_run": {f"{v}_seed{s}": {k: x for k, x in r.items() if k != "curves"}
                    for (v, s), r in per_run.items()},
    }
    (out / "results.json").write_text(json.dumps(finite_or_none(result), indent=1))
    (out / "results.md").write_text(_markdown(agg, result, setup, variants, seeds, pngs))
    return {"markdown": out / "results.md", "json": out / "results.json", "pngs": pngs}
