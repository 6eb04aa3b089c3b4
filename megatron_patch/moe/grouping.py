"""Regroup combined expert-output rows by token: the [T, k, H] layout the orthogonality loss needs."""

from __future__ import annotations

from typing import Optional

import torch


def group_rows_by_token(
    rows: torch.Tensor,
    row_to_token: torch.Tensor,
    num_tokens: int,
    topk: int,
    valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each token's expert-output rows into k slots.

    Args:
        rows: [N, H] expert outputs in any row order (the dispatcher's permuted order).
        row_to_token: [N] int64, the token each row belongs to.
        num_tokens: T, number of tokens owned by this rank.
        topk: k, the maximum number of rows per token.
        valid: optional [N] bool; False marks padding rows (capacity padding) to leave out.

    Returns:
        grouped: [T, k, H]; token t's rows in slots 0..n_t-1 in their original relative order,
            zero rows in the remaining slots (a token that lost experts to capacity dropping).
        filled: [T, k] bool, the slots that hold a row.
    """
    if valid is not None:
        rows = rows[valid]
        row_to_token = row_to_token[valid]
    num_rows, hidden = rows.shape
    order = torch.argsort(row_to_token, stable=True)
    if valid is None and num_rows == num_tokens * topk:
        # Dropless routing: every token has exactly k rows.
        filled = torch.ones(num_tokens, topk, dtype=torch.bool, device=rows.device)
        return rows.index_select(0, order).view(num_tokens, topk, hidden), filled
    sorted_tokens = row_to_token.index_select(0, order)
    counts = torch.bincount(sorted_tokens, minlength=num_tokens)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(num_rows, device=rows.device) - starts.index_select(0, sorted_tokens)
    grouped = rows.new_zeros(num_tokens, topk, hidden)
    grouped = grouped.index_put((sorted_tokens, slots), rows.index_select(0, order))
    filled = torch.zeros(num_tokens, topk, dtype=torch.bool, device=rows.device)
    filled[sorted_tokens, slots] = True
    return grouped, filled
