"""Build the GPT-MoE model of a consistency check from a small dict of model arguments."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.moe.config import SpecializationConfig
from megatron_patch.moe.specs import get_gpt_layer_spec
from megatron_patch.parallel_check.layouts import Layout

LayerSpecFn = Callable[[int], ModuleSpec]

# model_args keys that go to GPTModel; every other key goes to the config class.
GPT_MODEL_KEYS = ("vocab_size", "seq_length", "share_embeddings_and_output_weights",
                  "position_embedding_type")

# Config defaults that make the check deterministic and layout-independent; model_args may
# override them. Dropout is off (RNG streams differ between layouts), everything is fp32.
CONFIG_DEFAULTS: dict[str, Any] = {
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "add_bias_linear": False,
    "moe_token_dispatcher_type": "alltoall",
    "moe_grouped_gemm": False,
    "bf16": False,
    "fp16": False,
    "params_dtype": torch.float32,
    "pipeline_dtype": torch.float32,
}


def local_moe_layer_spec(num_experts: int) -> ModuleSpec:
    """This package's specialization MoE on megatron-core's local (no TE/apex) GPT layer spec,
    with SequentialMLP experts (identical to megatron's MoELayer when both losses are off)."""
    return get_gpt_layer_spec(num_experts)


DEFAULT_CONFIG_CLASS: type = SpecializationConfig
DEFAULT_LAYER_SPEC_FN: LayerSpecFn = local_moe_layer_spec


def make_config(
    model_args: Mapping[str, Any], layout: Layout, config_class: Optional[type] = None
) -> TransformerConfig:
    """Config for `layout`: CONFIG_DEFAULTS, then model_args (minus GPT_MODEL_KEYS), then the
    parallel sizes of `layout`, which model_args must not set."""
    layout_kwargs = {
        "tensor_model_parallel_size": layout.tp,
        "pipeline_model_parallel_size": layout.pp,
        "expert_model_parallel_size": layout.ep,
        "expert_tensor_parallel_size": layout.etp,
        "sequence_parallel": layout.sp,
    }
    clash = sorted(set(layout_kwargs) & set(model_args))
    if clash:
        raise ValueError(f"model_args must not set {clash}: the layout sets them")
    kwargs = dict(CONFIG_DEFAULTS)
    kwargs.update((k, v) for k, v in model_args.items() if k not in GPT_MODEL_KEYS)
    kwargs.update(layout_kwargs)
    kwargs["use_cpu_initialization"] = not torch.cuda.is_available()
    return (config_class or DEFAULT_CONFIG_CLASS)(**kwargs)


def build_model(
    model_args: Mapping[str, Any],
    layout: Layout,
    config_class: Optional[type] = None,
    layer_spec_fn: Optional[LayerSpecFn] = None,
) -> GPTModel:
    """This rank's stage/shard of the GPT-MoE model for `layout`.

    Needs parallel_state initialised with `layout`'s sizes (the model uses its global groups).
    model_args: `vocab_size`, `seq_length`, optional `share_embeddings_and_output_weights`
    (default True) and `position_embedding_type` (default "rope") for GPTModel; all other keys
    (num_layers, hidden_size, num_moe_experts, moe_router_topk, ...) for the config class.
    config_class / layer_spec_fn default to DEFAULT_CONFIG_CLASS / DEFAULT_LAYER_SPEC_FN.
    """
    config = make_config(model_args, layout, config_class)
    spec = (layer_spec_fn or DEFAULT_LAYER_SPEC_FN)(config.num_moe_experts)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model_args["vocab_size"],
        max_sequence_length=model_args["seq_length"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model_args.get(
            "share_embeddings_and_output_weights", True
        ),
        position_embedding_type=model_args.get("position_embedding_type", "rope"),
    )
