"""Downstream evaluation of a model on task files: greedy generation (exact / numeric match),
log-likelihood choice among options, execution (HumanEval); per-task accuracy and answer loss,
identical in one process and under data parallelism (``tools/evaluate.py``)."""

from megatron_patch.evaluation.items import METRICS, EvalItem, TaskFileError, load_items
from megatron_patch.evaluation.report import summary, task_scores, write_report
from megatron_patch.evaluation.runner import ItemResult, evaluate

__all__ = ["METRICS", "EvalItem", "ItemResult", "TaskFileError", "evaluate", "load_items",
           "summary", "task_scores", "write_report"]
