"""Alltoall token dispatcher that returns unweighted expert outputs to the token's owner.

megatron-core 0.16.1 multiplies the gate probability into the expert activation before fc2, so the
rows that travel back through combine are already weighted. The orthogonality loss needs the
unweighted outputs, without a gradient path into the router. This dispatcher hands the experts
unit gates, and applies the real gates on the owner rank after the combine all-to-all, just before
megatron-core's un-permutation; for experts without fc2 bias (and with it, since megatron scales
the fc2 bias by the gate too) the layer output is the same function as megatron-core's.
No collective is added; the gate probabilities' dispatch all-to-all is dropped.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_patch.compat import TOKEN_DISPATCH_RUNS_SHARED_EXPERT, expert_all_to_all

from megatron_patch.moe.gated_gram import apply_gates
from megatron_patch.moe.grouping import TokenSlots, token_slot_rows


class UnweightedCombineAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """MoEAlltoAllTokenDispatcher whose combine output rows are the experts' unweighted outputs.

    Between ``token_combine`` and ``combine_postprocess`` the caller holds, on the rank that owns
    the tokens, one row per (token, routed expert) in this rank's permuted order. It may read
    them by token through ``token_slots`` and must weight them with their gates
    (``apply_gates``, or ``megatron_patch.moe.gated_gram.gated_gram`` with ``local_permuted_probs``).
    """

    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ):
        tokens, permuted_probs = super().dispatch_preprocess(hidden_states, routing_map, probs)
        # [N] gates of this rank's permuted rows, in the order token_combine returns them.
        self.local_permuted_probs = permuted_probs
        return tokens, permuted_probs

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        """The tokens' expert-parallel all-to-all only: the experts get unit gates, so the gate
        probabilities need not travel (one all-to-all per layer fewer than megatron-core).
        Where megatron-core starts the overlapped shared expert here (0.18+), so does this."""
        shared = self.shared_experts if TOKEN_DISPATCH_RUNS_SHARED_EXPERT else None
        if shared is not None:
            shared.wait_current_stream()
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_ep_alltoall", self.tokens_per_expert
        )
        tokens = expert_all_to_all(self, permutated_local_input_tokens)
        if shared is not None:
            shared.linear_fc1_forward_and_act(tokens)
        return tokens, permuted_probs.new_ones(tokens.shape[0])

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        tokens, tokens_per_expert, expert_probs = super().dispatch_postprocess(
            global_input_tokens, global_probs
        )
        return tokens, tokens_per_expert, torch.ones_like(expert_probs)

    def apply_gates(self, rows: torch.Tensor) -> torch.Tensor:
        """Multiply the combined rows [N, H] by their gate probabilities (owner rank)."""
        return apply_gates(rows, self.local_permuted_probs)

    def token_slots(self) -> TokenSlots:
        """Which of the combined rows [N, H] are each owned token's k slots ([T_local, k])."""
        row_to_token = self.reversed_local_input_permutation_mapping
        num_tokens = self.hidden_shape_before_permute[0]
        valid = None
        if self.drop_and_pad:
            # Padded to capacity: the router's routing map marks `capacity` tokens per expert,
            # filling up with tokens that did not select the expert; megatron gives those
            # pairs gate 0 (so they add nothing to the output). They are not slots of L_o.
            valid = self.local_permuted_probs > 0
        return token_slot_rows(row_to_token, num_tokens, self.config.moe_router_topk, valid=valid)
