"""Loss values of all specialization MoE layers of a model, for logging (no communication)."""

from __future__ import annotations

import torch

from megatron_patch.deepspeed.layer import SpecializationMoE
from megatron_patch.moe.names import ORTHO_LOSS, VAR_LOSS


def specialization_loss_values(model: torch.nn.Module) -> dict[str, float]:
    """Mean over the model's ``SpecializationMoE`` layers of their last forward's losses.

    Returns:
        ``{"l_aux": ..., "ortho_loss": ..., "var_loss": ..., "moe_total": ...}`` (disabled losses
        left out; empty before the first forward). ``l_aux`` and ``moe_total`` are this rank's
        values; ``ortho_loss`` and ``var_loss`` are already expert-parallel-group means.
    """
    records = [module.specialization_losses for module in model.modules()
               if isinstance(module, SpecializationMoE) and module.specialization_losses is not None]
    if not records:
        return {}
    names = {"l_aux": "l_aux", "ortho": ORTHO_LOSS, "var": VAR_LOSS, "total": "moe_total"}
    metrics = {}
    for field, name in names.items():
        values = [getattr(record, field) for record in records if getattr(record, field) is not None]
        if values:
            metrics[name] = torch.stack(values).detach().float().mean().item()
    return metrics
