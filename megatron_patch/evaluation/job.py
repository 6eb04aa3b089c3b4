"""One evaluation job (``tools/evaluate.py``): a model, task files, a report.

The model is a Hugging Face checkpoint directory (``hf``) or a checkpoint saved by the trainer
(``load``), exported first into ``<output_dir>/hf_export`` (``megatron_patch.hf.export``; one
process). Under torchrun (``WORLD_SIZE`` > 1) the items are split over the processes (gloo
process group; see ``runner``); rank 0 writes the report.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_patch.evaluation.items import EvalItem, TaskFileError, load_items
from megatron_patch.evaluation.report import summary, write_report
from megatron_patch.evaluation.runner import evaluate

EXPORT_DIR = "hf_export"


@dataclasses.dataclass
class EvaluationOptions:
    """hf / load: the model (one of them). tasks: task files. humaneval: also HumanEval's first
    N problems (0: none; None: all 164)."""

    output_dir: str
    hf: Optional[str] = None
    load: Optional[str] = None
    tasks: list[str] = dataclasses.field(default_factory=list)
    humaneval: Optional[int] = 0
    batch_size: int = 16
    max_new_tokens: int = 32
    progress: bool = True


def _items(options: EvaluationOptions) -> list[EvalItem]:
    items = [item for path in options.tasks for item in load_items(path)]
    if options.humaneval is None or options.humaneval > 0:
        from megatron_patch.evaluation.humaneval import humaneval_items

        items += humaneval_items(options.humaneval)
    if not items:
        raise TaskFileError("nothing to evaluate: give --tasks FILE ... and/or --humaneval")
    return items


def _model_dir(options: EvaluationOptions, world_size: int) -> str:
    if (options.hf is None) == (options.load is None):
        raise TaskFileError("give the model as --hf DIR (a Hugging Face checkpoint) or --load "
                            "DIR (a checkpoint saved by the trainer), one of them")
    if options.hf is not None:
        if not (Path(options.hf) / "config.json").is_file():
            raise TaskFileError(f"--hf {options.hf}: no config.json there; give a Hugging Face "
                                "checkpoint directory (tools/export_hf.py writes one)")
        return options.hf
    if world_size > 1:
        raise TaskFileError("--load exports the checkpoint in one process: run it without "
                            "torchrun, or export with tools/export_hf.py and evaluate the export "
                            "with --hf under torchrun")
    from megatron_patch.distributed import shutdown
    from megatron_patch.hf.export import export_saved_checkpoint

    try:
        return str(export_saved_checkpoint(options.load, str(Path(options.output_dir) /
                                                              EXPORT_DIR)))
    finally:
        shutdown()


def run_evaluation(options: EvaluationOptions) -> dict[str, Any]:
    """Evaluate and (rank 0) write ``evaluation.json`` / ``evaluation.md`` to the output
    directory; returns the report (on every rank).

    Raises:
        TaskFileError: bad task files or model arguments (the message names the fix);
        megatron_patch.hf.HFImportError / AnalysisError: a checkpoint that does not export.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    items = _items(options)  # bad task files fail before any model is loaded
    model_dir = _model_dir(options, world_size)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    from megatron_patch.evaluation.models import HFModel

    check = None
    if any(item.task == "humaneval" for item in items):
        from megatron_patch.evaluation.humaneval import passes as check
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = evaluate(HFModel(model_dir, device), items, batch_size=options.batch_size,
                       max_new_tokens=options.max_new_tokens, execution_check=check,
                       progress=options.progress)
    report = summary(results, model_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_report(report, options.output_dir)
    return report
