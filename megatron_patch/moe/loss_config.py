"""The settings of the specialization losses, one knob set for every backend.

``LossConfig`` is the ``losses`` section of the training job (one flag per field), the source of
``SpecializationConfig``'s loss fields for megatron-core models, and what the DeepSpeed-MoE layer
takes. Pure Python: no megatron import.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Union

from megatron_patch.flags import ConfigError, option
from megatron_patch.moe.gated_gram import GRAM_KERNELS
from megatron_patch.moe.losses import ORTHO_FORMS
from megatron_patch.moe.names import ORTHO_LOSS, VAR_LOSS

AUTO = "auto"
Coefficient = Union[float, str]
COEFFICIENT_EXPECTS = f"a non-negative number or '{AUTO}'"


class SpecializationConfigError(ConfigError):
    """A specialization-loss setting that cannot work; the message names the flag and the fix."""


def parse_coefficient(text: str) -> Coefficient:
    """A coefficient flag's value: a number, or ``"auto"``."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {COEFFICIENT_EXPECTS}, got {text!r}") from None


def coefficient_enabled(value: Coefficient) -> bool:
    """True when the loss with this coefficient is part of the objective."""
    return value == AUTO or float(value) > 0


def _check_coefficient(value: Coefficient, flag: str) -> None:
    if isinstance(value, str):
        if value != AUTO:
            raise SpecializationConfigError(f"{flag} must be {COEFFICIENT_EXPECTS}, got {value!r}.")
        return
    if isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise SpecializationConfigError(
            f"{flag} must be a finite number >= 0 (0 disables the loss) or '{AUTO}', got {value}."
        )


@dataclass
class LossConfig:
    """beta * L_o + gamma * L_v (arXiv 2505.22323); validated at construction."""

    moe_ortho_loss_coeff: Coefficient = option(
        0.0, "beta, coefficient of the orthogonality loss L_o on each token's unweighted expert "
        "outputs; 0 disables it, 'auto' calibrates it on the first global batch",
        parse=parse_coefficient, expects=COEFFICIENT_EXPECTS)
    moe_ortho_loss_form: str = option(
        "span", "'span': projection onto the span of the token's other experts' outputs "
        "(authors' code); 'pairwise': the paper's Eq. 6 sum of pairwise projections",
        choices=ORTHO_FORMS)
    moe_ortho_loss_eps: float = option(1e-6, "regularizer of the Gram-matrix solves of L_o")
    moe_ortho_loss_normalize: bool = option(
        False, "L_o of the unit-normalized expert outputs (cosines): scale-free, so it turns the "
        "outputs apart instead of shrinking them; not in the paper")
    moe_ortho_loss_target: float = option(
        1e-4, "with --moe-ortho-loss-coeff auto: beta = 10^round(log10(target / L_o))")
    moe_ortho_loss_kernel: str = option(
        "torch", "how the gates and the per-token Gram matrices of L_o are computed: 'torch' "
        "(regroup the rows by token, batched products) or 'triton' (one fused pass over the "
        "combined rows in forward and in backward; CUDA, Triton installed, no capacity padding)",
        choices=GRAM_KERNELS)
    moe_var_loss_coeff: Coefficient = option(
        0.0, "gamma, coefficient of the variance loss L_v = -mean Var(routing scores); 0 "
        "disables it, 'auto' calibrates it on the first global batch",
        parse=parse_coefficient, expects=COEFFICIENT_EXPECTS)
    moe_var_loss_target: float = option(
        1e-3, "with --moe-var-loss-coeff auto: gamma = 10^round(log10(target / |L_v|))")
    moe_loss_calibration_iters: int = option(
        0, "with an 'auto' coefficient: train this many steps with the losses logged but not "
        "applied, then calibrate on the next global batch (0: on the first one). From scratch, "
        "routing starts near-uniform and outputs near-orthogonal, so first-batch values "
        "understate the trained ones by orders of magnitude")

    def __post_init__(self) -> None:
        _check_coefficient(self.moe_ortho_loss_coeff, "--moe-ortho-loss-coeff")
        _check_coefficient(self.moe_var_loss_coeff, "--moe-var-loss-coeff")
        if self.moe_ortho_loss_form not in ORTHO_FORMS:
            raise SpecializationConfigError(
                f"--moe-ortho-loss-form must be one of {', '.join(ORTHO_FORMS)}, "
                f"got {self.moe_ortho_loss_form!r}."
            )
        if self.moe_ortho_loss_kernel not in GRAM_KERNELS:
            raise SpecializationConfigError(
                f"--moe-ortho-loss-kernel must be one of {', '.join(GRAM_KERNELS)}, "
                f"got {self.moe_ortho_loss_kernel!r}."
            )
        if not self.moe_ortho_loss_eps > 0:
            raise SpecializationConfigError(
                f"--moe-ortho-loss-eps must be > 0, got {self.moe_ortho_loss_eps}."
            )
        for flag, target in (
            ("--moe-ortho-loss-target", self.moe_ortho_loss_target),
            ("--moe-var-loss-target", self.moe_var_loss_target),
        ):
            if not (math.isfinite(target) and target > 0):
                raise SpecializationConfigError(f"{flag} must be a finite number > 0, got {target}.")
        if self.moe_loss_calibration_iters < 0 or (
            self.moe_loss_calibration_iters > 0 and not self.auto
        ):
            raise SpecializationConfigError(
                f"--moe-loss-calibration-iters {self.moe_loss_calibration_iters} needs an 'auto' "
                "--moe-ortho-loss-coeff or --moe-var-loss-coeff and a value >= 1; pass 0 to "
                "calibrate on the first batch"
            )

    @property
    def ortho_loss_enabled(self) -> bool:
        return coefficient_enabled(self.moe_ortho_loss_coeff)

    @property
    def var_loss_enabled(self) -> bool:
        return coefficient_enabled(self.moe_var_loss_coeff)

    @property
    def auto(self) -> bool:
        """Some coefficient is calibrated (``"auto"``)."""
        return AUTO in (self.moe_ortho_loss_coeff, self.moe_var_loss_coeff)

    @property
    def enabled_losses(self) -> list[str]:
        """Tracker names of the specialization losses these settings compute."""
        return [name for name, enabled in ((ORTHO_LOSS, self.ortho_loss_enabled),
                                           (VAR_LOSS, self.var_loss_enabled)) if enabled]

    @property
    def auto_targets(self) -> dict[str, float]:
        """Target magnitude of each loss whose coefficient is ``"auto"``, by tracker name."""
        return {name: target for name, coeff, target in (
            (ORTHO_LOSS, self.moe_ortho_loss_coeff, self.moe_ortho_loss_target),
            (VAR_LOSS, self.moe_var_loss_coeff, self.moe_var_loss_target)) if coeff == AUTO}

    def transformer_config_kwargs(self) -> dict:
        """The ``SpecializationConfig`` fields (all but the calibration schedule, which is the
        trainer's)."""
        return {name: value for name, value in vars(self).items()
                if name != "moe_loss_calibration_iters"}
