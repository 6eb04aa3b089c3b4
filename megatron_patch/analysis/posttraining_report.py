"""The post-training study's report: ``results.json`` (every number, per run and aggregated),
``results.md`` (tables, the paper's claims checked, commands, machine) and PNGs.

Per run (variant x mode x seed) it reads the evaluation (``eval/evaluation.json``: per-task
accuracy and answer loss), the analysis (``analysis/specialization.json``: the layer means of
the specialization metrics on the task-labelled test conversations), the trainer's log
(``checkpoints/metrics.jsonl``: the last validation loss, the calibrated coefficients) and the
timing. Aggregates are mean ± sample std over seeds; differences to the aux-loss baseline are
paired by seed within a mode (full or LoRA).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from megatron_patch.analysis.ablation_report import machine_lines
from megatron_patch.analysis.labels import LABELS
from megatron_patch.analysis.posttraining import BASELINE, MODES, TIMING, VARIANTS
from megatron_patch.analysis.reporting import finite_or_none, fmt, fmt_mean_std, mean_std, pyplot
from megatron_patch.evaluation.report import RESULTS_JSON
from megatron_patch.machine import machine_info

SPECIALIZATION = ("expert_overlap", "routing_variance", "silhouette", "domain_nmi", "max_vio",
                  "routing_entropy")
SPEC_LABELS = {**LABELS, "domain_nmi": "NMI(task; expert)"}
MEAN_ACCURACY = "mean_accuracy"
# The paper's claims (post-training DeepSeek-MoE-16B with L_o + L_v against the aux loss
# alone): metric -> (direction, the paper's numbers).
CLAIMS = {
    "expert_overlap": ("lower", "0.50 -> 0.28"),
    "routing_variance": ("higher", "0.0045 -> 0.0125"),
    "silhouette": ("higher", "0.40 -> 0.51"),
    "max_vio": ("unchanged", "2.48 -> 2.48"),
    MEAN_ACCURACY: ("higher", "up to +23.79%"),
}
# "unchanged" holds when the paired mean difference is below this fraction of the baseline.
UNCHANGED_FRACTION = 0.1


def _json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def read_run(run: Path) -> Optional[dict]:
    """The numbers of one finished run directory (None when it has not finished)."""
    evaluation = _json(run / "eval" / RESULTS_JSON)
    analysis = _json(run / "analysis" / "specialization.json")
    if evaluation is None or analysis is None:
        return None
    rows = [json.loads(line) for line in
            (run / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    valid = [row["lm_loss"] for row in rows if row["split"] == "valid"]
    calibration = [row for row in rows if row["split"] == "calibration"]
    tasks = evaluation["tasks"]
    out = {
        "accuracy": {task: score["accuracy"] for task, score in tasks.items()},
        "items": {task: score["items"] for task, score in tasks.items()},
        "answer_loss": {task: score["answer_loss"] for task, score in tasks.items()},
        MEAN_ACCURACY: evaluation["overall"]["mean_task_accuracy"],
        "valid_loss": valid[-1] if valid else None,
        "coefficients": ({k: v for k, v in calibration[0].items()
                          if k not in ("split", "iteration")} if calibration else None),
        **{key: analysis["mean"].get(key) for key in SPECIALIZATION},
        **(_json(run / TIMING) or {}),
    }
    commands = sorted(run.glob("*.command.txt"))
    out["commands"] = {p.name.removesuffix(".command.txt"): p.read_text().strip()
                       for p in commands}
    return out


def _stat(values: list[Optional[float]]) -> dict:
    mean, std, n = mean_std(values)
    return {"mean": mean, "std": std, "n": n}


def _value(run: dict, key: str, task: Optional[str]) -> Optional[float]:
    return run[key].get(task) if task is not None else run.get(key)


def aggregate(study) -> dict:
    """Per-run numbers, mean/std per (variant, mode), paired differences to the baseline."""
    per_run: dict[str, dict] = {}
    for variant in study.variants:
        for mode in study.modes:
            for seed in study.setting.seeds:
                run = read_run(study.run_dir(variant, mode, seed))
                if run is not None:
                    per_run[f"{variant}_{mode}_seed{seed}"] = run
    tasks = sorted({task for run in per_run.values() for task in run["accuracy"]})
    keys = [("accuracy", t) for t in tasks] + [("answer_loss", t) for t in tasks] + [
        (k, None) for k in (MEAN_ACCURACY, "valid_loss", *SPECIALIZATION, "train_s")]
    stats: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    for variant in study.variants:
        for mode in study.modes:
            runs = {seed: per_run.get(f"{variant}_{mode}_seed{seed}") for seed in
                    study.setting.seeds}
            base = {seed: per_run.get(f"{BASELINE}_{mode}_seed{seed}") for seed in
                    study.setting.seeds}
            name = f"{variant}_{mode}"
            stats[name], paired[name] = {}, {}
            for key, task in keys:
                label = key if task is None else f"{key}/{task}"
                values = [_value(r, key, task) for r in runs.values() if r is not None]
                stats[name][label] = _stat(values)
                if variant == BASELINE:
                    continue
                # Rounded: accuracies are fractions k / n, whose float differences would
                # otherwise show as +-1e-17 where two runs got the same count.
                pairs = [(_value(runs[s], key, task), _value(base[s], key, task))
                         for s in study.setting.seeds if runs[s] is not None
                         and base[s] is not None]
                diffs = [round(x - y, 12) for x, y in pairs if x is not None and y is not None]
                paired[name][label] = {**_stat(diffs), "positive": sum(d > 0 for d in diffs),
                                       "diffs": diffs}
    return {"tasks": tasks, "per_run": per_run, "stats": stats, "paired": paired,
            "base": read_run(study.base)}


def claim_verdict(claim: str, baseline_mean: float, diff: dict) -> str:
    """Whether a paired difference ``diff`` (``_stat`` + ``positive``) bears out the paper's
    ``claim`` direction: "holds" only when the mean moves that way on every seed."""
    direction, _ = CLAIMS[claim]
    n, mean = diff["n"], diff["mean"]
    if n == 0:
        return "no runs"
    if direction == "unchanged":
        small = abs(mean) <= UNCHANGED_FRACTION * abs(baseline_mean)
        return "holds" if small else f"not seen ({'higher' if mean > 0 else 'lower'})"
    agree = diff["positive"] if direction == "higher" else n - diff["positive"]
    if agree == n and (mean > 0) == (direction == "higher"):
        return f"holds ({agree}/{n} seeds)"
    return f"not seen ({agree}/{n} seeds {direction})"


def _relative(diff: dict, baseline_mean: float) -> str:
    """A mean paired difference relative to the baseline's mean, in %."""
    if diff["n"] == 0 or not baseline_mean:
        return "n/a"
    return f"{100 * diff['mean'] / baseline_mean:+.1f}%"


