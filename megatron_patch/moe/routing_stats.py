"""Routing statistics of training steps: load per expert, MaxVio and routing entropy, per MoE layer.

A ``RoutingStatistics`` object is attached to the routers of a model (``attach``); each router then
adds the local counts of its *training* forwards (module in training mode, autograd enabled, not
calibrating) to it, without any collective; padding tokens are not counted. Evaluation, coefficient calibration and the no-grad
first pass of activation recomputation are not counted, so the statistics of a step are those of
its training tokens, each counted once. ``reduce`` sums the counts over every rank that routes
tokens of the same layer (TP x DP x CP) and over the pipeline stages, so every rank ends with the
global values of the step.

    load_e   = number of (token, expert e) assignments
    MaxVio   = max_e |load_e - mean_e load_e| / mean_e load_e     (0 = perfectly balanced)
    entropy  = mean over tokens of -sum_e p_e log p_e, p = normalized routing scores
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection


class RoutingStatistics:
    """Per-layer routing counts of this rank, accumulated over the forwards of one step.

    Args:
        num_layers: transformer layers of the whole model (rows are indexed by global layer).
        num_experts: routed experts per MoE layer.
        device: where the accumulators live (the model's device).
    """

    def __init__(self, num_layers: int, num_experts: int, device: torch.device) -> None:
        self.num_experts = num_experts
        # [num_layers, E + 2] float64: tokens per expert, entropy sum, token count.
        self.counts = torch.zeros(num_layers, num_experts + 2, dtype=torch.float64, device=device)

    def attach(self, model_chunks: Iterable[torch.nn.Module]) -> "RoutingStatistics":
        """Make every specialization router of ``model_chunks`` record into this object."""
        from megatron_patch.moe.router import SpecializationRouter

        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, SpecializationRouter):
                    module.routing_statistics = self
        return self

    @torch.no_grad()
    def record(self, layer_number: int, routing_map: torch.Tensor, scores: torch.Tensor,
               padding_mask: Optional[torch.Tensor] = None) -> None:
        """Add one micro-batch of one layer (this rank's tokens).

        Args:
            layer_number: 1-based global layer number.
            routing_map: [T, E] bool, the experts each token is sent to.
            scores: [T, E] routing scores of all experts (normalized here).
            padding_mask: optional [T] bool, True for padding tokens (not counted).
        """
        p = scores.double()
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        row = self.counts[layer_number - 1]
        if padding_mask is None:
            row[: self.num_experts] += routing_map.sum(0).double()
            row[-2] += entropy.sum()
            row[-1] += scores.shape[0]
            return
        # Masked by multiplication, not indexing: no device-to-host sync in the forward.
        valid = ~padding_mask.reshape(-1)
        row[: self.num_experts] += (routing_map & valid[:, None]).sum(0).double()
        row[-2] += (entropy * valid).sum()
        row[-1] += valid.sum()

    def reduce(self, pg_collection: ProcessGroupCollection) -> dict[str, torch.Tensor]:
        """Collective over all ranks: the step's global per-layer statistics; then resets.

        Sums over ``pg_collection.tp_dp_cp`` (sequence, data and context shards of a layer hold
        different tokens) and ``pg_collection.pp`` (each stage fills only its own layers' rows).

        Returns:
            ``load`` [L_moe, E] assignment fractions per expert, ``max_vio`` [L_moe], ``entropy``
            [L_moe], for the layers that routed tokens (the MoE layers), in layer order.
        """
        packed = self.counts.clone()
        self.counts.zero_()
        dist.all_reduce(packed, group=pg_collection.tp_dp_cp)
        dist.all_reduce(packed, group=pg_collection.pp)
        counts, entropy_sum, num_tokens = (
            packed[:, : self.num_experts], packed[:, -2], packed[:, -1]
        )
        moe = num_tokens > 0
        counts, entropy_sum, num_tokens = counts[moe], entropy_sum[moe], num_tokens[moe]
        mean = counts.mean(1, keepdim=True)
        return {
            "load": (counts / counts.sum(1, keepdim=True)).float(),
            "max_vio": ((counts - mean).abs().max(1).values / mean.squeeze(1)).float(),
            "entropy": (entropy_sum / num_tokens).float(),
        }


def is_training_forward(module: torch.nn.Module) -> bool:
    """A forward that trains: the module is in training mode and autograd records it.

    False in evaluation, under ``torch.no_grad`` (coefficient calibration, the first pass of
    activation recomputation, whose recomputation runs again with autograd).
    """
    return module.training and torch.is_grad_enabled()

