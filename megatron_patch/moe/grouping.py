"""Which combined expert-output rows belong to which token: the [T, k] slot map L_o reads them by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TokenSlots:
    """Where each token's expert-output rows are.

    rows: [T, k] int64; token t's row indices in slots 0..n_t-1, in the rows' original relative
        order, and -1 in the remaining slots (a token that lost experts to capacity dropping).
    dense: every slot is filled (dropless routing), known without a device sync.
    covers_all_rows: every row is in a slot (no ``valid`` mask left capacity padding out).
    """

    rows: torch.Tensor
    dense: bool
    covers_all_rows: bool

    @property
    def filled(self) -> torch.Tensor:
        """[T, k] bool, the slots that hold a row."""
        return self.rows >= 0


def token_slot_rows(
    row_to_token: torch.Tensor,
    num_tokens: int,
    topk: int,
    valid: Optional[torch.Tensor] = None,
) -> TokenSlots:
    """Assign each token's rows to its k slots.

    Args:
        row_to_token: [N] int64, the token each row belongs to (rows in any order, e.g. the
            dispatcher's permuted order).
        num_tokens: T, number of tokens owned by this rank.
        topk: k, the maximum number of rows per token.
        valid: optional [N] bool; False marks padding rows (capacity padding) to leave out.

    Returns:
        The slot map; ``dense`` when there are exactly k rows per token and no ``valid`` mask.
    """
    num_rows = row_to_token.shape[0]
    device = row_to_token.device
    if valid is None and num_rows == num_tokens * topk:
        # Dropless routing: every token has exactly k rows.
        slot_rows = torch.argsort(row_to_token, stable=True).view(num_tokens, topk)
        return TokenSlots(slot_rows, dense=True, covers_all_rows=True)
    row_ids = torch.arange(num_rows, device=device)
    if valid is not None:
        row_ids = row_ids[valid]
        row_to_token = row_to_token[valid]
    order = torch.argsort(row_to_token, stable=True)
    sorted_tokens = row_to_token.index_select(0, order)
    counts = torch.bincount(sorted_tokens, minlength=num_tokens)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(order.shape[0], device=device) - starts.index_select(0, sorted_tokens)
    slot_rows = torch.full((num_tokens, topk), -1, dtype=torch.int64, device=device)
    slot_rows[sorted_tokens, slots] = row_ids.index_select(0, order)
    return TokenSlots(slot_rows, dense=False, covers_all_rows=valid is None)


class _PermuteRows(torch.autograd.Function):
    """``rows[perm]`` for a permutation ``perm`` of the rows. Its backward gathers the gradient
    with the inverse permutation instead of index_select's scatter-add into a zero-filled
    tensor (atomics on GPU, a serial scatter on CPU)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(perm)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (perm,) = ctx.saved_tensors
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return grad.index_select(0, inverse), None


def gather_slots(rows: torch.Tensor, slots: TokenSlots) -> torch.Tensor:
    """[N, H] rows -> [T, k, H] by slot, zero rows in empty slots (differentiable).

    Args:
        rows: [N, H] expert outputs.
        slots: from ``token_slot_rows``.
    """
    num_tokens, topk = slots.rows.shape
    if slots.dense:  # the slot map is a permutation of the rows
        return _PermuteRows.apply(rows, slots.rows.reshape(-1)).view(num_tokens, topk, -1)
    filled = slots.filled
    grouped = rows.new_zeros(num_tokens, topk, rows.shape[1])
    return grouped.index_put((filled,), rows.index_select(0, slots.rows[filled]))
