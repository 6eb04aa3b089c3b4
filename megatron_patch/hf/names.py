"""Parameter names of this rank's megatron model -> the global names mbridge's mappings read.

mbridge names parameters as megatron-core's Transformer Engine spec with grouped-GEMM experts
does, over the whole model (one process): the input norm fused into ``linear_qkv``
(``...self_attention.linear_qkv.layer_norm_weight``; with multi-latent attention the q and kv
norms fused into ``linear_q_up_proj`` / ``linear_kv_up_proj`` instead), experts as
``...mlp.experts.linear_fc1.weight<e>`` with the global expert index ``e``. This project's local
spec (CPU) and SequentialMLP experts name them ``...input_layernorm.weight`` and
``...mlp.experts.local_experts.<i>.linear_fc1.weight``, and a rank holds only its pipeline
stage's layers (local layer indices) and its expert-parallel share of the experts.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from megatron_patch.training.lora import BASE, LoRALinear, is_adapter
from megatron_patch.training.param_names import global_parameter_names

_SEQUENTIAL_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.local_experts\.(?P<expert>\d+)\.(?P<linear>linear_fc[12])"
    r"\.(?P<kind>weight|bias)$")
# Local-spec norms that the Transformer Engine spec fuses into the next linear layer, for
# standard and for multi-latent attention.
_FUSED_NORMS = {".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight"}
_FUSED_MLA_NORMS = {
    ".self_attention.q_layernorm.weight": ".self_attention.linear_q_up_proj.layer_norm_weight",
    ".self_attention.kv_layernorm.weight": ".self_attention.linear_kv_up_proj.layer_norm_weight",
}
EXPERT_MARK = ".mlp.experts."


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _transferable_names(model: torch.nn.Module) -> list[str]:
    return ([name for name, _ in model.named_parameters() if not is_adapter(name)]
            + [name for name, _ in model.named_buffers() if name.endswith(".expert_bias")])


def transferable(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors an HF checkpoint holds, by local name, one at a time: every parameter but
    LoRA adapters (an adapted layer's weight with its adapter merged in) and the router's
    ``expert_bias`` buffer (the loss-coefficient buffers and token counters are not
    weights)."""
    modules = dict(model.named_modules())
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in _transferable_names(model):
        owner = modules.get(name.rsplit(".", 2)[0])
        if isinstance(owner, LoRALinear) and name.endswith(f".{BASE}.weight"):
            yield name, owner.merged_weight()
        else:
            yield name, tensors[name]


def global_names(model: torch.nn.Module) -> dict[str, str]:
    """Local name -> mbridge's global name for every ``transferable`` tensor of this rank:
    layer and expert indices made global (``training.param_names``), an adapted layer's base
    weight named as the layer's, norms and experts named as the Transformer Engine spec does."""
    fused_norms = (_FUSED_MLA_NORMS if getattr(model.config, "multi_latent_attention", False)
                   else _FUSED_NORMS)
    local_names = _transferable_names(model)
    names = {}
    for local, name in global_parameter_names(model, local_names).items():
        name = name.replace(f".{BASE}.", ".")
        for local_suffix, fused in fused_norms.items():
            if name.endswith(local_suffix):
                name = name[: -len(local_suffix)] + fused
        expert = _SEQUENTIAL_EXPERT.match(name)
        if expert:
            name = (f"{expert.group('prefix')}.{expert.group('linear')}.{expert.group('kind')}"
                    f"{expert.group('expert')}")
        names[local] = name
    return names


def is_expert(name: str) -> bool:
    """Routed-expert weights: split over the expert-tensor-parallel group, owned per expert."""
    return EXPERT_MARK in name
