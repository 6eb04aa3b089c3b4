"""Which Hugging Face MoE architectures import, and the megatron-core configuration of each.

A checkpoint directory (``save_pretrained`` layout: ``config.json``, ``*.safetensors``, tokenizer
files) is read by ``read_checkpoint``; its ``model_type`` selects an mbridge bridge, whose own
HF-config -> TransformerConfig mapping is taken and then corrected where it is wrong or
RL-specific for this use (each correction names the HF field it follows):

    qwen3_moe    Qwen3-MoE     top-k renormalization from ``norm_topk_prob``; q/k norms
    qwen2_moe    Qwen2-MoE     ``norm_topk_prob``; sigmoid-gated shared expert; ``qkv_bias``
    mixtral      Mixtral       softmax then top-k, renormalized (mbridge skips the renormalization)
    deepseek_v3  DeepSeek-V3,  multi-latent attention, dense first layers, shared experts,
                 Moonlight     sigmoid scores + expert bias, group-limited top-k, scaling factor
    deepseek_v2  DeepSeek-V2   the same layers with softmax scores (mbridge has no V2 bridge: its
                 (-Lite)       V3 bridge maps the V2 tensors, which have the same names)

Everywhere: the model's own load-balancing loss (``aux_loss`` with its ``router_aux_loss_coef``;
DeepSeek: ``seq_aux_loss`` with its ``aux_loss_alpha``, 1e-4 as in the DeepSeek-V3 report when
the config has none; mbridge switches it off for RL), ``head_dim`` derived when the config
leaves it empty, and the runtime settings (parallel sizes, dtype, fused kernels, dispatcher)
are this project's, not mbridge's. Settings the import cannot reproduce (sliding windows, RoPE
scaling other than DeepSeek's YaRN, dense layers between Qwen MoE layers, non-SiLU activations,
attention output biases, multi-token prediction, group rules megatron ranks differently) are
refused, each naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_patch.compat import MEGATRON_CORE, MLA_REQUIRES_Q_NORM
from megatron_patch.flags import ConfigError

HF_CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class HFImportError(ConfigError):
    """A Hugging Face checkpoint that cannot be imported; the message names the fix (reported
    as bad input: one line, exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One supported ``model_type``.

    name: what the README and errors call it.
    bridge: the mbridge bridge class (its name mapping and weight formats are used).
    corrections: HF config -> TransformerConfig fields replacing mbridge's.
    refusals: HF config -> list of (field, reason) the import cannot reproduce.
    multi_latent_attention: the model is built with ``MLASpecializationConfig``.
    """

    name: str
    bridge: Callable[[], type]
    corrections: Callable[[Any], dict]
    refusals: Callable[[Any], list[tuple[str, str]]]
    multi_latent_attention: bool = False


def _bridge(module: str, cls: str) -> Callable[[], type]:
    def load() -> type:
        import importlib

        return getattr(importlib.import_module(f"mbridge.models.{module}"), cls)

    return load


def _topk_renormalized(hf_config: Any) -> dict:
    # megatron: pre_softmax=False is softmax over the top-k logits (= renormalized top-k scores).
    return {"moe_router_pre_softmax": not getattr(hf_config, "norm_topk_prob", True)}


def _common_refusals(hf_config: Any) -> list[tuple[str, str]]:
    found = []
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        found.append(("hidden_act", f"{hf_config.hidden_act!r}: only SiLU-gated experts import"))
    if getattr(hf_config, "use_sliding_window", False) or getattr(hf_config, "sliding_window",
                                                                  None):
        found.append(("sliding_window", "sliding-window attention has no megatron-core "
                      "equivalent here"))
    if getattr(hf_config, "rope_scaling", None):
        found.append(("rope_scaling", f"{hf_config.rope_scaling}: RoPE scaling is not mapped"))
    if getattr(hf_config, "mlp_only_layers", None):
        found.append(("mlp_only_layers", "dense layers between MoE layers are not mapped"))
    if getattr(hf_config, "decoder_sparse_step", 1) != 1:
        found.append(("decoder_sparse_step", "only every-layer MoE models import"))
    return found


def _qwen3_refusals(hf_config: Any) -> list[tuple[str, str]]:
    found = _common_refusals(hf_config)
    if getattr(hf_config, "attention_bias", False):
        found.append(("attention_bias", "the output projection bias has no megatron field"))
    return found


# The DeepSeek-V3 report's sequence-wise balance loss weight, for configs that state none.
DEEPSEEK_V3_SEQ_AUX_ALPHA = 1e-4


def _rope_scaling_type(hf_config: Any) -> Optional[str]:
    scaling = getattr(hf_config, "rope_scaling", None)
    return None if not scaling else scaling.get("rope_type", scaling.get("type"))


def _deepseek_corrections(hf_config: Any, v3: bool) -> dict:
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    kwargs = dict(
        moe_router_topk_scaling_factor=float(hf_config.routed_scaling_factor),
        moe_router_load_balancing_type=(
            "seq_aux_loss" if getattr(hf_config, "seq_aux", True) else "aux_loss"),
        moe_aux_loss_coeff=float(getattr(hf_config, "aux_loss_alpha", None)
                                 or (DEEPSEEK_V3_SEQ_AUX_ALPHA if v3 else 0.0)),
        rope_type="yarn" if scaling else "rope",
        original_max_position_embeddings=int(scaling.get(
            "original_max_position_embeddings", hf_config.max_position_embeddings)),
    )
    if scaling:
        kwargs.update(rotary_scaling_factor=float(scaling["factor"]),
                      mscale=float(scaling.get("mscale", 1.0)),
                      mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)),
                      beta_fast=float(scaling.get("beta_fast", 32)),
                      beta_slow=float(scaling.get("beta_slow", 1)))
    if v3:
        # sigmoid scores, expert bias (e_score_correction_bias) for the choice only,
        # renormalized top-k (norm_topk_prob, checked), group-limited choice by top-2 sums.
        kwargs.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                      moe_router_pre_softmax=False)
        group_key = "n_group"
    else:
        # softmax over all experts, top-k not renormalized (transformers' V2 gate ignores
        # norm_topk_prob), groups by their best expert (checked to equal megatron's rule).
        kwargs.update(moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
                      moe_router_pre_softmax=True)
        group_key = "n_group" if hf_config.topk_method == "group_limited_greedy" else None
    groups = getattr(hf_config, group_key, None) if group_key else None
    if groups and groups > 1:
        kwargs.update(moe_router_num_groups=int(groups),
                      moe_router_group_topk=int(hf_config.topk_group))
    return kwargs


def _deepseek_refusals(hf_config: Any, v3: bool) -> list[tuple[str, str]]:
    found = []
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        found.append(("hidden_act", f"{hf_config.hidden_act!r}: only SiLU-gated experts import"))
    if _rope_scaling_type(hf_config) not in (None, "yarn"):
        found.append(("rope_scaling", f"{hf_config.rope_scaling}: only YaRN scaling is mapped"))
    if getattr(hf_config, "num_nextn_predict_layers", 0):
        found.append(("num_nextn_predict_layers", "multi-token-prediction layers are not imported"))
    for field in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, field, False):
            found.append((field, "biases have no megatron field here"))
    if hf_config.q_lora_rank is None and MLA_REQUIRES_Q_NORM:
        found.append(("q_lora_rank", f"None (uncompressed queries): megatron-core "
                      f"{MEGATRON_CORE}'s multi-latent attention then requires a query norm "
                      "this model does not have; import it with megatron-core 0.16.1 to 0.18"))
    groups = getattr(hf_config, "n_group", 1) or 1
    # megatron ranks groups by the sum of their top (topk // group_topk) scores.
    per_group = hf_config.num_experts_per_tok // max(getattr(hf_config, "topk_group", 1) or 1, 1)
    if v3:
        if not hf_config.norm_topk_prob:
            found.append(("norm_topk_prob", "False: megatron renormalizes sigmoid top-k scores"))
        if groups > 1 and per_group != 2:
            found.append(("topk_group", "groups are ranked by their top-2 scores, megatron by "
                          f"the top num_experts_per_tok // topk_group = {per_group}"))
    else:
        if hf_config.topk_method not in ("greedy", "group_limited_greedy"):
            found.append(("topk_method", f"{hf_config.topk_method!r} is not mapped"))
        if hf_config.topk_method == "group_limited_greedy" and groups > 1 and per_group != 1:
            found.append(("topk_group", "groups are ranked by their best score, megatron by "
                          f"the top num_experts_per_tok // topk_group = {per_group}"))
    return found


ARCHITECTURES: dict[str, Architecture] = {
    "qwen3_moe": Architecture(
        "Qwen3-MoE", _bridge("qwen3moe", "Qwen3MoEBridge"), _topk_renormalized, _qwen3_refusals),
    "qwen2_moe": Architecture(
        "Qwen2-MoE", _bridge("qwen2moe", "Qwen2MoEBridge"),
        lambda c: {**_topk_renormalized(c), "moe_shared_expert_gate": True,
                   "add_qkv_bias": bool(getattr(c, "qkv_bias", True))},
        _common_refusals),
    "mixtral": Architecture(
        "Mixtral", _bridge("mixtral", "MixtralBridge"),
        lambda c: {"moe_router_pre_softmax": False}, _common_refusals),
    "deepseek_v3": Architecture(
        "DeepSeek-V3 / Moonlight", _bridge("deepseek_v3", "DeepseekV3Bridge"),
        lambda c: _deepseek_corrections(c, v3=True), lambda c: _deepseek_refusals(c, v3=True),
        multi_latent_attention=True),
    "deepseek_v2": Architecture(
        "DeepSeek-V2", _bridge("deepseek_v3", "DeepseekV3Bridge"),
        lambda c: _deepseek_corrections(c, v3=False), lambda c: _deepseek_refusals(c, v3=False),
        multi_latent_attention=True),
}

# Fields of mbridge's TransformerConfig that are runtime choices of the job, not the model's;
# this project sets them (``megatron_patch.hf.model``).
RUNTIME_FIELDS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "expert_tensor_parallel_size", "virtual_pipeline_model_parallel_size",
    "context_parallel_size", "sequence_parallel", "pipeline_dtype", "params_dtype", "bf16",
    "variable_seq_lengths", "masked_softmax_fusion", "persist_layer_norm",
    "bias_activation_fusion", "bias_dropout_fusion", "use_cpu_initialization",
    "overlap_p2p_comm", "batch_p2p_comm", "moe_grouped_gemm", "moe_shared_expert_overlap",
    "moe_router_bias_update_rate", "moe_token_dispatcher_type", "attention_backend",
)
# Keys mbridge passes that are no TransformerConfig field (GPTModel takes the sequence length;
# multi-token prediction is refused).
_NOT_CONFIG_FIELDS = ("max_position_embeddings", "mtp_num_layers", "mtp_loss_scaling_factor")


def supported() -> str:
    """``"qwen3_moe (Qwen3-MoE), ..."`` for messages and the README."""
    return ", ".join(f"{key} ({arch.name})" for key, arch in ARCHITECTURES.items())


@dataclasses.dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint directory and what it says about its model.

    path: the directory. hf_config: its transformers config. architecture: the supported
    architecture of its ``model_type``. weight_files: HF tensor name -> safetensors file.
    """

    path: Path
    hf_config: Any
    architecture: Architecture
    weight_files: dict[str, Path]

    @property
    def model_type(self) -> str:
        return self.hf_config.model_type

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.hf_config, "tie_word_embeddings", False))

    def bridge(self) -> Any:
        """An mbridge bridge of this model for its name mapping and weight formats only (its
        own model construction, parallel state and distributed load are not used)."""
        bridge = object.__new__(self.architecture.bridge())
        bridge.hf_config = self.hf_config
        bridge.extra_args = {}
        bridge.dtype = None  # tensors keep their dtype; megatron_patch.hf casts to the parameter's
        bridge.make_vocab_size_divisible_by = None
        return bridge

    def transformer_config_kwargs(self) -> dict:
        """The model's TransformerConfig fields: mbridge's mapping of the HF config with this
        module's corrections, without the runtime fields (``RUNTIME_FIELDS``)."""
        bridge = self.bridge()
        bridge.mpu = _SINGLE_PROCESS
        bridge.TransformerConfigClass = dict  # _build_config returns its keyword arguments
        kwargs = bridge._build_config()
        for name in RUNTIME_FIELDS + _NOT_CONFIG_FIELDS:
            kwargs.pop(name, None)
        kwargs["moe_router_load_balancing_type"] = "aux_loss"
        kwargs["moe_aux_loss_coeff"] = float(getattr(self.hf_config, "router_aux_loss_coef", 0.0))
        kwargs.update(self.architecture.corrections(self.hf_config))
        return kwargs