def _step_seconds(run: Optional[dict]) -> float:
    return sum((run or {}).get(key) or 0.0 for key in ("train_s", "evaluation_and_analysis_s"))


def compute_time_line(study, agg: dict) -> str:
    """The study's time as the sum of its steps' own times (data, base model, every run with its
    evaluation and analysis), so a study resumed after an interruption counts each step once."""
    data = (_json(study.data / TIMING) or {}).get("data_s")
    base = _step_seconds(agg["base"])
    runs = sum(_step_seconds(run) for run in agg["per_run"].values())
    parts = [f"data {fmt(data, 3) if data is not None else 'n/a'} s", f"base model {base:.0f} s",
             f"{len(agg['per_run'])} post-training runs {runs:.0f} s"]
    total = (data or 0.0) + base + runs
    return (f"Compute time: {total:.0f} s ({total / 3600:.2f} h) = " + " + ".join(parts)
            + " (each step's own time: a resumed study counts every step once).")


def _cell(stat: dict) -> str:
    return fmt_mean_std(stat["mean"], stat["std"], stat["n"])


def _diff_cell(diff: dict) -> str:
    if diff["n"] == 0:
        return "n/a"
    std = "" if diff["n"] < 2 else f" ± {fmt(diff['std'], 2)}"
    return f"{diff['mean']:+.4g}{std} ({diff['positive']}/{diff['n']} > 0)"


def _rows(study) -> list[tuple[str, str, str]]:
    return [(f"{v}_{m}", f"{v}: {VARIANTS[v].label}", MODES[m][0]) for m in study.modes
            for v in study.variants]


