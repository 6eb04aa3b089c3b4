"""Evaluate a ``LanguageModel`` on items: the same numbers in one process and under data
parallelism.

The work is cut into batches of ``batch_size`` requests in item order, independently of the
number of processes: generation batches (``exact``, ``numeric`` and ``execution`` items) and
log-likelihood batches (every choice of a ``choice`` item, and the reference answer of every
other non-execution item, whose negative log-likelihood per token is reported as the answer
loss). Batch ``j`` runs on rank ``j mod world size``; the results are gathered over the default
process group (``all_gather_object``) so every rank returns all of them. Each batch is computed
by the same code on the same inputs whatever the world size, so the numbers are identical
(they depend on ``batch_size``: padding changes float rounding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch.distributed as dist
from tqdm import tqdm

from megatron_patch.evaluation.items import CHOICE, EXECUTION, EvalItem
from megatron_patch.evaluation.models import LanguageModel
from megatron_patch.evaluation.scoring import chosen, generation_correct

# An execution item's check: (item, completion) -> passed.
ExecutionCheck = Callable[[EvalItem, str], bool]


@dataclasses.dataclass
class ItemResult:
    """One item's outcome. prediction: the generated answer, or the chosen choice.
    answer_nll / answer_tokens: negative log-likelihood (nats, summed) and length of the
    reference answer (None for execution items)."""

    task: str
    metric: str
    prompt: str
    answer: str
    prediction: str
    correct: bool
    answer_nll: Optional[float]
    answer_tokens: Optional[int]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batches(requests: list, size: int) -> list[list]:
    return [requests[i:i + size] for i in range(0, len(requests), size)]


def evaluate(model: LanguageModel, items: Sequence[EvalItem], *, batch_size: int = 16,
             max_new_tokens: int = 32, execution_check: Optional[ExecutionCheck] = None,
             progress: bool = True) -> list[ItemResult]:
    """Every item's result, in item order, on every rank (collective over the default process
    group when one exists).

    Raises:
        ValueError: execution items without ``execution_check``.
    """
    if any(item.metric == EXECUTION for item in items) and execution_check is None:
        raise ValueError("execution items need an execution_check (see evaluation.humaneval)")
    generation = [i for i, item in enumerate(items) if item.metric != CHOICE]
    scoring = [(i, choice) for i, item in enumerate(items) if item.metric == CHOICE
               for choice in item.choices]
    scoring += [(i, items[i].answer) for i in generation if items[i].metric != EXECUTION]
    work = ([("generate", batch) for batch in _batches(generation, batch_size)]
            + [("score", batch) for batch in _batches(scoring, batch_size)])
    rank, world = _world()
    mine = list(range(rank, len(work), world))
    done: dict[int, Any] = {}
    for j in tqdm(mine, desc="evaluate", disable=not progress or rank != 0, unit="batch"):
        kind, batch = work[j]
        if kind == "generate":
            texts = model.generate([items[i] for i in batch], max_new_tokens)
            done[j] = [(text, execution_check(items[i], text) if items[i].metric == EXECUTION
                        else generation_correct(items[i], text))
                       for i, text in zip(batch, texts)]
        else:
            done[j] = model.loglikelihoods([items[i] for i, _ in batch],
                                           [text for _, text in batch])
    if world > 1:
        gathered: list[Optional[dict]] = [None] * world
        dist.all_gather_object(gathered, done)
        done = {j: value for part in gathered for j, value in part.items()}
    return _results(items, work, done)


def _results(items: Sequence[EvalItem], work: list, done: dict[int, Any]) -> list[ItemResult]:
    generated: dict[int, tuple[str, bool]] = {}
    loglik: dict[tuple[int, str], tuple[float, int]] = {}
    for j, (kind, batch) in enumerate(work):
        if kind == "generate":
            generated.update(zip(batch, done[j]))
        else:
            loglik.update(zip(((i, text) for i, text in batch), done[j]))
    results = []
    for i, item in enumerate(items):
        if item.metric == CHOICE:
            prediction = chosen(item, [loglik[i, choice][0] for choice in item.choices])
            correct = prediction == item.answer
        else:
            prediction, correct = generated[i]
        reference = loglik.get((i, item.answer))
        results.append(ItemResult(
            task=item.task, metric=item.metric, prompt=item.prompt, answer=item.answer,
            prediction=prediction, correct=bool(correct),
            answer_nll=None if reference is None else -reference[0],
            answer_tokens=None if reference is None else reference[1]))
    return results
