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
# Set by a training loop that calibrates "auto" coefficients from what the modules record while
# uncalibrated (instead of refusing to train).
DEFER_ATTR = "defer_calibration"


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


def loss_modules(modules: Modules) -> list[torch.nn.Module]:
    """The modules of ``modules`` that compute a specialization loss (router, MoE layer)."""
    return [module for chunk in model_chunks(modules) for module in chunk.modules()
            if hasattr(module, RECORDING_ONLY_ATTR)]


def defer_calibration(modules: Modules) -> None:
    """Let the loss modules of ``modules`` record, not refuse, while an ``"auto"`` coefficient
    is uncalibrated (``attaches_loss``): for a training loop that calibrates from those values."""
    for module in loss_modules(modules):
        setattr(module, DEFER_ATTR, True)


@contextlib.contextmanager
def recording_only(modules: Modules) -> Iterator[None]:
    """Compute and log the specialization losses of ``modules`` without attaching them (works
    under no_grad): coefficient calibration, and training before it."""
    holders = loss_modules(modules)
    for module in holders:
        setattr(module, RECORDING_ONLY_ATTR, True)
    try:
        yield
    finally:
        for module in holders:
            setattr(module, RECORDING_ONLY_ATTR, False)


def attaches_loss(module: torch.nn.Module, coeff: torch.Tensor, flag: str) -> bool:
    """Whether this forward of ``module`` attaches its loss (False: it only records it).

    Recording only: inside ``recording_only``, and, for a module with ``DEFER_ATTR`` set, while
    its ``"auto"`` coefficient is still uncalibrated (a training loop that calibrates from the
    recorded values, e.g. ``megatron_patch.megatron_lm``). Otherwise an uncalibrated coefficient
    is refused. The coefficient is read on the host only until it is seen calibrated.
    """
    if getattr(module, RECORDING_ONLY_ATTR):
        return False
    if module.coefficient_calibrated:
        return True
    if torch.isnan(coeff).item():
        if getattr(module, DEFER_ATTR, False):
            return False
        raise RuntimeError(
            f"{flag} is 'auto' but was not calibrated: call "
            "megatron_patch.moe.calibration.calibrate_coefficients(...) before the first training "
            "step (the training loop does this), or load a checkpoint that holds the calibrated "
            "value, or pass a fixed coefficient."
        )
    module.coefficient_calibrated = True
    return True
