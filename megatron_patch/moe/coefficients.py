"""Loss coefficients as module buffers, and the recording-only mode used to calibrate them.

A coefficient lives in a float32 scalar buffer of the module that computes its loss (the router
for L_v, the MoE layer for L_o), so ``state_dict``/``sharded_state_dict`` and therefore every
checkpoint carry it. A coefficient configured as ``"auto"`` starts as NaN ("not calibrated");
``megatron_patch.moe.calibration`` fills it from globally reduced first-batch values.

Recording-only is a switch of each of those modules (``losses_recording_only``), set for the
modules of one model by ``recording_only(model)``: no process-wide state.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Union

import torch

from megatron_patch.moe.loss_config import AUTO, Coefficient
from megatron_patch.moe.routing_stats import is_training_forward

Modules = Union[torch.nn.Module, Iterable[torch.nn.Module]]
RECORDING_ONLY_ATTR = "losses_recording_only"


def initial_coefficient(value: Coefficient, device: torch.device) -> torch.Tensor:
    """Scalar float32 buffer value: the fixed coefficient, or NaN for ``"auto"``."""
    number = float("nan") if value == AUTO else float(value)
    return torch.tensor(number, dtype=torch.float32, device=device)


def model_chunks(modules: Modules) -> list[torch.nn.Module]:
    """``modules`` as a list of model chunks (one module, or an iterable of them)."""
    return [modules] if isinstance(modules, torch.nn.Module) else list(modules)


def loss_active(module: torch.nn.Module) -> bool:
    """Whether ``module`` computes its specialization loss in this forward: a training forward
    (attached), or any forward while recording only (logged, not attached)."""
    return getattr(module, RECORDING_ONLY_ATTR) or is_training_forward(module)


@contextlib.contextmanager
def recording_only(modules: Modules) -> Iterator[None]:
    """Compute and log the specialization losses of ``modules`` without attaching them (works
    under no_grad): coefficient calibration, and training before it."""
    holders = [module for chunk in model_chunks(modules) for module in chunk.modules()
               if hasattr(module, RECORDING_ONLY_ATTR)]
    for module in holders:
        setattr(module, RECORDING_ONLY_ATTR, True)
    try:
        yield
    finally:
        for module in holders:
            setattr(module, RECORDING_ONLY_ATTR, False)


def check_calibrated(coeff: torch.Tensor, flag: str) -> None:
    """Refuse to train with an ``"auto"`` coefficient that was never calibrated."""
    if torch.isnan(coeff).item():
        raise RuntimeError(
            f"{flag} is 'auto' but was not calibrated: call "
            "megatron_patch.moe.calibration.calibrate_coefficients(...) before the first training "
            "step (the training loop does this), or load a checkpoint that holds the calibrated "
            "value, or pass a fixed coefficient."
        )
