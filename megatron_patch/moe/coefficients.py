"""Loss coefficients as module buffers, and the recording-only mode used to calibrate them.

A coefficient lives in a float32 scalar buffer of the module that computes its loss (the router
for L_v, the MoE layer for L_o), so ``state_dict``/``sharded_state_dict`` and therefore every
checkpoint carry it. A coefficient configured as ``"auto"`` starts as NaN ("not calibrated");
``megatron_patch.moe.calibration`` fills it from globally reduced first-batch values.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megatron_patch.moe.config import AUTO, Coefficient

_RECORDING_ONLY = False

ORTHO_LOSS_NAME = "ortho_loss"
VAR_LOSS_NAME = "var_loss"


def initial_coefficient(value: Coefficient, device: torch.device) -> torch.Tensor:
    """Scalar float32 buffer value: the fixed coefficient, or NaN for ``"auto"``."""
    number = float("nan") if value == AUTO else float(value)
    return torch.tensor(number, dtype=torch.float32, device=device)


def is_recording_only() -> bool:
    """True inside ``recording_only()``: losses are computed and logged but not attached."""
    return _RECORDING_ONLY


@contextlib.contextmanager
def recording_only() -> Iterator[None]:
    """Compute and log the specialization losses without attaching them (works under no_grad)."""
    global _RECORDING_ONLY
    previous, _RECORDING_ONLY = _RECORDING_ONLY, True
    try:
        yield
    finally:
        _RECORDING_ONLY = previous


def check_calibrated(coeff: torch.Tensor, flag: str) -> None:
    """Refuse to train with an ``"auto"`` coefficient that was never calibrated."""
    if torch.isnan(coeff).item():
        raise RuntimeError(
            f"{flag} is 'auto' but was not calibrated: call "
            "megatron_patch.moe.calibration.calibrate_coefficients(...) before the first training "
            "step (the training loop does this), or load a checkpoint that holds the calibrated "
            "value, or pass a fixed coefficient."
        )
