"""Routing statistics for logging: load per expert, MaxVio and routing entropy, per MoE layer.

The router records local counts (no collective) while recording is enabled; ``reduce_routing_stats``
sums them over every rank that routes tokens of the same layer (TP x DP x CP) and gathers the layers
of all pipeline stages, so every rank ends with the global values of the step.

    load_e   = number of (token, expert e) assignments
    MaxVio   = max_e |load_e - mean_e load_e| / mean_e load_e     (0 = perfectly balanced)
    entropy  = mean over tokens of -sum_e p_e log p_e, p = normalized routing scores
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass
class _Accumulators:
    tokens_per_expert: torch.Tensor  # [num_layers, E] float64
    entropy_sum: torch.Tensor  # [num_layers] float64
    num_tokens: torch.Tensor  # [num_layers] float64


_ACC: Optional[_Accumulators] = None


def enable_routing_stats(num_layers: int, num_experts: int, device: torch.device) -> None:
    """Start (or restart) recording; zeroes the accumulators."""
    global _ACC
    _ACC = _Accumulators(
        torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device),
        torch.zeros(num_layers, dtype=torch.float64, device=device),
        torch.zeros(num_layers, dtype=torch.float64, device=device),
    )


def disable_routing_stats() -> None:
    global _ACC
    _ACC = None


def routing_stats_enabled() -> bool:
    return _ACC is not None


@torch.no_grad()
def record_routing(layer_number: int, routing_map: torch.Tensor, scores: torch.Tensor) -> None:
    """Accumulate one micro-batch of one layer (local tokens only).

    Args:
        layer_number: 1-based global layer number.
        routing_map: [T, E] bool, the experts each token is sent to.
        scores: [T, E] routing scores of all experts (normalized here).
    """
    if _ACC is None or layer_number is None:
        return
    row = layer_number - 1
    _ACC.tokens_per_expert[row] += routing_map.sum(0).double()
    p = scores.double()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    _ACC.entropy_sum[row] += -(p * p.clamp_min(1e-30).log()).sum()
    _ACC.num_tokens[row] += scores.shape[0]


def reduce_routing_stats() -> dict[str, torch.Tensor]:
    """Collective over all ranks: global per-layer statistics of what was recorded; resets.

    Returns:
        ``load`` [L_moe, E] assignment fractions per expert, ``max_vio`` [L_moe],
        ``entropy`` [L_moe], for the MoE layers only (layers that routed tokens), in layer order.
    """
    assert _ACC is not None, "enable_routing_stats() first"
    packed = torch.cat(
        [_ACC.tokens_per_expert, _ACC.entropy_sum.unsqueeze(1), _ACC.num_tokens.unsqueeze(1)], 1
    )
    # Sequence/data/context shards of the same layer hold different tokens: sum them.
    dist.all_reduce(
        packed, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    )
    # Each pipeline stage filled only its own layers' rows.
    dist.all_reduce(packed, group=parallel_state.get_pipeline_model_parallel_group())
    num_experts = _ACC.tokens_per_expert.shape[1]
    enable_routing_stats(packed.shape[0], num_experts, packed.device)
    counts, entropy_sum, num_tokens = packed[:, :num_experts], packed[:, -2], packed[:, -1]
    moe = num_tokens > 0
    counts, entropy_sum, num_tokens = counts[moe], entropy_sum[moe], num_tokens[moe]
    mean = counts.mean(1, keepdim=True)
    return {
        "load": (counts / counts.sum(1, keepdim=True)).float(),
        "max_vio": ((counts - mean).abs().max(1).values / mean.squeeze(1)).float(),
        "entropy": (entropy_sum / num_tokens).float(),
    }
