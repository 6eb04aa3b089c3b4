"""Expert outputs back in token order: DeepSpeed's [E, C, M] buffer regrouped per token and route.

DeepSpeed 0.19's ``MOELayer`` no longer multiplies dense ``combine_weights`` [S, E, C]; its gate
returns each route's expert ``indices`` and capacity ``locations`` ([k, S] each, the non-zero
positions of the old ``dispatch_mask``), with ``indices == -1`` for a route dropped over capacity.
``deepspeed.moe.sharded_moe._route_slots`` turns them into flat slots ``e * C + c`` of the
[E * C] buffer, parking dropped routes on one scratch slot ``E * C`` that reads a zero row.
Capacity slots no route points at (empty padding) are never read.
"""

from __future__ import annotations

import torch


def gather_routes(expert_output: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Unweighted expert outputs of every (route, token).

    Args:
        expert_output: [E, C, M] expert outputs after the second all-to-all (token owner's rank).
        slots: [k, S] int64 flat slots from ``_route_slots`` (``E * C`` for dropped routes).

    Returns:
        [k, S, M]: row (i, s) is the output of token s's i-th routed expert, not multiplied by its
        gate; a zero row for a dropped route.
    """
    num_routes, num_tokens = slots.shape
    d_model = expert_output.size(-1)
    flat = expert_output.reshape(-1, d_model)
    padded = torch.cat([flat, flat.new_zeros(1, d_model)])
    return padded.index_select(0, slots.reshape(-1)).view(num_routes, num_tokens, d_model)


def combine_routes(routed: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The MoE output: sum over routes of gate * output, as ``sharded_moe._sparse_decode`` does.

    Args:
        routed: [k, S, M] unweighted outputs from ``gather_routes``.
        gates: [k, S] float32 normalized gate values (0 for dropped routes).

    Returns:
        [S, M] in ``routed``'s dtype (accumulated in float32).
    """
    return (routed * gates.unsqueeze(-1)).sum(0).to(routed.dtype)
