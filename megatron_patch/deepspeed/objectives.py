"""Per-rank sums and counts of L_o and L_v for one DeepSpeed MoE layer (no communication)."""

from __future__ import annotations

import torch

from megatron_patch.moe.losses import orthogonality_loss_per_slot, routing_variance_per_token


def ortho_sum(routed: torch.Tensor, kept: torch.Tensor, form: str, eps: float,
              normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the L_o slot penalties of this rank's tokens.

    Args:
        routed: [k, S, M] unweighted expert outputs per route and token (zero rows for dropped
            routes, see ``routes.gather_routes``).
        kept: [k, S] bool, False for routes dropped over capacity.
        form: ``"span"`` or ``"pairwise"`` (``megatron_patch.moe.losses``).
        eps: regularizer of the form.
        normalize: penalize the unit-normalized outputs (scale-free).

    Returns:
        (sum over kept slots of the per-slot penalty (float32, graph-attached to ``routed``),
        number of kept slots (int64)). A zero row changes no other slot's value, so a token that
        lost routes counts only its kept ones, against its kept experts.
    """
    per_slot = orthogonality_loss_per_slot(  # [S, k]
        routed.transpose(0, 1), form=form, eps=eps, normalize=normalize
    )
    kept_slots = kept.t()
    return per_slot.masked_fill(~kept_slots, 0.0).sum(), kept_slots.sum()


def variance_sum(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over this rank's tokens of -Var_e(scores[t]) (unbiased) and the token count.

    Args:
        scores: [S, E] softmax routing scores of all experts, before top-k.

    Returns:
        (float32 scalar graph-attached to ``scores``, int64 scalar S).
    """
    negative_variance = -routing_variance_per_token(scores).sum()
    return negative_variance, torch.tensor(scores.shape[0], dtype=torch.int64, device=scores.device)
