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

from megatron_patch.moe.calibration import coefficient_buffers, fill_calibrated
from megatron_patch.moe.coefficients import defer_calibration
from megatron_patch.moe.loss_config import LossConfig

# The key of Megatron-LM's ``total_loss_dict`` counting the iterations summed since its last print.
ADVANCED_ITERATIONS = "advanced iterations"


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
        self._checking = bool(losses.auto_targets)

    def attach(self, model_chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
        """Post-wrap hook of the model config: remember this rank's model chunks and let their
        specialization modules record, not refuse, while an ``"auto"`` coefficient is
        uncalibrated. Returns ``model_chunks``."""
        self.model_chunks = list(model_chunks)
        defer_calibration(self.model_chunks)
        return model_chunks

    def report(self, loss_scale: float, iteration: int, *args: Any,
               track_names: Optional[list[str]] = None, **kwargs: Any) -> str:
        """megatron-core's ``report`` with L_o and L_v among ``track_names``; then, on the first
        iteration past ``--moe-loss-calibration-iters``, the calibration of ``"auto"``
        coefficients from this iteration's reduced values."""
        if track_names is not None:
            names = self._resolve_names(track_names)
            track_names = names + [name for name in self.losses.enabled_losses
                                   if name not in names]
        self._scalars = {}
        log_string = super().report(loss_scale, iteration, *args, track_names=track_names,
                                    **kwargs)
        log_string += self._negative_losses(iteration, kwargs.get("total_loss_dict"))
        if self._checking and iteration > self.losses.moe_loss_calibration_iters:
            self._calibrate(iteration)
        return log_string

    def _negative_losses(self, iteration: int, totals: Optional[dict[str, Any]]) -> str:
        """Console text for the specialization losses below zero (L_v is), which Megatron-LM's
        log line leaves out: on the iterations it prints, their mean from its own sums
        (``totals``, its ``total_loss_dict``), as it prints the other losses."""
        if totals is None or iteration % get_args().log_interval:
            return ""
        steps = max(1, totals.get(ADVANCED_ITERATIONS, 0))
        means = {name: totals[name].item() / steps for name in self.losses.enabled_losses
                 if name in totals}
        return "".join(f" {name}: {mean:.6E} |" for name, mean in means.items() if mean < 0.0)

    def _aggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._scalars = super()._aggregate(*args, **kwargs)
        return self._scalars

    def _calibrate(self, iteration: int) -> None:
        """Fill this rank's still-NaN ``"auto"`` coefficient buffers (a loaded checkpoint may
        have set them) from this iteration's reduced raw values; each rank decides from its own
        buffers alone, and all of them read the same reduced values."""
        buffers = coefficient_buffers(self.model_chunks)
        for name, target in self.losses.auto_targets.items():
            if any(torch.isnan(buffer).item() for buffer in buffers[name]):
                self.calibrated[name] = fill_calibrated(
                    buffers[name], name, float(self._scalars[name]), target)
        self._checking = False
        if self.calibrated:
            print_rank_last(f"megatron_patch: calibrated coefficients on the global batch of "
                            f"iteration {iteration}: {self.calibrated}")
