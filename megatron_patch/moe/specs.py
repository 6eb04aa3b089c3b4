"""Layer specs that put the specialization router and MoE layer into megatron-core's GPT layers."""

from __future__ import annotations

import copy
from typing import Any, Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_patch.compat import (
    HAS_LOCAL_GROUPED_GEMM,
    MEGATRON_CORE,
    is_moe_entry,
    specialize_moe_entry,
)
from megatron_patch.moe.config import SpecializationConfigError
from megatron_patch.moe.layer import SpecializationMoELayer
from megatron_patch.moe.router import SpecializationRouter


def with_specialization(layer_spec: ModuleSpec) -> ModuleSpec:
    """Return a copy of a TransformerLayer spec whose MoE MLP uses this package's modules.

    Args:
        layer_spec: a megatron-core TransformerLayer spec with an ``MoELayer`` MLP (from
            ``get_gpt_layer_local_spec`` or ``get_gpt_layer_with_transformer_engine_spec`` with
            ``num_experts`` set).

    Returns:
        The spec with ``SpecializationMoELayer`` and ``SpecializationRouter``; experts, shared
        experts, attention and norms are untouched.
    """
    spec = copy.deepcopy(layer_spec)
    spec.submodules.mlp = specialize_moe_entry(
        spec.submodules.mlp, SpecializationMoELayer, SpecializationRouter)
    return spec


def specialize_layers(spec: Any) -> Any:
    """A TransformerLayer spec or a TransformerBlock spec (``layer_specs``: dense and MoE layers
    mixed), each MoE layer with this package's modules (``with_specialization``), dense layers
    as they are."""
    def specialized(layer: Any) -> Any:
        return with_specialization(layer) if is_moe_entry(layer.submodules.mlp) else layer

    if not hasattr(spec, "layer_specs"):
        return specialized(spec)
    spec = copy.copy(spec)
    spec.layer_specs = [specialized(layer) for layer in spec.layer_specs]
    return spec


def check_grouped_gemm(moe_grouped_gemm: bool, use_transformer_engine: bool) -> None:
    """Refuse grouped-GEMM experts where megatron-core would silently build SequentialMLP."""
    if moe_grouped_gemm and not use_transformer_engine and not HAS_LOCAL_GROUPED_GEMM:
        raise SpecializationConfigError(
            f"--moe-grouped-gemm without Transformer Engine: megatron-core {MEGATRON_CORE} has no "
            "grouped-GEMM experts without it (its legacy GroupedMLP went in 0.17) and would "
            "silently build SequentialMLP ones. Install Transformer Engine (the NGC images have "
            "it) or drop --moe-grouped-gemm.")


def get_gpt_block_spec(config: TransformerConfig, *, use_transformer_engine: bool = False) -> Any:
    """This pipeline stage's TransformerBlock spec for ``config`` (megatron-core's: dense and MoE
    layers per ``moe_layer_freq``, multi-latent or standard attention, q/k norms), each MoE layer
    with specialization; TE modules on GPU, local ones on CPU."""
    check_grouped_gemm(config.moe_grouped_gemm, use_transformer_engine)
    return specialize_layers(get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_transformer_engine,
        normalization=config.normalization))


def get_gpt_layer_spec(
    num_experts: int,
    *,
    use_transformer_engine: bool = False,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    normalization: Optional[str] = None,
) -> ModuleSpec:
    """GPT TransformerLayer spec with specialization MoE; TE modules on GPU, local ones on CPU.

    Args:
        num_experts: number of routed experts.
        use_transformer_engine: build on megatron-core's Transformer Engine spec (GPU images).
        moe_grouped_gemm: grouped GEMM experts (TE/grouped_gemm); SequentialMLP otherwise.
        qk_layernorm: normalize queries and keys.
        normalization: ``"LayerNorm"`` or ``"RMSNorm"`` (local spec; TE reads it from config).
    """
    check_grouped_gemm(moe_grouped_gemm, use_transformer_engine)
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        base = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm
        )
    else:
        base = get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=moe_grouped_gemm,
            qk_layernorm=qk_layernorm,
            normalization=normalization,
        )
    return with_specialization(base)
