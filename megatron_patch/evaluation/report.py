"""Per-task scores of an evaluation, as a dict, JSON and Markdown.

Per task: items, correct, accuracy, and the answer loss (the reference answers' negative
log-likelihood per token, summed over the task's items and divided by their tokens: the
validation loss restricted to the answers). Overall: the mean accuracy over tasks (each task
weighs the same) and over items.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from megatron_patch.evaluation.runner import ItemResult

RESULTS_JSON, RESULTS_MD = "evaluation.json", "evaluation.md"


def task_scores(results: Sequence[ItemResult]) -> dict[str, dict[str, Any]]:
    """task -> {"metric", "items", "correct", "accuracy", "answer_loss"} (tasks sorted)."""
    by_task: dict[str, list[ItemResult]] = defaultdict(list)
    for result in results:
        by_task[result.task].append(result)
    scores = {}
    for task in sorted(by_task):
        rows = by_task[task]
        tokens = sum(r.answer_tokens or 0 for r in rows)
        nll = sum(r.answer_nll or 0.0 for r in rows)
        scores[task] = {
            "metric": "/".join(sorted({r.metric for r in rows})),
            "items": len(rows),
            "correct": sum(r.correct for r in rows),
            "accuracy": sum(r.correct for r in rows) / len(rows),
            "answer_loss": nll / tokens if tokens else None,
        }
    return scores


def summary(results: Sequence[ItemResult], model: str) -> dict[str, Any]:
    """The whole report: model, per-task scores, overall accuracies, every item."""
    scores = task_scores(results)
    return {
        "model": model,
        "tasks": scores,
        "overall": {
            "tasks": len(scores),
            "items": len(results),
            "mean_task_accuracy": (sum(s["accuracy"] for s in scores.values()) / len(scores)
                                   if scores else None),
            "item_accuracy": sum(r.correct for r in results) / len(results) if results else None,
        },
        "items": [dataclasses.asdict(r) for r in results],
    }


def markdown(report: dict[str, Any]) -> str:
    """The per-task table of ``summary``'s report."""
    lines = [f"# Evaluation of {report['model']}", "",
             "| task | metric | items | correct | accuracy | answer loss (nats/token) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for task, score in report["tasks"].items():
        loss = "-" if score["answer_loss"] is None else f"{score['answer_loss']:.4f}"
        lines.append(f"| {task} | {score['metric']} | {score['items']} | {score['correct']} | "
                     f"{score['accuracy']:.4f} | {loss} |")
    overall = report["overall"]
    lines += ["", f"Mean accuracy over {overall['tasks']} tasks: "
              f"{overall['mean_task_accuracy']:.4f}; over {overall['items']} items: "
              f"{overall['item_accuracy']:.4f}.", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """``evaluation.json`` and ``evaluation.md`` in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_JSON).write_text(json.dumps(report, indent=1) + "\n")
    (output_dir / RESULTS_MD).write_text(markdown(report))
    return output_dir / RESULTS_JSON, output_dir / RESULTS_MD
