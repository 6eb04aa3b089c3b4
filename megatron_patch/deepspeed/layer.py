"""DeepSpeed-MoE layers that add L_o and L_v to the ``l_aux`` they return.

``SpecializationMoE`` is a drop-in ``deepspeed.moe.layer.MoE``: same constructor (plus the loss
settings, a ``LossConfig``: the knob set of every backend), same ``forward`` returning
``(output, l_aux, exp_counts)``, same parameters and
state-dict keys, and DeepSpeed's engine recognizes it as an MoE layer (expert groups, expert
gradient reduction). The returned ``l_aux`` is ``l_aux + beta * L_o + gamma * L_v``, so training
code that adds ``l_aux`` to its loss trains the new losses too; the parts are in
``layer.specialization_losses`` for logging.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, _AllToAll, _route_slots, _sparse_encode
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from megatron_patch.deepspeed.gate import SpecializationTopKGate
from megatron_patch.deepspeed.objectives import ortho_sum, variance_sum
from megatron_patch.deepspeed.reduction import group_means
from megatron_patch.deepspeed.routes import combine_routes, gather_routes
from megatron_patch.moe.loss_config import AUTO, LossConfig, SpecializationConfigError


def check_losses(losses: LossConfig, k: int) -> None:
    """Refuse settings the DeepSpeed layer cannot honour, naming the setting and the fix."""
    if losses.auto:
        raise SpecializationConfigError(
            f"DeepSpeed-MoE layers take fixed coefficients: '{AUTO}' calibration is part of "
            "megatron_patch's megatron-core trainer. Pass numbers for moe_ortho_loss_coeff and "
            "moe_var_loss_coeff.")
    if losses.moe_ortho_loss_kernel != "torch":
        raise SpecializationConfigError(
            "DeepSpeed-MoE layers compute L_o with the torch kernel; set "
            "moe_ortho_loss_kernel='torch'.")
    if losses.ortho_loss_enabled and k < 2:
        raise SpecializationConfigError(
            f"moe_ortho_loss_coeff={losses.moe_ortho_loss_coeff} needs top-k routing with k >= 2 "
            f"(got k={k}): L_o is identically zero for k=1. Use k >= 2 or set "
            "moe_ortho_loss_coeff=0.")


class SpecializationLosses(NamedTuple):
    """Scalars of the last forward, still attached to its graph (detach or ``.item()`` to log).

    ``l_aux`` is DeepSpeed's (this rank's local value); ``ortho`` and ``var`` are the expert-parallel
    group means (equal on every rank of the group; see ``reduction`` for their gradient), None when
    their coefficient is 0; ``total`` is ``l_aux + beta * ortho + gamma * var`` (what ``forward``
    sets as ``l_aux``).
    """

    l_aux: torch.Tensor
    ortho: Optional[torch.Tensor]
    var: Optional[torch.Tensor]
    total: torch.Tensor


class DeepSpeedSpecializationLayer(MOELayer):
    """``MOELayer`` whose forward also computes L_o and L_v and adds them to ``self.l_aux``.

    Data flow of ``forward`` (DeepSpeed's, with the combine split in two):
    gate -> [E, C, M] dispatch buffer -> all-to-all over the EP group -> local experts ->
    all-to-all back -> ``gather_routes`` ([k, S, M] unweighted outputs of each token's routes, on
    the token's own rank) -> L_o on those, and the gate-weighted sum as the layer output. L_o
    reaches the experts (and the layers below) only; L_v, on the gate's softmax scores, reaches the
    gate's ``wg`` (and the layers below) only.

    Process groups: ``self.ep_group`` (DeepSpeed's expert-parallel group of this layer) carries the
    two all-to-alls and one 4-element all-reduce of the loss sums and counts
    (``reduction.group_means``). Not supported: Tutel, and tensor parallelism (``groups.mpu`` with
    TP > 1), where DeepSpeed drops and re-gathers duplicate tokens around the all-to-alls.
    """

    settings: LossConfig
    losses: Optional[SpecializationLosses]

    @classmethod
    def from_layer(cls, layer: MOELayer, settings: LossConfig) -> "DeepSpeedSpecializationLayer":
        """The same layer (gate weights, experts, EP settings) with the specialization losses."""
        if layer.use_tutel:
            raise NotImplementedError("the specialization losses do not support use_tutel=True")
        check_losses(settings, layer.gate.k)
        converted = cls.__new__(cls)
        converted.__dict__.update(layer.__dict__)
        converted.gate = SpecializationTopKGate.from_gate(layer.gate)
        converted.settings = settings
        converted.losses = None
        return converted

    def _all_to_all(self, buffer: torch.Tensor) -> torch.Tensor:
        if self.ep_size > 1:
            return _AllToAll.apply(self.ep_group, buffer)
        return buffer.contiguous()

    def forward(self, *input: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """MoE over ``input[0]`` [..., M] (``input[1]``: optional used-token mask for top-1).

        ``kwargs`` are accepted and ignored, as by ``MOELayer.forward``.

        Returns the output with ``input[0]``'s shape; sets ``self.l_aux`` (graph-attached total),
        ``self.exp_counts`` and ``self.losses``.
        """
        if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
            raise NotImplementedError("the specialization losses do not support tensor parallelism")
        hidden = input[0]
        used_token = input[1] if len(input) > 1 else None
        d_model = hidden.shape[-1]
        tokens = hidden.reshape(-1, d_model)  # [S, M]
        gate_output, scores = self.gate(tokens, used_token, True, False)
        l_aux, capacity, num_experts, indices, locations, gates, self.exp_counts = gate_output
        capacity = int(capacity)
        slots = _route_slots(indices, locations, num_experts, capacity)  # [k, S]
        dispatched = self._all_to_all(_sparse_encode(tokens, slots, num_experts, capacity))
        expert_output = self.experts(dispatched.reshape(self.ep_size, self.num_local_experts, -1, d_model))
        expert_output = self._all_to_all(expert_output.reshape(num_experts, -1, d_model))
        routed = gather_routes(expert_output, slots)  # [k, S, M]
        self.l_aux = self._add_specialization_losses(l_aux, routed, indices >= 0, scores)
        return combine_routes(routed, gates).reshape(hidden.shape)

    def _add_specialization_losses(self, l_aux: torch.Tensor, routed: torch.Tensor, kept: torch.Tensor,
                                   scores: torch.Tensor) -> torch.Tensor:
        """``l_aux + beta * L_o + gamma * L_v``, with the group means of ``reduction``."""
        settings = self.settings
        terms = {}  # name -> (local sum, local count)
        if settings.ortho_loss_enabled:
            terms["ortho"] = ortho_sum(routed, kept, settings.moe_ortho_loss_form,
                                       settings.moe_ortho_loss_eps, settings.moe_ortho_loss_normalize)
        if settings.var_loss_enabled:
            terms["var"] = variance_sum(scores)
        sums, counts = [s for s, _ in terms.values()], [c for _, c in terms.values()]
        means = dict(zip(terms, group_means(sums, counts, self.ep_group)))
        ortho, var = means.get("ortho"), means.get("var")
        total = l_aux
        if ortho is not None:
            total = total + settings.moe_ortho_loss_coeff * ortho
        if var is not None:
            total = total + settings.moe_var_loss_coeff * var
        self.losses = SpecializationLosses(l_aux, ortho, var, total)
        return total


class SpecializationMoE(MoE):
    """``deepspeed.moe.layer.MoE`` plus L_o and L_v (see the module docstring).

    Args:
        *args, **kwargs: those of ``deepspeed.moe.layer.MoE`` (hidden_size, expert, num_experts,
            ep_size, k, capacity_factor, drop_tokens, ...).
        losses: beta (``moe_ortho_loss_coeff``, 0 disables L_o, > 0 needs k >= 2), gamma
            (``moe_var_loss_coeff``), the L_o form, eps and normalization; fixed coefficients
            and the torch kernel (``check_losses``). Default: both losses off.

    ``forward(hidden_states [..., M], used_token=None)`` returns ``(output [..., M],
    l_aux + beta * L_o + gamma * L_v, exp_counts [E])``.
    """

    def __init__(self, *args: Any, losses: Optional[LossConfig] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deepspeed_moe = DeepSpeedSpecializationLayer.from_layer(
            self.deepspeed_moe, losses or LossConfig())

    @property
    def specialization_losses(self) -> Optional[SpecializationLosses]:
        """The loss values of the last forward (None before the first)."""
        return self.deepspeed_moe.losses
