"""Layer specs that put the specialization router and MoE layer into megatron-core's GPT layers."""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_patch.compat import HAS_LOCAL_GROUPED_GEMM, MEGATRON_CORE, specialize_moe_entry
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
    if moe_grouped_gemm and not use_transformer_engine and not HAS_LOCAL_GROUPED_GEMM:
        raise SpecializationConfigError(
            f"--moe-grouped-gemm without Transformer Engine: megatron-core {MEGATRON_CORE} has no "
            "grouped-GEMM experts without it (its legacy GroupedMLP went in 0.17) and would "
            "silently build SequentialMLP ones. Install Transformer Engine (the NGC images have "
            "it) or drop --moe-grouped-gemm.")
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
