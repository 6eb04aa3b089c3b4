"""Fixed coefficients and options of the specialization losses for DeepSpeed-MoE layers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_patch.moe.losses import ORTHO_FORMS


@dataclass(frozen=True)
class SpecializationSettings:
    """beta (L_o), gamma (L_v), the L_o form, its eps and normalization; validated when built.

    A coefficient of 0 disables its loss (it is then not computed). The total loss a DeepSpeed
    MoE layer returns is ``l_aux + ortho_coeff * L_o + var_coeff * L_v``.
    """

    ortho_coeff: float = 0.0
    var_coeff: float = 0.0
    ortho_form: str = "span"
    ortho_eps: float = 1e-6
    ortho_normalize: bool = False

    def __post_init__(self) -> None:
        for name in ("ortho_coeff", "var_coeff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number >= 0, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (0 disables the loss), "
                                 f"got {value!r}")
        if self.ortho_form not in ORTHO_FORMS:
            raise ValueError(f"unknown ortho_form {self.ortho_form!r}; choose one of {ORTHO_FORMS}")
        if not (math.isfinite(self.ortho_eps) and self.ortho_eps > 0):
            raise ValueError(f"ortho_eps must be a finite number > 0, got {self.ortho_eps!r}")

    def check_topk(self, k: int) -> None:
        """Refuse L_o with top-1 routing: a single expert output has nothing to be orthogonal to."""
        if self.ortho_coeff > 0 and k < 2:
            raise ValueError(f"ortho_coeff={self.ortho_coeff} needs top-k routing with k >= 2 "
                             f"(got k={k}): L_o is identically zero for k=1. Use k >= 2 or set "
                             "ortho_coeff=0.")

    @property
    def ortho_enabled(self) -> bool:
        return self.ortho_coeff > 0

    @property
    def var_enabled(self) -> bool:
        return self.var_coeff > 0
