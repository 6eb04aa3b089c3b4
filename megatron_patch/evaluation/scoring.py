"""Is a model's answer right? One function per metric of ``items.METRICS``.

- ``exact``: the generated text, whitespace collapsed and stripped, equals the answer
  (case-sensitive: string tasks such as reversing a word depend on case);
- ``numeric``: the first number in the generated text equals the answer's number;
- ``choice``: the choice of highest log-likelihood is the answer (ties: the first such choice);
- ``execution``: the item's own check (HumanEval's tests) passes on the completion.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from megatron_patch.evaluation.items import CHOICE, EXACT, NUMBER, NUMERIC, EvalItem


def normalize(text: str) -> str:
    """Whitespace runs collapsed to one space, stripped."""
    return " ".join(text.split())


def first_number(text: str) -> Optional[float]:
    """The first number in ``text`` (an integer or decimal, signed), or None."""
    match = NUMBER.search(text)
    return float(match.group()) if match else None


def generation_correct(item: EvalItem, generated: str) -> bool:
    """Whether ``generated`` answers ``item`` (``exact`` or ``numeric``)."""
    if item.metric == EXACT:
        return normalize(generated) == normalize(item.answer)
    if item.metric == NUMERIC:
        value = first_number(generated)
        return value is not None and math.isclose(value, float(item.answer), rel_tol=0,
                                                  abs_tol=1e-9)
    raise ValueError(f"{item.metric!r} is not a generation metric")


def chosen(item: EvalItem, loglikelihoods: Sequence[float]) -> str:
    """The choice with the highest log-likelihood (the first of equals)."""
    if item.metric != CHOICE or item.choices is None or len(loglikelihoods) != len(item.choices):
        raise ValueError("chosen() needs a choice item and one log-likelihood per choice")
    best = max(range(len(item.choices)), key=lambda i: (loglikelihoods[i], -i))
    return item.choices[best]