class _SingleProcess:
    """The parallel sizes mbridge's config mapping reads (all 1; RUNTIME_FIELDS drops them)."""

    tp_size = pp_size = ep_size = etp_size = cp_size = 1
    vpp_size = None


_SINGLE_PROCESS = _SingleProcess()


def read_checkpoint(path: str | Path) -> HFCheckpoint:
    """Read a Hugging Face checkpoint directory's config and weight index.

    Raises:
        HFImportError: no such directory, no config.json, no safetensors weights, an
            unsupported ``model_type``, or a setting the import cannot reproduce.
    """
    directory = Path(path)
    if not (directory / HF_CONFIG_FILE).is_file():
        raise HFImportError(
            f"{directory}: no {HF_CONFIG_FILE} there; give a Hugging Face checkpoint directory "
            "(written by save_pretrained, or downloaded with huggingface-cli download)")
    from transformers import AutoConfig

    raw = json.loads((directory / HF_CONFIG_FILE).read_text())
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFImportError(
            f"{directory}: model_type {model_type!r} is not supported; supported: {supported()}")
    hf_config = AutoConfig.from_pretrained(directory)
    architecture = ARCHITECTURES[model_type]
    refused = architecture.refusals(hf_config)
    if refused:
        reasons = "; ".join(f"{field}: {reason}" for field, reason in refused)
        raise HFImportError(f"{directory}: {architecture.name} settings not supported: {reasons}")
    hf_config = copy.deepcopy(hf_config)
    if getattr(hf_config, "head_dim", None) is None:
        # mbridge's QKV merge reads head_dim and fails on an explicit None.
        hf_config.head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    return HFCheckpoint(directory, hf_config, architecture, _weight_files(directory))


def _weight_files(directory: Path) -> dict[str, Path]:
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SAFETENSORS_SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as handle:
            return {name: single for name in handle.keys()}
    raise HFImportError(
        f"{directory}: no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE}; only safetensors "
        "checkpoints import (save with save_pretrained(..., safe_serialization=True))")
