"""Configuration of the specialization losses: a TransformerConfig subclass, validated at construction.

Each field maps to a Megatron-style flag (see megatron_patch/training/arguments.py):

=========================  ===============================  =====================================
field                      flag                             meaning
=========================  ===============================  =====================================
moe_ortho_loss_coeff       --moe-ortho-loss-coeff           beta >= 0, or "auto" (calibrated)
moe_ortho_loss_form        --moe-ortho-loss-form            "span" (released code) | "pairwise"
moe_ortho_loss_eps         --moe-ortho-loss-eps             regularizer of the Gram solves
moe_ortho_loss_normalize   --moe-ortho-loss-normalize       L_o of the unit-normalized outputs
moe_ortho_loss_target      --moe-ortho-loss-target          magnitude "auto" calibrates beta*L_o to
moe_ortho_loss_kernel      --moe-ortho-loss-kernel          "torch" | "triton" (fused, CUDA)
moe_var_loss_coeff         --moe-var-loss-coeff             gamma >= 0, or "auto" (calibrated)
moe_var_loss_target        --moe-var-loss-target            magnitude "auto" calibrates gamma*|L_v| to
=========================  ===============================  =====================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.moe.gated_gram import GRAM_KERNELS
from megatron_patch.moe.losses import ORTHO_FORMS

AUTO = "auto"
Coefficient = Union[float, str]


class SpecializationConfigError(ValueError):
    """A specialization-loss setting that cannot work; the message names the flag and the fix."""


def _check_coefficient(value: Coefficient, flag: str) -> None:
    if isinstance(value, str):
        if value != AUTO:
            raise SpecializationConfigError(
                f"{flag} must be a non-negative number or '{AUTO}', got {value!r}."
            )
        return
    if not math.isfinite(value) or value < 0:
        raise SpecializationConfigError(
            f"{flag} must be a finite number >= 0 (0 disables the loss) or '{AUTO}', got {value}."
        )


def coefficient_enabled(value: Coefficient) -> bool:
    """True when the loss with this coefficient is part of the objective."""
    return value == AUTO or float(value) > 0


@dataclass
class SpecializationConfig(TransformerConfig):
    """TransformerConfig plus the orthogonality (L_o) and variance (L_v) loss settings."""

    moe_ortho_loss_coeff: Coefficient = 0.0
    moe_ortho_loss_form: str = "span"
    moe_ortho_loss_eps: float = 1e-6
    moe_ortho_loss_normalize: bool = False
    moe_ortho_loss_target: float = 1e-4
    moe_ortho_loss_kernel: str = "torch"
    moe_var_loss_coeff: Coefficient = 0.0
    moe_var_loss_target: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_specialization()

    @property
    def ortho_loss_enabled(self) -> bool:
        return coefficient_enabled(self.moe_ortho_loss_coeff)

    @property
    def var_loss_enabled(self) -> bool:
        return coefficient_enabled(self.moe_var_loss_coeff)

    def validate_specialization(self) -> None:
        """Raise SpecializationConfigError for settings under which a loss would be wrong."""
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
        if not (self.ortho_loss_enabled or self.var_loss_enabled):
            return
        if self.num_moe_experts is None:
            raise SpecializationConfigError(
                "--moe-ortho-loss-coeff / --moe-var-loss-coeff need an MoE model: set --num-experts."
            )
        if self.var_loss_enabled:
            self._validate_var_loss()
        if self.ortho_loss_enabled:
            self._validate_ortho_loss()

    def _validate_var_loss(self) -> None:
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            raise SpecializationConfigError(
                "--moe-var-loss-coeff needs --moe-router-score-function softmax or sigmoid, "
                f"got {self.moe_router_score_function!r}."
            )
        types = self.moe_router_load_balancing_type
        if "sinkhorn" in ([types] if isinstance(types, str) else types):
            raise SpecializationConfigError(
                "--moe-var-loss-coeff is not defined for --moe-router-load-balancing-type sinkhorn "
                "(its routing scores are not the softmax/sigmoid scores); use aux_loss, "
                "seq_aux_loss, global_aux_loss or none."
            )

    def _validate_ortho_loss(self) -> None:
        if self.moe_router_topk < 2:
            raise SpecializationConfigError(
                "--moe-ortho-loss-coeff needs --moe-router-topk >= 2: with one expert per token "
                "the orthogonality loss is identically zero. Set --moe-ortho-loss-coeff 0 or "
                "route to more experts."
            )
        if self.moe_token_dispatcher_type != "alltoall":
            raise SpecializationConfigError(
                "--moe-ortho-loss-coeff needs --moe-token-dispatcher-type alltoall (got "
                f"{self.moe_token_dispatcher_type!r}): the alltoall dispatcher brings each token's "
                "k expert outputs back to the rank that owns the token, so L_o costs no extra "
                "communication; the allgather and flex dispatchers sum them on the expert ranks "
                "and never hold them side by side."
            )
        unsupported = {
            "--moe-permute-fusion": self.moe_permute_fusion,
            "--moe-router-padding-for-quantization": self.moe_router_padding_for_quantization,
            "--moe-apply-probs-on-input": self.moe_apply_probs_on_input,
            "--moe-latent-size": bool(self.moe_latent_size),
        }
        for flag, enabled in unsupported.items():
            if enabled:
                raise SpecializationConfigError(
                    f"--moe-ortho-loss-coeff does not support {flag} yet: L_o regroups the "
                    "combined expert outputs by token with the unfused permutation map. Remove "
                    f"{flag} or set --moe-ortho-loss-coeff 0."
                )
        if self.moe_ortho_loss_kernel == "triton" and self.moe_pad_expert_input_to_capacity:
            raise SpecializationConfigError(
                "--moe-ortho-loss-kernel triton does not support "
                "--moe-pad-expert-input-to-capacity: the fused kernel writes only the rows that "
                "are a token's slots, not the capacity padding rows. Use --moe-ortho-loss-kernel "
                "torch."
            )
        if self.cuda_graph_impl != "none":
            raise SpecializationConfigError(
                "--moe-ortho-loss-coeff does not support CUDA graphs (--cuda-graph-impl "
                f"{self.cuda_graph_impl}): the dispatcher state L_o reads is not captured. "
                "Use --cuda-graph-impl none."
            )
