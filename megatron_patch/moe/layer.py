"""MoELayer with the orthogonality loss L_o on each token's unweighted expert outputs."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_patch.compat import MOE_LAYER_PARAMETERS, accepted
from megatron_patch.moe.attach import attach_mean_loss, global_count
from megatron_patch.moe.coefficients import (
    RECORDING_ONLY_ATTR,
    attaches_loss,
    initial_coefficient,
    loss_active,
)
from megatron_patch.moe.config import SpecializationConfig
from megatron_patch.moe.dispatcher import UnweightedCombineAlltoAllDispatcher
from megatron_patch.moe.gated_gram import gated_gram
from megatron_patch.moe.losses import projection_norms
from megatron_patch.moe.names import COEFFICIENT_FLAGS, ORTHO_LOSS


class SpecializationMoELayer(MoELayer):
    """megatron-core's MoELayer plus ``beta * L_o``.

    With L_o enabled the alltoall dispatcher is replaced by ``UnweightedCombineAlltoAllDispatcher``:
    after the combine all-to-all the owner rank holds each token's k unweighted expert outputs;
    it applies the gates and takes each token's Gram matrix of them in one call
    (``megatron_patch.moe.gated_gram``, torch or a fused Triton kernel), computes the per-slot
    penalties and attaches ``beta * sum / count`` (count summed over TP x CP) to the gated rows
    with ``MoEAuxLossAutoScaler``. The loss therefore trains the experts (and the layers below
    them) and has no gradient path into the router. With L_o disabled this is exactly MoELayer.
    """

    def __init__(
        self,
        config: SpecializationConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        is_mtp_layer: bool = False,
        name: Optional[str] = None,
    ):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            **accepted(MOE_LAYER_PARAMETERS, is_mtp_layer=is_mtp_layer, name=name),
        )
        self.tp_cp_group = pg_collection.tp_cp
        self.register_buffer(
            "ortho_loss_coeff",
            initial_coefficient(config.moe_ortho_loss_coeff, self.router.weight.device),
        )
        self.coefficient_calibrated = False
        setattr(self, RECORDING_ONLY_ATTR, False)
        # [T_local] bool (True = padding) of the forward in progress, set by ``route``.
        self._padding: Optional[torch.Tensor] = None
        if config.ortho_loss_enabled:
            self.token_dispatcher = UnweightedCombineAlltoAllDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection,
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """MoELayer.route; remembers ``padding_mask`` ([S, B], True = padding, the convention
        megatron-core's router and aux losses apply) so L_o leaves padding tokens out.

        Every forward variant runs ``route`` before its ``combine``, in the same call: the plain
        forward, its recomputation under selective MoE recompute (which can run after other
        micro-batches' forwards, with pipeline schedules) and the fine-grained overlap schedule,
        which never calls ``forward``.
        """
        self._padding = None if padding_mask is None else padding_mask.reshape(-1)
        return super().route(hidden_states, padding_mask)

    def combine(self, output: torch.Tensor) -> torch.Tensor:
        """Combine all-to-all, then the gates, with L_o on the unweighted rows.

        Args:
            output: [N_expert_rows, H] expert outputs on the expert rank.

        Returns:
            [N_local_rows, H] gate-weighted rows on the owner rank, in its permuted order.
        """
        rows = super().combine(output)
        if not self.config.ortho_loss_enabled:
            return rows
        if loss_active(self):
            return self._gates_with_ortho_loss(rows)
        return self.token_dispatcher.apply_gates(rows)

    def _gates_with_ortho_loss(self, rows: torch.Tensor) -> torch.Tensor:
        attach = attaches_loss(self, self.ortho_loss_coeff, COEFFICIENT_FLAGS[ORTHO_LOSS])
        slots = self.token_dispatcher.token_slots()
        gated, gram = gated_gram(
            rows,
            self.token_dispatcher.local_permuted_probs,
            slots,
            kernel=self.config.moe_ortho_loss_kernel,
        )
        per_slot = projection_norms(
            gram,
            form=self.config.moe_ortho_loss_form,
            eps=self.config.moe_ortho_loss_eps,
            normalize=self.config.moe_ortho_loss_normalize,
        )
        filled = slots.filled
        local_tokens = slots.rows.shape[0]
        padding = self._padding
        if padding is not None:
            # Padding tokens are routed and computed, but are not slots of L_o.
            valid = ~padding.to(per_slot.device).unsqueeze(-1)
            per_slot = per_slot * valid
            filled = filled & valid
            local_tokens = valid.sum()
        num_slots = filled.sum()
        uniform = self.config.moe_expert_capacity_factor is None and padding is None
        count = global_count(num_slots, self.tp_cp_group, gated.device, uniform=uniform)
        return attach_mean_loss(
            gated,
            local_sum=per_slot.sum(),
            count=count,
            local_tokens=local_tokens,
            coeff=self.ortho_loss_coeff,
            name=ORTHO_LOSS,
            config=self.config,
            layer_number=self.layer_number,
            reduce_group=self.tp_cp_group,
            attach=attach,
        )