def _markdown(study, agg: dict, machine: dict, plots: list[str]) -> str:
    tasks, stats, paired = agg["tasks"], agg["stats"], agg["paired"]
    setting = study.setting
    lines = [f"# Post-training study ({setting.name})", "",
             "The paper's protocol (arXiv 2505.22323) in miniature: a base GPT-MoE pretrained "
             "here with the aux loss only, exported to Hugging Face (Mixtral) and post-trained "
             "from that export on the task suite (`megatron_patch/data/tasks.py`) in "
             f"{len(study.modes)} modes x {len(study.variants)} variants, seeds "
             f"{', '.join(map(str, setting.seeds))}. Made by `python -m "
             f"megatron_patch.analysis.posttraining{' --quick' if setting.name == 'quick' else ''}`"
             " (`examples/posttrain/posttraining_study.sh`).", ""]
    lines += ["| variant | flags |", "| --- | --- |"]
    lines += [f"| {v}: {VARIANTS[v].label} | `{' '.join(VARIANTS[v].flags)}` |"
              for v in study.variants]
    lines += [f"| mode {m}: {MODES[m][0]} | `{' '.join(MODES[m][1]) or '(all parameters)'}`"
              f", lr {setting.lr[m]:g} |" for m in study.modes]
    base = agg["base"]
    if base is not None:
        lines += ["", "## Base model (before post-training)", "",
                  "| " + " | ".join(["mean accuracy", *tasks, *(SPEC_LABELS[k] for k in
                                                                SPECIALIZATION)]) + " |",
                  "| " + " | ".join(["---"] * (1 + len(tasks) + len(SPECIALIZATION))) + " |",
                  "| " + " | ".join([fmt(base[MEAN_ACCURACY]),
                                     *(fmt(base["accuracy"].get(t)) for t in tasks),
                                     *(fmt(base[k]) for k in SPECIALIZATION)]) + " |"]
    head = "| variant | mode | " + " | ".join([*tasks, "mean"]) + " |"
    rule = "| --- | --- | " + " | ".join(["---"] * (len(tasks) + 1)) + " |"
    lines += ["", "## Test accuracy (mean ± std over seeds)", "", head, rule]
    for name, label, mode in _rows(study):
        cells = [_cell(stats[name][f"accuracy/{t}"]) for t in tasks]
        lines.append(f"| {label} | {mode} | " + " | ".join(
            [*cells, _cell(stats[name][MEAN_ACCURACY])]) + " |")
    items = {t: (base or {}).get("items", {}).get(t) for t in tasks}
    lines += ["", "Sampling noise: an accuracy p on n test items has a binomial standard error "
              "sqrt(p (1 - p) / n), up to 0.05 for n = 100"
              + (" (items per task: " + ", ".join(f"{t} {n}" for t, n in items.items() if n)
                 + ")" if any(items.values()) else "") + "; the seed spread above adds training "
              "noise.", ""]
    lines += [f"## Accuracy differences to {BASELINE} (paired by seed; seeds with a gain)",
              "", head, rule]
    for name, label, mode in _rows(study):
        if name.startswith(f"{BASELINE}_"):
            continue
        cells = [_diff_cell(paired[name][f"accuracy/{t}"]) for t in tasks]
        lines.append(f"| {label} | {mode} | " + " | ".join(
            [*cells, _diff_cell(paired[name][MEAN_ACCURACY])]) + " |")
    lines += ["", "## Losses: validation loss (instruction valid set, the trainer's last "
              "evaluation) and answer loss per task (test answers, nats/token)", "",
              "| variant | mode | valid loss | " + " | ".join(tasks) + " |",
              "| --- | --- | --- | " + " | ".join(["---"] * len(tasks)) + " |"]
    for name, label, mode in _rows(study):
        cells = [_cell(stats[name][f"answer_loss/{t}"]) for t in tasks]
        lines.append(f"| {label} | {mode} | {_cell(stats[name]['valid_loss'])} | "
                     + " | ".join(cells) + " |")
    spec_head = "| variant | mode | " + " | ".join(SPEC_LABELS[k] for k in SPECIALIZATION) + " |"
    spec_rule = "| --- | --- | " + " | ".join(["---"] * len(SPECIALIZATION)) + " |"
    lines += ["", "## Specialization (test conversations labelled by task; mean over MoE "
              "layers)", "", spec_head, spec_rule]
    for name, label, mode in _rows(study):
        lines.append(f"| {label} | {mode} | " + " | ".join(
            _cell(stats[name][k]) for k in SPECIALIZATION) + " |")
    lines += ["", f"Differences to {BASELINE}, paired by seed:", "", spec_head, spec_rule]
    for name, label, mode in _rows(study):
        if not name.startswith(f"{BASELINE}_"):
            lines.append(f"| {label} | {mode} | " + " | ".join(
                _diff_cell(paired[name][k]) for k in SPECIALIZATION) + " |")
    columns = [(v, m) for m in study.modes for v in study.variants if v != BASELINE]
    lines += ["", "## The paper's claims, checked", "",
              f"A claim holds when the paired difference to {BASELINE} goes the paper's way on "
              f"every seed (\"unchanged\": |mean difference| <= {UNCHANGED_FRACTION:g} x the "
              "baseline's mean).", "",
              "| claim (paper) | " + " | ".join(f"{v} {m}" for v, m in columns) + " |",
              "| --- | " + " | ".join(["---"] * len(columns)) + " |"]
    for claim, (direction, numbers) in CLAIMS.items():
        cells = []
        for variant, mode in columns:
            baseline = stats[f"{BASELINE}_{mode}"][claim]["mean"]
            diff = paired[f"{variant}_{mode}"][claim]
            cell = claim_verdict(claim, baseline, diff)
            cells.append(cell + f", {_relative(diff, baseline)}" if claim == MEAN_ACCURACY
                         else cell)
        label = SPEC_LABELS.get(claim, "mean test accuracy")
        lines.append(f"| {label} {direction} ({numbers}) | " + " | ".join(cells) + " |")
    coefficients = {name: run["coefficients"] for name, run in agg["per_run"].items()
                    if run["coefficients"]}
    if coefficients:
        lines += ["", "Coefficients calibrated at step 0 (`auto`): " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {fmt(v)}" for k, v in values.items())
            for name, values in sorted(coefficients.items())) + "."]
    lines += ["", "## How it ran", "", compute_time_line(study, agg) + " Per run (train; "
              "evaluation + analysis): " + ", ".join(
                  f"{name} {fmt(run.get('train_s'), 3)}; {fmt(run.get('evaluation_and_analysis_s'), 2)} s"
                  for name, run in sorted(agg["per_run"].items())) + ".", "",
              "Exact commands of each run: `<runs>/posttrain/<run>/*.command.txt`; of the base "
              "model: `<runs>/base/*.command.txt`. One run's:", ""]
    example = next(iter(agg["per_run"].values()), None)
    if example is not None:
        lines += ["```", *example["commands"].values(), "```", ""]
    lines += ["Machine:", "", *machine_lines(machine), "",
              *(f"![{Path(p).stem}]({Path(p).name})" for p in plots), "",
              f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    return "\n".join(lines)


def _plot(study, agg: dict) -> list[str]:
    """accuracy.png (per task, per mode) and specialization.png (per metric)."""
    if not agg["per_run"]:
        return []
    plt = pyplot()
    out = []
    tasks = [*agg["tasks"], MEAN_ACCURACY]
    width = 0.8 / max(len(study.variants), 1)
    fig, axes = plt.subplots(1, len(study.modes), figsize=(6 * len(study.modes), 3.8),
                             squeeze=False)
    for ax, mode in zip(axes[0], study.modes):
        for i, variant in enumerate(study.variants):
            stats = agg["stats"][f"{variant}_{mode}"]
            keys = [f"accuracy/{t}" if t != MEAN_ACCURACY else t for t in tasks]
            means = [stats[k]["mean"] for k in keys]
            stds = [0 if math.isnan(stats[k]["std"]) else stats[k]["std"] for k in keys]
            ax.bar([x + i * width for x in range(len(tasks))], means, width, yerr=stds,
                   label=variant, capsize=2)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))])
        ax.set_xticklabels([t.replace("_", " ") for t in tasks], rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(f"test accuracy, {mode}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(str(study.output / "accuracy.png"))
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(SPECIALIZATION), figsize=(3.2 * len(SPECIALIZATION), 3.4))
    names = [f"{v}_{m}" for m in study.modes for v in study.variants]
    for ax, key in zip(axes, SPECIALIZATION):
        means = [agg["stats"][n][key]["mean"] for n in names]
        stds = [0 if math.isnan(agg["stats"][n][key]["std"]) else agg["stats"][n][key]["std"]
                for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=2,
               color=[f"C{study.variants.index(n.split('_')[0])}" for n in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, fontsize=7)
        ax.set_title(SPEC_LABELS[key], fontsize=9)
    fig.tight_layout()
    out.append(str(study.output / "specialization.png"))
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


def write_study_report(study) -> Path:
    """``results.json``, ``results.md`` and the PNGs into the study's output directory."""
    study.output.mkdir(parents=True, exist_ok=True)
    agg = aggregate(study)
    machine = machine_info()
    plots = _plot(study, agg)
    result: dict[str, Any] = {"setting": study.setting.name, "seeds": list(study.setting.seeds),
                              "variants": study.variants, "modes": study.modes,
                              "machine": machine, **agg}
    (study.output / "results.json").write_text(
        json.dumps(finite_or_none(result), indent=1, allow_nan=False) + "\n")
    path = study.output / "results.md"
    path.write_text(_markdown(study, agg, machine, plots))
    return path
