"""Evaluation items: one JSON object per line of a task file.

    {"prompt": "...", "answer": "...", "task": "arithmetic"}                  generated, scored
    {"prompt": "...", "answer": "B", "choices": ["A", "B", "C"], "task": ...}  log-likelihood
    {"prompt": "...", "answer": "...", "metric": "exact"}                      metric named

``task`` defaults to the file's name (without ``.jsonl``). The metric of an item (``METRICS``):
``choice`` when it has ``choices`` (the answer must be one of them), else ``numeric`` when the
answer is a number, else ``exact``; a ``metric`` field overrides that (``execution`` items come
from ``megatron_patch.evaluation.humaneval``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional

EXACT, NUMERIC, CHOICE, EXECUTION = "exact", "numeric", "choice", "execution"
METRICS = (EXACT, NUMERIC, CHOICE, EXECUTION)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


class TaskFileError(ValueError):
    """A task file that cannot be read; the message names the file, the line and the fix."""


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One question. ``chat``: render ``prompt`` as a user turn with the tokenizer's chat
    template (instruction-tuned models); False feeds it as raw text (code completion).
    ``extra``: what a metric needs besides the answer (HumanEval's tests)."""

    prompt: str
    answer: str
    task: str
    metric: str
    choices: Optional[tuple[str, ...]] = None
    chat: bool = True
    extra: Optional[dict[str, Any]] = None


def default_metric(answer: str, choices: Optional[list[str]]) -> str:
    """``choice`` with choices, ``numeric`` for a numeric answer, else ``exact``."""
    if choices is not None:
        return CHOICE
    return NUMERIC if NUMBER.fullmatch(answer.strip()) else EXACT


def _item(record: Any, task: str, where: str) -> EvalItem:
    if not isinstance(record, dict):
        raise TaskFileError(f"{where}: not a JSON object")
    missing = [key for key in ("prompt", "answer") if not isinstance(record.get(key), str)]
    if missing:
        raise TaskFileError(f"{where}: no string {' or '.join(repr(k) for k in missing)}; every "
                            "item needs \"prompt\" and \"answer\"")
    choices = record.get("choices")
    if choices is not None:
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) for c in choices)):
            raise TaskFileError(f"{where}: \"choices\" must be a list of at least two strings")
        if record["answer"] not in choices:
            raise TaskFileError(f"{where}: the answer {record['answer']!r} is not one of its "
                                "choices")
    metric = record.get("metric") or default_metric(record["answer"], choices)
    if metric not in (EXACT, NUMERIC, CHOICE) or (metric == CHOICE) != (choices is not None):
        raise TaskFileError(f"{where}: metric {metric!r}: use exact or numeric, or choice with "
                            "\"choices\"")
    if metric == NUMERIC and not NUMBER.fullmatch(record["answer"].strip()):
        raise TaskFileError(f"{where}: numeric metric, but the answer {record['answer']!r} is "
                            "not a number")
    return EvalItem(prompt=record["prompt"], answer=record["answer"],
                    task=str(record.get("task") or task), metric=metric,
                    choices=tuple(choices) if choices is not None else None)


def load_items(path: str | Path) -> list[EvalItem]:
    """The items of one task file (see the module docstring).

    Raises:
        TaskFileError: no such file, an empty file, or a bad line (named with its number).
    """
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file {path} not found")
    task = path.name.removesuffix(".jsonl")
    items = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskFileError(f"{where}: not JSON ({error.msg})") from None
            items.append(_item(record, task, where))
    if not items:
        raise TaskFileError(f"{path}: no items")
    return items
