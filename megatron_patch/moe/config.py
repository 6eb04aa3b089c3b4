"""SpecializationConfig: megatron-core's TransformerConfig plus the loss settings, validated at
construction.

The loss fields, their flags and their own checks are those of ``LossConfig``
(``megatron_patch/moe/loss_config.py``); the checks here are the ones that need the rest of the
model's configuration (routing, dispatcher, fused paths).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_patch.moe.loss_config import LossConfig, SpecializationConfigError

__all__ = ["MLASpecializationConfig", "SpecializationConfig", "SpecializationConfigError"]


@dataclass
class SpecializationConfig(TransformerConfig, LossConfig):
    """TransformerConfig plus the orthogonality (L_o) and variance (L_v) loss settings."""

    def __post_init__(self) -> None:
        TransformerConfig.__post_init__(self)
        LossConfig.__post_init__(self)
        self.validate_specialization()

    def validate_specialization(self) -> None:
        """Raise SpecializationConfigError for model settings under which a loss would be wrong."""
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


@dataclass
class MLASpecializationConfig(MLATransformerConfig, SpecializationConfig):
    """MLATransformerConfig (multi-latent attention: DeepSeek-V2/V3, Moonlight) plus the loss
    settings. MLATransformerConfig comes first: dataclass fields take the default of the last
    base that declares them, and SpecializationConfig re-declares TransformerConfig's
    ``multi_latent_attention=False`` (the other order builds standard attention, silently)."""

    def __post_init__(self) -> None:
        MLATransformerConfig.__post_init__(self)
        LossConfig.__post_init__(self)
        self.validate_specialization()
