"""megatron-core's MoE metrics tracker, extended for Megatron-LM's training loop: it reports L_o
and L_v next to the load-balancing loss, and calibrates ``"auto"`` coefficients from them.

Megatron-LM's ``training_log`` calls ``report()`` once per iteration on every rank; ``report``
reduces the recorded per-layer values exactly as megatron-core's MoE loss logging does (summed over
TP x CP, averaged over DP, gathered over PP) and averages them over MoE layers and micro-batches.
While an ``"auto"`` coefficient is uncalibrated the modules record their raw loss without attaching
it (``coefficients.DEFER_ATTR``); the first report after ``--moe-loss-calibration-iters``
iterations turns the reduced raw value into the coefficient, so it is the value
``megatron_patch.moe.calibration`` computes for the same weights and global batch (that global
batch itself is trained without the calibrated loss).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker
from megatron.training.global_vars import get_args
from megatron.training.utils import print_rank_last

from megatron_patch.moe.calibration import coefficient_buffers, power_of_ten_coefficient
from megatron_patch.moe.coefficients import DEFER_ATTR, RECORDING_ONLY_ATTR
from megatron_patch.moe.loss_config import AUTO, LossConfig
from megatron_patch.moe.names import COEFFICIENT_FLAGS, ORTHO_LOSS, VAR_LOSS


class SpecializationMetricsTracker(MoEMetricsTracker):
    """``MoEMetricsTracker`` that also reports ``ortho_loss``/``var_loss`` and calibrates their
    ``"auto"`` coefficients. ``report`` stays megatron-core's collective (PP, TP x CP, DP); the
    calibration only reads its reduced values, so it adds no collective."""

    def __init__(self, losses: LossConfig) -> None:
        super().__init__()
        self.losses = losses
        self.model_chunks: list[torch.nn.Module] = []
        self.calibrated: dict[str, float] = {}
        self._scalars: dict[str, Any] = {}
        self._targets = {
            name: target for name, coeff, target in (
                (ORTHO_LOSS, losses.moe_ortho_loss_coeff, losses.moe_ortho_loss_target),
                (VAR_LOSS, losses.moe_var_loss_coeff, losses.moe_var_loss_target))
            if coeff == AUTO}
        self._checking = bool(self._targets)
        self._interval_sums: dict[str, float] = {}
        self._interval_steps = 0
        self._printed = False

    @property
    def loss_names(self) -> list[str]:
        """The specialization losses this run computes."""
        return [name for name, enabled in ((ORTHO_LOSS, self.losses.ortho_loss_enabled),
                                           (VAR_LOSS, self.losses.var_loss_enabled)) if enabled]

    def attach(self, model_chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        """Post-wrap hook of the model config: remember this rank's model chunks and let their
        specialization modules record, not refuse, while an ``"auto"`` coefficient is
        uncalibrated. Returns ``model_chunks``."""
        self.model_chunks = list(model_chunks)
        for chunk in self.model_chunks:
            for module in chunk.modules():
                if hasattr(module, RECORDING_ONLY_ATTR):
                    setattr(module, DEFER_ATTR, True)
        return model_chunks

    def report(self, loss_scale: float, iteration: int, *args: Any,
               track_names: Optional[list[str]] = None, **kwargs: Any) -> str:
        """megatron-core's ``report`` with L_o and L_v among ``track_names``; then, on the first
        iteration past ``--moe-loss-calibration-iters``, the calibration of ``"auto"``
        coefficients from this iteration's reduced values."""
        if track_names is not None:
            names = [track_names] if isinstance(track_names, str) else list(track_names)
            track_names = names + [name for name in self.loss_names if name not in names]
        self._scalars = {}
        log_string = super().report(loss_scale, iteration, *args, track_names=track_names,
                                    **kwargs)
        log_string += self._negative_losses(iteration)
        if self._checking and iteration > self.losses.moe_loss_calibration_iters:
            self._calibrate(iteration)
        return log_string

    def _negative_losses(self, iteration: int) -> str:
        """Console text for the specialization losses below zero (L_v is), which Megatron-LM's
        log line leaves out: their mean over the ``--log-interval`` iterations, printed when
        Megatron-LM prints its line (TensorBoard and W&B get every value from ``report``)."""
        for name in self.loss_names:
            if name in self._scalars:
                self._interval_sums[name] = self._interval_sums.get(name, 0.0) + float(
                    self._scalars[name])
        self._interval_steps += 1
        if iteration % get_args().log_interval:
            return ""
        text = "".join(f" {name}: {total / self._interval_steps:.6E} |"
                       for name, total in self._interval_sums.items() if total < 0.0)
        if self._printed:  # like Megatron-LM's sums, kept over the process's first log line
            self._interval_sums, self._interval_steps = {}, 0
        self._printed = True
        return text

    def _aggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._scalars = super()._aggregate(*args, **kwargs)
        return self._scalars

    def _calibrate(self, iteration: int) -> None:
        """Fill this rank's still-NaN ``"auto"`` coefficient buffers (a loaded checkpoint may
        have set them) from this iteration's reduced raw values; each rank decides from its own
        buffers alone, and all of them read the same reduced values."""
        buffers = coefficient_buffers(self.model_chunks)
        for name, target in self._targets.items():
            if not any(torch.isnan(buffer).item() for buffer in buffers[name]):
                continue
            raw_mean = float(self._scalars[name])
            value = power_of_ten_coefficient(raw_mean, target, COEFFICIENT_FLAGS[name])
            for buffer in buffers[name]:
                buffer.fill_(value)
            self.calibrated[name] = value
        self._checking = False
        if self.calibrated:
            print_rank_last(f"megatron_patch: calibrated coefficients on the global batch of "
                            f"iteration {iteration}: {self.calibrated}")
