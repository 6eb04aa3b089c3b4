"""A post-training job from a Hugging Face checkpoint (``--hf-load``): the job's architecture
flags take the checkpoint's values, and a flag given with another value is refused, naming it.

The flags compared are those with a TransformerConfig field the import sets
(``ARCHITECTURE_FLAGS``); settings without a flag here (head dims, norms' epsilon, biases,
multi-latent attention, dense first layers, router groups and scaling) follow the checkpoint
through ``megatron_patch.hf.model`` and cannot be contradicted.
"""

from __future__ import annotations

from typing import Any

from megatron_patch.flags import ConfigError
from megatron_patch.hf.architectures import HFCheckpoint, read_checkpoint

# Job flag (its destination) -> the TransformerConfig field of the checkpoint's configuration.
ARCHITECTURE_FLAGS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "normalization": "normalization",
    "swiglu": "gated_linear_unit",
    "num_experts": "num_moe_experts",
    "moe_router_topk": "moe_router_topk",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    "moe_router_load_balancing_type": "moe_router_load_balancing_type",
    "moe_aux_loss_coeff": "moe_aux_loss_coeff",
    "moe_router_score_function": "moe_router_score_function",
    "moe_router_pre_softmax": "moe_router_pre_softmax",
    "moe_router_enable_expert_bias": "moe_router_enable_expert_bias",
}
# TransformerConfig's defaults of the fields above that a mapping may leave out.
_DEFAULTS = {"moe_shared_expert_intermediate_size": None, "moe_router_enable_expert_bias": False,
             "num_query_groups": None}


def architecture_values(checkpoint: HFCheckpoint) -> dict[str, Any]:
    """Flag destination -> the checkpoint's value, for ``ARCHITECTURE_FLAGS`` and the
    embedding settings."""
    kwargs = checkpoint.transformer_config_kwargs()
    values = {flag: kwargs.get(field, _DEFAULTS.get(field))
              for flag, field in ARCHITECTURE_FLAGS.items()}
    values["untie_embeddings_and_output_weights"] = not checkpoint.tied_embeddings
    values["position_embedding_type"] = "rope"
    values["max_position_embeddings"] = int(checkpoint.hf_config.max_position_embeddings)
    return values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def apply_hf_checkpoint(values: dict[str, Any]) -> dict[str, Any]:
    """The flag values of a ``--hf-load`` job (flag destination -> value, as given by the user
    through flags or YAML) completed with the checkpoint's architecture, and with its tokenizer
    unless ``--tokenizer-model`` names another.

    Raises:
        ConfigError: a given flag contradicts the checkpoint (named with both values), or the
            checkpoint cannot be imported (``HFImportError``).
    """
    checkpoint = read_checkpoint(values["hf_load"])
    architecture = architecture_values(checkpoint)
    contradictions = [
        f"{_flag(name)} {values[name]} (the checkpoint has {value})"
        for name, value in architecture.items() if name in values and values[name] != value]
    if contradictions:
        raise ConfigError(
            f"--hf-load {checkpoint.path} ({checkpoint.architecture.name}) fixes the "
            f"architecture; these flags contradict it: {'; '.join(contradictions)}. Drop them.")
    completed = {**values, **architecture}
    if completed.get("tokenizer_model") is None:
        completed["tokenizer_model"] = str(checkpoint.path)
    return completed
