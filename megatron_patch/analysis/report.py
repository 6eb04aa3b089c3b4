"""Write an analysis result as ``specialization.json``, ``specialization.md`` and PNG plots.

PNGs (matplotlib, Agg backend): per MoE layer, the domain x expert load heatmap (each domain's
assignments as shares over experts) and the expert output / weight cosine-similarity matrices;
one figure of the load per expert of every layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megatron_patch.analysis.labels import METRIC_LABELS, described
from megatron_patch.analysis.reporting import finite_or_none, pyplot


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_json(result: dict, path: Path) -> Path:
    path.write_text(json.dumps(finite_or_none(result), indent=2, allow_nan=False) + "\n")
    return path


def markdown(result: dict, images: list[str]) -> str:
    """The Markdown report of ``result``; ``images`` are PNG file names to link."""
    model, layers = result["model"], result["layers"]
    lines = [
        "# Expert specialization report", "",
        f"- checkpoint: `{result['checkpoint']}` (iteration {result['iteration']})",
        f"- data: `{result['data_path']}`, {result['num_samples']} sequences x "
        f"{result['seq_length']} = {result['num_tokens']} tokens"
        + ("" if result["has_domains"] else " (no domain sidecar: domain metrics are n/a)"),
        f"- model: {model['num_layers']} layers, MoE layers {model['moe_layers']}, "
        f"{model['num_experts']} experts, top-{model['topk']}, {model['score_function']} scores",
        f"- token sample for expert outputs: {result['token_sample']} tokens, seed "
        f"{result['seed']}, silhouette with {result['silhouette_metric']} distance",
        f"- validation LM loss on these tokens: {_fmt(result['lm_loss'])}",
        f"- chance levels: routing overlap k/E = {_fmt(model['topk'] / model['num_experts'])}, "
        f"maximum routing entropy log E = {_fmt(math.log(model['num_experts']))}",
        "", "Definitions: `docs/analysis.md`.", "",
        "## Averaged over MoE layers", "", "| metric | mean | " +
        " | ".join(f"layer {layer['layer_number']}" for layer in layers) + " |",
        "| --- | --- |" + " --- |" * len(layers),
    ]
    for key in METRIC_LABELS:
        name = described(key).replace("|", "\\|")  # a bare | would end the table cell
        lines.append(f"| {name} | {_fmt(result['mean'].get(key))} | "
                     + " | ".join(_fmt(layer.get(key)) for layer in layers) + " |")
    lines += ["", "## Load per expert (share of assignments)", "",
              "| layer | " + " | ".join(f"e{e}" for e in range(model["num_experts"])) + " |",
              "| --- |" + " --- |" * model["num_experts"]]
    for layer in layers:
        lines.append(f"| {layer['layer_number']} | "
                     + " | ".join(f"{v:.3f}" for v in layer["load"]) + " |")
    for layer in layers:
        lines += ["", f"## Layer {layer['layer_number']}: domain x expert load", "",
                  "Share of each domain's assignments per expert (rows sum to 1).", "",
                  "| domain | tokens | " + " | ".join(f"e{e}" for e in
                                                    range(model["num_experts"])) + " |",
                  "| --- | --- |" + " --- |" * model["num_experts"]]
        for name, row, tokens in zip(result["domains"], layer["domain_expert_counts"],
                                     layer["tokens_per_domain"]):
            total = sum(row)
            shares = [v / total if total else 0.0 for v in row]
            lines.append(f"| {name} | {int(tokens)} | "
                         + " | ".join(f"{v:.3f}" for v in shares) + " |")
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _row_shares(counts):
    import numpy as np

    table = np.asarray(counts, dtype=float)
    return table / np.clip(table.sum(1, keepdims=True), 1e-30, None)


def write_plots(result: dict, out_dir: Path) -> list[str]:
    """Write the PNGs; returns their file names."""
    import numpy as np

    plt = pyplot()
    names = []
    layers = result["layers"]
    num_experts = result["model"]["num_experts"]
    experts = np.arange(num_experts)

    fig, axes = plt.subplots(len(layers), 1, figsize=(max(6, 0.4 * num_experts), 2.2 * len(layers)),
                             squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        ax.bar(experts, layer["load"], color="tab:blue")
        ax.axhline(1.0 / num_experts, color="k", linestyle="--", linewidth=0.8)
        ax.set_ylabel("load share")
        ax.set_title(f"layer {layer['layer_number']}: MaxVio {_fmt(layer['max_vio'])}", fontsize=9)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(out_dir / "load_per_expert.png", dpi=100)
    plt.close(fig)
    names.append("load_per_expert.png")

    for layer in layers:
        number = layer["layer_number"]
        shares = _row_shares(layer["domain_expert_counts"])
        fig, ax = plt.subplots(figsize=(max(5, 0.45 * num_experts + 2),
                                        0.45 * len(result["domains"]) + 1.5))
        im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xticks(experts)
        ax.set_yticks(np.arange(len(result["domains"])), labels=result["domains"])
        ax.set_xlabel("expert")
        ax.set_title(f"layer {number}: domain x expert load (NMI {_fmt(layer['domain_nmi'])})",
                     fontsize=9)
        fig.colorbar(im, ax=ax, label="share of domain's assignments")
        fig.tight_layout()
        name = f"domain_expert_layer{number}.png"
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        names.append(name)

        fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
        for ax, key, title in ((axes[0], "output_similarity", "expert outputs"),
                               (axes[1], "weight_similarity", "expert weights")):
            matrix = layer.get(key)
            if matrix is None:
                ax.set_axis_off()
                continue
            im = ax.imshow(np.asarray(matrix, dtype=float), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_title(f"layer {number}: cosine, {title} "
                         f"(mean {_fmt(layer[key + '_mean'])})", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("expert")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        name = f"similarity_layer{number}.png"
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def write_report(result: dict, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write JSON, Markdown and (with ``plots``) PNGs into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = write_plots(result, out) if plots else []
    paths = {"json": write_json(result, out / "specialization.json")}
    md = out / "specialization.md"
    md.write_text(markdown(finite_or_none(result), images))
    paths["markdown"] = md
    paths.update({name: out / name for name in images})
    return paths
