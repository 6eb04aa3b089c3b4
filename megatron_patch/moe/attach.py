"""Attach a per-token-mean MoE loss to the autograd graph the way megatron-core attaches its aux losses.

Convention (identical to megatron-core's ``aux_loss``/``z_loss``): each rank holds a slice of a
micro-batch's tokens (sequence parallel splits over TP, context parallel over CP). A rank attaches
``coeff * local_sum / global_count`` where ``global_count`` is summed over the TP x CP group, so
the attached terms of the TP x CP ranks add up to ``coeff * mean`` over the micro-batch. Data
parallel ranks hold different micro-batches and DDP averages their gradients, as it does for the
language-model loss. The gradient is injected with ``MoEAuxLossAutoScaler``, whose backward scale
the training loop sets per step (loss scale / number of micro-batches), so it is scaled exactly
like megatron-core's aux losses.

With ``calculate_per_token_loss`` megatron divides every gradient by the global token count
(micro-batches x DP x CP x TP x a rank's tokens) instead; the attached loss is then multiplied by
this rank's tokens times the TP x CP size, which restores the same gradient. megatron-core 0.19.2
scales its own aux and z losses so; up to 0.18 it left out the TP x CP factor (its aux losses'
gradients were 1/(TP*CP) too small there).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.compat import ensure_moe_metrics, record_moe_metric

from megatron_patch.moe.names import BALANCING_LOSS, Z_LOSS


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
        local_tokens: this rank's token count; with ``config.calculate_per_token_loss`` the
            attached loss is multiplied by it times the ``reduce_group`` size (module docstring).
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
    record_moe_metric(name, value, layer_number, tracked_layers(config), reduce_group)
    if not attach:
        return activation
    loss = value * coeff.to(value.dtype)
    if config.calculate_per_token_loss:
        group_size = 1 if reduce_group is None else dist.get_world_size(reduce_group)
        loss = loss * local_tokens * group_size
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
    return names + getattr(config, "enabled_losses", [])


def tracked_layers(config: TransformerConfig) -> int:
    """Length of the tracker's per-layer vectors: every layer of the model, MTP included."""
    return config.num_layers + (config.mtp_num_layers or 0)


def ensure_tracked(names: list[str], config: TransformerConfig,
                   tp_cp_group: Optional[dist.ProcessGroup], device: Optional[torch.device]) -> None:
    """Give every name a (zero) entry in megatron's MoE loss tracker, summed over TP x CP, so that
    reducing the tracker runs the same collectives on every rank, also on a pipeline stage
    without MoE layers."""
    ensure_moe_metrics(names, tracked_layers(config), tp_cp_group, device)
