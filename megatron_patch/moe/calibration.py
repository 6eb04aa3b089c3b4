"""Auto-calibration of the L_o / L_v coefficients from globally reduced first-batch values.

The authors' released code sets, once, ``coeff = 10 ** round(log10(target / |L|))`` so that
``coeff * |L|`` lands near a target magnitude (1e-4 for L_o, 1e-3 for L_v). It reads a per-rank
value without any reduction, so data-parallel ranks can disagree. Here the raw losses of the first
global batch are recorded without being attached (``recording_only``), reduced exactly like
megatron-core's MoE loss logging (summed over TP x CP, averaged over DP, gathered over PP), averaged
over MoE layers and micro-batches, and only then turned into one coefficient per loss. Every rank
therefore computes the same value, and a layout change does not change it. The coefficients are
written into the module buffers, so checkpoints carry them and a resumed run does not recalibrate.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import reduce_aux_losses_tracker_across_ranks

from megatron_patch.compat import moe_metric_values
from megatron_patch.moe.attach import ensure_tracked
from megatron_patch.moe.coefficients import Modules, model_chunks, recording_only
from megatron_patch.moe.config import SpecializationConfig
from megatron_patch.moe.loss_config import AUTO, LossConfig
from megatron_patch.moe.layer import SpecializationMoELayer
from megatron_patch.moe.names import COEFFICIENT_FLAGS, ORTHO_LOSS, VAR_LOSS
from megatron_patch.moe.router import SpecializationRouter


def power_of_ten_coefficient(raw_mean: float, target: float, flag: str) -> float:
    """``10 ** round(log10(target / |raw_mean|))``; refuses a zero or non-finite raw value."""
    if not math.isfinite(raw_mean) or raw_mean == 0.0:
        raise RuntimeError(
            f"cannot calibrate {flag} 'auto': the first batch gave a raw loss of {raw_mean}. "
            f"Pass a fixed {flag} value instead."
        )
    return 10.0 ** round(math.log10(target / abs(raw_mean)))


def fill_calibrated(buffers: list[torch.Tensor], name: str, raw_mean: float,
                    target: float) -> float:
    """Calibrate loss ``name``'s coefficient from its reduced ``raw_mean`` towards ``target``
    (``power_of_ten_coefficient``), write it into ``buffers`` and return it."""
    value = power_of_ten_coefficient(raw_mean, target, COEFFICIENT_FLAGS[name])
    for buffer in buffers:
        buffer.fill_(value)
    return value


def coefficient_buffers(modules: Modules) -> dict[str, list[torch.Tensor]]:
    """The coefficient buffers of ``modules``' specialization layers, by loss name."""
    buffers: dict[str, list[torch.Tensor]] = {VAR_LOSS: [], ORTHO_LOSS: []}
    for chunk in model_chunks(modules):
        for module in chunk.modules():
            if isinstance(module, SpecializationRouter):
                buffers[VAR_LOSS].append(module.var_loss_coeff)
            elif isinstance(module, SpecializationMoELayer):
                buffers[ORTHO_LOSS].append(module.ortho_loss_coeff)
    return buffers


def reconcile_coefficients(
    modules: Modules, config: SpecializationConfig, saved: Optional[LossConfig], fresh: bool
) -> list[str]:
    """After a checkpoint load: make the coefficient buffers follow this run's flags.

    The loaded buffers hold the checkpoint's coefficients. A fixed coefficient on this run's
    command line replaces them (post-training adds or changes a loss on a pretrained model); an
    ``"auto"`` one keeps a value the checkpoint's own run calibrated (a resumed run does not
    recalibrate), and is calibrated anew on this run's data when the checkpoint's run used a fixed
    value, when its flags are unknown, or when ``fresh`` (``--finetune``).

    Args:
        modules: this rank's model chunks.
        config: this run's specialization settings.
        saved: the loss settings of the checkpoint's run, or None (unknown).
        fresh: fine-tuning: never keep a calibrated value.

    Returns:
        One line per coefficient whose value changed (identical on every rank).
    """
    fields = {ORTHO_LOSS: "moe_ortho_loss_coeff", VAR_LOSS: "moe_var_loss_coeff"}
    messages = []
    for name, buffers in coefficient_buffers(modules).items():
        flag, field = COEFFICIENT_FLAGS[name], fields[name]
        wanted = getattr(config, field)
        saved_value = None if saved is None else getattr(saved, field)
        if wanted == AUTO and saved_value == AUTO and not fresh:
            continue
        value = float("nan") if wanted == AUTO else float(wanted)
        for buffer in buffers:
            target = torch.full_like(buffer, value)
            if not torch.allclose(buffer, target, rtol=0.0, atol=0.0, equal_nan=True):
                messages.append(
                    f"{flag} {wanted}: replaces the checkpoint's {buffer.item():g}"
                    + (" (calibrated on this run's data)" if wanted == AUTO else "")
                )
            buffer.copy_(target)
    return sorted(set(messages))


def needs_calibration(modules: Modules) -> bool:
    """True if any local coefficient buffer is still NaN (``"auto"`` and not calibrated)."""
    return any(
        bool(torch.isnan(buffer).item())
        for buffers in coefficient_buffers(modules).values()
        for buffer in buffers
    )


def num_moe_layers(config: SpecializationConfig) -> int:
    """Number of MoE layers of the whole model (all pipeline stages), as megatron counts them."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        count = sum(1 for i in range(config.num_layers) if i % freq == 0)
    else:
        count = sum(freq)
    return count + (config.mtp_num_layers or 0)


def calibrate_coefficients(
    modules: Modules,
    config: SpecializationConfig,
    run_forward: Callable[[], object],
    num_microbatches: int,
    pg_collection: Optional[ProcessGroupCollection] = None,
) -> dict[str, float]:
    """Calibrate every ``"auto"`` coefficient; collective over all ranks of the model.

    Args:
        modules: the model chunks of this rank.
        config: the model's SpecializationConfig.
        run_forward: runs the forward pass of the first global batch on this rank (e.g. the
            pipeline schedule with ``forward_only=True``); its loss is ignored. It runs under
            ``torch.no_grad`` with the specialization losses in recording-only mode.
        num_microbatches: micro-batches ``run_forward`` processes on this rank.
        pg_collection: process groups (defaults to megatron's global parallel state); the PP and
            DP groups are used for the reduction, as in megatron-core's MoE loss logging.

    Returns:
        ``{"ortho_loss": beta, "var_loss": gamma}`` for the losses that were calibrated.
    """
    todo = config.auto_targets
    if not todo:
        return {}
    tp_cp_group = (
        pg_collection.tp_cp
        if pg_collection is not None
        else parallel_state.get_tensor_and_context_parallel_group()
    )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    ensure_tracked(list(todo), config, tp_cp_group, device)
    for name in todo:
        moe_metric_values(name).zero_()
    with torch.no_grad(), recording_only(modules):
        run_forward()
    reduce_aux_losses_tracker_across_ranks(list(todo), pg_collection=pg_collection)

    buffers = coefficient_buffers(modules)
    result = {}
    for name, target in todo.items():
        values = moe_metric_values(name)
        raw_mean = values.sum().item() / (num_moe_layers(config) * num_microbatches)
        result[name] = fill_calibrated(buffers[name], name, raw_mean, target)
        values.zero_()
    return result
