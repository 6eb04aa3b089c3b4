"""A DeepSpeed ``TopKGate`` that also returns the routing scores of all experts (for L_v)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, multiplicative_jitter, top1gating, top2gating, topkgating


class SpecializationTopKGate(TopKGate):
    """``TopKGate`` whose forward returns ``(gate_output, scores)``.

    ``gate_output`` is exactly what ``TopKGate.forward`` returns (DeepSpeed's top-1 / top-2 /
    top-k gating on the same logits, same capacity and dropping); ``scores`` [S, E] float32 are
    the softmax over all E experts of those logits, before top-k, i.e. the ``gates`` DeepSpeed
    computes first. Process groups: none of its own; with ``drop_tokens=False`` DeepSpeed's gating
    all-reduces the capacity (MAX) over ``self.ep_group``.
    """

    @classmethod
    def from_gate(cls, gate: TopKGate) -> "SpecializationTopKGate":
        """The same gate (settings, ``wg`` parameter, ep_group) as this class; no new init."""
        converted = cls.__new__(cls)
        converted.__dict__.update(gate.__dict__)
        return converted

    def forward(  # type: ignore[override]
        self,
        input: torch.Tensor,
        used_token: Optional[torch.Tensor] = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ) -> tuple[tuple, torch.Tensor]:
        """Route S tokens.

        Args:
            input: [S, M] tokens.
            used_token: optional [S] mask (top-1 gating only, as in DeepSpeed).
            sparse_routes: DeepSpeed's sparse route format (what ``MOELayer`` uses).
            use_tutel: Tutel's cumsum in top-1 gating.

        Returns:
            ``(gate_output, scores)``: DeepSpeed's gating tuple and [S, E] float32 scores.
        """
        input_fp32 = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            input_fp32 = multiplicative_jitter(input_fp32, device=input.device)
        logits = F.linear(input_fp32, weight=self.wg.weight.float(), bias=None)
        scores = F.softmax(logits, dim=1)
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            noisy_gate_policy = self.noisy_gate_policy if self.training else None
            gate_output = top1gating(logits, capacity_factor, self.min_capacity, used_token,
                                     noisy_gate_policy, self.drop_tokens, self.use_rts, self.ep_group,
                                     sparse_routes, use_tutel)
        elif self.k == 2:
            gate_output = top2gating(logits, capacity_factor, self.min_capacity, self.drop_tokens,
                                     self.ep_group, self.top2_2nd_expert_sampling, sparse_routes)
        else:
            gate_output = topkgating(logits, self.k, capacity_factor, self.min_capacity,
                                     self.drop_tokens, self.ep_group, sparse_routes=sparse_routes)
        return gate_output, scores
