"""Read the runs of a specialization ablation and aggregate them over seeds.

A run is ``<runs-dir>/<variant>_seed<seed>/`` of examples/pretrain/specialization_ablation.sh;
it is finished when it has a ``done`` marker and ``analysis/specialization.json``
(tools/analyze_specialization.py). Of a finished run this reads ``checkpoints/metrics.jsonl``
(validation loss, training MaxVio, tokens/s, loss curves), the analysis and ``timing.json``;
``aggregate`` gives mean/std over seeds per variant and the differences to variant a paired by
seed. The report: ``ablation_report``; the plots: ``ablation_plots``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from megatron_patch.analysis.labels import METRIC_LABELS
from megatron_patch.analysis.reporting import ReportError, mean_std
from megatron_patch.analysis.variants import VARIANTS, UnknownVariantError, check_variants
from megatron_patch.moe.names import BALANCING_LOSS, LOSS_LABELS, ORTHO_LOSS, VAR_LOSS

# Every metric aggregated over seeds, in report order: from the training run's metrics.jsonl and
# timing.json, and from the analysis.
METRICS = (
    "valid_loss", "valid_ppl", "expert_overlap", "silhouette", "output_similarity_mean",
    "weight_similarity_mean", "routed_output_rms", "routing_variance", "routing_entropy",
    "domain_nmi", "domain_mi_over_domain_entropy", "routing_overlap_same_domain",
    "routing_overlap_cross_domain", "routing_overlap", "max_vio", "train_max_vio",
    "tokens_per_s", "train_s", "analysis_s",
)
# The report's two tables of mean ± std over seeds.
QUALITY_TABLE = ("valid_loss", "valid_ppl", "max_vio", "train_max_vio", "tokens_per_s", "train_s")
SPECIALIZATION_TABLE = (
    "expert_overlap", "silhouette", "output_similarity_mean", "weight_similarity_mean",
    "routed_output_rms", "routing_variance", "routing_entropy", "domain_nmi",
    "domain_mi_over_domain_entropy", "routing_overlap_same_domain", "routing_overlap_cross_domain",
    "routing_overlap",
)

# Training curves (metrics.jsonl keys of the train split) and their plot titles.
CURVES = {
    "lm_loss": "train LM loss",
    "max_vio": f"{METRIC_LABELS['max_vio']} (train)",
    "routing_entropy": f"{METRIC_LABELS['routing_entropy']} (train)",
    BALANCING_LOSS["aux_loss"]: LOSS_LABELS[BALANCING_LOSS["aux_loss"]],
    ORTHO_LOSS: LOSS_LABELS[ORTHO_LOSS],
    VAR_LOSS: LOSS_LABELS[VAR_LOSS],
}

# Prefixes of the pretraining flags the report lists per variant (from the runs' command.txt).
TRAINED_FLAG_PREFIXES = ("--moe-ortho", "--moe-var-loss")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def median(values: list[float]) -> float:
    """The median (mean of the middle two for an even count); NaN for no values."""
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def _training_numbers(rows: list[dict]) -> dict:
    """Validation loss, training MaxVio, throughput and curves of one run's metrics.jsonl."""
    # A resumed run appends: keep the last record of every (split, iteration).
    by_key = {(row["split"], row["iteration"]): row for row in rows}
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
    out["curves"] = {key: [[r["iteration"], r[key]] for r in train if key in r] for key in CURVES}
    return out


def read_run(run: Path) -> dict:
    """Every metric of one finished run, plus its training curves."""
    out = _training_numbers(read_jsonl(run / "checkpoints" / "metrics.jsonl"))
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


def find_seeds(runs_dir: Path) -> list[str]:
    """The seeds of the run directories (``*_seed<seed>``) in ``runs_dir``, in numeric order."""
    found = {m.group(1) for d in runs_dir.glob("*_seed*")
             if (m := re.match(r".+_seed(\w+)$", d.name))}
    return sorted(found, key=lambda s: (len(s), s))


def _stats(values: list[float]) -> dict:
    return dict(zip(("mean", "std", "n"), mean_std(values)))


def aggregate(runs_dir: Path, variants: list[str], seeds: list[str]) -> dict:
    """Per run (``per_run[(variant, seed)]``), the runs not finished (``missing``) and per variant
    (``summary``) mean/std/n of every metric over the finished seeds and, against variant a, of
    the per-seed differences.

    Raises:
        ReportError: an unknown variant, or no finished run.
    """
    try:
        check_variants(variants)
    except UnknownVariantError as error:
        raise ReportError(f"{error}: fix --variants") from None
    per_run, missing = {}, []
    for v in variants:
        for seed in seeds:
            run = runs_dir / f"{v}_seed{seed}"
            if (run / "done").exists() and (run / "analysis" / "specialization.json").exists():
                per_run[(v, seed)] = read_run(run)
            else:
                missing.append(f"{v}_seed{seed}")
    if not per_run:
        raise ReportError(f"no finished run in {runs_dir} (a run is <variant>_seed<seed>/ with a "
                          "'done' marker and analysis/specialization.json): pass the --runs-dir "
                          "that examples/pretrain/specialization_ablation.sh trained into")
    summary = {}
    for v in variants:
        done = [s for s in seeds if (v, s) in per_run]
        stats = {key: _stats([per_run[(v, s)].get(key, float("nan")) for s in done])
                 for key in METRICS}
        # Paired by seed: variant - a, for the seeds both have.
        paired = {}
        if v != "a" and "a" in variants:
            both = [s for s in done if ("a", s) in per_run]
            paired = {key: _stats([per_run[(v, s)].get(key, float("nan"))
                                   - per_run[("a", s)].get(key, float("nan")) for s in both])
                      for key in METRICS}
        summary[v] = {"label": VARIANTS[v].description, "seeds_done": done, "stats": stats,
                      "paired_diff_vs_a": paired}
    return {"per_run": per_run, "missing": missing, "summary": summary}


def trained_flags(per_run: dict, variant: str) -> str:
    """The loss and OMoE flags the first run of ``variant`` that recorded its command trained
    with ("" if none did)."""
    for (v, _), run in sorted(per_run.items()):
        if v == variant and run.get("command"):
            words = run["command"].split()
            keep = []
            for i, w in enumerate(words):
                if w.startswith(TRAINED_FLAG_PREFIXES):
                    value = words[i + 1] if i + 1 < len(words) else "--"
                    keep.append(w if value.startswith("--") else f"{w} {value}")
            return " ".join(keep)
    return ""
