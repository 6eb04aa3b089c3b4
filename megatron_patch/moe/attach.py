"""Attach a per-token-mean MoE loss to the autograd graph the way megatron-core attaches its aux losses.

Convention (identical to megatron-core's ``aux_loss``/``z_loss``): each rank holds a slice of a
micro-batch's tokens (sequence parallel splits over TP, context parallel over CP). A rank attaches
``coeff * local_sum / global_count`` where ``global_count`` is summed over the TP x CP group, so
the attached terms of the TP x CP ranks add up to ``coeff * mean`` over the micro-batch. Data
parallel ranks hold different micro-batches and DDP averages their gradients, as it does for the
language-model loss. The gradient is injected with ``MoEAuxLossAutoScaler``, whose backward scale
the training loop sets per step (loss scale / number of micro-batches), so it is scaled exactly
like megatron-core's aux losses.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.moe.names import BALANCING_LOSS, ORTHO_LOSS, VAR_LOSS, Z_LOSS


def global_count(
    local_count: Union[int, torch.Tensor],
    group: Optional[dist.ProcessGroup],
    device: torch.device,
    *,
    uniform: bool,
) -> torch.Tensor:
    """Number of items summed over ``group``.

    Args:
        local_count: this rank's count.
        group: the process group to sum over (TP x CP for per-micro-batch statistics).
        device: device of the returned scalar.
        uniform: True when every rank of ``group`` is known to hold the same count; then the sum
            is ``local_count * group size`` and no collective runs.

    Returns:
        float32 scalar tensor.
    """
    count = torch.as_tensor(local_count, dtype=torch.float32, device=device)
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return count
    if uniform:
        return count * size
    count = count.clone()
    dist.all_reduce(count, group=group)
    return count


def attach_mean_loss(
    activation: torch.Tensor,
    *,
    local_sum: torch.Tensor,
    count: torch.Tensor,
    local_tokens: Union[int, torch.Tensor],
    coeff: torch.Tensor,
    name: str,
    config: TransformerConfig,
    layer_number: Optional[int],
    reduce_group: Optional[dist.ProcessGroup],
    attach: bool,
) -> torch.Tensor:
    """Log ``local_sum / count`` under ``name`` and attach ``coeff`` times it to ``activation``.

    Args:
        activation: tensor the loss rides on; returned unchanged in value.
        local_sum: scalar, this rank's sum of the per-item loss (with its graph).
        count: scalar, the item count summed over ``reduce_group`` (see ``global_count``).
        local_tokens: this rank's token count; with ``config.calculate_per_token_loss`` megatron
            divides gradients by the token count later, so the attached loss is multiplied by
            it, as megatron-core does for its aux losses.
        coeff: scalar coefficient tensor (a module buffer, so checkpoints carry it).
        name: tracker name, e.g. ``"ortho_loss"``.
        config: the model config (layer count for the tracker, per-token-loss mode).
        layer_number: 1-based global layer number for per-layer logging; None skips logging.
        reduce_group: group whose partial values sum to the micro-batch mean (TP x CP); the
            tracker also averages over DP when it is reduced for logging.
        attach: False records the value only (evaluation statistics, coefficient calibration).

    Returns:
        ``activation``, with the loss attached when ``attach`` is True.
    """
    value = local_sum / count.clamp(min=1.0)
    num_layers = config.num_layers + (config.mtp_num_layers or 0)
    save_to_aux_losses_tracker(
        name, value, layer_number, num_layers, reduce_group=reduce_group
    )
    if not attach:
        return activation
    loss = value * coeff.to(value.dtype)
    if config.calculate_per_token_loss:
        loss = loss * local_tokens
    return MoEAuxLossAutoScaler.apply(activation, loss)


def reported_losses(config: TransformerConfig) -> list[str]:
    """Tracker names of the MoE losses a model with ``config`` computes in training forwards."""
    types = config.moe_router_load_balancing_type
    types = [types] if isinstance(types, str) else list(types)
    coeffs = config.moe_aux_loss_coeff
    coeffs = [coeffs] * len(types) if not isinstance(coeffs, (list, tuple)) else list(coeffs)
    names = [BALANCING_LOSS[kind] for kind, coeff in zip(types, coeffs)
             if kind in BALANCING_LOSS and coeff > 0]
    if config.moe_z_loss_coeff:
        names.append(Z_LOSS)
    names += [name for name, on in ((ORTHO_LOSS, getattr(config, "ortho_loss_enabled", False)),
                                    (VAR_LOSS, getattr(config, "var_loss_enabled", False))) if on]
    return names


def ensure_tracked(names: list[str], config: TransformerConfig,
                   tp_cp_group: Optional[dist.ProcessGroup], device: Optional[torch.device]) -> None:
    """Give every name a (zero) entry in megatron's MoE loss tracker, so that reducing the tracker
    runs the same collectives on every rank, also on a pipeline stage without MoE layers."""
    tracker = get_moe_layer_wise_logging_tracker()
    num_layers = config.num_layers + (config.mtp_num_layers or 0)
    for name in names:
        if name not in tracker:
            tracker[name] = {
                "values": torch.zeros(num_layers, device=device),
                "reduce_group": tp_cp_group,
                "avg_group": None,
                "reduce_group_has_dp": False,
            }
